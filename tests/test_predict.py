"""The Predictor API, the bundled model and its card, safe loading, and `mnistlab predict`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnistlab.checkpoints import save_safetensors, save_torch
from mnistlab.config import TrainConfig
from mnistlab.data import BatchLoader, load_mnist
from mnistlab.errors import MnistlabError
from mnistlab.experiment import train_run
from mnistlab.mlpstep import forward_stack
from mnistlab.models import create_model
from mnistlab.predict import Prediction, Predictor, bundled_weights, read_card
from mnistlab.preprocess import ImageError, NoInkError
from mnistlab.training import evaluate


@pytest.fixture(scope="module")
def test_set(data_root) -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist(data_root, "test")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.default()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """A real (small) run folder: logistic regression, one epoch on 3,000 images."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(model="logreg", optimizer="sgd", lr=0.1, epochs=1, train_limit=3000)
    train_run(cfg, root=data_root, runs_dir=runs, name="tiny", log=lambda _: None)
    return runs / "tiny"


def png_bytes(digit: np.ndarray, scale: int = 4, invert: bool = True) -> bytes:
    im = Image.fromarray(255 - digit if invert else digit, "L").resize((28 * scale,) * 2)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# --- the bundled model ------------------------------------------------------------------------


def test_bundled_model_card_tells_the_truth(predictor, test_set):
    images, labels = test_set
    card = read_card(bundled_weights())
    assert card is not None
    _, accuracy = evaluate(predictor.model, BatchLoader(images, labels, 1000))
    assert accuracy >= 99.3
    assert card["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)  # measured on this file
    assert card["train_command"].startswith("mnistlab train --recipe ")
    assert card["sha256"] == hashlib.sha256(bundled_weights().read_bytes()).hexdigest()
    assert bundled_weights().stat().st_size < 4 * 1024 * 1024
    info = predictor.info
    assert info["name"] == card["model"]
    assert info["architecture"] == card["architecture"] == type(predictor.model).__name__
    assert info["parameters"] == card["parameters"]
    assert info["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert info["source"] == "bundled"


def test_models_default_shows_the_card(cli):
    card = read_card(bundled_weights())
    proc = cli("models", "--default")
    assert proc.returncode == 0, proc.stderr
    assert card["train_command"] in proc.stdout
    assert f"{card['test_accuracy']:.2f}%" in proc.stdout
    assert card["architecture"] in proc.stdout and card["date"] in proc.stdout
    shown = json.loads(cli("models", "--default", "--json").stdout)
    assert shown["test_accuracy"] == card["test_accuracy"]


# --- Predictor API ----------------------------------------------------------------------------


def test_predict_accepts_every_input_type(predictor, test_set, tmp_path):
    images, labels = test_set
    d, label = images[0].numpy(), int(labels[0])
    path = tmp_path / "digit.png"
    path.write_bytes(png_bytes(d))
    sources = [
        str(path),
        path,
        path.read_bytes(),
        io.BytesIO(path.read_bytes()),
        Image.open(io.BytesIO(path.read_bytes())),
        d,
        d.astype(np.float32) / 255.0,
        torch.from_numpy(d),
        torch.from_numpy(d).float().div(255).unsqueeze(0),
    ]
    predictions = predictor.predict(sources)
    assert len(predictions) == len(sources)
    for p in predictions:
        assert isinstance(p, Prediction)
        assert p.label == label and p.probability > 0.9
        assert p.image.shape == (28, 28) and sum(p.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert [p.path for p in predictions[:3]] == [str(path), str(path), None]
    single = predictor.predict(d)
    assert len(single) == 1
    assert single[0].probabilities == pytest.approx(predictions[5].probabilities, abs=1e-6)


def test_predictions_match_the_model_and_top_k_is_ordered(predictor, test_set):
    images, _ = test_set
    x = images[:64].float() / 255.0
    predictions = predictor.predict_pixels(x)
    with torch.inference_mode():
        logits = predictor.model(((x - 0.1307) / 0.3081).unsqueeze(1))
    probs = torch.softmax(logits, 1)
    for p, row in zip(predictions, probs, strict=True):
        assert p.label == int(row.argmax())
        assert p.probabilities == pytest.approx(row.tolist(), abs=1e-6)
        top = p.top_k(3)
        assert top[0] == (p.label, p.probability)
        assert [q for _, q in top] == sorted((q for _, q in top), reverse=True)
    assert len(predictor.predict_pixels(x[0])) == 1
    assert predictions[0].to_dict(2)["top_k"][0]["label"] == predictions[0].label


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 32, 32), torch.full((28, 28), 2.0), torch.full((28, 28), -0.4)]
)
def test_predict_pixels_refuses_what_is_not_pixels(predictor, bad):
    with pytest.raises(MnistlabError):
        predictor.predict_pixels(bad)


