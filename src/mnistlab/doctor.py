"""`mnistlab doctor`: the machine as mnistlab sees it, for a bug report.

The hardware, the torch build, what `auto` decides for each recipe and why, the data root and
whether its files verify, the bundled model, and the inference engine a Predictor would use.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from . import __version__


def torch_build() -> dict[str, Any]:
    import torch

    backends = torch.backends
    return {
        "version": torch.__version__,
        "git": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "cudnn": backends.cudnn.version() if backends.cudnn.is_available() else None,
        "mkl": backends.mkl.is_available(),
        "mkldnn": backends.mkldnn.is_available(),
        "openmp": backends.openmp.is_available(),
        "cpu_capability": backends.cpu.get_cpu_capability(),
        "default_threads": torch.get_num_threads(),
    }


def recipe_decisions(hw: Any) -> dict[str, Any]:
    """What `auto` decides for each recipe on `hw` (or the error it would stop with)."""
    from .config import RECIPES, resolve_config
    from .errors import MnistlabError
    from .hardware import decide

    out: dict[str, Any] = {}
    for name in RECIPES:
        try:
            out[name] = decide(hw, resolve_config(name)).to_dict()
        except MnistlabError as e:
            out[name] = {"error": str(e)}
    return out


def data_status(root: Any = None) -> dict[str, Any]:
    """The data root and, per file, whether it is there and holds MNIST's exact content."""
    from .catalog import MNIST
    from .data import find_file, raw_dir, resolve_root
    from .download import content_sha256
    from .errors import MnistlabError

    files = {}
    for name in MNIST.files:
        path = find_file(root, name)
        if path is None:
            files[name] = {"path": None, "status": "missing"}
            continue
        try:
            ok = content_sha256(path) == MNIST.sha256[name]
            detail = None if ok else "its content is not MNIST's (SHA-256 differs)"
        except (MnistlabError, OSError) as e:
            ok, detail = False, str(e)
        files[name] = {"path": str(path), "status": "verified" if ok else "corrupt"}
        if detail:
            files[name]["detail"] = detail
    statuses = {f["status"] for f in files.values()}
    status = "verified" if statuses == {"verified"} else (
        "corrupt" if "corrupt" in statuses else "missing")
    return {"root": str(resolve_root(root)), "raw": str(raw_dir(root)), "status": status,
            "files": files}


def bundled_model() -> dict[str, Any]:
    from .errors import MnistlabError
    from .export import sha256_file
    from .predict import Predictor, bundled_onnx, bundled_weights, read_card

    path = bundled_weights()
    out: dict[str, Any] = {"path": str(path), "present": path.is_file()}
    if not path.is_file():
        return out
    card = read_card(path) or {}
    out["sha256_ok"] = card.get("sha256") == sha256_file(path) if card else None
    out["onnx"] = str(bundled_onnx()) if bundled_onnx().is_file() else None
    try:
        predictor = Predictor.default()
    except MnistlabError as e:
        out["error"] = str(e)
        return out
    info = predictor.info
    out.update(name=info.get("name"), architecture=info.get("architecture"),
               parameters=info.get("parameters"), test_accuracy=info.get("test_accuracy"),
               inference={"value": predictor.backend.value, "reason": predictor.backend.reason})
    return out


def report(root: Any = None) -> dict[str, Any]:
    """Everything `mnistlab doctor --json` prints."""
    from .hardware import describe, onnxruntime_version

    hw = describe()
    return {
        "mnistlab": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hardware": hw.to_dict(),
        "summary": hw.summary(),
        "torch": torch_build(),
        "onnxruntime": onnxruntime_version(),
        "recipes": recipe_decisions(hw),
        "data": data_status(root),
        "bundled_model": bundled_model(),
    }


def format_report(r: dict[str, Any]) -> str:
    """The report as text, one fact a line."""
    hw, t = r["hardware"], r["torch"]
    lines = [
        f"mnistlab {r['mnistlab']}, Python {r['python']}, {r['platform']}",
        f"hardware: {r['summary']}",
        f"  instruction sets: OS {', '.join(hw['os_isa']) or 'none known'}; torch capability "
        f"{hw['torch_capability']}; usable {', '.join(hw['isa']) or 'none'}"
        + (f"; caps {', '.join(f'{k}={v}' for k, v in hw['caps'].items())}" if hw["caps"] else ""),
        f"  cores: {hw['cores']} usable, {hw['idle_cores']} idle now; torch default "
        f"{hw['torch_threads']} threads",
        f"  CUDA: {', '.join(d['name'] for d in hw['cuda']) or 'none'}; MPS: "
        f"{'yes' if hw['mps'] else 'no'}",
        f"torch {t['version']} (CUDA {t['cuda'] or 'none'}, MKL {t['mkl']}, oneDNN {t['mkldnn']}, "
        f"OpenMP {t['openmp']}); onnxruntime {r['onnxruntime'] or 'not installed'}",
        "auto decides, per recipe:",
    ]
    for name, d in r["recipes"].items():
        if "error" in d:
            lines.append(f"  {name}: {d['error']}")
            continue
        cl = "channels-last" if d["channels_last"]["value"] else "contiguous"
        n = d["threads"]["value"]
        lines.append(f"  {name}: {d['device']['value']}, {d['precision']['value']}, {cl}, "
                     f"{n} thread{'s' if n != 1 else ''}")
    lab = r["recipes"].get("fast") or next(iter(r["recipes"].values()))
    if "error" not in lab:
        lines.append("  why (fast): " + "; ".join(
            f"{k.replace('_', '-')} {lab[k]['reason']}" for k in ("precision", "channels_last",
                                                                  "threads")))
    data = r["data"]
    lines.append(f"data: {data['status']} in {data['raw']}")
    for name, f in data["files"].items():
        extra = f" ({f['detail']})" if f.get("detail") else ""
        lines.append(f"  {name}: {f['status']}{extra}")
    if data["status"] == "missing":
        lines.append("  run `mnistlab data download`, or point --root / $MNISTLAB_DATA at a "
                     "folder with MNIST/raw")
    elif data["status"] == "corrupt":
        lines.append("  delete the corrupt files and run `mnistlab data download`")
    m = r["bundled_model"]
    if not m.get("present"):
        lines.append(f"bundled model: missing ({m['path']}); reinstall mnistlab")
    elif "error" in m:
        lines.append(f"bundled model: unusable ({m['error']})")
    else:
        acc = f"{m['test_accuracy']:.2f}%" if m.get("test_accuracy") is not None else "?"
        digest = {True: "checksum ok", False: "CHECKSUM MISMATCH", None: "no card"}[
            m.get("sha256_ok")]
        lines.append(f"bundled model: {m['name']} ({m['architecture']}, {m['parameters']:,} "
                     f"parameters, {acc} on MNIST test), {digest}")
        inf = m["inference"]
        lines.append(f"inference: {inf['value']} ({inf['reason']})")
    return "\n".join(lines)
