"""How well does `mnistlab predict` read digits that look like photos, not like MNIST?

Turns MNIST test digits into photo-like JPEGs (scaled up 4–10×, dark ink on light, slightly
uneven paper, off centre on a larger canvas, mild blur and noise), runs them through the real
`mnistlab predict --json` with the bundled model, and prints the accuracy next to the accuracy on
the same digits unaltered, plus images per second.

    MNISTLAB_DATA=/work/shared/datasets python benchmarks/bench_robustness.py [-n 1000]
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

import numpy as np
from PIL import Image, ImageFilter


def photo_like(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 28×28 uint8 MNIST digit (white on black) as a photo of dark ink on light paper."""
    factor = rng.uniform(4.0, 10.0)
    size = round(28 * factor)
    ink_alpha = Image.fromarray(digit, "L").resize((size, size), Image.Resampling.BICUBIC)
    alpha = np.asarray(ink_alpha, dtype=np.float32) / 255.0
    canvas_h = round(size * rng.uniform(1.3, 2.0))
    canvas_w = round(size * rng.uniform(1.3, 2.0))
    # Paper: a light level with a gentle gradient in a random direction (light from one side).
    yy, xx = np.mgrid[0:canvas_h, 0:canvas_w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / canvas_w + np.sin(angle) * yy / canvas_h) - 0.5
    paper = rng.uniform(175, 235) + rng.uniform(10, 35) * ramp
    ink = rng.uniform(20, 80)
    top = int(rng.integers(0, canvas_h - size + 1))  # anywhere: usually off centre
    left = int(rng.integers(0, canvas_w - size + 1))
    a = np.zeros((canvas_h, canvas_w), dtype=np.float32)
    a[top : top + size, left : left + size] = alpha
    img = paper * (1 - a) + ink * a
    blurred = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").filter(
        ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0))
    )
    noisy = np.asarray(blurred, np.float32) + rng.normal(0, rng.uniform(2, 8), (canvas_h, canvas_w))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "L")


def write_photo_like(
    images: np.ndarray, folder: Path, seed: int = 0, quality: tuple[int, int] = (60, 90)
) -> list[Path]:
    """Photo-like JPEGs of `images` as folder/00000.jpg, ...; their paths in order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, digit in enumerate(images):
        path = folder / f"{i:05d}.jpg"
        q = int(rng.integers(*quality, endpoint=True))
        photo_like(digit, rng).save(path, "JPEG", quality=q)
        paths.append(path)
    return paths


def run_predict(
    paths: list[Path] | Path, model: str | None = None
) -> tuple[dict[str, int], float, str]:
    """Labels by file name from `mnistlab predict ... --json`, the seconds it took, stderr."""
    targets = [str(p) for p in paths] if isinstance(paths, list) else [str(paths)]
    cmd = [sys.executable, "-m", "mnistlab", "predict", *targets, "--json"]
    if model:
        cmd += ["--model", model]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if not proc.stdout.strip():
        raise SystemExit(f"mnistlab predict failed ({proc.returncode}): {proc.stderr.strip()}")
    rows = json.loads(proc.stdout)
    return {Path(r["path"]).name: r["label"] for r in rows}, seconds, proc.stderr


def accuracy(predicted: dict[str, int], paths: list[Path], labels: np.ndarray) -> float:
    hits = sum(predicted.get(p.name) == int(y) for p, y in zip(paths, labels, strict=True))
    return 100.0 * hits / len(paths)


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} CPUs{load}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="test digits to use (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="run or weights (default: bundled model)")
    parser.add_argument("--keep", type=Path, default=None, help="write the images here and keep")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the median is shown")
    args = parser.parse_args()

    import torch

    from mnistlab.data import load_mnist, normalize
    from mnistlab.predict import Predictor

    machine = hardware()  # with the load average before we add to it
    images, labels = load_mnist(None, "test")
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(len(labels), size=min(args.n, len(labels)), replace=False))
    digits, y = images.numpy()[pick], labels.numpy()[pick]

    predictor = Predictor.load(args.model)
    with torch.inference_mode():
        raw = predictor.model(normalize(torch.from_numpy(digits))).argmax(1).numpy()
    raw_acc = 100.0 * float((raw == y).mean())

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        plain = base / "unaltered"
        plain.mkdir(parents=True, exist_ok=True)
        plain_paths = []
        for i, d in enumerate(digits):
            plain_paths.append(plain / f"{i:05d}.png")
            Image.fromarray(d, "L").save(plain_paths[-1])
        photo_paths = write_photo_like(digits, base / "photo-like", seed=args.seed)
        plain_pred, _, _ = run_predict(plain, args.model)
        photo_pred, seconds, err = run_predict(base / "photo-like", args.model)
        # Time whole processes, and one on a single image to take start-up and model loading out.
        whole, single = [seconds], [run_predict(photo_paths[:1], args.model)[1]]
        for _ in range(max(1, args.repeat) - 1):
            whole.append(run_predict(base / "photo-like", args.model)[1])
            single.append(run_predict(photo_paths[:1], args.model)[1])

    info = predictor.info
    n = len(photo_paths)
    t_all, t_one = statistics.median(whole), statistics.median(single)
    print(f"model: {info['name']} ({info['architecture']}) from {info['source']}")
    print(f"hardware: {machine} at the start; at the end: {hardware().split(', ')[2]}")
    print(f"digits: {len(y)} MNIST test images (seed {args.seed})")
    print(f"unaltered, straight to the model:        {raw_acc:6.2f}%")
    print(f"unaltered 28×28 PNGs, mnistlab predict:  {accuracy(plain_pred, plain_paths, y):6.2f}%")
    print(f"photo-like JPEGs, mnistlab predict:      {accuracy(photo_pred, photo_paths, y):6.2f}%")
    failed = n - len(photo_pred)
    if failed:
        print(f"  ({failed} photo-like images were refused: {err.strip().splitlines()[:3]})")
    print(
        f"speed (median of {len(whole)}): {(n - 1) / max(t_all - t_one, 1e-9):.1f} images/s "
        f"decoded, preprocessed and predicted; the whole `mnistlab predict` process on {n} "
        f"images: {t_all:.1f} s ({n / t_all:.1f} images/s), on 1 image: {t_one:.1f} s"
    )


if __name__ == "__main__":
    main()
