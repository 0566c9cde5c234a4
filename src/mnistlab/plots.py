"""Figures, headless: each function returns a matplotlib Figure; `save_figure` writes it."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # headless: no display is needed or used

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .errors import MnistlabError  # noqa: E402
from .fileio import atomic_path  # noqa: E402


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> None:
    """Write `fig` atomically as PNG and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    except OSError as e:
        raise MnistlabError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def display_image(
    image: torch.Tensor, label: int | None = None, normalized: bool | None = None
) -> Figure:
    """The lab's display_image: the digit, its 784 values written on the grid, and a colour bar.

    Raw uint8 images get a 0–255 bar; normalized tensors a bar spanning their own min and max.
    """
    img = image.detach().cpu().squeeze()
    if img.shape != (28, 28):
        raise MnistlabError(f"expected a 28x28 image, got shape {tuple(image.shape)}")
    if normalized is None:
        normalized = img.dtype != torch.uint8
    values = img.float().numpy()
    vmin, vmax = (float(values.min()), float(values.max())) if normalized else (0.0, 255.0)
    fig, ax = plt.subplots(figsize=(12, 12))
    shown = ax.imshow(values, cmap="gray", vmin=vmin, vmax=vmax)
    mid = (vmin + vmax) / 2
    fmt = "{:.2f}" if normalized else "{:.0f}"
    for r in range(28):
        for c in range(28):
            v = values[r, c]
            ax.text(
                c, r, fmt.format(v), ha="center", va="center", fontsize=5 if normalized else 6,
                color="black" if v > mid else "white",
            )
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    title = f"Label: {label}" if label is not None else "Image"
    ax.set_title(title + (" (normalized)" if normalized else ""))
    ax.set_xticks([])
    ax.set_yticks([])
    return fig
