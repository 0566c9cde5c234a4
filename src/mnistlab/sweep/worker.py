"""A sweep's workers: the objective (a trial → a TrainConfig → a normal run folder → its
validation accuracy), one worker's loop, and `--workers K` local worker processes.

The objective is what Optuna's own examples make it (optuna-examples/pytorch/
pytorch_checkpoint.py): a plain function of a trial; storage, heartbeats and retries are
Optuna's. A trial reports its validation accuracy after every epoch (`trial.report`) and stops
there when the pruner says so. A trial whose worker was killed is failed by the heartbeat
check and retried; the retry continues from the dead trial's last saved epoch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import checkpoints as ck
from .. import runs
from ..errors import Interrupted, MnistlabError
from .study import Sweep, is_retry, is_surplus, quiet_optuna, tally

Log = Callable[[str], None]
# What a retry copies from the dead trial's folder to continue where it stopped.
RESUME_FILES = (runs.CONFIG, runs.ENVIRONMENT, runs.METRICS, runs.STEPS, ck.CHECKPOINT_NAME,
                ck.BEST_NAME)
WORKER_ENV = "MNISTLAB_SWEEP_STORAGE"  # the storage URL, passwords included, for workers


def trial_name(number: int) -> str:
    return f"trial-{number}"


def _params(values: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.removeprefix('model_args.')}={show(v)}" for k, v in values.items())


class Objective:
    """One trial: its config from the space, trained as run `trial-<n>` in the sweep's folder."""

    def __init__(self, sweep: Sweep, *, root: str | None, log: Log) -> None:
        self.sweep, self.root, self.log = sweep, root, log
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, trial: Any) -> float:
        import optuna

        sweep = self.sweep
        trials = trial.study.get_trials(deepcopy=False)
        me = next(t for t in trials if t.number == trial.number)  # its system attributes
        if not is_retry(me):
            self._check_budget(trial, trials)
        values = {p.key: p.suggest(trial) for p in sweep.space.search}
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("run", trial_name(trial.number))
        cfg = sweep.space.config(sweep.settings.recipe, values)
        source = self._resume_source(me)
        self.log(f"trial {trial.number}: {_params(values)}"
                 + (f" (continuing trial {source[0]} after epoch {source[1]})" if source else ""))

        def on_epoch(record: dict[str, Any]) -> str | None:
            value = record["val_acc"]
            trial.report(value, record["epoch"])
            self.log(f"trial {trial.number} epoch {record['epoch']}/{cfg.epochs}: val acc "
                     f"{value:.2f}% (loss {record['val_loss']:.4f}) {record['seconds']:.1f}s")
            if record["epoch"] < cfg.epochs and trial.should_prune():  # a last epoch is done
                return f"pruned by the {sweep.settings.pruner} pruner"
            return None

        from ..experiment import train_run

        quiet: Log = lambda line: None  # noqa: E731 - the sweep prints one line an epoch
        try:
            if source is not None:
                folder = self._continue(trial, source[0])
                summary = train_run(resume=folder, runs_dir=sweep.folder, root=self.root,
                                    log=quiet, on_epoch=on_epoch)  # fmt: skip
            else:
                summary = train_run(cfg, runs_dir=sweep.folder, name=trial_name(trial.number),
                                    root=self.root, log=quiet, on_epoch=on_epoch)  # fmt: skip
        except (Interrupted, KeyboardInterrupt):
            self._retry_later(trial)
            raise KeyboardInterrupt from None
        except MnistlabError as e:
            trial.set_user_attr("error", str(e))
            self.log(f"trial {trial.number} failed: {e}")
            raise
        history = runs.read_metrics(Path(summary["run_dir"]))
        last = history[-1]
        for key in ("val_loss", "epoch"):
            trial.set_user_attr(key, last[key])
        trial.set_user_attr("train_seconds", summary["train_seconds"])
        if summary.get("stop_reason"):
            trial.set_user_attr("stop_reason", summary["stop_reason"])
            raise optuna.TrialPruned(f"after epoch {last['epoch']}: {summary['stop_reason']}")
        return float(last["val_acc"])

    def _check_budget(self, trial: Any, trials: list[Any]) -> None:
        """A new trial beyond --trials (two workers asked for the last one at once) is not run."""
        earlier = [t for t in trials
                   if t.number < trial.number and not is_retry(t) and not is_surplus(t)]
        if len(earlier) >= self.sweep.settings.trials:
            trial.set_user_attr("surplus", True)
            raise MnistlabError(f"not run: the study already has its {len(earlier)} trials")

    def _resume_source(self, trial: Any) -> tuple[int, int] | None:
        """(trial, epochs saved) of the latest earlier attempt of this retried trial (a
        FrozenTrial) that left a checkpoint in this machine's sweep folder, if any."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

        with quiet_optuna():
            history = Retry.retry_history(trial)
        for number in reversed(history):
            folder = self.sweep.folder / trial_name(number)
            saved = _saved_history(folder)
            if saved and not runs.is_complete(folder):
                return number, len(saved)
        return None

    def _continue(self, trial: Any, number: int) -> Path:
        """This trial's folder, holding trial `number`'s saved epochs (reported again here: a
        retry is a new Optuna trial)."""
        from ..fileio import atomic_path

        source = self.sweep.folder / trial_name(number)
        folder = runs.create_run_dir(self.sweep.folder, trial_name(trial.number))
        try:
            for name in RESUME_FILES:
                if (source / name).is_file():
                    with atomic_path(folder / name) as tmp:
                        shutil.copyfile(source / name, tmp)
        except OSError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise MnistlabError(f"cannot continue trial {number} in {folder}: "
                                f"{e.strerror or e}") from None
        trial.set_user_attr("continues", number)
        for record in _saved_history(folder) or []:
            trial.report(record["val_acc"], record["epoch"])
        return folder

    def _retry_later(self, trial: Any) -> None:
        """Ctrl-C: queue this trial again, as a dead worker's trial is (the same callback), so
        the next `mnistlab sweep NAME` continues it from its last saved epoch."""
        retry = self.sweep.storage.get_heartbeat_stale_trial_callback()
        frozen = next(t for t in trial.study.get_trials(deepcopy=False)
                      if t.number == trial.number)  # fmt: skip
        with quiet_optuna():
            retry(trial.study, frozen)


def _saved_history(folder: Path) -> list[dict[str, Any]] | None:
    """The epochs a run folder's checkpoint holds (metrics.jsonl is written just after it)."""
    if not (folder / ck.CHECKPOINT_NAME).is_file():
        return None
    try:
        history = ck.load_torch(folder / ck.CHECKPOINT_NAME)["state"]["history"]
    except (MnistlabError, KeyError, TypeError):
        return None
    return history if isinstance(history, list) else None