SHAPE_ERROR = "expected images of shape [N, 28, 28] or [28, 28], got {}"
RANGE_ERROR = "pixel values must be finite and in [0, 1] (scale uint8 by 1/255)"


def test_predictions_read_as_a_sequence(predictor, test_set):
    x = test_set[0][:5].float() / 255
    predictions = predictor.predict_pixels(x)
    assert isinstance(predictions, Sequence) and len(predictions) == 5
    assert all(isinstance(p, Prediction) for p in predictions)
    assert predictions[-1] is predictions[4] and predictions[-5] is predictions[0]
    assert [p.label for p in predictions] == predictions.labels.tolist()
    middle = predictions[1:3]
    assert isinstance(middle, list) and len(middle) == 2
    assert middle[0] is predictions[1] and middle[1] is predictions[2]
    assert next(reversed(predictions)) is predictions[4]
    first, *rest = predictions
    assert first is predictions[0] and len(rest) == 4
    (one,) = predictor.predict_pixels(x[3])
    assert one.label == predictions[3].label
    for bad in (5, -6):
        with pytest.raises(IndexError):
            predictions[bad]
    with pytest.raises(TypeError):
        predictions[0] = predictions[1]  # read-only
    predictions[2].path = "kept.png"  # a Prediction is built once and then kept
    assert predictions[2].path == "kept.png" and predictions.paths == (None,) * 5
    empty = predictor.predict_pixels(torch.empty(0, 28, 28))
    assert len(empty) == 0 and list(empty) == [] and empty.probabilities.shape == (0, 10)


@pytest.mark.parametrize("name", ["bundled", "mlp", "mlp-wide"])
def test_batch_tensors_agree_with_the_items_and_with_eager_pytorch(predictor, test_set, name):
    if name == "bundled":
        model = predictor.model
    else:
        torch.manual_seed(0)
        args = {"hidden": 200, "depth": 2, "dropout": 0.25} if name == "mlp-wide" else {}
        model = create_model("mlp", **args)
    used = Predictor(model, {"name": name, "source": "test", "parameters": 0})
    x = test_set[0][:700].float() / 255  # more than one 512-image chunk
    predictions = used.predict_pixels(x.unsqueeze(1))  # [N, 1, 28, 28] is accepted too
    labels, probs = predictions.labels, predictions.probabilities
    assert labels.dtype == torch.int64 and labels.shape == (700,)
    assert probs.dtype == torch.float32 and probs.shape == (700, 10)
    assert torch.equal(predictions.images, x)
    with torch.inference_mode():
        eager = torch.softmax(model(((x - 0.1307) / 0.3081).unsqueeze(1)), dim=1)
    assert torch.equal(labels, eager.argmax(1))
    assert (probs - eager).abs().max().item() < 1e-6
    for i in (0, 511, 512, 699):
        p = predictions[i]
        assert p.label == int(labels[i])
        assert p.probabilities == probs[i].tolist() and p.probability == p.probabilities[p.label]
        assert torch.equal(p.image, x[i]) and p.path is None
    if name == "bundled":
        assert (labels == test_set[1][:700]).float().mean().item() > 0.98
    else:  # the mlp runs as its addmm chain: the module's own logits, to the bit
        assert used._stack is not None
        with torch.inference_mode():
            z = torch.add(used._shift, x[:512], alpha=used._scale).unsqueeze(1)
            assert torch.equal(forward_stack(used._stack, z)[-1], model(z))


