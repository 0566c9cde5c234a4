"""`mnistlab train --tensorboard DIR`, read back with TensorBoard's own reader: step and epoch
scalars, the confusion matrix image per epoch, hparams with the final metrics, the projector."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def logged(tmp_path_factory, data_root):
    from mnistlab.cli import main

    tmp = tmp_path_factory.mktemp("tb")
    with pytest.raises(SystemExit) as done:
        main(["train", "--epochs", "2", "--train-limit", "2000", "--threads", "1",
              "--runs-dir", str(tmp / "runs"), "--name", "tb", "--no-report",
              "--tensorboard", str(tmp / "board"), "--root", str(data_root)])
    assert done.value.code in (0, None)
    run = tmp / "runs" / "tb"
    board = tmp / "board" / "tb"
    acc = EventAccumulator(str(board), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return {"run": run, "board": board, "acc": acc,
            "summary": json.loads((run / "summary.json").read_text()),
            "metrics": [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()],
            "steps": [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]}


def test_step_scalars_match_the_run_folders_step_lines(logged):
    acc, steps = logged["acc"], logged["steps"]
    loss = acc.Scalars("step/loss")
    assert len(loss) == len(steps) == 2 * 7  # 7 progress lines an epoch
    per_epoch = steps[0]["steps"]
    for event, line in zip(loss, steps, strict=True):
        assert event.step == (line["epoch"] - 1) * per_epoch + line["step"]
        assert event.value == pytest.approx(line["loss"], rel=1e-6)
    assert [e.value for e in acc.Scalars("step/acc")] == pytest.approx([s["acc"] for s in steps])


def test_epoch_scalars_and_confusion_images(logged):
    acc, metrics = logged["acc"], logged["metrics"]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        values = acc.Scalars(f"epoch/{key}")
        assert [e.step for e in values] == [1, 2]
        assert [e.value for e in values] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    images = acc.Images("test/confusion_matrix")
    assert [i.step for i in images] == [1, 2]
    assert all(i.width > 200 and i.height > 200 and i.encoded_image_string[:4] == b"\x89PNG"
               for i in images)


def test_hparams_carry_the_final_metrics(logged):
    hp = EventAccumulator(str(logged["board"] / "hparams"), size_guidance={"scalars": 0})
    hp.Reload()
    content = hp.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model"].string_value == "mlp"
    assert start.hparams["lr"].number_value == pytest.approx(0.001)
    assert start.hparams["epochs"].number_value == 2
    assert set(start.hparams) >= {"optimizer", "batch_size", "seed", "recipe"}
    for key in ("test_acc", "test_loss"):
        (value,) = hp.Scalars(f"hparam/{key}")
        assert value.value == pytest.approx(logged["summary"][key], rel=1e-6)
        assert value.step == 2


def test_projector_has_features_sprite_and_labels(logged):
    board = logged["board"]
    config = text_format.Parse((board / "projector_config.pbtxt").read_text(), ProjectorConfig())
    (emb,) = config.embeddings
    folder = board / emb.tensor_path.rsplit("/", 1)[0]
    rows = (board / emb.tensor_path).read_text().strip().splitlines()
    assert len(rows) == 1000 and len(rows[0].split("\t")) == 128  # the mlp's hidden layer
    meta = (board / emb.metadata_path).read_text().strip().splitlines()
    assert meta[0] == "label\tpredicted" and len(meta) == 1001
    assert list(emb.sprite.single_image_dim) == [28, 28]
    from PIL import Image

    sprite = Image.open(board / emb.sprite.image_path)
    assert sprite.size == (32 * 28, 32 * 28)
    assert folder.is_dir()


def test_tensorboard_missing_is_one_line(tmp_path, cli, monkeypatch):
    # Without the extra: one clear line before any training (the import made to fail here).
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    done = cli("train", "--epochs", "1", "--tensorboard", tmp_path / "tb",
               "--runs-dir", tmp_path / "runs")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("mnistlab: error: --tensorboard needs the tensorboard")
    assert not (tmp_path / "runs").exists()
