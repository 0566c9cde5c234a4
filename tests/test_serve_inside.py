"""`/api/explain`, the views inside the model and the runs API, through FastAPI's TestClient and a
real server on 127.0.0.1: every input form and error, 403 off loopback, the CLI's own errors."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mnistlab import inside
from mnistlab.data import load_mnist
from mnistlab.predict import Predictor
from mnistlab.serve import create_app
from mnistlab.serve_runs import train_allowed

LIMIT = 200_000


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.default()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def client(predictor, runs_dir, data_root):
    app = create_app(predictor, max_upload_bytes=LIMIT, runs_dir=runs_dir, train_allowed=True,
                     root=data_root)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def digits(data_root):
    images, labels = load_mnist(data_root, "test")
    return images[:10].numpy(), labels[:10].numpy()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def check_explanation(body: dict, predictor: Predictor, pixels: torch.Tensor) -> None:
    assert {"label", "probabilities", "saliency"} <= set(body)
    sal = torch.tensor(body["saliency"])
    assert sal.shape == (28, 28)
    expected = inside.integrated_gradients(predictor.model, pixels)
    assert body["label"] == int(expected.labels[0])
    torch.testing.assert_close(sal, expected.attributions[0], atol=1e-5, rtol=1e-3)
    assert body["probabilities"] == pytest.approx(expected.probabilities[0].tolist(), abs=1e-6)
    assert (sal[pixels == 0] == 0).all()


def test_explain_every_input_form(client, predictor, digits):
    images, labels = digits
    for i in range(2):
        data = png(images[i])
        pixels = predictor.preprocess(data)
        forms = [
            {"files": {"file": ("d.png", data, "image/png")}},
            {"json": {"image": base64.b64encode(data).decode()}},
            {"json": {"image": "data:image/png;base64," + base64.b64encode(data).decode()}},
        ]
        for form in forms:
            r = client.post("/api/explain", **form)
            assert r.status_code == 200, r.text
            check_explanation(r.json(), predictor, pixels)
            assert r.json()["label"] == labels[i]
        raw = torch.from_numpy(images[i]).float() / 255
        r = client.post("/api/explain", json={"pixels": raw.tolist()})
        assert r.status_code == 200
        check_explanation(r.json(), predictor, raw)


ERROR_CASES = {
    "no ink (pixels)": {"json": {"pixels": [[0.0] * 28] * 28}},
    "no ink (image)": {"files": {"file": ("w.png", png(np.full((40, 40), 255, np.uint8)),
                                          "image/png")}},
    "not an image": {"files": {"file": ("x.png", b"not a picture", "image/png")}},
    "bad base64": {"json": {"image": "###"}},
    "both keys": {"json": {"image": "aGk=", "pixels": [[0.0] * 28] * 28}},
    "wrong shape": {"json": {"pixels": [[0.5] * 27] * 28}},
    "out of range": {"json": {"pixels": [[1.5] * 28] * 28}},
    "malformed json": {"content": b"{", "headers": {"content-type": "application/json"}},
    "unsupported type": {"content": b"hi", "headers": {"content-type": "text/plain"}},
    "no file field": {"files": {"other": ("x.png", b"x", "image/png")}},
    "too large": {"files": {"file": ("big.png", b"\0" * (LIMIT + 10), "image/png")}},
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_explain_errors_are_those_of_predict(client, case):
    predict = client.post("/api/predict", **ERROR_CASES[case])
    explain = client.post("/api/explain", **ERROR_CASES[case])
    assert predict.status_code >= 400
    assert explain.status_code == predict.status_code, explain.text
    assert explain.json() == predict.json()


def test_explain_is_in_the_api_docs(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/explain" in paths and "/api/runs" in paths


def test_confusion_matrix_and_its_digits(client, data_root, predictor):
    r = client.get("/api/inside/confusion")
    assert r.status_code == 200
    cm = r.json()
    m = np.array(cm["matrix"])
    assert m.shape == (10, 10) and m.sum() == 10_000 == cm["count"]
    assert cm["accuracy"] == pytest.approx(100 * np.trace(m) / 10_000)
    images, labels = load_mnist(data_root, "test")
    listed = [i for indices in cm["cells"].values() for i in indices]
    pred = dict(zip(listed, predictor.predict_pixels(images[listed].float() / 255).labels.tolist(),
                    strict=True))
    for key, indices in cm["cells"].items():
        t, p = map(int, key.split(","))
        assert len(indices) == min(60, m[t, p])
        assert all(labels[i] == t and pred[i] == p for i in indices)
    one = client.get(f"/api/mnist/test/{cm['cells']['4,9'][0]}.png")
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(one.content)).size == (28, 28)
    assert client.get("/api/mnist/test/10000.png").status_code == 404
    assert client.get("/api/inside/confusion?run=nope").status_code == 404


def test_inside_page_is_local(client):
    page = client.get("/inside")
    assert page.status_code == 200 and "default-src 'self'" in page.headers[
        "content-security-policy"]
    for asset in ("/static/inside.js", "/static/lab.js", "/static/lab.css", "/static/why.js",
                  "/static/run.js", "/static/runs.js"):
        assert client.get(asset).status_code == 200
    assert "http" not in client.get("/static/inside.js").text.replace("http://www.w3", "")


# --- the runs API ----------------------------------------------------------------------------


@given(st.sampled_from(["127.0.0.1", "127.5.6.7", "::1", "[::1]", "localhost", "LOCALHOST"]))
def test_loopback_hosts_may_train(host):
    assert train_allowed(host, allow_train=False)


@given(st.sampled_from(["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.org", "8.8.8.8",
                        "fe80::1"]), st.booleans())
def test_other_hosts_train_only_when_allowed(host, allow):
    assert train_allowed(host, allow_train=allow) is allow


@pytest.fixture(scope="module")
def refusing_server(predictor, runs_dir):
    """A real uvicorn server on 127.0.0.1 whose app was made as for a non-loopback host."""
    app = create_app(predictor, runs_dir=runs_dir, train_allowed=train_allowed("0.0.0.0", False))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_start_stop_resume_refused_off_loopback(refusing_server, runs_dir):
    for path in ("/api/runs", "/api/runs/x/stop", "/api/runs/x/resume"):
        r = httpx.post(refusing_server + path, json={"epochs": "1"}, timeout=10)
        assert r.status_code == 403, path
        assert r.headers["content-type"] == "application/json"
        assert "--allow-train" in r.json()["detail"]
    listed = httpx.get(refusing_server + "/api/runs", timeout=10).json()
    assert listed["train_allowed"] is False
    assert list(runs_dir.iterdir()) == []  # nothing was started


BAD_FORMS = [
    {"epochs": "0"},
    {"epochs": "two"},
    {"lr": "fast"},
    {"lr": "-1"},
    {"batch_size": "0"},
    {"recipe": "nope"},
    {"model": "resnet"},
    {"train_limit": "-5"},
]


@pytest.mark.parametrize("form", BAD_FORMS, ids=[json.dumps(f) for f in BAD_FORMS])
def test_bad_form_values_get_the_cli_error(client, cli, form, runs_dir):
    r = client.post("/api/runs", json=form)
    assert r.status_code == 422
    args = [a for k, v in form.items() for a in (f"--{k.replace('_', '-')}", v)]
    done = cli("train", *args, "--runs-dir", runs_dir)
    assert done.returncode != 0
    assert done.stderr.strip() == f"mnistlab: error: {r.json()['detail']}"
    assert [p.name for p in runs_dir.iterdir()] == []


def test_unknown_form_fields_and_bodies_are_refused(client):
    assert client.post("/api/runs", json={"epochz": "1"}).status_code == 422
    assert client.post("/api/runs", content=b"[1]",
                       headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/api/runs/nope/stop").status_code == 409
    assert client.post("/api/runs/nope/resume").status_code == 404
    assert client.get("/api/runs/..%2Fx").status_code == 404
