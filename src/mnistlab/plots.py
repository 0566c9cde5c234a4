"""Figures, headless: each function returns a matplotlib Figure; `save_figure` writes it.

Drawn for speed as much as for the eye, since every run's report draws six of them: margins are
set per figure rather than computed (`tight_layout` and `bbox_inches="tight"` each cost a
second drawing pass), image grids are one mosaic in one axes (an axes costs more than the image
in it), and PNGs are written with light compression.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import matplotlib

# Headless: no display is needed or used. In a notebook the kernel's inline backend is kept
# (ipykernel names it in MPLBACKEND), so the returned figures show up there.
if "inline" not in os.environ.get("MPLBACKEND", ""):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .errors import MnistlabError
from .fileio import atomic_path

if TYPE_CHECKING:  # tensors are read through numpy: drawing needs no torch (mnistlab.render)
    import torch

# zlib level 1: a fifth of the default level's encoding time, for files about a third larger.
PNG_OPTIONS = {"compress_level": 1}


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> None:
    """Write `fig` atomically as PNG and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs=PNG_OPTIONS)
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
    img = _numpy(image).squeeze()
    if img.shape != (28, 28):
        raise MnistlabError(f"expected a 28x28 image, got shape {tuple(image.shape)}")
    if normalized is None:
        normalized = img.dtype != np.uint8
    values = img.astype(np.float32)
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


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """`fig` rendered as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs=PNG_OPTIONS)
    finally:
        plt.close(fig)
    return buffer.getvalue()


History = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[float]]


def _columns(history: History) -> dict[str, np.ndarray]:
    """Per-epoch records (metrics.jsonl / fit's history) or a dict of lists → dict of arrays."""
    if isinstance(history, Mapping):
        cols = {k: np.asarray(v, dtype=float) for k, v in history.items()}
    else:
        keys = dict.fromkeys(k for record in history for k in record)
        cols = {
            k: np.asarray([r.get(k, np.nan) for r in history], dtype=float)
            for k in keys
            if all(isinstance(r.get(k, 0.0), int | float) for r in history)
        }
    n = max((len(v) for v in cols.values()), default=0)
    if "epoch" not in cols:
        cols["epoch"] = np.arange(1, n + 1, dtype=float)
    return cols


def _has(cols: dict[str, np.ndarray], key: str) -> bool:
    return key in cols and bool(np.isfinite(cols[key]).any())


def _epoch_axes(ax: Axes, title: str, ylabel: str, epochs: Sequence[float] = ()) -> None:
    ax.set_title(title)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    shown = sorted({int(e) for e in epochs if math.isfinite(e)})
    if 0 < len(shown) <= 20:  # one tick per epoch; a lone epoch would otherwise get 0.95…1.05
        ax.set_xticks(shown)
        if len(shown) == 1:
            ax.set_xlim(shown[0] - 1, shown[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_metrics(history: History, title: str | None = None) -> Figure:
    """The lab's curves, each measure on its splits together: training, test and (dashed)
    validation loss in one panel; training, test and validation accuracy in the other."""
    cols = _columns(history)
    if not _has(cols, "train_loss") and not _has(cols, "test_acc"):
        raise MnistlabError("no train_loss or test_acc per epoch to plot")
    epochs = cols["epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, measure, heading, ylabel, where in (
        (ax_loss, "loss", "Loss per epoch", "Cross-entropy loss", "upper right"),
        (ax_acc, "acc", "Accuracy per epoch", "Accuracy (%)", "lower right"),
    ):
        for split, colour in SPLIT_COLOURS.items():
            key = f"{split}_{measure}"
            if _has(cols, key):
                style = "--" if split == "val" else "-"
                ax.plot(epochs, cols[key], style, marker="o", color=colour,
                        label=_CURVE_NAMES[key])
        _epoch_axes(ax, heading, ylabel, epochs)
        ax.legend(loc=where)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.84 if title else 0.91,
                        wspace=0.22)
    return fig


SPLIT_COLOURS = {"train": "tab:blue", "test": "tab:orange", "val": "tab:green"}
_CURVE_NAMES = {
    f"{split}_{measure}": f"{name} {what}"
    for split, name in (("train", "training"), ("test", "test"), ("val", "validation"))
    for measure, what in (("loss", "loss"), ("acc", "accuracy"))
}


def plot_comparison(histories: Mapping[str, History]) -> Figure:
    """Several runs' curves overlaid: training loss (validation dashed) and test accuracy."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    epochs: list[float] = []
    for i, (name, history) in enumerate(histories.items()):
        cols = _columns(history)
        epochs += cols["epoch"].tolist()
        colour = colours[i % len(colours)]
        for ax, solid, dashed in (
            (ax_loss, "train_loss", "val_loss"),
            (ax_acc, "test_acc", "val_acc"),
        ):
            if _has(cols, solid):
                ax.plot(cols["epoch"], cols[solid], "-", marker="o", color=colour, label=name)
            if _has(cols, dashed):
                ax.plot(
                    cols["epoch"], cols[dashed], "--", marker=".", color=colour,
                    label=f"{name} (validation)",
                )
    _epoch_axes(ax_loss, "Training loss (validation dashed)", "Cross-entropy loss", epochs)
    _epoch_axes(ax_acc, "Test accuracy (validation dashed)", "Accuracy (%)", epochs)
    ax_loss.legend(fontsize="small", loc="upper right")
    ax_acc.legend(fontsize="small", loc="lower right")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    return fig


def _images(images: Any) -> tuple[np.ndarray, float | None, float | None]:
    """[N, 28, 28] float array and the colour range: 0–255 for raw uint8, automatic otherwise."""
    x = _numpy(images)
    raw = x.dtype == np.uint8
    x = x.astype(np.float32).reshape(len(x), 28, 28)
    return (x, 0.0, 255.0) if raw else (x, None, None)


def _numpy(x: Any) -> np.ndarray:
    """An array of `x`: a tensor (without importing torch), an array or a nested sequence."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _predicted(predictions: Any) -> np.ndarray:
    p = _numpy(predictions)
    return (p.argmax(1) if p.ndim == 2 else p).astype(np.int64)


def _grid(n: int, cols: int | None, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    cols = max(1, min(n, cols or math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * size[0], rows * size[1]), squeeze=False
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def _no_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


@dataclass
class Mosaic:
    """Images tiled into one array for one axes: tile k's top-left corner is at `corner(k)`."""

    rows: int
    cols: int
    gap_x: int
    gap_y: int
    top: int  # room above each tile (for its title)

    def corner(self, k: int) -> tuple[int, int]:
        r, c = divmod(k, self.cols)
        return c * (28 + self.gap_x) + self.gap_x // 2, r * (28 + self.gap_y) + self.top

    def canvas(self, tiles: np.ndarray) -> np.ndarray:
        height = self.rows * (28 + self.gap_y)
        width = self.cols * (28 + self.gap_x)
        out = np.full((height, width), np.nan, dtype=np.float32)  # gaps: transparent
        for k, tile in enumerate(tiles):
            x, y = self.corner(k)
            out[y : y + 28, x : x + 28] = tile
        return out


def _mosaic_axes(
    tiles: np.ndarray, mosaic: Mosaic, tile_inches: float, vmin: float | None,
    vmax: float | None, title_inches: float = 0.55,
) -> tuple[Figure, Axes]:
    """One figure holding the mosaic of `tiles`, sized to it, with room for a title on top."""
    canvas = mosaic.canvas(tiles)
    scale = tile_inches / 28  # inches per pixel
    width, height = canvas.shape[1] * scale, canvas.shape[0] * scale
    fig = plt.figure(figsize=(width + 0.2, height + title_inches + 0.1))
    total = height + title_inches + 0.1
    ax = fig.add_axes((0.1 / (width + 0.2), 0.1 / total, width / (width + 0.2), height / total))
    cmap = plt.get_cmap("gray").with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    ax.imshow(canvas, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    return fig, ax


def sample_indices(count: int, n: int, seed: int = 0) -> list[int]:
    """The seeded random sample of test images that `display_predictions` shows."""
    rng = np.random.default_rng(seed)
    return rng.choice(count, size=min(n, count), replace=False).tolist()


def display_predictions(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    predictions: torch.Tensor | np.ndarray,
    n: int = 16,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    cols: int | None = None,
) -> Figure:
    """The lab's grid of random test images titled "pred P / true T"; mistakes in red, framed.

    `predictions` are class indices or per-class scores; the sample is seeded (or `indices`).
    The grid is one mosaic image: each title is a text of the axes, each mistake's frame a
    rectangle patch.
    """
    x, vmin, vmax = _images(images)
    y = _numpy(labels).astype(np.int64)
    p = _predicted(predictions)
    if not len(x) == len(y) == len(p):
        raise MnistlabError(f"{len(x)} images, {len(y)} labels and {len(p)} predictions differ")
    if indices is None:
        indices = sample_indices(len(x), n, seed)
    indices = list(indices)
    cols = max(1, min(len(indices), cols or math.ceil(math.sqrt(len(indices)))))
    mosaic = Mosaic(max(1, math.ceil(len(indices) / cols)), cols, gap_x=8, gap_y=14, top=10)
    fig, ax = _mosaic_axes(x[indices], mosaic, 1.3, vmin, vmax)
    wrong = 0
    for k, i in enumerate(indices):
        left, top = mosaic.corner(k)
        mistake = bool(p[i] != y[i])
        wrong += mistake
        colour = "red" if mistake else "black"
        ax.text(left + 14, top - 2, f"pred {p[i]} / true {y[i]}", color=colour, fontsize=9,
                ha="center", va="bottom", fontweight="bold" if mistake else "normal")
        if mistake:  # a red frame too, so a mistake does not rely on colour alone
            ax.add_patch(Rectangle((left - 1.5, top - 1.5), 30, 30, fill=False,
                                   edgecolor="red", linewidth=2.5))
    fig.suptitle(f"Predicted / true label of {len(indices)} random test images "
                 f"({wrong} mistake{'s' if wrong != 1 else ''}, in red)", y=0.99, va="top")
    return fig


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray, title: str = "Confusion matrix"
) -> Figure:
    """Heatmap of counts, rows true and columns predicted, every cell annotated."""
    m = np.asarray(cm)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise MnistlabError(f"a confusion matrix is square, got shape {m.shape}")
    k = m.shape[0]
    fig, ax = plt.subplots(figsize=(0.75 * k + 2, 0.7 * k + 1.5))
    shown = ax.imshow(m, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    threshold = m.max() / 2 if m.size else 0
    for t in range(k):
        for p in range(k):
            ax.text(
                p, t, f"{m[t, p]:d}", ha="center", va="center", fontsize=8,
                color="white" if m[t, p] > threshold else "black",
            )
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(title)
    fig.subplots_adjust(left=0.1, right=0.95, bottom=0.1, top=0.93)
    return fig


def plot_misclassified(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    probs: torch.Tensor | np.ndarray,
    n: int = 12,
    cols: int = 6,
) -> Figure:
    """The `n` mistakes the model was surest of, each titled "true T → pred P" in red with its
    top-3 class probabilities below (one mosaic, like `display_predictions`)."""
    x, vmin, vmax = _images(images)
    y = _numpy(labels).astype(np.int64)
    pr = _numpy(probs).astype(np.float32)
    predicted = pr.argmax(1)
    confidence = pr[np.arange(len(pr)), predicted]
    wrong = np.flatnonzero(predicted != y)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:n].tolist()
    if not order:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "No mistakes", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        ax.set_title("Most confident mistakes")
        return fig
    cols = max(1, min(len(order), cols))
    mosaic = Mosaic(math.ceil(len(order) / cols), cols, gap_x=12, gap_y=32, top=8)
    fig, ax = _mosaic_axes(x[order], mosaic, 1.3, vmin, vmax)
    for k, i in enumerate(order):
        left, top = mosaic.corner(k)
        ax.text(left + 14, top - 1.5, f"true {y[i]} → pred {predicted[i]}", color="red",
                fontsize=9, ha="center", va="bottom")
        top3 = np.argsort(-pr[i], kind="stable")[:3]
        ax.text(left + 14, top + 30, "\n".join(f"{c}: {100 * pr[i, c]:5.1f}%" for c in top3),
                fontsize=8, family="monospace", ha="center", va="top")
    fig.suptitle(f"The {len(order)} most confident of {len(wrong)} mistakes "
                 "(top-3 probabilities below each)", y=0.99, va="top")
    return fig


def plot_per_class(per_class: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Figure:
    """Precision, recall and F1 by digit, from classification_metrics (or its "per_class")."""
    rows = per_class["per_class"] if isinstance(per_class, Mapping) else per_class
    labels = [r["label"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(rows))
    width = 0.27
    values = []
    for j, (key, name) in enumerate((("precision", "precision"), ("recall", "recall"),
                                     ("f1", "F1"))):
        v = [float(r[key]) for r in rows]
        values += v
        ax.bar(x + (j - 1) * width, v, width, label=name)
    # Scores sit near 1: zoom in so the differences between digits are visible.
    low = max(0.0, math.floor((min(values, default=0.0) - 0.02) * 20) / 20)
    ax.set_ylim(low, 1.0)
    ax.set_xticks(x, [f"{c}\n(n={r['support']})" for c, r in zip(labels, rows, strict=True)])
    ax.set_xlabel("Digit (test images)")
    ax.set_ylabel("Score")
    ax.set_title("Precision, recall and F1 by digit")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.88, bottom=0.2, top=0.91)
    return fig


def plot_calibration(
    probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, bins: int = 15
) -> Figure:
    """Reliability diagram (accuracy against confidence per bin) titled with the ECE, and how
    many predictions fall in each bin."""
    from .metrics import calibration_bins, expected_calibration_error

    b = calibration_bins(probs, labels, bins)
    ece = expected_calibration_error(probs, labels, bins)
    edges = b["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    seen = b["count"] > 0
    fig, (ax, ax_count) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.bar(centers[seen], b["accuracy"][seen], width, edgecolor="black", alpha=0.85,
           label="accuracy in bin")
    # The bin's mean confidence as a red bar-wide tick: above the bar means over-confident.
    ax.errorbar(centers[seen], b["confidence"][seen], xerr=width / 2, fmt="none", ecolor="red",
                elinewidth=2.5, capsize=0, label="mean confidence in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability diagram: ECE {100 * ece:.2f}% ({bins} bins)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax_count.bar(centers, b["count"], width, edgecolor="black", color="tab:gray")
    ax_count.set_yscale("log")
    ax_count.set_xlabel("Confidence (top-1 probability)")
    ax_count.set_ylabel("Predictions")
    fig.subplots_adjust(left=0.13, right=0.96, bottom=0.08, top=0.95, hspace=0.08)
    return fig


# --- inside the model (mnistlab.inside) and the learning-rate finder ---------------------------


def _symmetric(values: np.ndarray) -> float:
    """A colour range centred on 0: the largest magnitude (1.0 for an all-zero array)."""
    top = float(np.abs(values).max()) if values.size else 0.0
    return top if top > 0 else 1.0


def _mosaic(tiles: np.ndarray, cols: int, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """[n, h, w] tiles laid out in rows of `cols`, `gap` pixels of `fill` between them."""
    n, h, w = tiles.shape
    rows = max(1, math.ceil(n / cols))
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), fill, dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def _tile_numbers(ax: Axes, n: int, cols: int, h: int, w: int, gap: int = 1) -> None:
    for i in range(n):
        r, c = divmod(i, cols)
        ax.text(c * (w + gap) + 0.5, r * (h + gap) + 0.5, str(i), fontsize=6, va="top",
                ha="left", color="black", alpha=0.7)


def plot_first_layer(weights: torch.Tensor | np.ndarray, kind: str = "linear",
                     title: str | None = None, max_units: int = 64) -> Figure:
    """A first layer's weights as images: red excites, blue inhibits (each tile on its own
    symmetric scale). Linear layers show 28×28 templates, convolutions k×k filters.

    One image of all tiles (a subplot per unit costs ~20 ms each to draw)."""
    w = _numpy(weights).astype(np.float32)[:max_units]
    n, h, wd = w.shape
    scaled = w / np.maximum(np.abs(w).reshape(n, -1).max(1), 1e-12)[:, None, None]
    cols = 10 if n == 10 else min(16, max(1, math.ceil(math.sqrt(n))))
    mosaic = _mosaic(scaled, cols)
    rows = mosaic.shape[0] / (h + 1)
    fig, ax = plt.subplots(figsize=(min(12.0, 0.9 * cols + 1), 0.9 * rows + 0.9))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    if h >= 10:  # numbers would hide a small filter
        _tile_numbers(ax, n, cols, h, wd)
    _no_ticks(ax)
    what = "28×28 weights per unit" if kind == "linear" else "filters of the first convolution"
    shown = f" (the first {n})" if n == max_units else ""
    ax.set_title(title or f"First layer: {n} {what}{shown}; red excites, blue inhibits")
    fig.tight_layout()
    return fig


def plot_feature_maps(image: torch.Tensor | np.ndarray, maps: torch.Tensor | np.ndarray,
                      label: int | None = None, max_maps: int = 32) -> Figure:
    """One digit and what each first-layer filter of a convnet answered to it."""
    img = _numpy(image).astype(np.float32).reshape(28, 28)
    m = _numpy(maps).astype(np.float32)[:max_maps]
    n = len(m)
    scaled = m / np.maximum(m.reshape(n, -1).max(1), 1e-6)[:, None, None]
    cols = min(8, n)
    fig, (ax_in, ax) = plt.subplots(1, 2, figsize=(11, 3.2),
                                    gridspec_kw={"width_ratios": [1, 2.6]})
    ax_in.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax_in.set_title("input" if label is None else f"input (a {label})")
    cmap = plt.get_cmap("magma").with_extremes(bad="white")
    ax.imshow(_mosaic(scaled, cols), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"Feature maps of the first convolution ({n} channels; brighter: stronger)")
    for a_ in (ax_in, ax):
        _no_ticks(a_)
    fig.tight_layout()
    return fig


def saliency_rgba(image: np.ndarray, attribution: np.ndarray) -> np.ndarray:
    """[28, 28, 4] RGBA: the digit as light grey ink on white, under a heat map whose colour is
    the sign (red raises the score, blue lowers it) and whose opacity is the magnitude."""
    lim = _symmetric(attribution)
    heat = plt.get_cmap("RdBu_r")(np.clip(attribution / lim, -1, 1) * 0.5 + 0.5)
    strength = np.clip(np.abs(attribution) / lim, 0, 1)[..., None] ** 0.7
    ink = (1.0 - 0.3 * np.clip(image, 0, 1))[..., None]
    rgb = strength * heat[..., :3] + (1 - strength) * ink
    return np.concatenate([rgb, np.ones_like(ink)], axis=-1)


def plot_saliency(images: torch.Tensor | np.ndarray, attributions: torch.Tensor | np.ndarray,
                  labels: Sequence[int], predictions: Sequence[int], cols: int = 6) -> Figure:
    """Digits with their integrated-gradients heat maps: red pixels raised the predicted digit's
    score, blue ones lowered it; the digit shows through in grey."""
    x = _numpy(images).astype(np.float32).reshape(-1, 28, 28)
    a = _numpy(attributions).astype(np.float32).reshape(-1, 28, 28)
    fig, axes = _grid(len(x), cols, (1.7, 1.9))
    for ax, img, att, y, p in zip(axes, x, a, labels, predictions, strict=True):
        ax.imshow(saliency_rgba(img, att), interpolation="nearest")
        wrong = int(y) != int(p)
        ax.set_title(f"pred {int(p)} / true {int(y)}", fontsize=8,
                     color="red" if wrong else "black")
        _no_ticks(ax)
    fig.suptitle("Why? Integrated gradients from a black image (red: for the prediction, "
                 "blue: against)")
    fig.tight_layout()
    return fig


def plot_embedding(xy: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                   title: str | None = None) -> Figure:
    """t-SNE map of test digits coloured by true label; mistakes ringed in black."""
    xy = np.asarray(xy)
    y = np.asarray(labels)
    p = np.asarray(predictions)
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab10")
    for d in range(10):
        sel = y == d
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(d), label=str(d), linewidths=0)
    wrong = y != p
    ax.scatter(xy[wrong, 0], xy[wrong, 1], s=40, facecolors="none", edgecolors="black",
               linewidths=1.0, label=f"mistake ({int(wrong.sum())})")
    for d in range(10):  # each digit's label at its cluster's median
        sel = y == d
        if sel.any():
            cx, cy = np.median(xy[sel], axis=0)
            ax.text(cx, cy, str(d), fontsize=14, fontweight="bold", ha="center", va="center",
                    color=cmap(d), bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
    _no_ticks(ax)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=2, fontsize="small")
    ax.set_title(title or f"Embedding map: t-SNE of {len(xy):,} test digits' penultimate "
                 "features")
    fig.tight_layout()
    return fig


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggested: float,
                 raw: Sequence[float] | None = None, rule: str = "") -> Figure:
    """The learning-rate range test: smoothed loss against lr (log scale), the suggestion
    marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if raw is not None:
        ax.plot(lrs, raw, color="tab:gray", alpha=0.35, lw=0.8, label="loss per step")
    ax.plot(lrs, losses, color="tab:blue", lw=2, label="smoothed loss")
    ax.axvline(suggested, color="tab:red", ls="--", label=f"suggested lr {suggested:.2g}")
    finite = np.asarray([v for v in losses if math.isfinite(v)], dtype=float)
    if finite.size:
        low, start = float(finite.min()), float(finite[0])
        ax.set_ylim(max(0.0, low - 0.1 * (start - low)), max(start, low) * 1.3 + 1e-3)
    ax.set_xscale("log")
    ax.set_xlabel("Learning rate (log scale)")
    ax.set_ylabel("Training loss")
    ax.set_title("Learning-rate finder" + (f"\n{rule}" if rule else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig
