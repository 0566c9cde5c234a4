"""Drawing figures as PNGs: in this process, or in worker processes started ahead of time.

A report draws six figures with matplotlib: its import costs about half a second and each
figure a tenth or more. `mnistlab train` starts a `FigurePool` while the run trains, on a core
the training leaves idle, so the import is done by the time the report is written and the
figures are drawn in parallel. The workers import numpy and matplotlib only (no torch): a job
is a function of `mnistlab.plots` and its arguments, as plain data and numpy arrays.

    python -m mnistlab.render    # one worker: jobs on stdin, PNGs on stdout (pickled frames)
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

Pending = Callable[[], list[bytes]]


@dataclass(frozen=True)
class FigureJob:
    """`mnistlab.plots.<function>(*args, **kwargs)`, drawn to PNG."""

    function: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def draw(job: FigureJob) -> bytes:
    from . import plots

    fn = getattr(plots, job.function)
    return plots.figure_png(fn(*job.args, **job.kwargs))


class LocalRenderer:
    """Draws each job in this process, when asked."""

    def start(self, jobs: Sequence[FigureJob]) -> Pending:
        pngs = [draw(job) for job in jobs]
        return lambda: pngs

    def close(self) -> None:
        pass


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the other side closed the pipe")
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other side closed the pipe mid-message")
    return pickle.loads(data)  # our own worker (or parent) at the other end of a private pipe


class FigurePool:
    """Worker processes that have imported matplotlib and wait for figures to draw.

    Started early (`FigurePool(2)`), used once the data to draw exists (`start(jobs)`), each
    job going to whichever worker is free. A worker that fails is replaced by drawing here, so
    the result is the same PNGs either way. `close()` (or the end of this process) stops them.
    """

    def __init__(self, workers: int = 2) -> None:
        env = {**os.environ, "MPLBACKEND": "Agg"}
        self._procs = [
            subprocess.Popen(
                [sys.executable, "-m", "mnistlab.render"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            )
            for _ in range(max(1, workers))
        ]

    def start(self, jobs: Sequence[FigureJob]) -> Pending:
        todo: queue.Queue[int] = queue.Queue()
        for i in range(len(jobs)):
            todo.put(i)
        results: list[bytes | None] = [None] * len(jobs)

        def serve(proc: subprocess.Popen) -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    _send(proc.stdin, jobs[i])
                    status, value = _receive(proc.stdout)
                except (OSError, EOFError, pickle.PickleError):
                    todo.put(i)  # this worker is gone: leave the job to the others
                    return
                if status != "ok":
                    todo.put(i)
                    return
                results[i] = value

        threads = [threading.Thread(target=serve, args=(p,), daemon=True) for p in self._procs]
        for t in threads:
            t.start()

        def wait() -> list[bytes]:
            for t in threads:
                t.join()
            # Whatever no worker could draw is drawn here.
            return [png if png is not None else draw(jobs[i]) for i, png in enumerate(results)]

        return wait

    def close(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # a worker exits at the end of its input
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> FigurePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """Draw the jobs that arrive on `stdin` until it closes; answer each on `stdout`."""
    import matplotlib

    matplotlib.use("Agg")
    from . import plots

    # Warm up: fonts are loaded and the first text laid out before the first real job.
    plots.figure_png(plots.plot_metrics({"train_loss": [1.0, 0.5], "test_acc": [90.0, 95.0]}))
    while True:
        try:
            job = _receive(stdin)
        except EOFError:
            return
        try:
            _send(stdout, ("ok", draw(job)))
        except Exception as e:  # reported to the parent, which then draws the job itself
            _send(stdout, ("error", f"{type(e).__name__}: {e}"))


if __name__ == "__main__":
    worker(sys.stdin.buffer, sys.stdout.buffer)
