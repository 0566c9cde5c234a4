"""`mnistlab train --tensorboard DIR`: the run as TensorBoard event files, under DIR/<run name>/.

Step scalars at every progress line, epoch scalars and the test confusion matrix as an image
every epoch, hparams with the final metrics, and the embedding projector (penultimate features
of test digits, a sprite of the digits, their labels). Needs the optional extra `tensorboard`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .errors import MnistlabError

PROJECTOR_DIGITS = 1000  # a 32×32 sprite of 28-pixel digits: 896×896 pixels
EPOCH_SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr")


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MnistlabError(
            "--tensorboard needs the tensorboard package: python -m pip install "
            "'mnistlab[tensorboard]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter


def check_available() -> None:
    """Fail early, before any training, when the extra is not installed."""
    _writer_class()


class TensorBoardLog:
    def __init__(self, logdir: str | os.PathLike[str], run_dir: Path, cfg: TrainConfig,
                 steps_per_epoch: int) -> None:
        self.path = Path(logdir) / run_dir.name
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MnistlabError(f"cannot create --tensorboard folder {self.path}: "
                                f"{e.strerror or e}") from None
        self.writer = _writer_class()(log_dir=str(self.path))
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch

    def step(self, record: dict[str, Any]) -> None:
        """One progress line: the interval's loss and accuracy at its global step."""
        step = (int(record["epoch"]) - 1) * self.steps_per_epoch + int(record["step"])
        self.writer.add_scalar("step/loss", record["loss"], step)
        self.writer.add_scalar("step/acc", record["acc"], step)

    def epoch(self, record: dict[str, Any], model: nn.Module, test_loader: Any) -> None:
        """An epoch's metrics, and its confusion matrix on the test set as an image."""
        from . import plots
        from .metrics import classification_metrics
        from .training import predict_logits

        epoch = int(record["epoch"])
        for key in EPOCH_SCALARS:
            value = record.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        was_training = model.training
        logits, labels = predict_logits(model, test_loader)
        model.train(was_training)
        cm = classification_metrics(logits, labels)["confusion_matrix"]
        self.writer.add_figure(
            "test/confusion_matrix",
            plots.plot_confusion_matrix(cm, title=f"Confusion matrix after epoch {epoch}"),
            epoch,
        )
        self.writer.flush()

    def finish(self, summary: dict[str, Any], model: nn.Module, test_loader: Any) -> None:
        """hparams with the final metrics, the embedding projector, then close."""
        from .inside import penultimate_features

        try:
            hparams = {k: v for k, v in self.cfg.to_dict().items()
                       if isinstance(v, bool | int | float | str)}
            metrics = {"hparam/test_acc": float(summary["test_acc"]),
                       "hparam/test_loss": float(summary["test_loss"])}
            self.writer.add_hparams(hparams, metrics, run_name="hparams",
                                    global_step=int(summary["epochs"]))
            images = test_loader.x[:PROJECTOR_DIGITS]
            labels = test_loader.y[:PROJECTOR_DIGITS]
            # The loader holds normalized floats or raw uint8; the projector wants [0, 1].
            if images.dtype == torch.uint8:
                pixels = images.float() / 255
            else:
                from .catalog import MNIST

                pixels = (images.float().reshape(-1, 28, 28) * MNIST.std + MNIST.mean).clamp(0, 1)
            features, logits = penultimate_features(model, pixels.cpu())
            predicted = logits.argmax(1)
            self.writer.add_embedding(
                features,
                metadata=[[str(int(y)), str(int(p))] for y, p in zip(labels, predicted,
                                                                      strict=True)],
                metadata_header=["label", "predicted"],
                label_img=pixels.cpu().unsqueeze(1),
                global_step=int(summary["epochs"]),
                tag="penultimate_features",
            )
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()
