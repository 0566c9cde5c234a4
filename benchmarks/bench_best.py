"""Best accuracy: `mnistlab train --recipe best` over 3 seeds (single model, MNIST training data
only, every choice made on a validation split), against the lab's best model, the Advanced
MLP (`--recipe advanced`: BatchNorm, dropout, Adam with weight decay 1e-5, 10 epochs).

Target: mean test accuracy ≥ 99.65%, at most 15 minutes a run. The recipe runs take minutes
each; `--runs-from DIR` reads finished `best` runs (e.g. started with nohup) instead of training.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import benchutil as bu

TARGET_MEAN = 99.65
TARGET_SECONDS = 15 * 60


def summaries(folder: Path, recipe: str) -> list[dict]:
    """Summaries of the complete runs of `recipe` under `folder`, in seed order."""
    out = []
    for path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        config = json.loads((path.parent / "config.json").read_text())
        if summary.get("recipe") == recipe:
            out.append({**summary, "run_dir": str(path.parent), "seed": config["seed"],
                        "config": config})
    return sorted(out, key=lambda s: s["seed"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--runs-from", type=Path, default=None,
                   help="Read finished best runs from this runs folder instead of training.")
    p.add_argument("--threads", type=int, default=0,
                   help="--threads for the best runs (0: mnistlab's automatic choice).")
    p.add_argument("--quick", action="store_true",
                   help="Smoke run: one epoch on 2,000 images; nothing is saved.")
    p.add_argument("--no-save", action="store_true", help="Do not write benchmarks/results.")
    a = p.parse_args(argv)
    hw = bu.hardware()
    bu.print_hardware(hw)
    quick = ["--train-limit", "2000", "--epochs", "1"] if a.quick else []
    seeds = 1 if a.quick else a.seeds
    with tempfile.TemporaryDirectory() as tmp:
        refs = []
        for seed in range(seeds):
            ref = bu.run_json(bu.mnistlab_cmd(
                "train", "--recipe", "advanced", "--json", "--no-progress", "--runs-dir",
                f"{tmp}/ref", "--seed", str(seed), *quick,
            ))
            print(f"reference (advanced) seed {seed}: {ref['test_acc']:.2f}% in "
                  f"{ref['seconds']:.1f}s", flush=True)
            refs.append(ref)
        if a.runs_from is not None:
            ours = summaries(a.runs_from, "best")[:seeds]
            for run in ours:
                env = json.loads((Path(run["run_dir"]) / "environment.json").read_text())
                run["threads"] = env.get("threads")
            if len(ours) < seeds:
                sys.exit(f"{a.runs_from} holds {len(ours)} complete best runs, need {seeds}")
        else:
            ours = []
            for seed in range(seeds):
                run = bu.run_json(bu.mnistlab_cmd(
                    "train", "--recipe", "best", "--json", "--no-progress", "--runs-dir",
                    f"{tmp}/best", "--seed", str(seed), "--threads", str(a.threads), *quick,
                ), timeout=2 * TARGET_SECONDS)
                run["seed"] = seed
                env = json.loads((Path(run["run_dir"]) / "environment.json").read_text())
                run["threads"] = env.get("threads")
                ours.append(run)
        for run in ours:
            print(f"best seed {run['seed']}: {run['test_acc']:.2f}% in {run['seconds']:.0f}s on "
                  f"{run.get('threads')} thread(s) (best validation acc "
                  f"{run.get('best_val_acc') or 0:.2f}%)", flush=True)
    accs = [r["test_acc"] for r in ours]
    acc_s = bu.stats(accs)
    sec_s = bu.stats([r["seconds"] for r in ours])
    ref_acc = bu.stats([r["test_acc"] for r in refs])
    met_acc = acc_s["mean"] >= TARGET_MEAN
    met_time = sec_s["max"] <= TARGET_SECONDS
    error_ratio = (100 - ref_acc["mean"]) / max(1e-9, 100 - acc_s["mean"])
    print(f"reference: mean {ref_acc['mean']:.2f}% ({ref_acc['min']:.2f}–{ref_acc['max']:.2f})")
    print(f"best:      mean {acc_s['mean']:.3f}% (min {acc_s['min']:.2f}, max {acc_s['max']:.2f}); "
          f"{bu.fmt_stats(sec_s, digits=0)} a run")
    print(f"error rate {error_ratio:.1f}x lower; mean ≥ {TARGET_MEAN}%: {met_acc}; every run ≤ "
          f"{TARGET_SECONDS // 60} min: {met_time}")
    figures = {
        "reference": {"test_acc": ref_acc, "recipe": "advanced"},
        "mnistlab": {
            "test_acc": acc_s,
            "seconds": sec_s,
            "best_val_acc": [r.get("best_val_acc") for r in ours],
            "seeds": [r["seed"] for r in ours],
            "threads": [r.get("threads") for r in ours],
        },
        "error_ratio": error_ratio,
        "met_acc": met_acc,
        "met_time": met_time,
        "met": met_acc and met_time,
    }
    flags = (f" --threads {a.threads}" if a.threads else "") + (
        f" --runs-from {a.runs_from}" if a.runs_from else ""
    )
    return bu.finish("best", hw, a, figures, flags)


if __name__ == "__main__":
    sys.exit(0 if main()["met"] else 1)
