"""One training run end to end: data → loaders → model → fit → run folder.

`train_run` is what `mnistlab train` calls; it is just as usable from Python.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoints as ck
from . import distributed, hardware, runs
from .config import TrainConfig
from .data import BatchLoader, load_mnist, normalize, split_indices
from .errors import Interrupted, MnistlabError
from .models import count_parameters, create_model
from .training import FitState, build_optimizer, build_scheduler, evaluate, fit


@dataclasses.dataclass
class Data:
    train: BatchLoader
    test: BatchLoader | None  # None when the config keeps the test set out (eval_test off)
    val: BatchLoader | None


def make_loaders(
    cfg: TrainConfig,
    root: str | os.PathLike[str] | None,
    device: torch.device,
    group: distributed.Group | None = None,
) -> Data:
    """The lab's loaders: shuffled training batches, a seeded validation split if asked for.

    In a distributed run each rank's loaders hand it its share, and the first rank on each
    machine verifies (downloads, caches) the files while the others wait, then read its cache.
    """
    first = group is None or group.local_rank == 0
    if not first:
        group.barrier()  # type: ignore[union-attr]
    images, labels = load_mnist(root, "train", download=True)
    test_images, test_labels = load_mnist(root, "test", download=True) if cfg.eval_test else (
        None, None)
    if first and group is not None:
        group.barrier()
    shard = {"rank": group.rank, "world": group.world} if group is not None else {}
    if cfg.train_limit:
        images, labels = images[: cfg.train_limit], labels[: cfg.train_limit]
    val = None
    if cfg.val_split:
        train_idx, val_idx = split_indices(labels, cfg.val_split, seed=cfg.seed)
        val = BatchLoader(normalize(images[val_idx]), labels[val_idx], cfg.eval_batch_size,
                          device=device, **shard)  # fmt: skip
        images, labels = images[train_idx], labels[train_idx]
    train = BatchLoader(images, labels, cfg.batch_size, shuffle=True, seed=cfg.seed, device=device,
                        **shard)  # fmt: skip
    # Evaluation sets are normalized once (they are read whole every epoch); the training set
    # stays uint8 and is normalized batch by batch.
    test = None
    if test_images is not None:
        test = BatchLoader(normalize(test_images), test_labels, cfg.eval_batch_size, device=device,
                           **shard)  # fmt: skip
    return Data(train, test, val)


# Where and how verbosely a run trains, not what it learns: --resume may change these.
RUNTIME_FIELDS = ("device", "threads", "log_every")


def _check_resume(run_dir: Path, asked: dict[str, Any]) -> TrainConfig:
    """The saved config of an unfinished run; `asked` settings must agree with it."""
    if runs.is_complete(run_dir):
        raise MnistlabError(f"run {run_dir} is already complete; start a new run instead")
    if not (run_dir / runs.CONFIG).is_file():
        raise MnistlabError(f"{run_dir} is not a run folder (no {runs.CONFIG})")
    saved = TrainConfig.from_dict(runs.read_json(run_dir / runs.CONFIG)).validate()
    diffs = [
        f"{key} {getattr(saved, key)!r}, not {value!r}"
        for key, value in asked.items()
        if key not in RUNTIME_FIELDS and value is not None and getattr(saved, key, value) != value
    ]
    if diffs:
        raise MnistlabError(
            f"run {run_dir} was made with {'; '.join(diffs)}; "
            "resume it without those flags, or start a new run"
        )
    runtime = {k: asked[k] for k in RUNTIME_FIELDS if asked.get(k) is not None}
    return dataclasses.replace(saved, **runtime).validate()


def recipe_line(cfg: TrainConfig) -> str:
    """`Recipe: fast` and the flags that differ from it, e.g. `Recipe: lab with --epochs 2`."""
    from .export import recipe_flags

    flags = recipe_flags(cfg.to_dict())
    return f"Recipe: {cfg.recipe}" + (f" with {' '.join(flags)}" if flags else "")


def plan_execution(
    cfg: TrainConfig, run_dir: Path | None = None, log: Callable[[str], None] | None = None
) -> tuple[hardware.Hardware, hardware.Execution]:
    """This machine and the decisions for `cfg` on it. A resumed run (`run_dir`) keeps the
    automatic thread count it started with: CPU results depend on it, to the last bit."""
    hw = hardware.describe()
    execution = hardware.decide(hw, cfg)
    started = _started_threads(run_dir) if run_dir is not None and not cfg.threads else None
    if started is not None and started != execution.threads.value:
        if started <= hw.cores:
            choice = hardware.Choice(started, "kept from the run's start: CPU results depend on "
                                     "the thread count")
        else:
            choice = hardware.Choice(hw.cores, f"the run started with {started} threads; this "
                                     f"machine has {hw.cores} usable cores, so the last digits "
                                     "may differ from an uninterrupted run")
        execution = dataclasses.replace(execution, threads=choice)
    return hw, execution


def _started_threads(run_dir: Path) -> int | None:
    """The torch thread count a run started with, from its environment.json, if readable."""
    try:
        threads = runs.read_json(run_dir / runs.ENVIRONMENT).get("threads")
    except (MnistlabError, AttributeError):
        return None
    return threads if isinstance(threads, int) and threads > 0 else None


def _restore(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    group: distributed.Group | None = None,
) -> FitState:
    """Load a resume checkpoint into the model, optimizer, scheduler and RNGs; its FitState."""
    saved = ck.load_torch(path)  # weights_only: a crafted file is refused here
    try:
        ck.load_state_into(model, saved["model"], str(path))
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        ranks = saved.get("rng_ranks") or []
        if group is not None and len(ranks) == group.world:  # each rank's own dropout stream
            torch.set_rng_state(ranks[group.rank])
        if saved.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        return FitState(**saved["state"], best_state=saved.get("best"))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise MnistlabError(
            f"{path} is not a usable mnistlab checkpoint ({type(e).__name__}: {e}); start a new run"
        ) from None


def train_run(
    cfg: TrainConfig | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = runs.RUNS_DIR,
    name: str | None = None,
    resume: str | os.PathLike[str] | None = None,
    resume_check: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
    started: float | None = None,
    on_epoch: Callable[[dict[str, Any]], str | None] | None = None,
    tensorboard: str | os.PathLike[str] | None = None,
    on_plan: Callable[[hardware.Hardware, hardware.Execution], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run and return its summary.

    Resuming takes the run's saved config; `resume_check` holds settings the caller asked for,
    which must match it. `started` is the perf_counter reading when the command's work began.
    `on_epoch` sees each epoch's record before it is saved; a reason it returns (e.g. "pruned")
    stops the run there, complete, with that reason in its summary.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 alone logs and writes.
    `tensorboard`: also log to TensorBoard event files under this folder (`mnistlab.tblog`).
    `on_plan` is told the machine and the execution decided for it, before training starts.
    """
    started = time.perf_counter() if started is None else started
    group = distributed.start(cfg.device if cfg is not None else "auto")
    try:
        return _train(cfg, group, root=root, runs_dir=runs_dir, name=name, resume=resume,
                      resume_check=resume_check, log=log, progress=progress, started=started,
                      on_epoch=on_epoch, tensorboard=tensorboard, on_plan=on_plan)  # fmt: skip
    finally:
        distributed.stop(group)


