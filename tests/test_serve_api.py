"""The JSON API of `mnistlab serve` through FastAPI's TestClient: every input form, every error."""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mnistlab.data import load_mnist
from mnistlab.errors import MnistlabError
from mnistlab.predict import Predictor
from mnistlab.serve import create_app

LIMIT = 200_000  # a small upload limit so the 413 cases stay cheap


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.default()  # the bundled model


@pytest.fixture(scope="module")
def client(predictor: Predictor):
    with TestClient(create_app(predictor, max_upload_bytes=LIMIT)) as c:
        yield c


@pytest.fixture(scope="module")
def digits(data_root) -> tuple[np.ndarray, np.ndarray]:
    """The first 30 MNIST test digits (uint8 [30, 28, 28]) and their labels."""
    images, labels = load_mnist(data_root, "test")
    return images[:30].numpy(), labels[:30].numpy()


def encode(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def photo_like(digit: np.ndarray) -> np.ndarray:
    """Dark ink on light paper, 8× larger, off centre on a bigger canvas."""
    big = np.asarray(Image.fromarray(digit).resize((224, 224), Image.BILINEAR))
    page = np.full((400, 360), 235, np.uint8)
    page[40:264, 110:334] = 235 - (big.astype(np.int32) * 215 // 255)
    return page


def decode_png(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.mode == "L" and image.size == (28, 28)
    return np.asarray(image)


def check_answer(body: dict, predictor: Predictor) -> None:
    assert set(body) == {"label", "probability", "probabilities", "preprocessed", "model"}
    probs = body["probabilities"]
    assert len(probs) == 10 and all(0 <= p <= 1 for p in probs)
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-4)
    assert body["label"] == int(np.argmax(probs))
    assert body["probability"] == pytest.approx(max(probs))
    assert body["model"] == predictor.info["name"]
    decode_png(body["preprocessed"])


def post_file(client: TestClient, data: bytes, name: str = "digit.png", ctype="image/png"):
    return client.post("/api/predict", files={"file": (name, data, ctype)})


# --- the three input forms -------------------------------------------------------------------


def test_multipart_png_reads_mnist_test_digits(client, predictor, digits):
    images, labels = digits
    got = []
    for image in images:
        response = post_file(client, encode(image))
        assert response.status_code == 200, response.text
        check_answer(response.json(), predictor)
        got.append(response.json()["label"])
    assert (np.array(got) == labels).sum() >= 29, (got, labels.tolist())


def test_multipart_answer_matches_the_library(client, predictor, digits):
    data = encode(digits[0][0])
    body = post_file(client, data).json()
    (expected,) = predictor.predict([data])
    assert body["label"] == expected.label
    assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
    seen = decode_png(body["preprocessed"]).astype(np.float32) / 255
    assert np.abs(seen - expected.image.numpy()).max() <= 1 / 255 + 1e-6


def test_multipart_jpeg_photo_like_digit(client, predictor, digits):
    images, labels = digits
    for image, label in zip(images[:5], labels[:5], strict=True):
        jpeg = encode(photo_like(image), "JPEG", quality=85)
        response = post_file(client, jpeg, "photo.jpg", "image/jpeg")
        assert response.status_code == 200, response.text
        body = response.json()
        check_answer(body, predictor)
        assert body["label"] == label
        # What the model saw is white ink on black, like MNIST.
        seen = decode_png(body["preprocessed"])
        assert seen[0].max() == 0 and seen.max() > 200


def test_json_base64_image_plain_and_data_url(client, predictor, digits):
    images, labels = digits
    png = base64.b64encode(encode(images[1])).decode()
    for image in (png, f"data:image/png;base64,{png}"):
        response = client.post("/api/predict", json={"image": image})
        assert response.status_code == 200, response.text
        check_answer(response.json(), predictor)
        assert response.json()["label"] == labels[1]


def test_json_pixels_are_used_as_they_are(client, predictor, digits):
    images, labels = digits
    pixels = (images[2] / 255).round(4)
    response = client.post("/api/predict", json={"pixels": pixels.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    check_answer(body, predictor)
    assert body["label"] == labels[2]
    # No re-centring: the image the model saw is the one sent.
    assert np.abs(decode_png(body["preprocessed"]).astype(int) - images[2].astype(int)).max() <= 1
    (expected,) = predictor.predict_pixels(torch.tensor(pixels, dtype=torch.float32))
    assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)


def test_json_pixels_accept_integers_0_and_1(client, predictor, digits):
    binary = (digits[0][3] > 127).astype(int)
    response = client.post("/api/predict", json={"pixels": binary.tolist()})
    assert response.status_code == 200, response.text
    assert response.json()["label"] == digits[1][3]


# --- health, model, page, docs ---------------------------------------------------------------


def test_health(client, predictor):
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["model"] == predictor.info["name"]


def test_model_info(client, predictor):
    response = client.get("/api/model")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"name", "architecture", "parameters", "test_accuracy"}
    info = predictor.info
    assert body["name"] == info["name"]
    assert body["architecture"] == info["architecture"]
    assert body["parameters"] == info["parameters"] > 1000
    assert body["test_accuracy"] == info["test_accuracy"]
    if body["test_accuracy"] is not None:
        assert 90 < body["test_accuracy"] <= 100  # percent, like the rest of mnistlab


def test_page_and_its_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert 'id="pad"' in html and 'id="clear"' in html and 'type="file"' in html
    assert "http://" not in html and "https://" not in html
    for asset in ("/static/app.js", "/static/style.css", "/static/favicon.svg"):
        response = client.get(asset)
        assert response.status_code == 200, asset
        text = response.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text, asset


def test_docs_work_offline(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "https://" not in docs.text and "http://" not in docs.text
    for script in ("/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css"):
        assert script in docs.text
        assert client.get(script).status_code == 200
    assert client.get("/redoc").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    responses = spec["paths"]["/api/predict"]["post"]["responses"]
    assert {"200", "400", "413", "415", "422"} <= set(responses)
    assert {"/api/health", "/api/model"} <= set(spec["paths"])


# --- errors ----------------------------------------------------------------------------------


def check_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word in detail.lower(), detail


def test_413_upload_over_the_limit_by_content_length(client):
    big = encode(np.random.default_rng(0).integers(0, 256, (600, 600), dtype=np.uint8))
    assert len(big) > LIMIT + 64 * 1024
    check_error(post_file(client, big), 413, "limit")


def test_413_file_over_the_limit_within_the_body_allowance(client):
    # Bigger than the limit but inside the multipart overhead allowance: caught on reading.
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * (LIMIT + 100)
    check_error(post_file(client, data), 413, "limit")


def test_413_streamed_body_without_content_length(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    response = client.post(
        "/api/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    check_error(response, 413, "limit")


def test_413_base64_image_over_the_limit(client):
    payload = base64.b64encode(b"\0" * (LIMIT + 10)).decode()
    check_error(client.post("/api/predict", json={"image": payload}), 413, "limit")


def test_415_not_an_image(client):
    check_error(post_file(client, b"hello, this is text\n", "notes.txt", "text/plain"), 415)
    text = base64.b64encode(b"%PDF-1.4 not an image").decode()
    check_error(client.post("/api/predict", json={"image": text}), 415)


def test_415_corrupt_image(client, digits):
    png = encode(digits[0][0])
    check_error(post_file(client, png[: len(png) // 2]), 415)


def test_415_decompression_bomb_refused_quickly(client):
    # A tiny PNG that claims to be 7000×7000 (49 MP): refused before its pixels are decoded.
    bomb = encode(np.zeros((1, 1), np.uint8))
    ihdr = bomb.index(b"IHDR")
    header = b"IHDR" + struct.pack(">II", 7000, 7000) + bomb[ihdr + 12 : ihdr + 17]
    bomb = bomb[: ihdr - 4] + struct.pack(">I", 13) + header
    bomb += struct.pack(">I", zlib.crc32(header)) + b"\0\0\0\0IEND\xaeB`\x82"
    started = time.perf_counter()
    check_error(post_file(client, bomb), 415, "pixel", "limit")
    assert time.perf_counter() - started < 2


def test_415_unsupported_body_type(client):
    response = client.post("/api/predict", content=b"1,2,3", headers={"content-type": "text/csv"})
    check_error(response, 415, "multipart")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", ["json"]),
        (b"[1, 2]", ["object"]),
        (b"{}", ["exactly one"]),
        (json.dumps({"image": "aGk=", "pixels": [[0.5] * 28] * 28}).encode(), ["exactly one"]),
        (b'{"image": null}', ["exactly one"]),
        (b'{"pixel": []}', ["pixel"]),
        (b'{"image": 42}', ["image"]),
        (b'{"image": "not base64!"}', ["base64"]),
        (b'{"image": ""}', ["empty"]),
    ],
)
def test_422_malformed_json(client, body, words):
    response = client.post(
        "/api/predict", content=body, headers={"content-type": "application/json"}
    )
    check_error(response, 422, *words)


def _pixels(rows: int = 28, cols: int = 28, value: object = 0.5) -> list:
    grid: list = [[0.0] * cols for _ in range(rows)]
    if rows and cols:
        grid[rows // 2][cols // 2] = value
    return grid


@pytest.mark.parametrize(
    ("pixels", "words"),
    [
        (_pixels(27, 28), ["pixels", "28"]),
        (_pixels(28, 29), ["pixels[", "28"]),
        ([0.5] * 784, ["pixels", "at most 28"]),
        ([[[0.5] * 28] * 28], ["pixels"]),
        (_pixels(value=1.5), ["pixels[14][14]", "less than or equal to 1"]),
        (_pixels(value=-0.01), ["pixels[14][14]", "greater than or equal to 0"]),
        (_pixels(value="0.5"), ["pixels[14][14]", "number"]),
        (_pixels(value=True), ["pixels[14][14]", "number"]),
        (_pixels(value=None), ["pixels[14][14]", "number"]),
    ],
)
def test_422_wrong_pixels(client, pixels, words):
    check_error(client.post("/api/predict", json={"pixels": pixels}), 422, *words)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_422_non_finite_pixels(client, token):
    grid = json.dumps(_pixels()).replace("0.5", token, 1)
    response = client.post(
        "/api/predict",
        content=f'{{"pixels": {grid}}}'.encode(),
        headers={"content-type": "application/json"},
    )
    check_error(response, 422, "pixels[14][14]", "finite")


def test_422_multipart_without_a_file_field(client, digits):
    response = client.post(
        "/api/predict", files={"image": ("digit.png", encode(digits[0][0]), "image/png")}
    )
    check_error(response, 422, "file")
    check_error(client.post("/api/predict", files={"file": (None, "just text")}), 422, "file")


def test_422_malformed_multipart(client):
    response = client.post(
        "/api/predict",
        content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n",
        headers={"content-type": "multipart/form-data"},  # no boundary
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_400_no_ink(client):
    blank = np.full((100, 100), 255, np.uint8)
    check_error(post_file(client, encode(blank)), 400)
    black = np.zeros((64, 64), np.uint8)
    check_error(post_file(client, encode(black)), 400)
    check_error(client.post("/api/predict", json={"pixels": _pixels(value=0.0)}), 400, "no")


def test_errors_leave_the_server_working(client, digits):
    for _ in range(3):
        post_file(client, b"junk")
        client.post("/api/predict", content=b"{", headers={"content-type": "application/json"})
    response = post_file(client, encode(digits[0][4]))
    assert response.status_code == 200
    assert response.json()["label"] == digits[1][4]


def test_create_app_refuses_a_nonpositive_limit(predictor):
    with pytest.raises(MnistlabError, match="positive"):
        create_app(predictor, max_upload_bytes=0)
