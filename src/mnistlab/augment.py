"""Augmentation as tensor operations on whole batches (never per sample).

`RandomAffine` draws one rotation, scale, shear and shift per image and warps the batch with a
single `affine_grid` + `grid_sample` call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .catalog import MNIST
from .config import AUGMENTATIONS
from .errors import MnistlabError

# The normalized value of a black (0) pixel: warping pads with it, so borders stay background.
BACKGROUND = -MNIST.mean / MNIST.std


class RandomAffine:
    """Random rotation and shear (degrees), zoom (± fraction) and shift (fraction of size)."""

    def __init__(
        self,
        degrees: float = 10.0,
        scale: float = 0.1,
        shear: float = 0.0,
        translate: float = 0.1,
        background: float = BACKGROUND,
    ) -> None:
        self.degrees, self.scale, self.shear = degrees, scale, shear
        self.translate, self.background = translate, background

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        opts = {"device": x.device, "dtype": torch.float32}

        def uniform(half_width: float) -> torch.Tensor:
            return (torch.rand(n, **opts) * 2 - 1) * half_width

        angle = uniform(math.radians(self.degrees))
        shear = uniform(math.radians(self.shear))
        # Sampling grids map output to input coordinates, so zooming in means scale < 1 here.
        s = 1.0 / (1.0 + uniform(self.scale))
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.empty(n, 2, 3, **opts)
        theta[:, 0, 0] = s * cos
        theta[:, 0, 1] = s * (-sin + torch.tan(shear) * cos)
        theta[:, 1, 0] = s * sin
        theta[:, 1, 1] = s * (cos + torch.tan(shear) * sin)
        theta[:, 0, 2] = uniform(2 * self.translate)  # grid coordinates span [-1, 1]: width 2
        theta[:, 1, 2] = uniform(2 * self.translate)
        return warp(x, theta, self.background)


def warp(x: torch.Tensor, theta: torch.Tensor, background: float = BACKGROUND) -> torch.Tensor:
    """Each image of `x` [N, C, H, W] resampled through its 2×3 affine `theta` [N, 2, 3]
    (output → input grid coordinates in [-1, 1]), in one grid_sample; `background` fills in."""
    return resample(x, F.affine_grid(theta, list(x.shape), align_corners=False), background)


def resample(x: torch.Tensor, grid: torch.Tensor, background: float = BACKGROUND) -> torch.Tensor:
    """`x` [N, C, H, W] bilinearly sampled at `grid` [N, H, W, 2]; `background` fills in."""
    shifted = x.float() - background
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + background).to(x.dtype)


def make_augmentation(name: str, **kwargs: float) -> RandomAffine | None:
    """The batch transform for a config's `augment` setting, or None."""
    if name == "none":
        return None
    if name == "affine":
        return RandomAffine(**kwargs)
    choices = ", ".join(AUGMENTATIONS)
    raise MnistlabError(f"unknown augmentation {name!r}; choose one of: {choices}")
