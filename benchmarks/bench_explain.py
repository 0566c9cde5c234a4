"""Explanations and the embedding map on the bundled model: speed and faithfulness.

- `/api/explain` latency for one digit (a real server on 127.0.0.1, the bundled model), median
  of N requests with 28×28 pixels and with a PNG upload, beside `/api/predict` as reference;
- faithfulness on 500 MNIST test digits: how often removing the 10% most-attributed ink pixels
  lowers the predicted digit's probability more than removing 10% random ink pixels, and the
  share of positive attribution within 2 px of ink (targets: ≥ 90% and ≥ 80%);
- the t-SNE embedding map of 2,000 test digits, seconds (target ≤ 10 s).
"""

from __future__ import annotations

import argparse
import io
import threading
import time

import httpx
import numpy as np
import torch

import benchutil as bu

EXPLAIN_MS = 50.0
EMBED_S = 10.0
TOP_BEATS_RANDOM = 0.9
NEAR_INK = 0.8


def serve_once(predictor, requests: int, digits: np.ndarray) -> dict:
    """Median milliseconds of /api/explain and /api/predict, interleaved, on a real server."""
    import uvicorn
    from PIL import Image

    from mnistlab.serve import create_app

    app = create_app(predictor)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    out: dict[str, list[float]] = {k: [] for k in ("explain_pixels", "explain_png",
                                                   "predict_pixels", "predict_png")}
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(requests + 3):  # the first 3 warm up
                d = digits[i % len(digits)]
                pixels = {"pixels": (d / 255.0).round(4).tolist()}
                buffer = io.BytesIO()
                Image.fromarray(d).save(buffer, format="PNG")
                files = {"file": ("d.png", buffer.getvalue(), "image/png")}
                for key, call in (
                    ("explain_pixels", lambda p=pixels: client.post("/api/explain", json=p)),
                    ("predict_pixels", lambda p=pixels: client.post("/api/predict", json=p)),
                    ("explain_png", lambda f=files: client.post("/api/explain", files=f)),
                    ("predict_png", lambda f=files: client.post("/api/predict", files=f)),
                ):
                    t = time.perf_counter()
                    r = call()
                    ms = 1000 * (time.perf_counter() - t)
                    assert r.status_code == 200, r.text
                    if i >= 3:
                        out[key].append(ms)
    finally:
        server.should_exit = True
        thread.join(10)
    return {k: bu.stats(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (the target: 2 cores)")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--digits", type=int, default=500)
    p.add_argument("--embed", type=int, default=2000)
    p.add_argument("--embed-repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="Smoke run: small sizes.")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.digits, a.embed, a.embed_repeats = 5, 40, 300, 1
    torch.set_num_threads(a.threads)
    hw = bu.hardware()
    bu.print_hardware(hw)

    from mnistlab import inside
    from mnistlab.data import load_mnist
    from mnistlab.predict import Predictor

    predictor = Predictor.default()
    images, labels = load_mnist(bu.data_root(), "test")
    latency = serve_once(predictor, a.requests, images[:50].numpy())
    for key, s in latency.items():
        print(f"{key:15s} {bu.fmt_stats(s, ' ms', 1)}")

    t = time.perf_counter()
    x = images[: a.digits]
    explained = inside.integrated_gradients(predictor.model, x)
    faithful = inside.faithfulness(predictor.model, x, explained)
    ig_seconds = time.perf_counter() - t
    print(f"faithfulness on {a.digits} test digits: top-10% beats random for "
          f"{100 * faithful.top_beats_random:.1f}% (target ≥ {100 * TOP_BEATS_RANDOM:.0f}%), "
          f"{100 * faithful.near_ink_share:.1f}% of positive attribution within 2 px of ink "
          f"(target ≥ {100 * NEAR_INK:.0f}%); median log-prob drop top "
          f"{float(faithful.drop_top.median()):.4f} vs random "
          f"{float(faithful.drop_random.median()):.5f}; {ig_seconds:.1f}s")

    embed, embed_cpu = [], []
    for _ in range(a.embed_repeats):
        t, c = time.perf_counter(), time.process_time()
        emap = inside.embedding_map(predictor.model, images, labels, n=a.embed, seed=0)
        embed.append(time.perf_counter() - t)
        embed_cpu.append(time.process_time() - c)  # this process's CPU time: what load hides
    embed_stats = bu.stats(embed)
    print(f"embedding map of {a.embed} digits: {bu.fmt_stats(embed_stats)}; CPU time "
          f"{bu.fmt_stats(bu.stats(embed_cpu))} "
          f"({int((emap.labels != emap.predictions).sum())} mistakes marked)")
    explain_ms = latency["explain_pixels"]["median"]
    met = {
        "explain": explain_ms <= EXPLAIN_MS,
        "faithful": faithful.top_beats_random >= TOP_BEATS_RANDOM
        and faithful.near_ink_share >= NEAR_INK,
        "embedding": embed_stats["median"] <= EMBED_S,
    }
    print(f"targets: /api/explain ≤ {EXPLAIN_MS:.0f} ms median {met['explain']}, faithfulness "
          f"{met['faithful']}, embedding ≤ {EMBED_S:.0f} s {met['embedding']}")
    return bu.finish("explain", hw, a, {
        "threads": a.threads,
        "latency_ms": latency,
        "faithfulness": {"digits": a.digits, "top_beats_random": faithful.top_beats_random,
                         "near_ink_share": faithful.near_ink_share,
                         "median_drop_top": float(faithful.drop_top.median()),
                         "median_drop_random": float(faithful.drop_random.median())},
        "embedding_seconds": embed_stats,
        "embedding_cpu_seconds": bu.stats(embed_cpu),
        "embedding_digits": a.embed,
        "met": met,
        "reference": {"predict_ms": latency["predict_pixels"]["median"]},
    }, f" --threads {a.threads}")


if __name__ == "__main__":
    main()