def work(
    sweep: Sweep,
    *,
    root: str | None = None,
    log: Log = print,
    timeout: float | None = None,
    seed_offset: int = 0,
    reports: bool = True,
) -> None:
    """Run trials until the study has its --trials (none waiting or running anywhere) or
    `timeout` seconds have passed; Ctrl-C or SIGTERM stop it cleanly (Interrupted)."""
    import optuna

    from ..report import build_report

    counts = tally(sweep.study)
    sweep.use_sampler(sweep.settings.seed + 7919 * counts.total + 104_729 * seed_offset)
    objective = Objective(sweep, root=root, log=log)

    def after(study: Any, trial: Any) -> None:
        _result_line(study, trial, log)
        run = sweep.folder / trial_name(trial.number)
        if reports and trial.state != optuna.trial.TrialState.FAIL and runs.is_complete(run):
            try:
                build_report(run, root=root)
            except MnistlabError as e:
                log(f"warning: no report for trial {trial.number} ({e})")

    started = time.monotonic()
    old = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # the launcher's stop
    try:
        while timeout is None or time.monotonic() - started < timeout:
            counts = tally(sweep.study)
            if counts.fresh >= sweep.settings.trials and not counts.waiting:
                if not counts.running:
                    break
                # Trials running elsewhere, or left by a killed worker: their heartbeat says
                # which, once it is stale they are failed and queued again, and we run them.
                time.sleep(sweep.heartbeat)
                with quiet_optuna():
                    optuna.storages.fail_stale_trials(sweep.study)
                continue
            left = None if timeout is None else max(1.0, timeout - (time.monotonic() - started))
            with quiet_optuna():
                sweep.study.optimize(objective, n_trials=1, timeout=left, catch=(MnistlabError,),
                                     callbacks=[after], gc_after_trial=False)  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; sweep {sweep.name} is saved: rerun `mnistlab sweep "
                          f"{sweep.name}` to continue it") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, old)


def _result_line(study: Any, trial: Any, log: Log) -> None:
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        best = study.best_trial
        log(f"trial {trial.number} done: val acc {trial.value:.2f}% (best: trial {best.number}, "
            f"{best.value:.2f}%)")
    elif trial.state == TrialState.PRUNED:
        last = trial.last_step
        value = trial.intermediate_values.get(last) if last is not None else None
        shown = f", val acc {value:.2f}%" if value is not None else ""
        log(f"trial {trial.number} pruned after epoch {last}{shown}")
    elif is_surplus(trial):
        pass
    elif trial.state == TrialState.FAIL and "error" not in trial.user_attrs:
        log(f"trial {trial.number} stopped; it is queued to continue")


# --- K local workers ----------------------------------------------------------------------------


def run_workers(sweep: Sweep, k: int, args: Sequence[str], *, log: Log = print) -> list[str]:
    """Start `k` worker processes (`mnistlab sweep run NAME ARGS --worker-id I`) on the sweep's
    study and wait for them; lines about workers that died. Ctrl-C stops them all."""
    env = {**os.environ, WORKER_ENV: sweep.url}
    cmd = [sys.executable, "-m", "mnistlab", "sweep", "run", sweep.name, *args]
    procs = [subprocess.Popen([*cmd, "--worker-id", str(i)], env=env) for i in range(1, k + 1)]
    log(f"started {k} workers: " + ", ".join(f"w{i} pid {p.pid}" for i, p in
                                             enumerate(procs, start=1)))  # fmt: skip
    notes: list[str] = []
    old = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        pending = dict(enumerate(procs, start=1))
        while pending:
            for i, p in list(pending.items()):
                code = p.poll()
                if code is None:
                    continue
                del pending[i]
                if code < 0:
                    note = (f"worker w{i} (pid {p.pid}) was killed by "
                            f"{signal.Signals(-code).name}; the others retry its trial")
                    log(note)
                    notes.append(note)
                elif code not in (0, 130):
                    notes.append(f"worker w{i} (pid {p.pid}) stopped with status {code}")
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)
        raise Interrupted(f"interrupted; sweep {sweep.name} is saved: rerun `mnistlab sweep "
                          f"{sweep.name}` to continue it") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, old)
    return notes


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """Each worker got Ctrl-C from the terminal (or SIGTERM from us): wait for it to save."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
