"""Memory: peak resident memory (ru_maxrss of the process alone, from wait4) of a lab-recipe run,
`mnistlab train`, next to the lab-style reference pipeline's. Target: ≤ 1 GB.

The reference trains one epoch here (its memory peaks in the first: the data, the model and one
batch are all it holds); mnistlab runs its full 5-epoch recipe.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import benchutil as bu

TARGET_MIB = 1024.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="Smoke run: one small run each.")
    p.add_argument("--no-save", action="store_true", help="Do not write benchmarks/results.")
    a = p.parse_args(argv)
    hw = bu.hardware()
    bu.print_hardware(hw)
    runs = 1 if a.quick else a.runs
    refs, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        raw = bu.raw_copy(Path(tmp) / "raw")
        bu.run_json(bu.mnistlab_cmd("data", "info", "--json"))  # fill mnistlab's decode cache
        for seed in range(runs):
            extra = ["--limit", "2000"] if a.quick else []
            rss, _ = bu.peak_rss_mib(bu.labref_cmd("--raw", str(raw), "--epochs", "1", *extra))
            refs.append(rss)
            extra = ["--train-limit", "2000", "--epochs", "1"] if a.quick else []
            rss_ours, _ = bu.peak_rss_mib(bu.mnistlab_cmd(
                "train", "--json", "--no-progress", "--runs-dir", f"{tmp}/runs",
                "--seed", str(seed), *extra,
            ))
            ours.append(rss_ours)
            print(f"run {seed}: reference {rss:.0f} MiB, mnistlab train {rss_ours:.0f} MiB",
                  flush=True)
    ref_s, our_s = bu.stats(refs), bu.stats(ours)
    met = our_s["max"] <= TARGET_MIB
    print(f"reference: {bu.fmt_stats(ref_s, ' MiB', 0)}")
    print(f"mnistlab:  {bu.fmt_stats(our_s, ' MiB', 0)}; ≤ {TARGET_MIB:.0f} MiB: "
          f"{'met' if met else 'MISSED'}")
    figures = {
        "reference": {"peak_rss_mib": ref_s},
        "mnistlab": {"peak_rss_mib": our_s},
        "ratio": ref_s["median"] / our_s["median"],
        "met": met,
    }
    return bu.finish("memory", hw, a, figures)


if __name__ == "__main__":
    sys.exit(0 if main()["met"] else 1)
