"""Training with two processes on loopback: torchrun and `--nproc`, in the accuracy band of one
process, rank 0 alone writing; a killed rank is one clear line and a resumable checkpoint; the
loader's shards are the single process's batches (hypothesis)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab import runs
from mnistlab.data import BatchLoader
from mnistlab.errors import DataError

FLAGS = ["--train-limit", "6000", "--epochs", "2", "--threads", "1", "--seed", "1", "--no-report",
         "--json", "--device", "cpu"]  # fmt: skip
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def train(cwd: Path, *args: str, launcher: list[str] | None = None, timeout: float = 240):
    cmd = [*(launcher or [sys.executable, "-m"]), "mnistlab", "train", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **LOOPBACK})  # fmt: skip


def summary_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_and_only_rank_0_writes(tmp_path, cli):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single = json.loads(cli("train", *FLAGS, "--name", "run", "--runs-dir", one / "runs").stdout)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m"]  # fmt: skip
    proc = train(two, *FLAGS, "--name", "run", launcher=torchrun)
    double = summary_of(proc)
    assert double["processes"] == 2 and single["processes"] == 1
    # The same recipe and seed: the same global batches, so the same accuracy band.
    assert abs(double["test_acc"] - single["test_acc"]) <= 0.15, (single, double)
    a = runs.read_metrics(one / "runs" / "run")
    b = runs.read_metrics(two / "runs" / "run")
    assert abs(a[0]["train_loss"] - b[0]["train_loss"]) < 1e-3
    # Rank 0 alone wrote: one run folder holding what a one-process run holds, and its lines
    # were printed once (rank 1 printed nothing).
    assert sorted(p.name for p in (two / "runs").iterdir()) == ["run"]
    assert sorted(p.name for p in (two / "runs" / "run").iterdir()) == sorted(
        p.name for p in (one / "runs" / "run").iterdir())  # fmt: skip
    assert sorted(p.name for p in two.iterdir()) == ["runs"]
    assert proc.stderr.count("Epoch 1/2 |") == 1
    hardware = next(line for line in proc.stderr.splitlines() if line.startswith("Hardware: "))
    assert hardware.endswith("(2 processes, gloo)"), hardware


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the training process of `rank` among the launcher's children."""
    try:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    except OSError:
        return None
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_with_one_line_and_it_resumes(tmp_path):
    flags = ["--train-limit", "9000", "--epochs", "2", "--threads", "1", "--no-report",
             "--device", "cpu", "--name", "k", "--nproc", "2"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "mnistlab", "train", *flags], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "k"
    deadline = time.monotonic() + 180
    killed = None
    rank1 = None
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        rank1 = rank1 or _rank_pid(proc, 1)
        if rank1 and len(runs.read_metrics(run)) == 1:  # epoch 1 saved, epoch 2 under way
            os.kill(rank1, signal.SIGKILL)
            killed = rank1
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert killed, "rank 1 was never found mid-run"
    assert proc.returncode == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == ("mnistlab: error: training process rank 1 was killed by SIGKILL; runs/k"
                    " holds epoch 1/2. Resume with: mnistlab train --resume runs/k --nproc 2")
    assert (run / "checkpoint.pt").is_file() and not (run / runs.SUMMARY).exists()
    first = runs.read_metrics(run)[0]

    resumed = train(tmp_path, "--resume", "runs/k", "--nproc", "2", "--no-report", "--json")
    summary = summary_of(resumed)
    history = runs.read_metrics(run)
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == first
    assert summary["epochs"] == 2 and summary["processes"] == 2 and summary["test_acc"] > 90


def test_nproc_refuses_bad_values_before_launching(cli, tmp_path):
    proc = cli("train", "--nproc", "0", "--runs-dir", tmp_path)
    assert proc.returncode == 1 and "--nproc must be at least 1" in proc.stderr
    proc = cli("train", "--nproc", "2", "--lr", "-1", "--runs-dir", tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("mnistlab: error: ")
    assert not any(tmp_path.iterdir())


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 300), batch=st.integers(1, 70), world=st.integers(2, 4),
       seed=st.integers(0, 100), drop_last=st.booleans())  # fmt: skip
def test_rank_shards_make_up_the_single_process_batches(n, batch, world, seed, drop_last):
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    labels = torch.arange(n)
    if batch < world:
        with pytest.raises(DataError, match=f"cannot give each of {world} processes a sample"):
            BatchLoader(images, labels, batch, shuffle=True, rank=0, world=world)
        return
    whole = BatchLoader(images, labels, batch, shuffle=True, seed=seed, drop_last=drop_last)
    shards = [BatchLoader(images, labels, batch, shuffle=True, seed=seed, drop_last=drop_last,
                          rank=r, world=world) for r in range(world)]  # fmt: skip
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1  # every rank takes the same number of steps
    steps = [list(s) for s in shards]
    expected = list(whole)
    for i in range(lengths.pop()):
        parts = [steps[r][i][1] for r in range(world)]
        assert all(len(p) >= 1 for p in parts)
        assert torch.equal(torch.cat(parts).sort().values, expected[i][1].sort().values)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    # Only a last batch too small to give each rank a sample is left out.
    assert len(expected) - len(steps[0]) in (0, 1)
    if len(expected) > len(steps[0]):
        assert len(expected[-1][1]) < world
    # Evaluation loaders split the batches between the ranks, every sample once.
    evals = [BatchLoader(images, labels, batch, rank=r, world=world) for r in range(world)]
    seen = torch.cat([y for e in evals for _, y in e])
    assert torch.equal(seen.sort().values, labels)