def test_paths_from_predict_survive(predictor, test_set, tmp_path):
    images, labels = test_set
    files = []
    for i in range(2):
        files.append(tmp_path / f"digit{i}.png")
        files[-1].write_bytes(png_bytes(images[i].numpy()))
    predictions = predictor.predict([files[0], files[1].read_bytes(), str(files[1])])
    expected = (str(files[0]), None, str(files[1]))
    assert predictions.paths == expected
    assert [p.path for p in predictions] == list(expected)
    assert [p.to_dict()["path"] for p in predictions] == list(expected)
    assert predictions.labels.tolist() == [int(labels[0]), int(labels[1]), int(labels[1])]
    assert predictor.predict(files[0])[0].path == str(files[0])
    assert len(predictor.predict([])) == 0


def _with(value: float, n: int = 600) -> torch.Tensor:
    x = torch.rand(n, 28, 28)
    x[-1, 27, 27] = value  # the very last pixel, in the second 512-image chunk
    return x


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_with(float("nan")), RANGE_ERROR),
        (_with(float("inf")), RANGE_ERROR),
        (_with(float("-inf")), RANGE_ERROR),
        (_with(1.0001), RANGE_ERROR),
        (_with(-1e-6), RANGE_ERROR),
        (_with(float("nan"), 1)[0].double(), RANGE_ERROR),
        (torch.full((2, 28, 28), 255, dtype=torch.uint8), RANGE_ERROR),
        (torch.zeros(3, 32, 32), SHAPE_ERROR.format([3, 32, 32])),
        (torch.zeros(32, 32), SHAPE_ERROR.format([1, 32, 32])),
        (torch.zeros(784), SHAPE_ERROR.format([784])),
        (torch.zeros(2, 3, 28, 28), SHAPE_ERROR.format([2, 3, 28, 28])),
    ],
    ids=["nan", "inf", "-inf", "over-1", "below-0", "float64-nan", "uint8-255", "32x32-batch",
         "32x32", "flat", "3-channels"],
)
def test_predict_pixels_error_messages(predictor, bad, message):
    with pytest.raises(MnistlabError) as raised:
        predictor.predict_pixels(bad)
    assert str(raised.value) == message


def test_pixels_exactly_0_and_1_are_accepted(predictor):
    x = torch.zeros(2, 28, 28)
    x[1, 10:18, 12:16] = 1.0
    assert len(predictor.predict_pixels(x)) == 2
    assert len(predictor.predict_pixels(x.numpy().astype(np.float64))) == 2


def test_changing_the_input_later_does_not_change_the_result(predictor, test_set):
    x = test_set[0][:3].float() / 255
    before = x.clone()
    from_array = x.numpy().copy()  # torch.as_tensor shares a float32 array's memory
    with_grad = x.clone().requires_grad_()
    for source in (x, from_array, with_grad):
        predictions = predictor.predict_pixels(source)
        image = predictions[0].image
        with torch.no_grad():
            source[:] = 0.5
        assert torch.equal(predictions.images, before)
        assert torch.equal(image, before[0]) and torch.equal(predictions[1].image, before[1])
        assert not predictions.probabilities.requires_grad


def test_predict_raises_for_bad_images(predictor):
    with pytest.raises(ImageError):
        predictor.predict([b"not an image"])
    with pytest.raises(NoInkError):
        predictor.predict(np.full((50, 50), 255, np.uint8))


