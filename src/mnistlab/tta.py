"""Test-time augmentation: average a model's probabilities over small shifts and rotations.

Each image is seen as VIEWS: itself, shifted one pixel left, right, up and down, and rotated
±10° — the kind of variation handwriting has and MNIST's centring removes only roughly. All
views of a batch are made by one `grid_sample` call (`mnistlab.augment.resample`) and go through
the model as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .augment import resample

# (rotation in degrees, shift right in pixels, shift down in pixels); the first is the identity.
VIEWS: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, -1.0, 0.0),
    (0.0, 0.0, 1.0),
    (0.0, 0.0, -1.0),
    (10.0, 0.0, 0.0),
    (-10.0, 0.0, 0.0),
)
DESCRIPTION = "7 views: the image, ±1 pixel shifts in x and y, ±10° rotations"


def _thetas(size: int = 28, views: tuple[tuple[float, float, float], ...] = VIEWS
            ) -> torch.Tensor:
    """[K, 2, 3] sampling grids (output → input), in grid units where the image spans 2."""
    out = torch.zeros(len(views), 2, 3)
    for k, (degrees, dx, dy) in enumerate(views):
        a = math.radians(degrees)
        out[k, 0, 0], out[k, 0, 1] = math.cos(a), -math.sin(a)
        out[k, 1, 0], out[k, 1, 1] = math.sin(a), math.cos(a)
        # Moving the content right by dx pixels samples from dx pixels to the left.
        out[k, 0, 2], out[k, 1, 2] = -2.0 * dx / size, -2.0 * dy / size
    return out


def views(x: torch.Tensor) -> torch.Tensor:
    """[N, 28, 28] images in [0, 1] → [K, N, 28, 28]: every view of every image (black fills).

    One sampling grid per view, shared by all N images (building a grid per image costs five
    times the sampling itself), then one grid_sample over all K·N.
    """
    n, h, w = x.shape
    k = len(VIEWS)
    grids = F.affine_grid(_thetas(w).to(x.device), [k, 1, h, w], align_corners=False)
    batch = x.float().unsqueeze(1).repeat(k, 1, 1, 1)  # [K·N, 1, H, W], view-major
    return resample(batch, grids.repeat_interleave(n, 0), background=0.0).view(k, n, h, w)


def tta_probabilities(
    logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """The mean softmax over VIEWS of each image: `logits_of` maps [M, 28, 28] images in [0, 1]
    to [M, 10] logits; `chunk` images (× 7 views) go through it at a time."""
    out = []
    for s in range(0, x.shape[0], chunk):
        v = views(x[s : s + chunk])
        k, n = v.shape[:2]
        probs = torch.softmax(logits_of(v.reshape(k * n, *v.shape[2:])).float(), 1)
        out.append(probs.view(k, n, -1).mean(0))
    return torch.cat(out) if out else torch.empty(0, 10)


@dataclass
class TTAChange:
    """What test-time augmentation changed on a labelled set."""

    accuracy: float  # % without
    tta_accuracy: float  # % with
    changed: int  # predictions that differ
    fixed: int  # wrong without, right with
    broken: int  # right without, wrong with
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"views": DESCRIPTION, "accuracy": self.accuracy,
                "tta_accuracy": self.tta_accuracy, "changed": self.changed, "fixed": self.fixed,
                "broken": self.broken, "count": self.count}

    def line(self) -> str:
        delta = self.tta_accuracy - self.accuracy
        return (f"test-time augmentation ({DESCRIPTION}): accuracy {self.accuracy:.2f}% → "
                f"{self.tta_accuracy:.2f}% ({delta:+.2f} points); {self.changed} of "
                f"{self.count:,} predictions changed: {self.fixed} fixed, {self.broken} broken")


def compare(plain: torch.Tensor, tta: torch.Tensor, labels: torch.Tensor) -> TTAChange:
    """Compare predictions (scores or probabilities [N, 10]) without and with TTA."""
    p, t, y = plain.argmax(1), tta.argmax(1), labels.long()
    n = max(1, len(y))
    return TTAChange(
        accuracy=100.0 * float((p == y).sum()) / n,
        tta_accuracy=100.0 * float((t == y).sum()) / n,
        changed=int((p != t).sum()),
        fixed=int(((p != y) & (t == y)).sum()),
        broken=int(((p == y) & (t != y)).sum()),
        count=len(y),
    )


def tta_scores(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, plain: torch.Tensor,
    chunk: int = 500,
) -> tuple[torch.Tensor, TTAChange]:
    """(log of the TTA probabilities [N, 10], what TTA changed against `plain` scores) for a
    model and uint8 (or [0, 1]) images; the log-probabilities serve as logits for metrics."""
    from .inside import as_images, normalize

    x = as_images(images)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            probs = tta_probabilities(lambda v: model(normalize(v.to(device))).cpu(), x, chunk)
    finally:
        model.train(was_training)
    return probs.clamp(min=1e-30).log(), compare(plain, probs, labels)
