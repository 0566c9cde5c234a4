"""Sweeps: trials per hour of `mnistlab sweep` on the bundled lab-mlp space with 1 and 2 worker
processes, pruning on (median) and off, and the best validation accuracy a 20-trial sweep finds
against the lab recipe's on the same 50,000 / 10,000 split. Reported, not targeted: on a shared
2-core machine two workers share the cores that one would use.

Each configuration is a fresh sweep, timed from the command's start to its end (start-up, trial
reports and storage included). The best trial's test accuracy is measured once, by
`mnistlab sweep report`; so is the lab recipe's, by its own run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchutil as bu

QUICK_SPACE = """
[fixed]
model = "mlp"
epochs = 1
train_limit = 3000
[search]
"model_args.hidden" = { choices = [32, 64] }
lr = { low = 1e-3, high = 1e-2, log = true }
[sweep]
startup_trials = 1
"""


def sweep(tmp: Path, name: str, space: str, trials: int, workers: int, pruner: str) -> dict:
    """Run one sweep; its wall time, counts, epochs trained and best trial."""
    cmd = bu.mnistlab_cmd("sweep", name, "--space", space, "--trials", str(trials),
                          "--workers", str(workers), "--pruner", pruner,
                          "--runs-dir", str(tmp / "runs"))  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    status = bu.run_json(bu.mnistlab_cmd("sweep", "status", name, "--json", "--runs-dir",
                                         str(tmp / "runs")))  # fmt: skip
    counts = status["counts"]
    finished = counts["complete"] + counts["pruned"]
    epochs = sum(t["epochs"] or 0 for t in status["trials"] if t["state"] in ("complete",
                                                                             "pruned"))
    row = {
        "workers": workers, "pruner": pruner, "trials": finished, "complete": counts["complete"],
        "pruned": counts["pruned"], "epochs": epochs, "seconds": seconds,
        "trials_per_hour": 3600 * finished / seconds, "epochs_per_hour": 3600 * epochs / seconds,
        "best": status["best"], "loadavg": bu.hardware()["loadavg"],
    }  # fmt: skip
    print(f"{workers} worker(s), pruner {pruner}: {finished} trials ({counts['pruned']} pruned, "
          f"{epochs} epochs) in {seconds:.0f}s = {row['trials_per_hour']:.0f} trials/h, "
          f"{row['epochs_per_hour']:.0f} epochs/h; best val acc "
          f"{status['best']['val_acc']:.2f}% (load {row['loadavg']})", flush=True)
    return row


def table_rows(figures: dict) -> list[dict]:
    """The lines of BENCHMARKS.md: trials per hour of each configuration, then what the search
    found against the lab recipe. Reported, not targeted."""
    space = figures["space"]
    rows = [
        bu.row(f"Sweep `{space}`, {r['workers']} worker(s), pruner {r['pruner']}: trials per hour "
               f"({r['trials']} trials, {r['pruned']} pruned; load {r['loadavg'][0]:.1f})",
               f"{r['trials_per_hour']:.0f}/h ({r['epochs_per_hour']:.0f} epochs/h)", "–", "–",
               "reported, not targeted", None)
        for r in figures["rows_measured"]
    ]  # fmt: skip
    found, lab = figures["search"], figures["lab"]
    rows.append(bu.row(
        f"Sweep `{space}`: best validation accuracy after {found['trials']} trials",
        f"{found['best']['val_acc']:.2f}% (its test accuracy, measured once: "
        f"{found['test_acc']:.2f}%)",
        f"lab recipe {lab['val_acc']:.2f}% (test {lab['test_acc']:.2f}%)",
        f"{found['best']['val_acc'] - lab['val_acc']:+.2f} points", "reported, not targeted",
        None))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8,
                   help="Trials of each throughput configuration. Default: 8.")
    p.add_argument("--search-trials", type=int, default=20,
                   help="Trials of the sweep whose best validation accuracy is reported.")
    p.add_argument("--quick", action="store_true", help="Smoke run: a tiny space, 2 trials.")
    p.add_argument("--no-save", action="store_true", help="Do not write benchmarks/results.")
    a = p.parse_args(argv)
    hw = bu.hardware()
    bu.print_hardware(hw)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        space = "lab-mlp"
        trials, search_trials = a.trials, a.search_trials
        if a.quick:
            (tmp / "quick.toml").write_text(QUICK_SPACE)
            space, trials, search_trials = str(tmp / "quick.toml"), 2, 2
        bu.run_json(bu.mnistlab_cmd("data", "info", "--json"))  # fill mnistlab's decode cache
        search = sweep(tmp, "search", space, search_trials, 1, "median")
        report = subprocess.run(bu.mnistlab_cmd("sweep", "report", "search", "--runs-dir",
                                                str(tmp / "runs")),
                                capture_output=True, text=True, check=True)  # fmt: skip
        once = re.search(r"test accuracy ([\d.]+)%", report.stdout)
        if once is None:
            raise RuntimeError(f"sweep report printed no test accuracy:\n{report.stdout}")
        test = {"test_acc": float(once[1])}
        print(report.stdout.strip().splitlines()[-1], flush=True)
        rows = [search]
        for workers, pruner in ((1, "none"), (2, "median"), (2, "none")):
            rows.append(sweep(tmp, f"w{workers}-{pruner}", space, trials, workers, pruner))
        lab_flags = ["--epochs", "1", "--train-limit", "3000"] if a.quick else []
        lab = bu.run_json(bu.mnistlab_cmd("train", "--json", "--no-progress", "--no-report",
                                          "--val-split", str(1 / 6), "--runs-dir",
                                          str(tmp / "runs"), *lab_flags))  # fmt: skip
        lab_history = [json.loads(line) for line in
                       (Path(lab["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    lab_val = lab_history[-1]["val_acc"]
    best = search["best"]
    print(f"best of {search['trials']} trials: val acc {best['val_acc']:.2f}% (trial "
          f"{best['trial']}: {best['params']}); test acc once {test['test_acc']:.2f}%")
    print(f"lab recipe on the same split: val acc {lab_val:.2f}%, test acc {lab['test_acc']:.2f}%")
    figures = {
        "space": "lab-mlp" if not a.quick else "quick", "rows_measured": rows,
        "search": {"trials": search["trials"], "best": best, "test_acc": test["test_acc"]},
        "lab": {"val_acc": lab_val, "test_acc": lab["test_acc"]},
        "met": True,  # reported, not targeted
    }  # fmt: skip
    figures["rows"] = table_rows(figures)
    flags = f" --trials {a.trials} --search-trials {a.search_trials}"
    return bu.finish("sweep", hw, a, figures, flags=flags)


if __name__ == "__main__":
    main()
    sys.exit(0)
