"""Shared helpers of the benchmarks: hardware, subprocess runs, statistics, result files.

Results are kept per machine kind, in `results/<machine>/<name>.json` (the machine being the CPU
model, its usable instruction sets and cores, and the GPU if any), so that figures measured on
one kind of machine never replace another's; `run_all.py` makes one BENCHMARKS.md section each.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from mnistlab.runs import cpu_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def hardware() -> dict:
    """What the figures were measured on, including how busy the machine was."""
    import torch

    from mnistlab.hardware import describe

    machine = describe()
    flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    hw = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_name(),
        "cores": machine.cores,
        "isa": list(machine.isa),  # usable: what the OS reports, less any cap
        "caps": dict(machine.caps),  # ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, if set
        "cpu_flags": sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx"))),
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": gpu,
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    hw["machine"] = machine_label(hw)
    return hw


ISA_NAMES = {"avx2": "AVX2", "avx512": "AVX-512", "avx512_bf16": "AVX-512-BF16", "amx": "AMX"}


def machine_label(hw: dict) -> str:
    """The kind of machine a result belongs to, e.g. `AMD EPYC, 2 cores, AVX2`."""
    if hw.get("machine"):
        return hw["machine"]
    isa = hw.get("isa")
    if isa is None:  # results from before the instruction sets were recorded
        isa = ["avx2"] + (["avx512"] if hw.get("avx512") else []) + (
            ["avx512_bf16"] if hw.get("avx512_bf16") else [])
    names = [ISA_NAMES.get(i, i) for i in isa if i != "avx2" or len(isa) == 1]
    label = f"{hw['cpu']}, {hw['cores']} cores, {' + '.join(names) or 'no AVX2'}"
    if hw.get("caps"):
        label += " (capped: " + ", ".join(f"{k}={v}" for k, v in hw["caps"].items()) + ")"
    if hw.get("gpu"):
        label += f", GPU {hw['gpu']}"
    return label


def machine_slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def row(figure: str, mnistlab: str, reference: str, ratio: str, target: str,
        met: bool | None) -> dict:  # fmt: skip
    """One line of a machine's table in BENCHMARKS.md (a benchmark's figures["rows"]); `met`
    None for a figure that is reported, not targeted."""
    return {"figure": figure, "mnistlab": mnistlab, "reference": reference, "ratio": ratio,
            "target": target, "met": None if met is None else bool(met)}


def print_hardware(hw: dict) -> None:
    print(
        f"# {hw['date']} | {hw['cpu']} | {hw['cores']} cores | AVX-512 {hw['avx512']} "
        f"(BF16 {hw['avx512_bf16']}) | torch {hw['torch']} | python {hw['python']} | "
        f"GPU {hw['gpu'] or 'none'} | load {hw['loadavg']}",
        flush=True,
    )


def stats(values: Sequence[float]) -> dict:
    """Median, min, max, and the spread (max - min) relative to the median."""
    values = list(values)
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "spread_pct": 100.0 * (max(values) - min(values)) / med if med else 0.0,
        "n": len(values),
        "values": values,
    }


def fmt_stats(s: dict, unit: str = "s", digits: int = 2) -> str:
    return (
        f"median {s['median']:.{digits}f}{unit} (min {s['min']:.{digits}f}, "
        f"max {s['max']:.{digits}f}, n={s['n']})"
    )


def data_root() -> Path:
    root = os.environ.get("MNISTLAB_DATA")
    if not root:
        sys.exit("set MNISTLAB_DATA to the folder that holds MNIST/raw")
    return Path(root)


def raw_copy(dest: Path) -> Path:
    """Uncompressed IDX files in `dest`, as torchvision leaves them after its download."""
    src = data_root() / "MNIST" / "raw"
    dest.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        target = dest / name
        if target.is_file():
            continue
        if (src / name).is_file():
            shutil.copyfile(src / name, target)
        else:
            target.write_bytes(gzip.decompress((src / f"{name}.gz").read_bytes()))
    return dest


def run_json(cmd: Sequence[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run a command; the JSON object on the last stdout line that holds one."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    lines = [line for line in out.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON:\n{out[-1000:]}\n{err[-1000:]}")
    return json.loads(lines[-1])


# Linux keeps the high-water mark of the memory a process had before exec in its ru_maxrss, so
# a child forked from this (torch-sized) process would report our size. A small launcher forks
# the command from a fresh interpreter instead and reports the rusage of that grandchild.
_LAUNCHER = """
import os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def peak_rss_mib(cmd: Sequence[str], env: dict | None = None) -> tuple[float, str]:
    """Run a command to completion; (its own peak resident memory in MiB, its stdout)."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage"
        proc = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(report), *cmd],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=full_env, check=False,
        )
        maxrss, code = map(int, report.read_text().split())
    if code != 0 or proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code})")
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return maxrss * scale, proc.stdout.decode()


def mnistlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnistlab", *args]


def labref_cmd(*args: str) -> list[str]:
    return [sys.executable, str(HERE / "labref.py"), *args]


def finish(name: str, hw: dict, args, figures: dict, flags: str = "") -> dict:
    """A benchmark's result: its name, hardware, figures and command, saved to results/<name>.json
    unless it was a smoke run (`args.quick`) or `args.no_save`."""
    result = {
        "name": name, "hardware": hw, "quick": args.quick, **figures,
        "command": f"python benchmarks/bench_{name}.py{flags}",
    }
    if not args.quick and not args.no_save:
        save_result(name, result)
    return result


def results_dir(hw: dict | None = None) -> Path:
    """Where this machine's (or `hw`'s) results go."""
    return RESULTS / machine_slug(machine_label(hw or hardware()))


def save_result(name: str, result: dict) -> Path:
    folder = results_dir(result["hardware"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path.relative_to(REPO)}")
    return path


def load_result(name: str, hw: dict | None = None) -> dict | None:
    """This machine's (or `hw`'s) latest result of benchmark `name`."""
    path = results_dir(hw) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_all() -> dict[str, dict[str, dict]]:
    """Every machine's results: {machine label: {benchmark name: result}}."""
    machines: dict[str, dict[str, dict]] = {}
    for path in sorted(RESULTS.glob("*/*.json")):
        result = json.loads(path.read_text())
        machines.setdefault(machine_label(result["hardware"]), {})[path.stem] = result
    return machines
