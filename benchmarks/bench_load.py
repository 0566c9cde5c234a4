"""Load benchmark: cold vs warm vs in-process loads of MNIST, and our batches vs a DataLoader.

    MNISTLAB_DATA=../shared/datasets python benchmarks/bench_load.py [--repeats 5] [--epochs 3]

Each load is timed in a fresh Python process (so no in-memory cache helps), around the
`load_mnist` call only; the interpreter start and `import torch` are reported separately.

- cold: an empty MNISTLAB_CACHE: read the .gz, gunzip, SHA-256, parse, write the .npy cache.
- warm: a fresh process with the disk cache populated by a cold run: read the .npy.
- in-process: a second `load_mnist` of the same split in the warm process (memory cache).
- naive: `gzip.open(...).read()` + `np.frombuffer` + `torch.from_numpy`, no verification or
  cache: what a script that decodes the files itself does on every start.

The source files stay in the OS page cache throughout, so "cold" means "our cache is empty",
not "the disk is cold". Then, in this process, one epoch of the training set at batch 64,
shuffled: `torch.utils.data.DataLoader` over `MNISTDataset` (the torchvision-style per-sample
pipeline) against `BatchLoader` (whole-tensor normalization, index slices).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch  # noqa: F401
from mnistlab.data import load_mnist
t1 = time.perf_counter()
root, split = sys.argv[1], sys.argv[2]
images, labels = load_mnist(root, split)
t2 = time.perf_counter()
again, _ = load_mnist(root, split)
t3 = time.perf_counter()
assert again.data_ptr() == images.data_ptr() and len(images) == len(labels)
print(json.dumps({"import": t1 - t0, "first": t2 - t1, "second": t3 - t2, "n": len(labels)}))
"""

NAIVE = r"""
import gzip, json, sys, time
import numpy as np
import torch
from mnistlab.catalog import MNIST
from mnistlab.data import find_file
root, split = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
out = []
for name, offset in zip(MNIST.splits[split], (16, 8)):
    with gzip.open(find_file(root, name), "rb") as f:
        data = f.read()
    out.append(torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=offset).copy()))
images, labels = out[0].view(-1, 28, 28), out[1].long()
t1 = time.perf_counter()
print(json.dumps({"first": t1 - t0, "n": len(labels)}))
"""


def run_child(code: str, root: str, split: str, cache: str) -> dict:
    env = dict(os.environ, MNISTLAB_CACHE=cache)  # OMP_NUM_THREADS (--threads) passes through
    done = subprocess.run(
        [sys.executable, "-c", code, root, split],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"benchmark child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float], unit: float = 1e3, suffix: str = "ms") -> str:
    med = statistics.median(values)
    return (
        f"median {med * unit:8.1f} {suffix}  (min {min(values) * unit:7.1f}, "
        f"max {max(values) * unit:7.1f}, n={len(values)})"
    )


def hardware() -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    import numpy as np
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"CPU: {model}; {os.cpu_count()} logical cores ({usable} usable); "
        f"torch threads {torch.get_num_threads()}",
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"{platform.system()} {platform.release()}",
        f"load average at start: {load}",
    ]


def bench_loads(root: str, repeats: int) -> None:
    print(f"\n== load_mnist, fresh process per run, {repeats} runs each ==")
    for split in ("train", "test"):
        cold, warm, second, naive, imports = [], [], [], [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="mnistlab-bench-") as cache:
                c = run_child(CHILD, root, split, cache)  # empty cache
                w = run_child(CHILD, root, split, cache)  # populated by the run above
            cold.append(c["first"])
            warm.append(w["first"])
            second.append(w["second"])
            imports += [c["import"], w["import"]]
            with tempfile.TemporaryDirectory(prefix="mnistlab-bench-") as cache:
                naive.append(run_child(NAIVE, root, split, cache)["first"])
        n = c["n"]
        print(f"{split} ({n} images)")
        print(f"  cold  (gunzip+verify+parse+cache write) {summary(cold)}")
        print(f"  warm  (fresh process, disk cache)       {summary(warm)}")
        print(f"  in-process second load (memory cache)   {summary(second, 1e6, 'µs')}")
        print(f"  naive (gzip.open + np.frombuffer)       {summary(naive)}")
        med = statistics.median
        print(
            f"  ratios: cold/warm {med(cold) / med(warm):.1f}x, "
            f"naive/warm {med(naive) / med(warm):.1f}x, "
            f"cold/naive {med(cold) / med(naive):.2f}x"
        )
        print(f"  (process start: import torch + mnistlab.data {summary(imports)})")


def bench_epochs(root: str, epochs: int) -> None:
    import torch

    from mnistlab.data import BatchLoader, MNISTDataset, load_mnist

    images, labels = load_mnist(root, "train")
    print(f"\n== one training epoch, batch 64, shuffled, CPU, {epochs} epochs each ==")

    def epoch_times(loader) -> list[float]:
        times = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            steps = sum(1 for _x, _y in loader)
            times.append(time.perf_counter() - t0)
        assert steps == 938
        return times

    t0 = time.perf_counter()
    ours = BatchLoader(images, labels, batch_size=64, shuffle=True, seed=0)
    build = time.perf_counter() - t0
    ours_times = epoch_times(ours)
    g = torch.Generator().manual_seed(0)
    theirs = epoch_times(torch.utils.data.DataLoader(
        MNISTDataset(images, labels), batch_size=64, shuffle=True, generator=g
    ))

    print(f"  BatchLoader construction (uint8 kept; batches normalized as drawn) "
          f"{build * 1e3:.1f} ms")
    print(f"  BatchLoader epoch                      {summary(ours_times)}")
    print(f"  DataLoader(MNISTDataset) epoch         {summary(theirs)}")
    print(
        f"  ratio DataLoader/BatchLoader: "
        f"{statistics.median(theirs) / statistics.median(ours_times):.0f}x per epoch"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("MNISTLAB_DATA", "data"))
    parser.add_argument("--repeats", type=int, default=5, help="fresh-process runs per measure")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loader")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads here and in the children (0: torch's default). On a busy "
        "machine, 1 avoids OpenMP stalls that otherwise dominate sub-millisecond operations.",
    )
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    print("mnistlab load benchmark")
    for line in hardware():
        print(line)
    print(f"data root: {args.root}")
    bench_loads(args.root, args.repeats)
    bench_epochs(args.root, args.epochs)


if __name__ == "__main__":
    main()
