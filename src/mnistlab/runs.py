"""Run folders: `runs/<name>/` holds everything a training run leaves behind.

    config.json       the resolved TrainConfig
    environment.json  mnistlab, torch and Python versions, device, threads, machine
    metrics.jsonl     one JSON object per completed epoch
    steps.jsonl       one JSON object per progress line (the lab's Step lines), as they happen
    checkpoint.pt     model, optimizer, scheduler, RNG states, best weights, progress: --resume
    best.pt           best weights on the validation split (when validating)
    model.pt          final weights: a plain state_dict, `model.load_state_dict(torch.load(...))`
    summary.json      final metrics; its presence marks the run complete

Every file is written atomically, so a kill at any instant leaves the previous good state.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .errors import MnistlabError
from .fileio import atomic_write_json, atomic_write_text

RUNS_DIR = "runs"
CONFIG = "config.json"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
SUMMARY = "summary.json"


def create_run_dir(runs_dir: str | os.PathLike[str], name: str | None = None) -> Path:
    """Make a new, empty run folder; an existing run is never reused or overwritten."""
    parent = Path(runs_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is a file" if parent.is_file() else e.strerror or e
        raise MnistlabError(
            f"cannot create runs folder {parent}: {why}; choose another with --runs-dir"
        ) from None
    if name is not None:
        if not name or "/" in name or name in (".", ".."):
            raise MnistlabError(f"bad run name {name!r}: use a plain folder name")
        candidates = [name]
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        candidates = [stamp] + [f"{stamp}-{i}" for i in range(2, 100)]
    for candidate in candidates:
        path = parent / candidate
        try:
            path.mkdir()  # atomic: fails if it exists, so two runs never share a folder
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise MnistlabError(
                f"cannot write to runs folder {parent}: {e.strerror or e}"
            ) from None
    raise MnistlabError(
        f"run {parent / name} already exists; choose another --name, or continue it with "
        f"--resume {parent / name}"
        if name
        else f"could not find a free run name in {parent}"
    )


def find_run(run: str | os.PathLike[str], runs_dir: str | os.PathLike[str] = RUNS_DIR) -> Path:
    """A run given as a path, or as a name under `runs_dir`."""
    candidates = list(dict.fromkeys((Path(run), Path(runs_dir) / str(run))))
    for path in candidates:
        if path.is_dir():
            return path
    looked = " and ".join(str(p) for p in candidates)
    raise MnistlabError(f"no run {str(run)!r} (looked for {looked}); check the name or --runs-dir")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MnistlabError(f"{path} is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MnistlabError(f"{path} is unreadable ({e})") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run ([] if it has none yet)."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MnistlabError(f"{path} is unreadable: {e}") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise MnistlabError(f"{path} is unreadable at line {n}: {e}") from None
    return records


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    path = run_dir / METRICS
    try:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))
    except OSError as e:
        raise MnistlabError(f"could not save {path}: {e.strerror or e}") from None


class StepLog:
    """Appends the lab's Step lines to steps.jsonl as JSON, one line a progress interval,
    flushed at once so a reader (the live page) sees each as it happens.

    Each line is whole or absent after a kill (one write() of under a page); a torn last line is
    skipped by `read_steps`. Resuming first drops the lines of epochs that were not saved.
    """

    def __init__(self, run_dir: Path, keep_epochs: int | None = None) -> None:
        self.path = run_dir / STEPS
        if keep_epochs is not None and self.path.exists():
            kept = [r for r in read_steps(run_dir) if int(r.get("epoch", 0)) <= keep_epochs]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open)
        except OSError as e:
            raise MnistlabError(f"could not write {self.path}: {e.strerror or e}") from None

    def __call__(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    """The progress lines of a run so far ([] if none); a torn last line is left out."""
    try:
        text = (run_dir / STEPS).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise MnistlabError(f"{run_dir / STEPS} is unreadable: {e}") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written, or one torn by a kill
        if isinstance(record, dict):
            records.append(record)
    return records


def write_json(run_dir: Path, name: str, obj: Any) -> None:
    try:
        atomic_write_json(run_dir / name, obj)
    except OSError as e:
        raise MnistlabError(f"could not save {run_dir / name}: {e.strerror or e}") from None


def environment(device: str, **more: Any) -> dict[str, Any]:
    """Versions, machine and thread count of a run, plus `more` (the hardware and the
    decisions made for it, from mnistlab.hardware)."""
    import torch

    from . import __version__

    return {
        "mnistlab": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **more,
    }


def cpu_name() -> str:
    """The CPU model name, for environment records and benchmark headers."""
    from .hardware import cpu_name

    return cpu_name()


def is_complete(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).is_file()