def test_concurrent_calls_give_the_same_answers(predictor, test_set):
    images, _ = test_set
    inputs = [png_bytes(d.numpy(), scale=3) for d in images[:48]]
    expected = [predictor.predict(b)[0].probabilities for b in inputs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: predictor.predict(b)[0].probabilities, inputs))
    assert got == expected


def test_from_run_from_weights_and_load(tiny_run, test_set):
    summary = json.loads((tiny_run / "summary.json").read_text())
    by_run = Predictor.from_run(tiny_run)
    assert by_run.info["name"] == "logreg"
    assert by_run.info["architecture"] == "LogisticRegression"
    assert by_run.info["test_accuracy"] == summary["test_acc"]
    by_file = Predictor.from_weights(tiny_run / "model.pt")
    assert Predictor.load(str(tiny_run)).info["name"] == "logreg"
    assert Predictor.load(None).info["source"] == "bundled"
    x = test_set[0][:20].float() / 255
    a = [p.probabilities for p in by_run.predict_pixels(x)]
    assert a == [p.probabilities for p in by_file.predict_pixels(x)]
    with pytest.raises(MnistlabError, match="no such run"):
        Predictor.load("no/such/thing")


# --- safe loading -----------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    as_torch = tmp_path / "evil.pt"
    torch.save({"model": _Exploit(marker), "weight": torch.zeros(1)}, as_torch)
    as_pickle = tmp_path / "evil-pickle.pt"
    as_pickle.write_bytes(pickle.dumps(_Exploit(marker)))
    for path in (as_torch, as_pickle):
        with pytest.raises(MnistlabError, match=r"refusing|not a PyTorch"):
            Predictor.from_weights(path)
    assert not marker.exists()


def test_weights_that_are_not_mnistlabs_are_refused(tmp_path):
    foreign = tmp_path / "resnet.safetensors"
    save_safetensors({"stem.conv.weight": torch.zeros(8, 3, 3, 3)}, foreign, {})
    with pytest.raises(MnistlabError, match="not mnistlab weights"):
        Predictor.from_weights(foreign)
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(MnistlabError, match="state_dict"):
        Predictor.from_weights(not_weights)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(MnistlabError, match="cannot read"):
        Predictor.from_weights(garbage)


def test_weights_of_another_architecture_are_refused(tmp_path, tiny_run):
    mislabelled = tmp_path / "mlp-as-convnet.safetensors"
    save_safetensors(create_model("mlp").state_dict(), mislabelled, {"model": "convnet"})
    with pytest.raises(MnistlabError, match=r"another architecture.*'mlp'"):
        Predictor.from_weights(mislabelled)
    save_torch(create_model("mlp").state_dict(), tiny_run.parent / "swap.pt")
    run = tiny_run.parent / "swapped"
    run.mkdir()
    (run / "config.json").write_text((tiny_run / "config.json").read_text())
    (tiny_run.parent / "swap.pt").rename(run / "model.pt")
    with pytest.raises(MnistlabError, match="another architecture"):
        Predictor.from_run(run)


