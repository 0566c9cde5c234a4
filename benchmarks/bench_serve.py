"""Load benchmark of `mnistlab serve`: prediction requests, 32 at a time, against a real server.

    MNISTLAB_DATA=../shared/datasets python benchmarks/bench_serve.py [--requests 2000]
        [--rounds 3] [--concurrency 32] [--payload png|jpeg|base64|pixels]
        [--model RUN_OR_WEIGHTS] [--compare-with SRC]

`--compare-with SRC` serves the same requests from another source tree too (a `git worktree` of
an older commit; its src/ goes first on PYTHONPATH), alternating with this one round by round,
and gives the ratio of the median throughputs. Target: ≥ 1.5× the server of commit e2fd09a.

Starts `mnistlab serve --port 0` as a separate process on 127.0.0.1, then this process sends
`--requests` POST /api/predict requests (MNIST test digits, cycled) from `--concurrency` threads,
each over its own keep-alive connection, and prints throughput, latency percentiles (of the
answered requests), the error count (any non-200 answer or failed request) and how many answers
were the digit's true label. Stops by itself after the requests or `--max-seconds`, whichever
comes first. Client and server share the machine's cores, so the figures are a floor for a
dedicated server.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from mnistlab.runs import cpu_name


def hardware() -> str:
    import torch

    return (
        f"{cpu_name()}, {os.cpu_count()} logical cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def payloads(kind: str, count: int) -> tuple[list[dict], list[int]]:
    """httpx request arguments for the first `count` MNIST test digits, and their labels."""
    from mnistlab.data import load_mnist

    images, labels = load_mnist(None, "test")
    out = []
    for image in images[:count].numpy():
        if kind == "pixels":
            out.append({"json": {"pixels": (image / 255).round(4).tolist()}})
            continue
        buffer = io.BytesIO()
        if kind == "jpeg":
            # Photo-like: dark ink on light paper, 4× larger.
            big = Image.fromarray(255 - image).resize((112, 112), Image.BILINEAR)
            big.save(buffer, format="JPEG", quality=90)
            name, ctype = "digit.jpg", "image/jpeg"
        else:
            Image.fromarray(image).save(buffer, format="PNG")
            name, ctype = "digit.png", "image/png"
        out.append({"files": {"file": (name, buffer.getvalue(), ctype)}})
    if kind == "base64":
        out = [
            {"json": {"image": base64.b64encode(p["files"]["file"][1]).decode()}} for p in out
        ]
    return out, labels[:count].tolist()


class ServerProcess:
    def __init__(self, model: str | None, env: dict | None = None) -> None:
        args = [sys.executable, "-m", "mnistlab", "serve", "--port", "0"]
        if model:
            args += ["--model", model]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True
        ).start()
        try:
            first = lines.get(timeout=120)
        except queue.Empty:
            first = ""
        match = re.search(r"http://\S+/", first)
        if not match:
            self.proc.kill()
            sys.exit(f"bench_serve: the server did not start: {self.proc.stderr.read()}")
        self.url = match.group(0)
        self.startup = time.perf_counter() - self.started

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def hammer(
    url: str, requests: list[dict], labels: list[int], total: int, concurrency: int,
    max_seconds: float,
) -> dict:
    """`total` requests from `concurrency` threads, each with its own keep-alive connection.

    Threads with blocking clients, not asyncio: on a small machine httpx's async client spent more
    CPU than the server and doubled the measured latencies.
    """
    latencies: list[float] = []
    errors: dict[str, int] = {}
    correct = 0
    issued = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        nonlocal issued, correct
        with httpx.Client(base_url=url, timeout=30) as client:
            while True:
                with lock:
                    if issued >= total or time.perf_counter() >= deadline:
                        return
                    i = issued % len(requests)
                    issued += 1
                start = time.perf_counter()
                try:
                    response = client.post("/api/predict", **requests[i])
                    ok = response.status_code == 200
                    right = ok and response.json()["label"] == labels[i]
                    error = None if ok else f"HTTP {response.status_code}"
                except httpx.HTTPError as e:
                    right, error = False, type(e).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    if error:
                        errors[error] = errors.get(error, 0) + 1
                    else:
                        latencies.append(elapsed)
                        correct += right

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "sent": issued, "seconds": time.perf_counter() - started, "latencies": latencies,
        "errors": errors, "correct": correct,
    }


def serve_round(a, requests: list[dict], labels: list[int], env: dict | None) -> dict:
    """Start a server, warm it up, send `a.requests` requests, stop it; the figures."""
    server = ServerProcess(a.model, env)
    try:
        # A short warm-up so the first-request costs (lazy imports, allocator) are not counted.
        hammer(server.url, requests, labels, 2 * a.concurrency, a.concurrency, 60)
        r = hammer(server.url, requests, labels, a.requests, a.concurrency, a.max_seconds)
    finally:
        code = server.stop()
    r["exit"], r["startup"] = code, server.startup
    r["rps"] = r["sent"] / r["seconds"]
    return r


def describe(name: str, r: dict, concurrency: int) -> None:
    lat = np.array(r["latencies"]) * 1000
    n_errors = sum(r["errors"].values())
    print(f"{name}: {r['sent']} requests at {concurrency} concurrent in {r['seconds']:.2f} s: "
          f"{r['rps']:.1f} requests/s (server ready in {r['startup']:.1f} s)")
    if lat.size:
        print(
            f"  latency ms: p50 {np.percentile(lat, 50):.1f}  p90 {np.percentile(lat, 90):.1f}  "
            f"p99 {np.percentile(lat, 99):.1f}  max {lat.max():.1f}  "
            f"mean {statistics.fmean(lat):.1f}"
        )
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items()))
    print(f"  errors: {n_errors}" + (f" ({detail})" if detail else "")
          + f"; correct labels: {r['correct']}/{r['sent'] - n_errors}; exit status after "
          f"SIGTERM: {r['exit']}", flush=True)


TARGET_RATIO = 1.5


def main(argv: list[str] | None = None) -> dict:
    import benchutil as bu

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="Requests in each round.")
    p.add_argument("--rounds", type=int, default=3, help="Rounds of each server (median).")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--payload", choices=["png", "jpeg", "base64", "pixels"], default="png",
                   help="png: multipart upload of the 28×28 digit (default); jpeg: a 112×112 "
                   "dark-on-light JPEG; base64: the PNG as JSON; pixels: JSON 28×28.")
    p.add_argument("--distinct", type=int, default=1000, help="Distinct test digits to cycle.")
    p.add_argument("--model", default=None, help="RUN_OR_WEIGHTS; default: the bundled model.")
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--compare-with", metavar="SRC", default=None,
                   help="Also serve from this source tree, alternating with this one.")
    p.add_argument("--quick", action="store_true", help="Smoke run: one short round.")
    p.add_argument("--no-save", action="store_true", help="Do not write benchmarks/results.")
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.rounds = 100, 1
    hw = bu.hardware()
    bu.print_hardware(hw)
    print(f"hardware: {hardware()}; payload {a.payload}")
    requests, labels = payloads(a.payload, a.distinct)
    variants: dict[str, dict | None] = {"mnistlab": None}
    if a.compare_with:
        variants["compared"] = {"PYTHONPATH": str(Path(a.compare_with).resolve() / "src")}
    rounds: dict[str, list[dict]] = {k: [] for k in variants}
    for i in range(a.rounds):
        for name, env in variants.items():
            r = serve_round(a, requests, labels, env)
            describe(f"{name} round {i + 1}", r, a.concurrency)
            rounds[name].append({k: v for k, v in r.items() if k != "latencies"}
                                | {"p50_ms": float(np.percentile(r["latencies"], 50) * 1000)
                                   if r["latencies"] else None})
    rps = {k: bu.stats([r["rps"] for r in v]) for k, v in rounds.items()}
    clean = all(sum(r["errors"].values()) == 0 and r["sent"] == a.requests and r["exit"] == 0
                for v in rounds.values() for r in v)
    ours = rps["mnistlab"]["median"]
    if "compared" in rps:
        theirs = rps["compared"]["median"]
        ratio = ours / theirs
        met = clean and ratio >= TARGET_RATIO
        reference, ratio_text = f"{theirs:.1f}/s as {Path(a.compare_with).name} serves it", (
            f"{ratio:.2f}×")
        print(f"median throughput {ours:.1f} vs {theirs:.1f} requests/s: {ratio:.2f}x "
              f"(target ≥ {TARGET_RATIO}x: {'met' if met else 'MISSED'})")
    else:
        ratio, met, reference, ratio_text = None, clean, "–", "–"
        print(f"median throughput {ours:.1f} requests/s")
    figures = {
        "rounds": rounds, "rps": rps, "ratio": ratio, "met": met, "payload": a.payload,
        "concurrency": a.concurrency, "compared_with": a.compare_with,
        "rows": [bu.row(
            f"`mnistlab serve`, POST /api/predict ({a.payload}), requests/s at {a.concurrency} "
            f"concurrent (median of {a.rounds} rounds of {a.requests})",
            f"{ours:.1f}/s", reference, ratio_text,
            f"≥ {TARGET_RATIO}× e2fd09a's" if a.compare_with else "no errors", met)],
    }
    flags = f" --compare-with {a.compare_with}" if a.compare_with else ""
    return bu.finish("serve", hw, a, figures, flags)


if __name__ == "__main__":
    sys.exit(0 if main()["met"] else 1)
