"""Lab recipe: `mnistlab train` (SimpleMNISTDNN, Adam 0.001, batch 64, 5 epochs, evaluation after
every epoch) against the lab-style reference pipeline with the same hyperparameters.

Both are timed from after `import torch` to the final test accuracy, data loading and per-epoch
evaluation included (mnistlab: the `seconds` of `mnistlab train --json`). Runs alternate between
the two so that a busy machine slows both alike. Target: ≥ 15× faster, accuracy 97.2–98.2%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import benchutil as bu

TARGET_RATIO = 15.0
ACC_BAND = (97.2, 98.2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="Runs of each pipeline (seeds 0..N-1).")
    p.add_argument("--quick", action="store_true", help="Smoke run: 1 epoch on 2,000 images.")
    p.add_argument("--no-save", action="store_true", help="Do not write benchmarks/results.")
    a = p.parse_args(argv)
    hw = bu.hardware()
    bu.print_hardware(hw)
    runs = 1 if a.quick else a.runs
    small = ["--epochs", "1"] if a.quick else []
    ref_small = [*small, "--limit", "2000"] if a.quick else []
    ours_small = [*small, "--train-limit", "2000"] if a.quick else []
    refs, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        raw = bu.raw_copy(Path(tmp) / "raw")
        bu.run_json(bu.mnistlab_cmd("data", "info", "--json"))  # fill mnistlab's decode cache
        for seed in range(runs):
            ref = bu.run_json(bu.labref_cmd("--raw", str(raw), "--seed", str(seed), *ref_small))
            print(f"reference seed {seed}: {ref['seconds']:.2f}s, test acc {ref['test_acc']:.2f}% "
                  f"({ref['threads']} threads)", flush=True)
            refs.append(ref)
            run = bu.run_json(bu.mnistlab_cmd(
                "train", "--json", "--no-progress", "--runs-dir", f"{tmp}/runs",
                "--seed", str(seed), *ours_small,
            ))
            env = json.loads((Path(run["run_dir"]) / "environment.json").read_text())
            run["threads"] = env.get("threads")
            print(f"mnistlab  seed {seed}: {run['seconds']:.2f}s, test acc {run['test_acc']:.2f}% "
                  f"({run['threads']} thread(s))", flush=True)
            ours.append(run)
    ref_s = bu.stats([r["seconds"] for r in refs])
    our_s = bu.stats([r["seconds"] for r in ours])
    accs = [r["test_acc"] for r in ours]
    ratio = ref_s["median"] / our_s["median"]
    met = ratio >= TARGET_RATIO and all(ACC_BAND[0] <= acc <= ACC_BAND[1] for acc in accs)
    print(f"reference: {bu.fmt_stats(ref_s)}, acc {[r['test_acc'] for r in refs]}")
    print(f"mnistlab:  {bu.fmt_stats(our_s)}, acc {accs}")
    print(f"ratio {ratio:.1f}x (target ≥ {TARGET_RATIO:.0f}x, accuracy in {ACC_BAND}): "
          f"{'met' if met else 'MISSED'}")
    threads = ours[-1].get("threads")
    figures = {
        "reference": {"seconds": ref_s, "test_acc": [r["test_acc"] for r in refs],
                      "threads": refs[-1]["threads"]},
        "mnistlab": {"seconds": our_s, "test_acc": accs, "threads": threads},
        "ratio": ratio,
        "met": met,
        "rows": [bu.row(
            f"Lab recipe, 5 epochs, seconds (median of {our_s['n']})",
            f"{our_s['median']:.2f} s (test acc {', '.join(f'{v:.2f}' for v in accs)}%; "
            f"{threads} thread{'s' if threads != 1 else ''})",
            f"{ref_s['median']:.1f} s (lab-style, {refs[-1]['threads']} threads)",
            f"{ratio:.1f}×", f"≥ {TARGET_RATIO:.0f}×, acc {ACC_BAND[0]}–{ACC_BAND[1]}%", met)],
    }
    return bu.finish("lab", hw, a, figures)


if __name__ == "__main__":
    sys.exit(0 if main()["met"] else 1)
