"""The lab's training loop, lean: `train_epoch`, `evaluate` and `fit`, usable from Python.

Batches come from an in-memory BatchLoader on the model's device; per step the loop does only
what the lab does (zero_grad, forward, loss, backward, step). It reads nothing back from the
device per step: the running metrics are kept as device tensors and read at the log points.
How a run executes (device, precision, layout, threads) is decided in `mnistlab.hardware`.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .augment import make_augmentation
from .config import TrainConfig
from .hardware import Execution, decide, describe, select_device
from .mlpstep import MLPStep
from .optim import FusedAdam

__all__ = ["FitState", "build_optimizer", "build_scheduler", "evaluate", "fit", "predict_logits",
           "select_device", "train_epoch"]  # select_device: its home is mnistlab.hardware

Log = Callable[[str], None]
# Sums a float64 tensor of running totals over the processes of a distributed run, in place.
Reduce = Callable[[torch.Tensor], torch.Tensor]
# Called at each progress line with {"step", "steps", "loss", "acc"} (the interval's numbers);
# fit adds "epoch". The run folder's steps.jsonl and TensorBoard's step scalars come from here.
StepHook = Callable[[dict[str, Any]], None]


def build_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)
    # fused: the whole update in one pass over each parameter (CPU and CUDA kernels exist for
    # Adam, AdamW and SGD); foreach otherwise: one kernel per op over all parameters.
    fusable = cfg.optimizer in ("adam", "adamw", "sgd") and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    if fusable and cfg.optimizer in ("adam", "adamw"):
        # torch's fused kernel without torch.optim's machinery (see mnistlab.optim): the same
        # updates, minus a 1.2 s import and the per-step regrouping.
        return FusedAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         decoupled_weight_decay=cfg.optimizer == "adamw")
    common: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    common["fused" if fusable else "foreach"] = True
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, **common)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **common)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=cfg.momentum, nesterov=cfg.nesterov, **common)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, momentum=cfg.momentum, **common)
    raise ValueError(cfg.optimizer)  # unreachable: TrainConfig.validate checks the name


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A scheduler stepped once per batch (so every schedule has the same call site)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "none":
        return None
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    raise ValueError(cfg.schedule)


def _progress(loader, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


class RunningMetrics:
    """Loss and correct predictions of the steps since the last read, kept on the device.

    A step only keeps references to its loss and logits (no op, no read); `sums()` reduces them
    into one device tensor [loss sum, correct, seen], which the log points read with a single
    transfer. That tensor is where a check for divergence, or an all-reduce across processes,
    belongs.
    """

    FOLD = 256  # steps between reductions on the device: bounds what is kept between log points

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._folded: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        if loss.requires_grad:  # keep the values, not the graph
            loss, logits = loss.detach(), logits.detach()
        self._losses.append(loss)
        self._sizes.append(y.shape[0])
        self._logits.append(logits)
        self._labels.append(y)
        if len(self._losses) >= self.FOLD:
            self._folded = self._reduce()

    def _reduce(self) -> torch.Tensor | None:
        if not self._losses:
            return self._folded
        losses = torch.stack(self._losses).float()
        device = losses.device
        sizes = torch.tensor(self._sizes, dtype=torch.float32, device=device)
        correct = (torch.cat(self._logits).argmax(1) == torch.cat(self._labels)).sum()
        out = torch.stack([losses.dot(sizes), correct.float(), sizes.sum()])
        self._losses, self._sizes, self._logits, self._labels = [], [], [], []
        return out if self._folded is None else out + self._folded

    def sums(self) -> torch.Tensor | None:
        """[loss sum, correct, seen] since the last call, on the device (None: no steps)."""
        out, self._folded = self._reduce(), None
        return out


def train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device | str | None = None,
    *,
    scheduler: Any = None,
    grad_clip: float = 0.0,
    log_every: int = 0,
    log: Log | None = print,
    progress: bool = False,
    desc: str = "train",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    mlp_step: bool = True,
    reduce: Reduce | None = None,
    on_log: StepHook | None = None,
) -> tuple[float, float]:
    """One pass over `loader`; returns (mean loss, accuracy in %).

    Every `log_every` steps it logs the lab's line `Step 134/938 - Loss: 0.561 | Acc: 84.57%`
    with the loss and accuracy over that interval. With `mlp_step`, models that `MLPStep` can
    train (plain MLPs under cross-entropy, no autocast) get their gradients without autograd.
    `reduce` sums the interval's totals over the processes of a distributed run, at those same
    log points (and so at the epoch's end). `scaler` scales the loss of float16 training
    against underflow.
    """
    model.train()
    hand = MLPStep.for_model(model, loss_fn) if mlp_step and autocast is None else None
    steps = len(loader)  # type: ignore[arg-type]
    bar = _progress(loader, desc, progress)
    write = (bar.write if bar is not None else log) if log else None
    metrics = RunningMetrics()
    total_loss = total_correct = total_seen = 0.0
    device = torch.device(device) if device is not None else None
    for step, (x, y) in enumerate(loader, start=1):
        if device is not None and x.device != device:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if transform is not None:
            x = transform(x)
        if hand is not None:  # overwrites every .grad: nothing to zero
            loss, logits = hand(x, y)
        else:
            optimizer.zero_grad(set_to_none=True)
            if autocast is None:
                logits = model(x)
            else:  # low-precision forward; the loss and its gradient start in float32
                with torch.autocast(x.device.type, dtype=autocast):
                    logits = model(x)
                logits = logits.float()
            loss = loss_fn(logits, y)
            if scaler is not None:
                scaler.scale(loss).backward()
                if grad_clip > 0:
                    scaler.unscale_(optimizer)
            else:
                loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None and hand is None:
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        metrics.add(loss, logits, y)
        if log_every and (step % log_every == 0 or step == steps):
            # The one read of the interval: loss sum, correct, seen (over every process).
            sums = _summed(metrics.sums(), reduce, device)
            int_loss, int_correct, int_seen = sums.tolist() if sums is not None else (0, 0, 0)
            if write and int_seen:
                write(
                    f"Step {step}/{steps} - Loss: {int_loss / int_seen:.3f} | "
                    f"Acc: {100.0 * int_correct / int_seen:.2f}%"
                )
            if on_log is not None and int_seen:
                on_log({"step": step, "steps": steps, "loss": int_loss / int_seen,
                        "acc": 100.0 * int_correct / int_seen})
            total_loss += int_loss
            total_correct += int_correct
            total_seen += int_seen
            if bar is not None and total_seen:
                bar.set_postfix(
                    loss=f"{total_loss / total_seen:.3f}",
                    acc=f"{100 * total_correct / total_seen:.2f}%",
                )
        if bar is not None:
            bar.update()
    sums = _summed(metrics.sums(), reduce, device)  # steps after the last log point
    if sums is not None:
        rest_loss, rest_correct, rest_seen = sums.tolist()
        total_loss += rest_loss
        total_correct += rest_correct
        total_seen += rest_seen
    if bar is not None:
        bar.close()
    if not total_seen:
        return math.nan, math.nan
    return total_loss / total_seen, 100.0 * total_correct / total_seen


def _summed(sums: torch.Tensor | None, reduce: Reduce | None, device: Any) -> torch.Tensor | None:
    """`sums` added up over the processes (every process takes part, with or without steps)."""
    if reduce is None:
        return sums
    return reduce(sums if sums is not None else torch.zeros(3, device=device))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, else `model` itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of `loader`, in its order (eval mode, no gradients)."""
    model.eval()
    device = next(model.parameters()).device
    outs, labels = [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module | None = None,
    reduce: Reduce | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in %) of `model` on `loader`, read once at the end;
    with `reduce`, over the loaders of every process of a distributed run."""
    model.eval()
    device = next(model.parameters()).device
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    metrics = RunningMetrics()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        metrics.add(loss_fn(logits, y), logits, y)
    sums = _summed(metrics.sums(), reduce, device)
    if sums is None:
        return math.nan, math.nan
    total_loss, correct, seen = sums.tolist()
    return total_loss / seen, 100.0 * correct / seen


@dataclass
class FitState:
    """Where a fit stands after its last complete epoch; enough to resume it exactly."""

    epoch: int = 0  # complete epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False
    stop_reason: str | None = None  # why on_epoch_end stopped the fit, e.g. "pruned"
    ema_state: dict[str, torch.Tensor] | None = None  # the weight average, with cfg.ema
    scaler_state: dict[str, Any] | None = None  # the loss scale, when training in float16


def _with_epoch(hook: StepHook, epoch: int) -> StepHook:
    return lambda record: hook({"epoch": epoch, **record})


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Any,
    test_loader: Any,
    cfg: TrainConfig,
    *,
    val_loader: Any = None,
    scheduler: Any = None,
    state: FitState | None = None,
    on_epoch_end: Callable[[FitState], bool | None] | None = None,
    log: Log = print,
    progress: bool = False,
    reduce: Reduce | None = None,
    on_step: StepHook | None = None,
    execution: Execution | None = None,
) -> FitState:
    """Train for `cfg.epochs`, evaluating after every epoch; early-stop on validation loss.

    `state` resumes from its epoch. With early stopping, the best weights are restored at the end.
    `test_loader` may be None (no test set: a sweep's trials choose on validation only).
    `on_epoch_end` sees the state after each epoch; if it returns True the fit stops there
    (it sets `state.stop_reason`). `model` may be a DistributedDataParallel wrapper; `reduce`
    then sums metrics over its processes.
    `on_step` gets each progress line's numbers, with the epoch. `execution` says how
    (precision, layout: see `mnistlab.hardware.decide`); by default it is decided for this
    machine and the model's device. Threads are the caller's to set.
    """
    state = state or FitState()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_loss_fn = nn.CrossEntropyLoss()
    log_every = cfg.log_every or max(1, math.ceil(len(train_loader) / 7))  # 7 lines: 134 of 938
    transform = make_augmentation(
        cfg.augment, degrees=cfg.aug_degrees, scale=cfg.aug_scale, shear=cfg.aug_shear,
        translate=cfg.aug_translate,
    )
    net = unwrap(model)  # what is evaluated and averaged; `model` is what trains
    device = next(model.parameters()).device
    if execution is None:
        execution = decide(describe(), cfg, device=device.type)
    if execution.channels_last.value:
        model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its params
    autocast = execution.autocast
    scaler = None
    if execution.grad_scaler:
        scaler = torch.amp.GradScaler(device.type)
        if state.scaler_state is not None:
            scaler.load_state_dict(state.scaler_state)
    ema = None
    if cfg.ema:
        # An exponential moving average of the weights (and BatchNorm statistics): evaluated
        # every epoch and, at the end, copied into `model`.
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
            use_buffers=True,
        )
        if state.ema_state is not None:
            ema.load_state_dict(state.ema_state)
    eval_model = ema.module if ema is not None else net
    summed = {"reduce": reduce} if reduce is not None else {}
    end = state.epoch if state.stopped_early else cfg.epochs  # a resumed early stop stays stopped
    for epoch in range(state.epoch, end):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(
            model,
            train_loader,
            optimizer,
            loss_fn,
            device,
            scheduler=scheduler,
            grad_clip=cfg.grad_clip,
            log_every=log_every,
            log=log,
            progress=progress,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            transform=transform,
            autocast=autocast,
            scaler=scaler,
            ema=ema,
            mlp_step=cfg.mlp_step,
            reduce=reduce,
            on_log=None if on_step is None else _with_epoch(on_step, epoch + 1),
        )
        if ema is not None:
            state.ema_state = ema.state_dict()
        if scaler is not None:
            state.scaler_state = scaler.state_dict()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
        }
        if val_loader is not None:
            record["val_loss"], record["val_acc"] = evaluate(eval_model, val_loader, eval_loss_fn,
                                                             **summed)  # fmt: skip
        if test_loader is not None:
            record["test_loss"], record["test_acc"] = evaluate(eval_model, test_loader,
                                                               eval_loss_fn, **summed)  # fmt: skip
        record["lr"] = optimizer.param_groups[0]["lr"]
        record["seconds"] = time.perf_counter() - start
        state.history.append(record)
        state.epoch = epoch + 1
        parts = [
            f"Epoch {epoch + 1}/{cfg.epochs}",
            f"train loss {train_loss:.4f} acc {train_acc:.2f}%",
        ]
        if val_loader is not None:
            parts.append(f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}%")
            if record["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.best_epoch, state.bad_epochs = (
                    record["val_loss"],
                    epoch + 1,
                    0,
                )
                state.best_state = copy.deepcopy(eval_model.state_dict())
            else:
                state.bad_epochs += 1
        if test_loader is not None:
            parts.append(f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}%")
        parts.append(f"{record['seconds']:.1f}s")
        log(" | ".join(parts))
        stop = bool(cfg.early_stop) and state.bad_epochs >= cfg.early_stop
        state.stopped_early = stop
        asked = on_epoch_end is not None and bool(on_epoch_end(state))
        if stop:
            log(
                f"Early stop: validation loss has not improved for {cfg.early_stop} epochs; "
                f"restoring the weights of epoch {state.best_epoch}"
            )
            break
        if asked:
            log(f"Stopped after epoch {epoch + 1}: {state.stop_reason or 'asked to stop'}")
            break
    if ema is not None:
        net.load_state_dict(ema.module.state_dict())
    if cfg.early_stop and state.best_state is not None:
        net.load_state_dict(state.best_state)
    return state