def _for_rank(execution: hardware.Execution, group: distributed.Group,
              cfg: TrainConfig) -> hardware.Execution:  # fmt: skip
    """One rank's share of the execution: its own CUDA device under NCCL, and (threads not
    set) the cores of its machine shared between the ranks on it."""
    changes: dict[str, Any] = {}
    if group.backend == "nccl":
        changes["device"] = hardware.Choice(f"cuda:{group.local_rank}",
                                            f"NCCL rank {group.rank}: local device")
    if not cfg.threads and group.local_world > 1:
        threads = max(1, execution.threads.value // group.local_world)
        changes["threads"] = hardware.Choice(threads, f"{execution.threads.value} shared by "
                                             f"{group.local_world} processes on this machine")
    return dataclasses.replace(execution, **changes)


def _resume_hint(run_dir: Path, group: distributed.Group | None) -> str:
    if group is None:
        return f"mnistlab train --resume {run_dir}"
    return (f"mnistlab train --resume {run_dir} --nproc {group.world} (or the same torchrun "
            f"command with --resume {run_dir})")


def _train(
    cfg: TrainConfig | None,
    group: distributed.Group | None,
    *,
    root: str | os.PathLike[str] | None,
    runs_dir: str | os.PathLike[str],
    name: str | None,
    resume: str | os.PathLike[str] | None,
    resume_check: dict[str, Any] | None,
    log: Callable[[str], None],
    progress: bool,
    started: float,
    on_epoch: Callable[[dict[str, Any]], str | None] | None,
    tensorboard: str | os.PathLike[str] | None,
    on_plan: Callable[[hardware.Hardware, hardware.Execution], None] | None,
) -> dict[str, Any]:
    main = group is None or group.main
    if not main:
        log, progress = (lambda line: None), False
    if resume is not None:
        if name is not None:
            raise MnistlabError("--name names a new run; --resume continues one: use only one")
        run_dir = runs.find_run(resume, runs_dir)
        cfg = _check_resume(run_dir, resume_check or {})
    else:
        cfg = (cfg or TrainConfig()).validate()
        run_dir = None  # created once the data and model are known to be good
    if tensorboard is not None and not cfg.eval_test:
        raise MnistlabError("--tensorboard shows the test set each epoch; drop --no-eval-test")
    # Device, precision, layout and threads: decided (and refused) before anything is made.
    hw, execution = plan_execution(cfg, run_dir)
    if group is not None:
        execution = _for_rank(execution, group, cfg)
    if resume is None:
        log(recipe_line(cfg))  # the whole config goes into <run>/config.json
    for warning in execution.warnings:
        log(warning)
    torch.set_num_threads(execution.threads.value)
    allocator = hardware.keep_freed_memory()
    device = torch.device(execution.device.value)
    log(hardware.hardware_line(hw, execution) + (
        f" ({group.world} processes, {group.backend})" if group is not None else ""))
    if on_plan is not None:
        on_plan(hw, execution)

    data = make_loaders(cfg, root, device, group)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **cfg.model_args).to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, len(data.train))
    state = FitState()
    train_model: torch.nn.Module = model
    reduce = None
    if group is not None:
        train_model = distributed.wrap(model, group, data.train)
        reduce = group.all_sum
        if group.rank:  # dropout and augmentation draw differently on each rank
            torch.manual_seed(cfg.seed + 1_000_003 * group.rank)

    if run_dir is None and not main:
        pass  # rank 0 makes the run folder
    elif run_dir is None:
        run_dir = runs.create_run_dir(runs_dir, name)
        try:
            runs.write_json(run_dir, runs.CONFIG, cfg.to_dict())
            runs.write_json(run_dir, runs.ENVIRONMENT, runs.environment(
                str(device), hardware=hw.to_dict(), execution=execution.to_dict(),
                allocator=allocator))
        except MnistlabError:
            shutil.rmtree(run_dir, ignore_errors=True)  # a folder without its config is no run
            raise
        log(f"Run folder: {run_dir}")
    else:
        log(recipe_line(cfg))
        if (run_dir / ck.CHECKPOINT_NAME).is_file():
            state = _restore(run_dir / ck.CHECKPOINT_NAME, model, optimizer, scheduler, group)
            log(f"Resuming {run_dir} after epoch {state.epoch}/{cfg.epochs}")
        else:
            log(f"Resuming {run_dir} from the start (it has no complete epoch)")
    if main:
        distributed.note(run_dir=str(run_dir))
    log(f"Model: {cfg.model} ({count_parameters(model):,} parameters)")

    saved_epoch = state.epoch  # the last epoch safely on disk
    steps_log = runs.StepLog(run_dir, keep_epochs=state.epoch) if main else None
    board = board_test = None
    if tensorboard is not None and main:
        from .tblog import TensorBoardLog

        board = TensorBoardLog(tensorboard, run_dir, cfg, steps_per_epoch=len(data.train))
        # All of the test set: in a distributed run data.test is rank 0's share of it.
        board_test = data.test if group is None else BatchLoader(
            data.test.x, data.test.y, cfg.eval_batch_size)  # fmt: skip

    def on_step(record: dict[str, Any]) -> None:
        if steps_log is not None:
            steps_log(record)
        if board is not None:
            board.step(record)

    def save(state: FitState) -> None:
        nonlocal saved_epoch
        if board is not None:
            board.epoch(state.history[-1], model, board_test)
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(FitState)}
        fields.pop("best_state")
        rng_ranks = group.gather(torch.get_rng_state()) if group is not None else None
        if not main:
            saved_epoch = state.epoch
            return
        try:
            # The checkpoint is the truth a resume starts from; best.pt and metrics.jsonl follow.
            ck.save_torch(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": torch.get_rng_state(),
                    "rng_ranks": rng_ranks,
                    "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    "state": fields,
                    "best": state.best_state,
                    "config": cfg.to_dict(),
                },
                run_dir / ck.CHECKPOINT_NAME,
            )
            saved_epoch = state.epoch
            if state.best_state is not None and state.best_epoch == state.epoch:
                ck.save_torch(state.best_state, run_dir / ck.BEST_NAME)
            runs.write_metrics(run_dir, state.history)
        except MnistlabError as e:
            raise MnistlabError(
                f"{e}. {run_dir} holds epoch {saved_epoch}/{cfg.epochs}; once fixed, resume "
                f"with: {_resume_hint(run_dir, group)}"
            ) from None

    def epoch_end(state: FitState) -> bool:
        reason = on_epoch(state.history[-1]) if on_epoch is not None else None
        if reason:
            state.stopped_early, state.stop_reason = True, reason
        save(state)
        return bool(reason)

    # Ctrl-C and SIGTERM stop between two instructions; the last saved epoch stays intact.
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, signal.default_int_handler)
    try:
        state = fit(
            train_model,
            optimizer,
            data.train,
            data.test,
            cfg,
            val_loader=data.val,
            scheduler=scheduler,
            state=state,
            on_epoch_end=epoch_end,
            log=log,
            progress=progress,
            reduce=reduce,
            on_step=on_step,
            execution=execution,
        )
    except KeyboardInterrupt:
        if board is not None:
            board.close()  # what was logged so far stays readable
        raise Interrupted(
            f"interrupted; {run_dir or 'the run'} is saved after epoch {saved_epoch}/{cfg.epochs}. "
            f"Resume with: {_resume_hint(run_dir, group)}"
        ) from None
    except Exception as e:
        if board is not None:
            board.close()
        if group is None or not distributed.is_peer_failure(e):
            raise
        raise MnistlabError(
            f"another process of this {group.world}-process run stopped "
            f"({distributed._first_line(e)}); {run_dir or 'the run'} is saved after epoch "
            f"{saved_epoch}/{cfg.epochs}. Resume with: {_resume_hint(run_dir, group)}"
        ) from None
    except BaseException:
        if board is not None:
            board.close()
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if steps_log is not None:
            steps_log.close()

    test_loss = test_acc = None
    if data.test is None:
        pass  # the test set stays unseen (a sweep's trial)
    elif cfg.early_stop and state.best_state is not None:
        test_loss, test_acc = evaluate(model, data.test, reduce=reduce)  # the restored best
    else:
        test_loss, test_acc = state.history[-1]["test_loss"], state.history[-1]["test_acc"]
    seconds = time.perf_counter() - started
    val_accs = [r["val_acc"] for r in state.history if "val_acc" in r]
    summary = {
        "run_dir": str(run_dir),
        "model": cfg.model,
        "recipe": cfg.recipe,
        "epochs": state.epoch,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "best_val_acc": max(val_accs) if val_accs else None,
        "best_epoch": state.best_epoch or None,
        "stopped_early": state.stopped_early,
        "stop_reason": state.stop_reason,
        "processes": group.world if group is not None else 1,
        "seconds": seconds,
        "train_seconds": sum(r["seconds"] for r in state.history),
        "parameters": count_parameters(model),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not main:
        return summary
    if test_loss is not None and not math.isfinite(test_loss):
        log("warning: the test loss is not finite; the learning rate may be too high")
    try:
        ck.save_torch(model.state_dict(), run_dir / ck.WEIGHTS_NAME)
        if state.best_state is not None:  # also after a resume that found no better epoch
            ck.save_torch(state.best_state, run_dir / ck.BEST_NAME)
        runs.write_json(run_dir, runs.SUMMARY, summary)  # last: its presence marks the run done
    except MnistlabError as e:
        raise MnistlabError(
            f"{e}. Every epoch is saved; once fixed, finish with: mnistlab train --resume {run_dir}"
        ) from None
    if board is not None:
        board.finish(summary, model, board_test)
        log(f"TensorBoard: {board.path} (tensorboard --logdir {tensorboard})")
    if test_acc is not None:
        log(f"Final test accuracy: {test_acc:.2f}% (loss {test_loss:.4f}) in {seconds:.1f}s")
    else:
        last = state.history[-1]
        log(f"Final validation accuracy: {last.get('val_acc', math.nan):.2f}% (the test set was "
            f"not used) in {seconds:.1f}s")
    log(f"Saved {run_dir / ck.WEIGHTS_NAME}")
    return summary
