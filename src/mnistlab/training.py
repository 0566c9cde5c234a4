"""The lab's training loop, lean: `train_epoch`, `evaluate` and `fit`, usable from Python.

Batches come from an in-memory BatchLoader; per step the loop does only what the lab does
(zero_grad, forward, loss, backward, step) plus two scalar reads for the running metrics.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .augment import make_augmentation
from .config import TrainConfig
from .mlpstep import MLPStep
from .optim import FusedAdam

Log = Callable[[str], None]
# Sums a float64 tensor of running totals over the processes of a distributed run, in place.
Reduce = Callable[[torch.Tensor], torch.Tensor]
# Called at each progress line with {"step", "steps", "loss", "acc"} (the interval's numbers);
# fit adds "epoch". The run folder's steps.jsonl and TensorBoard's step scalars come from here.
StepHook = Callable[[dict[str, Any]], None]
# torch's own choice (physical cores, or $OMP_NUM_THREADS), before anyone lowers it.
DEFAULT_THREADS = torch.get_num_threads()


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; a named device must be available."""
    from .errors import MnistlabError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MnistlabError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise MnistlabError("--device mps: Apple MPS is not available here; use --device cpu")
    return torch.device(name)


def idle_cores(samples: int = 5, interval: float = 0.004, stat: str = "/proc/stat") -> int:
    """CPU cores this process may use that no other process is running on right now.

    From the kernel's count of runnable tasks (/proc/stat procs_running, ourselves included),
    the median of a few samples; all usable cores where that count is not available.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    counts = []
    for i in range(samples):
        try:
            with open(stat, "rb") as f:
                for line in f:
                    if line.startswith(b"procs_running"):
                        counts.append(int(line.split()[1]))
                        break
        except (OSError, ValueError):
            return cores
        if i + 1 < samples:
            time.sleep(interval)
    if not counts:
        return cores
    others = sorted(counts)[len(counts) // 2] - 1
    return max(1, min(cores, cores - others))


# Below this many multiply-adds in a training batch's forward pass, a second thread's sync costs
# about what it saves (the lab's mlp at batch 64: 6.5M, 1.1x at best; fastcnn at 128: 178M, 2x).
SMALL_STEP_MACS = 20_000_000


def forward_macs(model: nn.Module, shape: tuple[int, ...] = (1, 1, 28, 28)) -> int:
    """Multiply-adds of a forward pass on a batch of `shape` (Conv2d and Linear layers)."""
    total = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * k * module.in_channels // module.groups

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


def auto_threads(cfg: TrainConfig | None = None) -> int:
    """Threads for `threads=0`: one per idle core, never more than torch's default; one alone
    when `cfg`'s model does too little work per training step to share it.

    An OpenMP team waits at every op for its slowest thread, so a thread that shares its core
    with another busy process can make a run many times slower; one thread too few costs at most
    that thread's share.
    """
    if cfg is not None:
        from .models import create_model

        with torch.random.fork_rng(devices=[]):  # a throwaway model: leave the seed alone
            macs = forward_macs(create_model(cfg.model, **cfg.model_args))
        if macs * cfg.batch_size < SMALL_STEP_MACS:
            return 1
    return max(1, min(DEFAULT_THREADS, idle_cores()))


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
    log points (and so at the epoch's end).
    """
    model.train()
    hand = MLPStep.for_model(model, loss_fn) if mlp_step and autocast is None else None
    steps = len(loader)  # type: ignore[arg-type]
    bar = _progress(loader, desc, progress)
    write = (bar.write if bar is not None else log) if log else None
    total_loss = total_correct = total_seen = 0.0
    int_loss = int_correct = int_seen = 0.0
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
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = y.shape[0]
        batch_loss = loss.item() * n
        batch_correct = (logits.argmax(1) == y).sum().item()
        int_loss += batch_loss
        int_correct += batch_correct
        int_seen += n
        if log_every and (step % log_every == 0 or step == steps):
            if reduce is not None:
                int_loss, int_correct, int_seen = _reduced(reduce, int_loss, int_correct, int_seen)
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
            int_loss = int_correct = int_seen = 0.0
            if bar is not None:
                bar.set_postfix(
                    loss=f"{total_loss / total_seen:.3f}",
                    acc=f"{100 * total_correct / total_seen:.2f}%",
                )
        if bar is not None:
            bar.update()
    if reduce is not None and not log_every:
        int_loss, int_correct, int_seen = _reduced(reduce, int_loss, int_correct, int_seen)
    total_loss += int_loss
    total_correct += int_correct
    total_seen += int_seen
    if bar is not None:
        bar.close()
    if not total_seen:
        return math.nan, math.nan
    return total_loss / total_seen, 100.0 * total_correct / total_seen


def _reduced(reduce: Reduce, *values: float) -> list[float]:
    return reduce(torch.tensor(values, dtype=torch.float64)).tolist()


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
    """(mean cross-entropy loss, accuracy in %) of `model` on `loader`; with `reduce`, over
    the loaders of every process of a distributed run."""
    model.eval()
    device = next(model.parameters()).device
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    total_loss = correct = seen = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += float(loss_fn(logits, y)) * y.shape[0]
        correct += int((logits.argmax(1) == y).sum())
        seen += y.shape[0]
    if reduce is not None:
        total_loss, correct, seen = _reduced(reduce, total_loss, correct, seen)
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
) -> FitState:
    """Train for `cfg.epochs`, evaluating after every epoch; early-stop on validation loss.

    `state` resumes from its epoch. With early stopping, the best weights are restored at the end.
    `test_loader` may be None (no test set: a sweep's trials choose on validation only).
    `on_epoch_end` sees the state after each epoch; if it returns True the fit stops there
    (it sets `state.stop_reason`). `model` may be a DistributedDataParallel wrapper; `reduce`
    then sums metrics over its processes.
    `on_step` gets each progress line's numbers, with the epoch.
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
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its params
    autocast = torch.bfloat16 if cfg.autocast == "bf16" else None
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
            ema=ema,
            mlp_step=cfg.mlp_step,
            reduce=reduce,
            on_log=None if on_step is None else _with_epoch(on_step, epoch + 1),
        )
        if ema is not None:
            state.ema_state = ema.state_dict()
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
