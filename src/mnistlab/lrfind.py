"""The learning-rate range test (Smith, 2017; fast.ai's `lr_find`): `lr_find(cfg)`.

Train a fresh model for a few hundred steps while the learning rate grows exponentially, record
the smoothed loss against it, stop once the loss diverges, and suggest a rate by a stated rule.
Only training images are used (the validation split, if any, is left out; never the test set).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .errors import MnistlabError

START_LR = 1e-7
END_LR = 10.0
STEPS = 300  # 37.5 a decade
BETA = 0.98  # the loss's exponential moving average, debiased as in Adam
DIVERGE = 4.0  # stop once the smoothed loss is this many times its minimum
SKIP = 0.1  # the first tenth of the sweep is left out of the search: there the curve is noise
RULE = (
    "steepest descent: the rate where the smoothed loss falls fastest against log(lr), "
    "searched between the first tenth of the sweep and the loss's minimum"
)
FALLBACK_RULE = "a tenth of the rate at the smoothed loss's minimum (it came too early to search)"


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    raw_losses: list[float]
    suggested_lr: float
    rule: str
    stopped: str  # "diverged" or "end of sweep"
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The shape `mnistlab lr-find --json` prints."""
        return {
            "suggested_lr": self.suggested_lr,
            "rule": self.rule,
            "lrs": self.lrs,
            "losses": self.losses,
            "raw_losses": self.raw_losses,
            "stopped": self.stopped,
            "seconds": self.seconds,
            "recipe": self.config.get("recipe"),
            "model": self.config.get("model"),
        }


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, str]:
    """(suggested rate, the rule that chose it): RULE, or FALLBACK_RULE when the minimum comes
    before there is anything to search."""
    loss = np.asarray(losses, dtype=float)
    if len(loss) < 3 or not np.isfinite(loss).any():
        raise MnistlabError("lr-find recorded too few finite losses to suggest a rate")
    lr = np.asarray(lrs, dtype=float)
    low = int(np.nanargmin(loss))
    skip = max(1, int(SKIP * len(loss)))
    if low <= skip + 1:
        return float(lr[low]) / 10.0, FALLBACK_RULE
    slope = np.gradient(loss, np.log(lr))
    steepest = skip + int(np.nanargmin(slope[skip:low]))
    return float(lr[steepest]), RULE


def lr_find(
    cfg: TrainConfig,
    root: str | os.PathLike[str] | None = None,
    *,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    steps: int = STEPS,
    log: Callable[[str], None] | None = None,
) -> LRFindResult:
    """Run the range test on `cfg`'s model, optimizer, batch size and data (its lr is ignored).

    The RNG state is restored afterwards, so a training run that follows starts as it would have.
    """
    from .augment import make_augmentation
    from .data import BatchLoader, load_mnist, split_indices
    from .hardware import select_device
    from .models import create_model
    from .training import build_optimizer

    if not 0 < start_lr < end_lr < math.inf:
        raise MnistlabError(f"lr-find needs 0 < start < end, got {start_lr} and {end_lr}")
    if steps < 10:
        raise MnistlabError(f"lr-find needs at least 10 steps, got {steps}")
    started = time.perf_counter()
    device = select_device(cfg.device)
    images, labels = load_mnist(root, "train", download=True)
    if cfg.train_limit:
        images, labels = images[: cfg.train_limit], labels[: cfg.train_limit]
    if cfg.val_split:
        train_idx, _ = split_indices(labels, cfg.val_split, seed=cfg.seed)
        images, labels = images[train_idx], labels[train_idx]
    loader = BatchLoader(images, labels, cfg.batch_size, shuffle=True, seed=cfg.seed,
                         device=device)
    transform = make_augmentation(cfg.augment, degrees=cfg.aug_degrees, scale=cfg.aug_scale,
                                  shear=cfg.aug_shear, translate=cfg.aug_translate)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    factor = (end_lr / start_lr) ** (1.0 / (steps - 1))
    lrs: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    stopped = "end of sweep"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, **cfg.model_args).to(device).train()
        optimizer = build_optimizer(cfg, model.parameters())
        avg, best, epoch = 0.0, math.inf, 0
        while len(lrs) < steps and stopped == "end of sweep":
            loader.set_epoch(epoch)
            epoch += 1
            for x, y in loader:
                lr = start_lr * factor ** len(lrs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if transform is not None:
                    x = transform(x)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                value = loss.item()  # one read a step: the sweep needs every loss
                lrs.append(lr)
                raw.append(value)
                avg = BETA * avg + (1 - BETA) * value
                smoothed = avg / (1 - BETA ** len(lrs))
                smooth.append(smoothed)
                if not math.isfinite(smoothed) or smoothed > DIVERGE * best:
                    stopped = "diverged"
                    break
                best = min(best, smoothed)
                if len(lrs) >= steps:
                    break
    finite = [(lr, s) for lr, s in zip(lrs, smooth, strict=True) if math.isfinite(s)]
    suggested, rule = suggest([lr for lr, _ in finite], [s for _, s in finite])
    seconds = time.perf_counter() - started
    if log is not None:
        log(f"lr-find: {len(lrs)} steps from {start_lr:g} to {lrs[-1]:.3g} ({stopped}) in "
            f"{seconds:.1f}s; suggested lr {suggested:.3g}")
    return LRFindResult(lrs, smooth, raw, suggested, rule, stopped, seconds, cfg.to_dict())
