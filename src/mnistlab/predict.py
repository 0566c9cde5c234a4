"""Read digits: `Predictor.default().predict("digit.jpg")` → labels and probabilities.

A Predictor holds one model in eval mode and no other mutable state, so one instance may serve
concurrent calls from several threads. Every input goes through `mnistlab.preprocess` first.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import nn

from .catalog import MNIST
from .checkpoints import load_model
from .errors import MnistlabError
from .hardware import INFERENCE_ENV, choose_inference, onnxruntime_version
from .mlpstep import forward_stack, linear_stack, stack_params
from .models import count_parameters
from .preprocess import ImageSource, open_image, to_mnist

BUNDLED_WEIGHTS = "default.safetensors"
BUNDLED_ONNX = "default.onnx"  # the same weights as an onnxruntime graph (export.engine_session)
CHUNK = 512  # images per forward pass: bounds memory for long lists
_CPU = torch.device("cpu")
PIXELS_ERROR = "pixel values must be finite and in [0, 1] (scale uint8 by 1/255)"


def bundled_weights() -> Path:
    """The weights file that ships inside the package."""
    return Path(str(resources.files("mnistlab") / "weights" / BUNDLED_WEIGHTS))


def bundled_onnx() -> Path:
    """The bundled weights as the graph a Predictor runs on onnxruntime."""
    return bundled_weights().with_name(BUNDLED_ONNX)


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


class Predictions(Sequence[Prediction]):
    """A batch's readings as tensors (`labels`, `probabilities`, `images`, `paths`), read-only;
    also a sequence of `Prediction`, each built on first access (its image a view of `images`)."""

    __slots__ = ("_images", "_items", "_labels", "_paths", "_probabilities")

    def __init__(
        self,
        labels: torch.Tensor,
        probabilities: torch.Tensor,
        images: torch.Tensor,
        paths: Sequence[str | None] | None = None,
    ) -> None:
        if paths is not None and len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths for {len(labels)} predictions")
        self._labels, self._probabilities, self._images = labels, probabilities, images
        self._paths = tuple(paths) if paths is not None else None
        self._items: list[Prediction | None] | None = None

    @property
    def labels(self) -> torch.Tensor:
        """int64 [N]: the most probable digit of each image."""
        return self._labels

    @property
    def probabilities(self) -> torch.Tensor:
        """float32 [N, 10]: each image's softmax."""
        return self._probabilities

    @property
    def images(self) -> torch.Tensor:
        """float32 [N, 28, 28] in [0, 1]: what the model saw (a copy of the input)."""
        return self._images

    @property
    def paths(self) -> tuple[str | None, ...]:
        """The file each image came from (None where it was not a path)."""
        return self._paths if self._paths is not None else (None,) * len(self)

    def __len__(self) -> int:
        return len(self._labels)

    @overload
    def __getitem__(self, index: int) -> Prediction: ...
    @overload
    def __getitem__(self, index: slice) -> list[Prediction]: ...
    def __getitem__(self, index: int | slice) -> Prediction | list[Prediction]:
        n = len(self._labels)
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(n))]
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"prediction index {index} out of range for {n}")
        return self._item(i)

    def __iter__(self) -> Iterator[Prediction]:
        for i in range(len(self._labels)):
            yield self._item(i)

    def __repr__(self) -> str:
        shown = ", ".join(str(d) for d in self._labels[:10].tolist())
        more = ", ..." if len(self) > 10 else ""
        return f"Predictions({len(self)} images, labels [{shown}{more}])"

    def _item(self, i: int) -> Prediction:
        # Kept once built, so an attribute set on it (the CLI sets .path) is still there later.
        if self._items is None:
            self._items = [None] * len(self._labels)
        item = self._items[i]
        if item is None:
            label = int(self._labels[i])
            probabilities = self._probabilities[i].tolist()
            path = self._paths[i] if self._paths is not None else None
            item = Prediction(label, probabilities[label], probabilities, self._images[i], path)
            self._items[i] = item
        return item


