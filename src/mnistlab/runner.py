"""Training runs started from the page: each a child `mnistlab train` process, one at a time.

The server never trains in its own process. Runs wait in a queue; Stop sends the child SIGINT,
which `mnistlab train` answers by keeping its last complete epoch and exiting, so the run can be
resumed (`mnistlab train --resume`), from the page or the command line.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MnistlabError

# The form's fields → `mnistlab train` flags. Values are passed as text, so the child parses
# them exactly as the command line would, and a bad value gets the CLI's own error line.
FORM_FLAGS = {
    "recipe": "--recipe",
    "model": "--model",
    "epochs": "--epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "train_limit": "--train-limit",
    "threads": "--threads",
    "log_every": "--log-every",
}
LOG_LINES = 200  # of each child's output, kept for the page


def train_args(form: dict[str, Any]) -> list[str]:
    """`mnistlab train` arguments for the non-empty form fields (unknown fields refused)."""
    unknown = sorted(set(form) - set(FORM_FLAGS))
    if unknown:
        raise MnistlabError(f"unknown form field(s): {', '.join(unknown)}; use "
                            + ", ".join(FORM_FLAGS))
    args = []
    for key, flag in FORM_FLAGS.items():
        value = form.get(key)
        if value is None or str(value).strip() == "":
            continue
        args += [flag, str(value).strip()]
    return args


def check_train_args(args: list[str]) -> None:
    """Parse and resolve `args` exactly as `mnistlab train` would, without training: a bad
    value raises MnistlabError with the line the CLI prints (after `mnistlab: error: `)."""
    import click

    from .cli import cli, error_message
    from .cli.train import resolve_flags, train

    parent = click.Context(cli, info_name="mnistlab")
    try:
        ctx = train.make_context("train", list(args), parent=parent)
    except click.ClickException as e:
        raise MnistlabError(error_message(e)) from None
    resolve_flags(ctx.params)


@dataclass
class Job:
    name: str
    args: list[str]  # after `mnistlab train`
    kind: str  # "start" or "resume"
    state: str = "queued"  # queued, running, stopping, stopped, finished, failed
    returncode: int | None = None
    error: str | None = None  # the child's `mnistlab: error:` line, if it failed
    log: collections.deque[str] = field(default_factory=lambda: collections.deque(
        maxlen=LOG_LINES))
    proc: subprocess.Popen[str] | None = None
    queued_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "state": self.state,
                "returncode": self.returncode, "error": self.error, "args": self.args}


class RunManager:
    """A queue of `mnistlab train` children under one runs folder, run one at a time."""

    def __init__(self, runs_dir: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.root = root
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.jobs: dict[str, Job] = {}  # every job of this server, by run name
        self.queue: collections.deque[Job] = collections.deque()
        self.current: Job | None = None
        self.lock = threading.Lock()
        self.closed = False

    # -- the page's actions --------------------------------------------------------------------

    def new_name(self) -> str:
        """A run name free in the runs folder and in this server's queue."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1, 1000):
            name = stamp if i == 1 else f"{stamp}-{i}"
            if name not in self.jobs and not (self.runs_dir / name).exists():
                return name
        raise MnistlabError("could not find a free run name")

    def start(self, args: list[str]) -> Job:
        """Queue a new run with these `mnistlab train` arguments (already checked)."""
        with self.lock:
            name = self.new_name()
            job = Job(name, [*args, "--name", name], "start")
            return self._enqueue(job)

    def resume(self, name: str) -> Job:
        with self.lock:
            job = self.jobs.get(name)
            if job is not None and job.state in ("queued", "running", "stopping"):
                raise MnistlabError(f"run {name} is {job.state}; wait for it to stop")
            run = self.runs_dir / name
            if not (run / "config.json").is_file():
                raise MnistlabError(f"no run {name!r} in {self.runs_dir}")
            if (run / "summary.json").is_file():
                raise MnistlabError(f"run {name} is already complete; start a new run instead")
            return self._enqueue(Job(name, ["--resume", str(run)], "resume"))

    def stop(self, name: str) -> Job:
        """Stop a running run (SIGINT: it keeps its last complete epoch) or drop a queued one."""
        with self.lock:
            job = self.jobs.get(name)
            if job is None or job.state not in ("queued", "running", "stopping"):
                raise MnistlabError(f"run {name} is not running or queued here")
            if job.state == "queued":
                self.queue.remove(job)
                job.state = "stopped"
            elif job.proc is not None and job.proc.poll() is None:
                job.state = "stopping"
                job.proc.send_signal(signal.SIGINT)
            return job

    def state_of(self, name: str) -> Job | None:
        with self.lock:
            return self.jobs.get(name)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [j.to_dict() for j in self.jobs.values()]

    def close(self, timeout: float = 15.0) -> None:
        """Drop the queue and stop the running child cleanly (killed after `timeout`)."""
        with self.lock:
            self.closed = True
            for job in self.queue:
                job.state = "stopped"
            self.queue.clear()
            job = self.current
        if job is not None and job.proc is not None and job.proc.poll() is None:
            job.proc.send_signal(signal.SIGINT)
            try:
                job.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()

    # -- the queue -----------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> Job:
        if self.closed:
            raise MnistlabError("the server is shutting down")
        self.jobs[job.name] = job
        self.queue.append(job)
        self._next()
        return job

    def _next(self) -> None:
        """With the lock held: start the first queued job if none is running."""
        if self.current is not None or not self.queue or self.closed:
            return
        job = self.queue.popleft()
        cmd = [sys.executable, "-m", "mnistlab", "train", *job.args, "--runs-dir",
               str(self.runs_dir), "--no-progress"]
        if self.root is not None:
            cmd += ["--root", str(self.root)]
        try:
            job.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, env=self.env)
        except OSError as e:
            job.state, job.error = "failed", f"could not start mnistlab train: {e}"
            self._next()
            return
        job.state = "running"
        self.current = job
        threading.Thread(target=self._watch, args=(job,), daemon=True,
                         name=f"mnistlab-run-{job.name}").start()

    def _watch(self, job: Job) -> None:
        assert job.proc is not None and job.proc.stdout is not None
        for line in job.proc.stdout:
            job.log.append(line.rstrip("\n"))
        code = job.proc.wait()
        with self.lock:
            job.returncode = code
            errors = [line for line in job.log if line.startswith("mnistlab: error: ")]
            if code == 0:
                job.state = "finished"
            elif job.state == "stopping":
                job.state = "stopped"
            else:
                job.state = "failed"
                job.error = errors[-1] if errors else f"mnistlab train exited with {code}"
            self.current = None
            self._next()
