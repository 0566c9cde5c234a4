"""Saving and safely loading weights and checkpoints.

Nothing is ever unpickled beyond tensors and plain containers: `.pt` files load with
`weights_only=True`, `.safetensors` files hold tensors only. A file crafted to run code is refused.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MnistlabError
from .fileio import atomic_path, atomic_write_bytes
from .models import MODELS, create_model

WEIGHTS_NAME = "model.pt"
BEST_NAME = "best.pt"
CHECKPOINT_NAME = "checkpoint.pt"


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save, atomically; a failure (a full disk, say) leaves the previous file intact."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        raise MnistlabError(
            f"could not save {path}: {_write_error(e)}; the previous file is intact"
        ) from None


def _write_error(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ...").
    return "the write failed (is the disk full?)"


def load_torch(path: str | os.PathLike[str]) -> Any:
    """torch.load restricted to tensors and plain containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise MnistlabError(
                f"refusing to load {path}: it holds objects other than tensors, and mnistlab "
                "never unpickles arbitrary code"
            ) from None
        raise MnistlabError(f"cannot read {path}: not a PyTorch weights file ({first})") from None
    except (OSError, EOFError) as e:
        raise MnistlabError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def save_safetensors(
    state: dict[str, torch.Tensor], path: str | os.PathLike[str], meta: dict[str, Any]
) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"mnistlab": json.dumps(meta)}
    try:
        # Serialize in memory and write through fileio: safetensors' own writer makes 0600 files.
        atomic_write_bytes(path, save(tensors, metadata=metadata))
    except OSError as e:
        raise MnistlabError(
            f"could not save {path}: {_write_error(e)}; the previous file is intact"
        ) from None


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mnistlab", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise MnistlabError(f"cannot read {path}: not a safetensors weights file ({e})") from None


def infer_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """The registered model whose parameter names and shapes match `state` exactly, if any."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, entry in MODELS.items():
        reference = entry.cls().state_dict()
        if shapes == {k: tuple(v.shape) for k, v in reference.items()}:
            return name
    return None


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load weights, refusing those of another architecture with a clear message."""
    expected = model.state_dict()
    if set(state) != set(expected) or any(
        tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items()
    ):
        found = infer_architecture(state)
        hint = f" (they fit model {found!r})" if found else ""
        raise MnistlabError(
            f"{source}: weights of another architecture than {type(model).__name__}{hint}"
        )
    model.load_state_dict(state)
    return model


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A state_dict and its metadata from a .pt or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise MnistlabError(f"{path}: no such weights file")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and head[:2] != b"PK" and head[0] != 0x80):
        return load_safetensors(path)
    obj = load_torch(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"], {k: v for k, v in obj.items() if k in ("config", "model_name")}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MnistlabError(f"{path}: not a state_dict of tensors")
    return obj, {}


def load_model(
    source: str | os.PathLike[str], model_name: str | None = None, best: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """A model in eval mode from a run folder or a weights file, and what is known about it.

    For a run folder the architecture comes from its config; for a bare weights file from its
    metadata, `model_name`, or by matching parameter shapes against the registry.
    """
    source = Path(source)
    info: dict[str, Any] = {"source": str(source)}
    if source.is_dir():
        config_path = source / "config.json"
        if not config_path.is_file():
            raise MnistlabError(f"{source}: not a run folder (no config.json)")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MnistlabError(f"{config_path}: unreadable ({e})") from None
        weights = source / (BEST_NAME if best else WEIGHTS_NAME)
        if not weights.is_file():
            raise MnistlabError(
                f"{source}: no {weights.name} yet (the run is unfinished; resume it, or "
                "evaluate a finished run)"
            )
        state, meta = read_weights(weights)
        name = model_name or config.get("model")
        info.update(run=str(source), config=config)
        model_args = config.get("model_args", {})
    else:
        state, meta = read_weights(source)
        cfg = meta.get("config") or {}
        name = model_name or meta.get("model") or cfg.get("model") or infer_architecture(state)
        model_args = meta.get("model_args") or cfg.get("model_args") or {}
        info.update(meta)
        if name is None:
            raise MnistlabError(
                f"{source}: these weights match none of mnistlab's models "
                f"({', '.join(MODELS)}); they are not mnistlab weights"
            )
    model = create_model(name, **model_args)
    load_state_into(model, state, str(source))
    info["model"] = name
    return model.eval(), info
