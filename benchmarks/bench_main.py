"""The main command end to end: how long `mnistlab train` (the lab recipe, report included) keeps
the user waiting beyond its training — the whole process's wall time minus the run's own
`seconds` (data loading, training and per-epoch evaluation) — next to the same command with
`--no-report` (start-up and exit alone). Target: ≤ 1.5 s.

    python benchmarks/bench_main.py [--runs 3] [--compare-with SRC]

`--compare-with SRC` also times the command as another source tree has it (e.g. a `git worktree`
of an older commit, run with PYTHONPATH=SRC/src), interleaved with this one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchutil as bu

TARGET_SECONDS = 1.5


def timed_train(runs_dir: Path, extra: list[str], env: dict | None = None) -> dict:
    """One `mnistlab train --json` process: its wall seconds and its summary."""
    cmd = bu.mnistlab_cmd("train", "--json", "--no-progress", "--runs-dir", str(runs_dir), *extra)
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                         check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    report = Path(summary["run_dir"]) / "report.html"
    return {"wall": wall, "seconds": summary["seconds"], "overhead": wall - summary["seconds"],
            "report": report.is_file(), "test_acc": summary["test_acc"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="Runs of each variant (median).")
    p.add_argument("--compare-with", metavar="SRC", default=None,
                   help="Also time this command from another source tree (its src/ is put first "
                   "on PYTHONPATH).")
    p.add_argument("--quick", action="store_true", help="Smoke run: 1 epoch on 2,000 images.")
    p.add_argument("--no-save", action="store_true", help="Do not write benchmarks/results.")
    a = p.parse_args(argv)
    hw = bu.hardware()
    bu.print_hardware(hw)
    runs = 1 if a.quick else a.runs
    small = ["--epochs", "1", "--train-limit", "2000"] if a.quick else []
    variants: dict[str, tuple[list[str], dict | None]] = {
        "report": (small, None),
        "no_report": ([*small, "--no-report"], None),
    }
    if a.compare_with:
        other = {"PYTHONPATH": str(Path(a.compare_with).resolve() / "src")}
        variants["compared_report"] = (small, other)
    samples: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        bu.run_json(bu.mnistlab_cmd("data", "info", "--json"))  # fill mnistlab's decode cache
        for i in range(runs):
            for name, (extra, env) in variants.items():
                r = timed_train(Path(tmp) / name, extra, env)
                samples[name].append(r)
                print(f"{name:16s} run {i}: wall {r['wall']:.2f}s, training {r['seconds']:.2f}s,"
                      f" beyond it {r['overhead']:.2f}s (report written: {r['report']})",
                      flush=True)
    stats = {k: {key: bu.stats([r[key] for r in v]) for key in ("wall", "seconds", "overhead")}
             for k, v in samples.items()}
    ours = stats["report"]["overhead"]["median"]
    startup = stats["no_report"]["overhead"]["median"]
    met = ours <= TARGET_SECONDS and all(r["report"] for r in samples["report"])
    print(f"beyond training: {ours:.2f}s with the report, {startup:.2f}s without "
          f"(target ≤ {TARGET_SECONDS}s: {'met' if met else 'MISSED'})")
    reference = f"{startup:.2f} s with `--no-report` (start-up and exit)"
    if "compared_report" in stats:
        before = stats["compared_report"]["overhead"]["median"]
        reference += f"; {before:.2f} s as {Path(a.compare_with).name} has it"
        print(f"as {a.compare_with} has it: {before:.2f}s beyond training")
    wall, secs = stats["report"]["wall"]["median"], stats["report"]["seconds"]["median"]
    figures = {
        "samples": samples,
        "stats": stats,
        "met": met,
        "rows": [bu.row(
            f"`mnistlab train` whole process minus its training seconds (median of {runs})",
            f"{ours:.2f} s (wall {wall:.1f} s, training {secs:.1f} s)", reference,
            f"{ours - startup:.2f} s for the report", f"≤ {TARGET_SECONDS} s", met)],
    }
    flags = f" --compare-with {a.compare_with}" if a.compare_with else ""
    return bu.finish("main", hw, a, figures, flags)


if __name__ == "__main__":
    sys.exit(0 if main()["met"] else 1)
