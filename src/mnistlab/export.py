"""Export weights: to ONNX (verified with onnxruntime) and to safetensors with a model card.

The ONNX graph includes the normalization, so its input is what `mnistlab.preprocess.to_mnist`
returns: float32 pixels in [0, 1], shape [N, 1, 28, 28], white ink on black.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .catalog import MNIST
from .checkpoints import load_model, save_safetensors
from .errors import MnistlabError
from .fileio import atomic_path, atomic_write_json, new_file_mode
from .models import count_parameters

LOGIT_TOLERANCE = 1e-4
OPSET = 17


class Normalized(nn.Module):
    """`model` behind the training normalization: pixels in [0, 1] in, logits out."""

    def __init__(self, model: nn.Module, mean: float = MNIST.mean, std: float = MNIST.std) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


@dataclass
class OnnxCheck:
    images: int
    agreement: float  # % of images whose ONNX arg-max equals PyTorch's
    max_abs_diff: float  # largest |logit difference| over all images and classes

    @property
    def ok(self) -> bool:
        return self.agreement == 100.0 and self.max_abs_diff <= LOGIT_TOLERANCE


def export_onnx(model: nn.Module, path: str | os.PathLike[str], name: str, opset: int = OPSET):
    """Write `model` (with its normalization) as ONNX with a dynamic batch dimension."""
    wrapped = Normalized(model).eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript and
        # gives the same graph for a plain convnet; this one needs nothing beyond onnx.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped,
            (torch.zeros(2, 1, 28, 28),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        )
    model.eval()  # the exporter restores the wrapper's training flag recursively
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {
        "mnistlab_model": name,
        "input": "pixels: float32 [N, 1, 28, 28] in [0, 1], white ink on black, MNIST-centred "
        "(mnistlab.preprocess.to_mnist); the graph normalizes with mean "
        f"{MNIST.mean} and std {MNIST.std}",
        "output": "logits: float32 [N, 10]; softmax gives the probabilities of digits 0-9",
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def verify_onnx(
    model: nn.Module, path: str | os.PathLike[str], images: torch.Tensor, batch: int = 1000
) -> OnnxCheck:
    """Compare onnxruntime with PyTorch on uint8 images [N, 28, 28]."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapped = Normalized(model).eval()
    agree, worst = 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = images[start : start + batch].float().div(255.0).unsqueeze(1)
            ref = wrapped(x).numpy()
            got = session.run(["logits"], {"pixels": x.numpy()})[0]
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            worst = max(worst, float(np.abs(ref - got).max()))
    return OnnxCheck(len(images), 100.0 * agree / len(images), worst)


def train_command(config: dict[str, Any]) -> str:
    """The `mnistlab train` command line that resolves to `config` (a run's config.json)."""
    recipe = config.get("recipe", "lab")
    return " ".join(["mnistlab", "train", "--recipe", recipe, *recipe_flags(config)])