class Predictor:
    """A model plus the preprocessing that makes real pictures look like MNIST.

    It runs the model on the fastest engine at hand (`mnistlab.hardware.choose_inference`):
    onnxruntime for convnets on the CPU, eager PyTorch otherwise. `backend="eager"` (or
    `$MNISTLAB_INFERENCE=eager`) forces PyTorch; `.backend` says what was chosen and why.
    """

    def __init__(
        self, model: nn.Module, info: dict[str, Any], backend: str | None = None,
        onnx: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._info = dict(info)
        self.mean, self.std = MNIST.mean, MNIST.std
        # Normalizing as one fused op, shift + scale·x, costs a third of (x - mean) / std (CPU
        # time at batch 1); like the device below, read once here.
        self._shift, self._scale = torch.tensor(-self.mean / self.std), 1.0 / self.std
        # Where the model's weights are, read once: move the model before making the Predictor.
        self.device = next(self.model.parameters(), torch.empty(0)).device
        self._on_cpu = self.device == _CPU
        # A plain MLP runs as its chain of addmm (what nn.Linear computes, to the bit) without
        # the module calls, which at batch 1 cost a third of the `mlp`'s time.
        stack = linear_stack(self.model)
        self._stack = (
            stack_params(stack) if stack and all(m.bias is not None for m in stack) else None
        )
        asked = backend or os.environ.get(INFERENCE_ENV) or "auto"
        self.backend = choose_inference(
            asked, self.device.type,
            convolutional=any(isinstance(m, nn.Conv2d) for m in self.model.modules()),
            linear_stack=self._stack is not None,
            onnxruntime=onnxruntime_version() is not None,
        )
        self._session = None
        if self.backend.value == "onnxruntime":
            from .export import engine_session

            bundled = Path(onnx) if onnx is not None else None
            self._session = engine_session(self.model, torch.get_num_threads(), bundled)
            self._outputs = [o.name for o in self._session.get_outputs()]  # probabilities

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_run(
        cls, path: str | os.PathLike[str], best: bool = False, backend: str | None = None
    ) -> Predictor:
        """The final (or, with `best`, the best-validation) weights of a run folder."""
        model, meta = load_model(path, best=best)
        summary_path = Path(path) / "summary.json"
        test_accuracy = None
        if summary_path.is_file() and not best:
            try:
                test_accuracy = json.loads(summary_path.read_text()).get("test_acc")
            except (OSError, ValueError):
                test_accuracy = None
        return cls(model, _info(model, meta, str(path), test_accuracy), backend=backend)

    @classmethod
    def from_weights(
        cls, path: str | os.PathLike[str], backend: str | None = None,
        onnx: str | os.PathLike[str] | None = None,
    ) -> Predictor:
        """A `.pt` or `.safetensors` weights file (its model card, if any, is read too)."""
        model, meta = load_model(path)
        card = read_card(path) if Path(path).suffix == ".safetensors" else None
        accuracy = (card or {}).get("test_accuracy", meta.get("test_accuracy"))
        info = _info(model, meta, str(path), accuracy)
        if card:
            info["card"] = card
        return cls(model, info, backend=backend, onnx=onnx)

    @classmethod
    def default(cls, backend: str | None = None) -> Predictor:
        """The model that ships with mnistlab (no download, works offline)."""
        path = bundled_weights()
        if not path.is_file():
            raise MnistlabError(
                f"the bundled model is missing ({path}); reinstall mnistlab, or pass --model "
                "with a run folder or weights file"
            )
        predictor = cls.from_weights(path, backend=backend, onnx=bundled_onnx())
        predictor._info["source"] = "bundled"
        predictor._info["path"] = str(path)
        return predictor

    @classmethod
    def load(
        cls, spec: str | os.PathLike[str] | None = None, best: bool = False,
        backend: str | None = None,
    ) -> Predictor:
        """None → the bundled model; a run folder (or run name under runs/) or a weights file.
        `backend`: auto (default), eager or onnxruntime."""
        if spec is None or str(spec) == "":
            return cls.default(backend=backend)
        path = Path(spec)
        if path.is_dir():
            return cls.from_run(path, best=best, backend=backend)
        if path.is_file():
            return cls.from_weights(path, backend=backend)
        if not path.exists() and (Path("runs") / str(spec)).is_dir() and "/" not in str(spec):
            return cls.from_run(Path("runs") / str(spec), best=best, backend=backend)
        raise MnistlabError(f"{spec}: no such run folder or weights file")

    # -- use ---------------------------------------------------------------------------------

    @property
    def info(self) -> dict[str, Any]:
        """name, architecture, parameters, test_accuracy (%, or None), source, and more."""
        return dict(self._info)

    def preprocess(self, source: ImageSource) -> torch.Tensor:
        """The 28×28 image in [0, 1] the model sees for `source` (ImageError, NoInkError)."""
        return to_mnist(open_image(source))

    def predict(
        self, images: ImageSource | Sequence[ImageSource], tta: bool = False
    ) -> Predictions:
        """Predictions for one image or a list of them (paths, bytes, PIL, arrays, tensors).

        An array or tensor is one image; pass a list for several, or use `predict_pixels` for a
        ready batch. The first bad image raises ImageError or NoInkError. `tta`: average over
        shifted and rotated views (`mnistlab.tta`).
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = [self.preprocess(item) for item in items]
        paths = [str(i) if isinstance(i, (str, os.PathLike)) else None for i in items]
        x = torch.stack(pixels) if pixels else torch.empty(0, 28, 28)
        return self.predict_pixels(x, paths=paths, tta=tta)

    def predict_pixels(
        self, x: torch.Tensor, paths: Sequence[str | None] | None = None, tta: bool = False
    ) -> Predictions:
        """Predictions for ready 28×28 images in [0, 1] ([N, 28, 28] or [28, 28]), as they are.

        `paths`, one per image, are carried into the result. The result holds a float32 copy of
        `x`, so changing `x` later does not change it. `tta`: average the probabilities over
        shifted and rotated views (`mnistlab.tta`).
        """
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        shape = x.shape
        if len(shape) == 2:
            x = x.unsqueeze(0)
            shape = x.shape
        elif len(shape) == 4 and shape[1] == 1:
            x = x.squeeze(1)
            shape = x.shape
        if len(shape) != 3 or shape[1] != 28 or shape[2] != 28:
            raise MnistlabError(
                f"expected images of shape [N, 28, 28] or [28, 28], got {list(shape)}"
            )
        n = shape[0]
        if self._session is not None and not tta:
            return self._predict_onnx(x, n, paths)
        # All of it under inference_mode (it makes every op cheaper), so the returned tensors are
        # inference tensors, like the model's output.
        with torch.inference_mode():
            # Exactly one copy, whatever came in (clone is the cheaper call where no conversion is
            # due), so changing `x` later does not change the result.
            x = x.clone() if x.dtype is torch.float32 and x.is_cpu else x.to(_CPU, torch.float32)
            if n:
                # One pass: NaN makes both ends NaN and ±inf lands on one end, so all fail here.
                lo, hi = torch.aminmax(x)
                if not (lo.item() >= 0 and hi.item() <= 1):
                    raise MnistlabError(PIXELS_ERROR)
            if tta:
                probs = self._tta_probabilities(x)
            elif n <= CHUNK:
                probs = self._probabilities(x) if n else torch.empty(0, 10)
            else:
                chunks = [self._probabilities(x[s : s + CHUNK]) for s in range(0, n, CHUNK)]
                probs = torch.cat(chunks)
            labels = probs.argmax(1)
        return Predictions(labels, probs, x, paths)

    def _predict_onnx(
        self, x: torch.Tensor, n: int, paths: Sequence[str | None] | None
    ) -> Predictions:
        """predict_pixels on onnxruntime: the same checks and copy, in numpy, around one run."""
        if not (x.dtype is torch.float32 and x.is_cpu):
            x = x.to(_CPU, torch.float32)
        # The copy in numpy's memory: onnxruntime ran 15-25% slower at batch 1 on a fresh
        # torch allocation (measured; not understood).
        a = x.detach().numpy().copy()
        x = torch.from_numpy(a)
        if n:
            if not (a.min() >= 0 and a.max() <= 1):  # NaN fails both comparisons
                raise MnistlabError(PIXELS_ERROR)
            pixels = a.reshape(n, 1, 28, 28)
            run = self._session.run
            if n <= CHUNK:
                probs = run(self._outputs, {"pixels": pixels})[0]
            else:
                probs = np.concatenate([run(self._outputs, {"pixels": pixels[s : s + CHUNK]})[0]
                                        for s in range(0, n, CHUNK)])
        else:
            probs = np.empty((0, 10), dtype=np.float32)
        return Predictions(torch.from_numpy(probs.argmax(1)), torch.from_numpy(probs), x, paths)

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        if self._session is not None:  # the graph normalizes and ends in softmax
            pixels = batch.detach().numpy().reshape(batch.shape[0], 1, 28, 28).copy()
            return torch.from_numpy(self._session.run(self._outputs, {"pixels": pixels})[0])
        z = torch.add(self._shift, batch, alpha=self._scale).unsqueeze(1)  # (x - mean) / std
        if not self._on_cpu:
            z = z.to(self.device)
        logits = self.model(z) if self._stack is None else forward_stack(self._stack, z)[-1]
        if logits.dtype != torch.float32:
            logits = logits.float()
        return torch.softmax(logits, dim=1) if self._on_cpu else torch.softmax(logits, 1).cpu()

    def _tta_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        from .tta import tta_probabilities

        def logits(views: torch.Tensor) -> torch.Tensor:
            return torch.log(self._probabilities(views))  # log-softmax: softmax gives it back

        return tta_probabilities(logits, x, chunk=max(1, CHUNK // 8))

    def __repr__(self) -> str:
        i = self._info
        return (f"Predictor({i['name']}, {i['parameters']:,} parameters, from {i['source']}, "
                f"on {self.backend.value})")


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
