"""Inference: images per second at batch 1, 64 and 1000, for `mlp` and the bundled model.

Three paths do the same job — normalize 28×28 images in [0, 1], run the model, softmax, arg-max:
mnistlab's API used the way a batch user would (`Predictor.predict_pixels(x).labels`, which also
checks the input's shape and range and keeps a copy of it, building no per-image objects, on the
engine mnistlab chooses), plain eager PyTorch on the same model, and onnxruntime on the same
model exported with `torch.onnx.export`. All use the same number of CPU threads.

Targets: the bundled model through the Predictor at ≥ 0.9× onnxruntime (the fastest engine at
hand); the `mlp`, which stays on PyTorch, at ≥ 0.9× eager.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import benchutil as bu

BATCHES = (1, 64, 1000)
MEAN, STD = 0.1307, 0.3081
TARGET = 0.9


def throughput(fn, x, seconds: float, repeats: int) -> list[float]:
    """Images per second of `fn(x)`, `repeats` times, each over about `seconds`."""
    fn(x)  # warm up (allocations, oneDNN primitive caches)
    out = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn(x)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        out.append(n * len(x) / elapsed)
    return out


def load_models() -> dict[str, torch.nn.Module]:
    from mnistlab.models import create_model

    torch.manual_seed(0)
    models = {"mlp": create_model("mlp").eval()}  # speed does not depend on the weight values
    try:
        from mnistlab.predict import Predictor, bundled_weights

        if bundled_weights().is_file():
            models["bundled"] = Predictor.default().model
        else:
            print(f"no bundled weights at {bundled_weights()}: skipping the bundled model")
    except ImportError:
        print("mnistlab.predict is not there: skipping the bundled model")
    return models


def paths_for(model: torch.nn.Module, onnx_dir: Path, threads: int) -> dict:
    """name -> callable on float32 [B, 28, 28] in [0, 1] returning labels."""

    def eager(x: torch.Tensor):
        with torch.inference_mode():
            probs = torch.softmax(model(((x - MEAN) / STD).unsqueeze(1)), dim=1)
            return probs.argmax(1)

    paths = {"eager": eager}
    try:
        from mnistlab.predict import Predictor

        predictor = Predictor(model, {"name": "bench", "source": "bench", "parameters": 0})
        paths["mnistlab"] = lambda x: predictor.predict_pixels(x).labels
        paths["mnistlab"].engine = predictor.backend.value  # type: ignore[attr-defined]
    except ImportError:
        from mnistlab.training import predict_logits

        paths["mnistlab"] = lambda x: predict_logits(model, [(((x - MEAN) / STD).unsqueeze(1),
                                                              torch.zeros(len(x)))])[0].argmax(1)
    try:
        import onnxruntime as ort

        path = onnx_dir / f"{id(model)}.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter warns that it is the old one
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False,
                input_names=["x"], output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def onnx(x: torch.Tensor):
            a = ((x.numpy() - MEAN) / STD).astype(np.float32)[:, None]
            logits = session.run(None, {"x": a})[0]
            e = np.exp(logits - logits.max(1, keepdims=True))
            return (e / e.sum(1, keepdims=True)).argmax(1)

        paths["onnxruntime"] = onnx
    except ImportError:
        print("onnxruntime is not installed: skipping it")
    return paths


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every path.")
    p.add_argument("--seconds", type=float, default=0.5, help="Length of one measurement.")
    p.add_argument("--repeats", type=int, default=7, help="Measurements of each path (median).")
    p.add_argument("--quick", action="store_true", help="Smoke run: short measurements.")
    p.add_argument("--no-save", action="store_true", help="Do not write benchmarks/results.")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.repeats = 0.05, 1
    torch.set_num_threads(a.threads)
    hw = bu.hardware()
    bu.print_hardware(hw)
    g = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in load_models().items():
            paths = paths_for(model, Path(tmp), a.threads)
            for batch in BATCHES:
                x = torch.rand(batch, 28, 28, generator=g)
                labels = {k: np.asarray(fn(x)) for k, fn in paths.items()}
                agree = all((v == labels["eager"]).all() for v in labels.values())
                row = {"model": name, "batch": batch, "agree": bool(agree),
                       "engine": getattr(paths["mnistlab"], "engine", "eager")}
                # Repeats interleaved across the paths, so a burst of load on this shared
                # machine hits them alike rather than one path's whole measurement.
                samples: dict[str, list[float]] = {k: [] for k in paths}
                for _ in range(a.repeats):
                    for path, fn in paths.items():
                        samples[path] += throughput(fn, x, a.seconds, 1)
                for path in paths:
                    row[path] = statistics.median(samples[path])
                rows.append(row)
                cells = ", ".join(f"{k} {row[k]:,.0f}/s" for k in paths)
                print(f"{name:8s} batch {batch:5d}: {cells} (labels agree: {agree})", flush=True)
    table = []
    for row in rows:
        versus = "onnxruntime" if row["model"] == "bundled" and "onnxruntime" in row else "eager"
        ratio = row["mnistlab"] / row[versus]
        row["ratio"], row["versus"] = ratio, versus
        others = "; ".join(f"{k} {row[k]:,.0f}/s" for k in ("eager", "onnxruntime")
                           if k in row and k != versus)
        table.append(bu.row(
            f"Inference `{row['model']}`, batch {row['batch']}, images/s ({a.threads} thread)",
            f"{row['mnistlab']:,.0f}/s on {row['engine']}",
            f"{versus} {row[versus]:,.0f}/s" + (f" ({others})" if others else ""),
            f"{ratio:.2f}×", f"≥ {TARGET}× {versus}", ratio >= TARGET and row["agree"]))
    figures = {
        "threads": a.threads,
        "measurements": rows,
        "met": all(r["met"] for r in table),
        "rows": table,
    }
    return bu.finish("inference", hw, a, figures)


if __name__ == "__main__":
    main()
