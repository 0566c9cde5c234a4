"""`mnistlab lr-find` on the lab recipe for 5 seeds, and `mnistlab train --lr auto`.

Targets: every seed's suggestion in [3e-4, 3e-3], each `mnistlab lr-find` command ≤ 10 s (wall
time of the whole command, imports and data loading included); `train --lr auto` lands in the
lab's band, 97.2–98.2% test accuracy after 5 epochs. The reference is the lab's own rate, 0.001.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import benchutil as bu

LOW, HIGH = 3e-4, 3e-3
SECONDS = 10.0
BAND = (97.2, 98.2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-train", action="store_true", help="Skip the `train --lr auto` run.")
    p.add_argument("--quick", action="store_true", help="Smoke run: 1 seed, 1 epoch.")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    seeds = 1 if a.quick else a.seeds
    hw = bu.hardware()
    bu.print_hardware(hw)
    rows = []
    for seed in range(seeds):
        t = time.perf_counter()
        r = bu.run_json(bu.mnistlab_cmd("lr-find", "--seed", str(seed), "--threads",
                                        str(a.threads), "--json"))
        wall = time.perf_counter() - t
        rows.append({"seed": seed, "suggested_lr": r["suggested_lr"], "wall_seconds": wall,
                     "sweep_seconds": r["seconds"], "steps": len(r["lrs"]),
                     "stopped": r["stopped"]})
        print(f"seed {seed}: suggested {r['suggested_lr']:.3g} ({len(r['lrs'])} steps, "
              f"{r['stopped']}), sweep {r['seconds']:.2f}s, command {wall:.2f}s")
    print(f"rule: {r['rule']}")
    auto = None
    if not a.no_train:
        with tempfile.TemporaryDirectory() as tmp:
            epochs = "1" if a.quick else "5"
            t = time.perf_counter()
            s = bu.run_json(bu.mnistlab_cmd("train", "--lr", "auto", "--epochs", epochs,
                                            "--threads", str(a.threads), "--runs-dir", tmp,
                                            "--no-report", "--json", "--no-progress"))
            auto = {"test_acc": s["test_acc"], "seconds": time.perf_counter() - t,
                    "epochs": int(epochs)}
            import json
            from pathlib import Path

            auto["lr"] = json.loads((Path(s["run_dir"]) / "config.json").read_text())["lr"]
        print(f"train --lr auto: lr {auto['lr']:.3g}, test accuracy {auto['test_acc']:.2f}% "
              f"after {epochs} epochs ({auto['seconds']:.1f}s)")
    in_range = all(LOW <= r["suggested_lr"] <= HIGH for r in rows)
    fast = all(r["wall_seconds"] <= SECONDS for r in rows)
    band = auto is not None and BAND[0] <= auto["test_acc"] <= BAND[1]
    print(f"targets: suggestions in [{LOW:g}, {HIGH:g}] {in_range}, ≤ {SECONDS:.0f} s {fast}, "
          f"--lr auto in {BAND[0]}–{BAND[1]}% {band}")
    return bu.finish("lrfind", hw, a, {
        "threads": a.threads, "seeds": rows, "auto": auto,
        "met": {"range": in_range, "seconds": fast, "band": band},
        "reference": {"lr": 0.001},
    }, f" --threads {a.threads}")


if __name__ == "__main__":
    main()
