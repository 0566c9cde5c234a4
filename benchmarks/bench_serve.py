"""Load benchmark of `mnistlab serve`: prediction requests, 32 at a time, against a real server.

    MNISTLAB_DATA=../shared/datasets python benchmarks/bench_serve.py [--requests 5000]
        [--concurrency 32] [--payload png|jpeg|base64|pixels] [--model RUN_OR_WEIGHTS]

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
    def __init__(self, model: str | None) -> None:
        args = [sys.executable, "-m", "mnistlab", "serve", "--port", "0"]
        if model:
            args += ["--model", model]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--payload", choices=["png", "jpeg", "base64", "pixels"], default="png",
                   help="png: multipart upload of the 28×28 digit (default); jpeg: a 112×112 "
                   "dark-on-light JPEG; base64: the PNG as JSON; pixels: JSON 28×28.")
    p.add_argument("--distinct", type=int, default=1000, help="Distinct test digits to cycle.")
    p.add_argument("--model", default=None, help="RUN_OR_WEIGHTS; default: the bundled model.")
    p.add_argument("--max-seconds", type=float, default=300)
    a = p.parse_args(argv)

    print(f"hardware: {hardware()}")
    requests, labels = payloads(a.payload, a.distinct)
    server = ServerProcess(a.model)
    print(f"server: {server.url} (ready in {server.startup:.1f} s), payload {a.payload}")
    try:
        # A short warm-up so the first-request costs (lazy imports, allocator) are not counted.
        hammer(server.url, requests, labels, 2 * a.concurrency, a.concurrency, 60)
        r = hammer(server.url, requests, labels, a.requests, a.concurrency, a.max_seconds)
    finally:
        code = server.stop()
    lat = np.array(r["latencies"]) * 1000
    n_errors = sum(r["errors"].values())
    answered = r["sent"] - n_errors
    print(f"requests: {r['sent']} at {a.concurrency} concurrent in {r['seconds']:.2f} s")
    print(f"throughput: {r['sent'] / r['seconds']:.1f} requests/s")
    if lat.size:
        print(
            f"latency ms: p50 {np.percentile(lat, 50):.1f}  p90 {np.percentile(lat, 90):.1f}  "
            f"p99 {np.percentile(lat, 99):.1f}  max {lat.max():.1f}  "
            f"mean {statistics.fmean(lat):.1f}"
        )
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items()))
    print(f"errors: {n_errors}" + (f" ({detail})" if detail else ""))
    print(f"correct labels: {r['correct']}/{answered}")
    print(f"server exit status after SIGTERM: {code}")
    return 0 if n_errors == 0 and r["sent"] == a.requests and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