def recipe_flags(config: dict[str, Any]) -> list[str]:
    """The `mnistlab train` flags by which `config` differs from its recipe."""
    from .config import RECIPES, TrainConfig, resolve_config

    recipe = config.get("recipe", "lab")
    base = resolve_config(recipe if recipe in RECIPES else "lab").to_dict()
    parts: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("recipe", "model_args") or f.name not in config:
            continue
        value = config[f.name]
        if value == base.get(f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            parts += [flag, str(value)]
    return parts


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_safetensors(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    best: bool = False,
) -> dict[str, Any]:
    """Weights as safetensors plus a model card `<target>.json`; returns the card.

    The card's test accuracy is measured on the written file, loaded back the way users load it.
    """
    from .data import BatchLoader, load_mnist
    from .training import evaluate

    model, info = load_model(source, best=best)
    config = info.get("config") or {}
    meta = {"model": info["model"], "model_args": config.get("model_args", {}), "config": config}
    save_safetensors(model.state_dict(), target, meta)
    os.chmod(target, new_file_mode())  # safetensors writes its file 0600, whatever the umask

    shipped, _ = load_model(target)
    images, labels = load_mnist(root, "test")
    test_loss, test_acc = evaluate(shipped, BatchLoader(images, labels, 1000))
    card: dict[str, Any] = {
        "name": Path(target).stem,
        "model": info["model"],
        "architecture": type(shipped).__name__,
        "parameters": count_parameters(shipped),
        "weights": Path(target).name,
        "sha256": sha256_file(target),
        "dtype": "float32",
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "test_images": len(labels),
        "measured_on": "the exported file, loaded back with mnistlab.checkpoints.load_model",
        "date": time.strftime("%Y-%m-%d"),
    }
    run = Path(source)
    if run.is_dir():
        card["train_command"] = train_command(config)
        card["config"] = config
        card.update(_run_facts(run, best))
    atomic_write_json(Path(target).with_suffix(".json"), card)
    return card


def _run_facts(run: Path, best: bool) -> dict[str, Any]:
    """What the run folder says about how the weights were made (no test-set decisions)."""
    facts: dict[str, Any] = {"run": run.name, "weights_of": "best.pt" if best else "model.pt"}
    for name in ("summary.json", "environment.json"):
        try:
            data = json.loads((run / name).read_text())
        except (OSError, ValueError):
            continue
        if name == "summary.json":
            facts["trained"] = data.get("finished")
            facts["epochs"] = data.get("epochs")
            facts["train_seconds"] = data.get("train_seconds")
        else:
            facts["trained_on"] = {
                k: data.get(k) for k in ("processor", "cpu_count", "threads", "device", "torch")
            }
    try:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        vals = [r for r in records if "val_acc" in r]
        if vals:
            facts["val_accuracy"] = vals[-1]["val_acc"]  # of the final epoch: these weights
    except (OSError, ValueError):
        pass
    return facts


def write_onnx(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    best: bool = False,
    opset: int = OPSET,
) -> OnnxCheck:
    """Export to ONNX and verify on the whole MNIST test set before the file is put in place."""
    from .data import load_mnist

    model, info = load_model(source, best=best)
    images, _ = load_mnist(root, "test")
    with atomic_path(target) as tmp:
        export_onnx(model, tmp, info["model"], opset)
        check = verify_onnx(model, tmp, images)
        if not check.ok:
            raise MnistlabError(
                f"the ONNX model disagrees with PyTorch (arg-max agreement {check.agreement:.2f}%, "
                f"max |logit diff| {check.max_abs_diff:.2e} > {LOGIT_TOLERANCE:g}); "
                f"{target} was not written"
            )
    return check


# --- onnxruntime as an inference engine (mnistlab.predict.Predictor) ------------------------

# The graph a Predictor runs: pixels in [0, 1] [N, 1, 28, 28] → probabilities [N, 10].
ENGINE_GRAPH = "probabilities-v1"
STATE_KEY = "mnistlab_state_sha256"  # metadata: the digest of the weights the graph holds
BUNDLED_ONNX = "default.onnx"


class Probabilities(nn.Module):
    """`model` behind the training normalization, ending in softmax."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = Normalized(model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(pixels), dim=1)


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a model's class, weights and buffers, and of the engine graph's version:
    the key of its ONNX graph."""
    h = hashlib.sha256(f"{ENGINE_GRAPH}:{type(model).__name__}:{torch.__version__}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def export_engine_graph(model: nn.Module, digest: str | None = None) -> bytes:
    """The ONNX graph of `Probabilities(model)`, its weights' digest in its metadata."""
    import io

    import onnx

    buffer = io.BytesIO()
    wrapped = Probabilities(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            wrapped, (torch.zeros(2, 1, 28, 28),), buffer, dynamo=False, opset_version=OPSET,
            input_names=["pixels"], output_names=["probabilities"],
            dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    model.eval()  # the exporter restores the wrapper's training flag recursively
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = STATE_KEY, digest or state_digest(model)
    return proto.SerializeToString()


def _session(source: bytes | str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warnings on stderr
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def engine_session(model: nn.Module, threads: int, bundled: Path | None = None):
    """An onnxruntime session computing `Probabilities(model)` on CPU with `threads` threads.

    The graph comes from `bundled` (a shipped .onnx) if it holds these very weights, else from
    the decode cache ($MNISTLAB_CACHE/onnx), else it is exported now (a few seconds the first
    time; cached after).
    """
    digest = state_digest(model)
    if bundled is not None and bundled.is_file():
        session = _session(str(bundled), threads)
        if session.get_modelmeta().custom_metadata_map.get(STATE_KEY) == digest:
            return session
    from .data import _cache_dir

    cache = _cache_dir()
    path = cache / "onnx" / f"{digest[:32]}.onnx" if cache is not None else None
    if path is not None and path.is_file():
        try:
            session = _session(str(path), threads)
            if session.get_modelmeta().custom_metadata_map.get(STATE_KEY) == digest:
                return session
        except Exception:  # a damaged cache entry: made again below
            pass
    graph = export_engine_graph(model, digest)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            from .fileio import atomic_write_bytes

            atomic_write_bytes(path, graph)
        except OSError:
            pass  # a cache is an optimization; an unwritable one is not an error
    return _session(graph, threads)