# --- mnistlab predict -------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture
def mixed_folder(tmp_path, test_set) -> tuple[Path, dict[str, int], list[str]]:
    """Good images (some with misleading names) and every kind of bad file, in subfolders."""
    images, labels = test_set
    folder = tmp_path / "inbox"
    (folder / "b-sub").mkdir(parents=True)
    good = {}
    for i, name in enumerate(["a.png", "b-sub/c.jpg", "b-sub/d.txt", "z.webp"]):
        im = Image.fromarray(255 - images[i].numpy(), "L").resize((84, 84))
        fmt = {0: "PNG", 1: "PNG", 2: "JPEG", 3: "WEBP"}[i]  # c.jpg holds a PNG
        im.save(folder / name, fmt)
        good[name] = int(labels[i])
    jpeg = (folder / "b-sub/d.txt").read_bytes()
    (folder / "notes.md").write_text("# not an image\n")
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("L", (64, 64), 255).save(folder / "blank.png")
    (folder / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (folder / "empty.gif").write_bytes(b"")
    bad = ["notes.md", "cut.jpg", "blank.png", "bomb.png", "empty.gif"]
    return folder, good, bad


def test_predict_folder_with_bad_files(run_cli, mixed_folder, tmp_path):
    folder, good, bad = mixed_folder
    out_dir = tmp_path / "seen"
    proc = run_cli("predict", folder, "--json", "--save-preprocessed", out_dir)
    assert proc.returncode == 1
    rows = json.loads(proc.stdout)
    paths = [str(Path(r["path"]).relative_to(folder)) for r in rows]
    assert paths == ["a.png", "b-sub/c.jpg", "b-sub/d.txt", "z.webp"]  # recursive, sorted
    assert [r["label"] for r in rows] == [good[p] for p in paths]
    for r in rows:
        assert len(r["probabilities"]) == 10 and r["probability"] == max(r["probabilities"])
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    for name in bad:
        assert sum(f"{folder / name}:" in line for line in lines) == 1, (name, lines)
    assert len(lines) == len(bad) + 1  # one line per bad file, then the summary
    assert "5 of 9 inputs failed" in lines[-1]
    for text, name in [("not an image", "notes.md"), ("truncated", "cut.jpg"),
                       ("no ink", "blank.png"), ("limit", "bomb.png"), ("empty", "empty.gif")]:
        assert text in next(line for line in lines if f"/{name}:" in line)
    saved = sorted(out_dir.iterdir())
    assert len(saved) == 4
    assert Image.open(saved[0]).size == (28, 28)
    assert np.asarray(Image.open(saved[0])).max() == 255


def test_predict_stdin_csv_and_force(cli, test_set, tmp_path):
    images, labels = test_set
    data = png_bytes(images[1].numpy())
    (tmp_path / "x.png").write_bytes(data)
    csv_file = tmp_path / "out.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "mnistlab", "predict", str(tmp_path / "x.png"), "-", "--csv",
         str(csv_file)],
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    lines = csv_file.read_text().splitlines()
    assert lines[0] == "path,label,probability," + ",".join(f"p{d}" for d in range(10))
    assert [line.split(",")[1] for line in lines[1:]] == [str(int(labels[1]))] * 2
    assert lines[2].startswith("<stdin>,")
    before = csv_file.read_bytes()
    proc = cli("predict", tmp_path / "x.png", "--csv", csv_file)
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert csv_file.read_bytes() == before
    proc = cli("predict", tmp_path / "x.png", "--csv", csv_file, "--force", "--top-k", "2")
    assert proc.returncode == 0 and len(csv_file.read_text().splitlines()) == 2
    text = cli("predict", tmp_path / "x.png", "--top-k", "2")
    assert text.returncode == 0
    assert text.stdout.startswith(f"{tmp_path / 'x.png'}: {int(labels[1])} (")
    assert text.stdout.count("%") == 3  # the probability and the top 2


def test_predict_with_a_run_and_bad_models(cli, tiny_run, tmp_path, test_set):
    images, _ = test_set
    (tmp_path / "x.png").write_bytes(png_bytes(images[0].numpy()))
    proc = cli("predict", tmp_path / "x.png", "--model", tiny_run, "--json")
    assert proc.returncode == 0, proc.stderr
    expected = Predictor.from_run(tiny_run).predict(tmp_path / "x.png")[0]
    assert json.loads(proc.stdout)[0]["probabilities"] == pytest.approx(expected.probabilities)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Exploit(marker)}, evil)
    for model in (evil, tmp_path / "missing.pt"):
        proc = cli("predict", tmp_path / "x.png", "--model", model)
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mnistlab: error: ")
    assert not marker.exists()
    proc = cli("predict", tmp_path / "nothing-here.png")
    assert proc.returncode == 1 and "no such file" in proc.stderr
