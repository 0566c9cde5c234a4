"""`mnistlab export`: the ONNX round trip and safetensors with a model card."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistlab.config import TrainConfig, resolve_config
from mnistlab.data import load_mnist
from mnistlab.experiment import train_run
from mnistlab.export import LOGIT_TOLERANCE, train_command
from mnistlab.fileio import new_file_mode
from mnistlab.predict import Predictor, bundled_weights


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    cfg = resolve_config("lab", epochs=1, train_limit=3000, val_split=0.2, lr=0.002)
    train_run(cfg, root=data_root, runs_dir=runs, name="tiny", log=lambda _: None)
    return runs / "tiny"


def test_onnx_round_trip_of_the_bundled_model(cli, tmp_path, data_root):
    import onnxruntime as ort

    out = tmp_path / "digits.onnx"
    proc = cli("export", bundled_weights(), "--onnx", out)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"on 10,000 MNIST test images: arg-max agreement ([\d.]+)%, "
                      r"max \|logit diff\| ([\d.e+-]+)", proc.stdout)
    assert found, proc.stdout
    assert float(found[1]) == 100.0 and float(found[2]) <= LOGIT_TOLERANCE

    # Independently of the command's own check: any batch size, same answers as PyTorch.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    images, _ = load_mnist(data_root, "test")
    predictor = Predictor.default()
    for n in (1, 37):
        x = images[:n].float() / 255.0
        logits = session.run(None, {"pixels": x.unsqueeze(1).numpy()})[0]
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
        expected = np.array([p.probabilities for p in predictor.predict_pixels(x)])
        assert logits.shape == (n, 10)
        assert np.abs(probs - expected).max() < 1e-5

    before = out.read_bytes()
    again = cli("export", bundled_weights(), "--onnx", out)
    assert again.returncode == 1 and "--force" in again.stderr
    assert out.read_bytes() == before


def test_safetensors_export_with_card(cli, tiny_run, tmp_path):
    out = tmp_path / "tiny.safetensors"
    proc = cli("export", tiny_run, "--safetensors", out)
    assert proc.returncode == 0, proc.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert card["model"] == "mlp" and card["architecture"] == "SimpleMNISTDNN"
    assert card["test_accuracy"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert card["run"] == "tiny" and card["epochs"] == 1
    assert out.stat().st_mode & 0o777 == new_file_mode()  # as open() would make it
    predictor = Predictor.load(out)
    assert predictor.info["test_accuracy"] == card["test_accuracy"]
    assert predictor.info["name"] == "mlp"


def rebuild_config(command, args: list[str]) -> dict:
    """The config `mnistlab train ARGS` resolves to, without training."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    params = command.make_context("train", args).params
    flags = {k: v for k, v in params.items() if k in fields and k != "recipe"}
    return resolve_config(params["recipe"] or "lab", **flags).to_dict()


def test_train_command_reproduces_the_config(tiny_run):
    from mnistlab.cli.train import train

    config = json.loads((tiny_run / "config.json").read_text())
    command = train_command(config)
    args = shlex.split(command)
    assert args[:2] == ["mnistlab", "train"]
    assert rebuild_config(train, args[2:]) == config


def test_bundled_card_command_reproduces_its_config():
    from mnistlab.cli.train import train

    card = json.loads(bundled_weights().with_suffix(".json").read_text())
    args = shlex.split(card["train_command"])
    assert args[:2] == ["mnistlab", "train"]
    rebuilt = rebuild_config(train, args[2:])
    assert {k: rebuilt[k] for k in card["config"]} == card["config"]
    defaults = TrainConfig().to_dict()  # settings added to mnistlab after the model was trained
    assert {k: v for k, v in rebuilt.items() if k not in card["config"]} == {
        k: defaults[k] for k in rebuilt if k not in card["config"]
    }


def test_export_refuses_bad_sources(cli, tmp_path):
    proc = cli("export", tmp_path / "nothing.pt", "--onnx", tmp_path / "x.onnx")
    assert proc.returncode == 1 and proc.stderr.startswith("mnistlab: error: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.onnx").exists()
    proc = cli("export", bundled_weights())
    assert proc.returncode == 2 and "--onnx" in proc.stderr
