"""Read digits: `Predictor.default().predict("digit.jpg")` → labels and probabilities.

A Predictor holds one model in eval mode and no other mutable state, so one instance may serve
concurrent calls from several threads. Every input goes through `mnistlab.preprocess` first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .catalog import MNIST
from .checkpoints import load_model
from .errors import MnistlabError
from .models import count_parameters
from .preprocess import ImageSource, open_image, to_mnist

BUNDLED_WEIGHTS = "default.safetensors"
CHUNK = 512  # images per forward pass: bounds memory for long lists


def bundled_weights() -> Path:
    """The weights file that ships inside the package."""
    return Path(str(resources.files("mnistlab") / "weights" / BUNDLED_WEIGHTS))


def card_path(weights: str | os.PathLike[str]) -> Path:
    """The model card beside a weights file: `x.safetensors` → `x.json`."""
    return Path(weights).with_suffix(".json")


def read_card(weights: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The model card beside `weights`, or None if it has none (or an unreadable one)."""
    path = card_path(weights)
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


@dataclass
class Prediction:
    """One image's reading: the digit, its probability, all ten, and the image the model saw."""

    label: int
    probability: float
    probabilities: list[float]
    image: torch.Tensor = field(repr=False)  # float32 [28, 28] in [0, 1], white ink on black
    path: str | None = None

    def top_k(self, k: int = 3) -> list[tuple[int, float]]:
        """The k most probable digits, most probable first."""
        ranked = sorted(enumerate(self.probabilities), key=lambda p: p[1], reverse=True)
        return ranked[: max(0, k)]

    def to_dict(self, top_k: int = 0) -> dict[str, Any]:
        """The JSON shape `mnistlab predict --json` prints."""
        out: dict[str, Any] = {
            "path": self.path,
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
        }
        if top_k:
            out["top_k"] = [{"label": d, "probability": p} for d, p in self.top_k(top_k)]
        return out


class Predictor:
    """A model plus the preprocessing that makes real pictures look like MNIST."""

    def __init__(self, model: nn.Module, info: dict[str, Any]) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._info = dict(info)
        self.mean, self.std = MNIST.mean, MNIST.std

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_run(cls, path: str | os.PathLike[str], best: bool = False) -> Predictor:
        """The final (or, with `best`, the best-validation) weights of a run folder."""
        model, meta = load_model(path, best=best)
        summary_path = Path(path) / "summary.json"
        test_accuracy = None
        if summary_path.is_file() and not best:
            try:
                test_accuracy = json.loads(summary_path.read_text()).get("test_acc")
            except (OSError, ValueError):
                test_accuracy = None
        return cls(model, _info(model, meta, str(path), test_accuracy))

    @classmethod
    def from_weights(cls, path: str | os.PathLike[str]) -> Predictor:
        """A `.pt` or `.safetensors` weights file (its model card, if any, is read too)."""
        model, meta = load_model(path)
        card = read_card(path) if Path(path).suffix == ".safetensors" else None
        accuracy = (card or {}).get("test_accuracy", meta.get("test_accuracy"))
        info = _info(model, meta, str(path), accuracy)
        if card:
            info["card"] = card
        return cls(model, info)

    @classmethod
    def default(cls) -> Predictor:
        """The model that ships with mnistlab (no download, works offline)."""
        path = bundled_weights()
        if not path.is_file():
            raise MnistlabError(
                f"the bundled model is missing ({path}); reinstall mnistlab, or pass --model "
                "with a run folder or weights file"
            )
        predictor = cls.from_weights(path)
        predictor._info["source"] = "bundled"
        predictor._info["path"] = str(path)
        return predictor

    @classmethod
    def load(cls, spec: str | os.PathLike[str] | None = None, best: bool = False) -> Predictor:
        """None → the bundled model; a run folder (or run name under runs/) or a weights file."""
        if spec is None or str(spec) == "":
            return cls.default()
        path = Path(spec)
        if path.is_dir():
            return cls.from_run(path, best=best)
        if path.is_file():
            return cls.from_weights(path)
        if not path.exists() and (Path("runs") / str(spec)).is_dir() and "/" not in str(spec):
            return cls.from_run(Path("runs") / str(spec), best=best)
        raise MnistlabError(f"{spec}: no such run folder or weights file")

    # -- use ---------------------------------------------------------------------------------

    @property
    def info(self) -> dict[str, Any]:
        """name, architecture, parameters, test_accuracy (%, or None), source, and more."""
        return dict(self._info)

    def preprocess(self, source: ImageSource) -> torch.Tensor:
        """The 28×28 image in [0, 1] the model sees for `source` (ImageError, NoInkError)."""
        return to_mnist(open_image(source))

    def predict(self, images: ImageSource | Sequence[ImageSource]) -> list[Prediction]:
        """Predictions for one image or a list of them (paths, bytes, PIL, arrays, tensors).

        An array or tensor is one image; pass a list for several, or use `predict_pixels` for a
        ready batch. The first bad image raises ImageError or NoInkError.
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = [self.preprocess(item) for item in items]
        if not pixels:
            return []
        predictions = self.predict_pixels(torch.stack(pixels))
        for p, item in zip(predictions, items, strict=True):
            if isinstance(item, (str, os.PathLike)):
                p.path = str(item)
        return predictions

    def predict_pixels(self, x: torch.Tensor) -> list[Prediction]:
        """Predictions for ready 28×28 images in [0, 1] ([N, 28, 28] or [28, 28]), as they are."""
        x = torch.as_tensor(x)
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
            raise MnistlabError(
                f"expected images of shape [N, 28, 28] or [28, 28], got {list(x.shape)}"
            )
        x = x.detach().to("cpu", torch.float32)
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise MnistlabError("pixel values must be finite and in [0, 1] (scale uint8 by 1/255)")
        out: list[Prediction] = []
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(x), CHUNK):
                batch = x[start : start + CHUNK]
                logits = self.model(((batch - self.mean) / self.std).unsqueeze(1).to(device))
                probs = torch.softmax(logits.float(), dim=1).cpu()
                for image, p in zip(batch, probs, strict=True):
                    label = int(p.argmax())
                    out.append(Prediction(label, float(p[label]), p.tolist(), image.clone()))
        return out

    def __repr__(self) -> str:
        i = self._info
        return f"Predictor({i['name']}, {i['parameters']:,} parameters, from {i['source']})"


def _info(
    model: nn.Module, meta: dict[str, Any], source: str, test_accuracy: Any
) -> dict[str, Any]:
    return {
        "name": meta.get("model"),
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),
        "test_accuracy": float(test_accuracy) if test_accuracy is not None else None,
        "source": source,
    }
