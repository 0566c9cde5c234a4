"""How a run executes: the machine described once (`describe`), and one pure function from that
description and a TrainConfig to the decisions (`decide`): device, precision, memory layout and
CPU threads, each with its reason.

The description reads the CPU's instruction sets from the OS (/proc/cpuinfo on Linux, sysctl on
macOS) and from torch's CPU capability, and honours a user's caps on them
(`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`); usable cores come from the CPU affinity and the
cgroup CPU quota. `decide` reads nothing but its arguments, so every rule is testable with
made-up machines.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MnistlabError

# torch's own thread count (physical cores, or $OMP_NUM_THREADS), read before anyone lowers it.
DEFAULT_THREADS = torch.get_num_threads()

# x86 instruction sets that change what runs fast, lowest first. A cap keeps the ones up to it.
ISA_ORDER = ("avx2", "avx512", "avx512_bf16", "amx")
ISA_NAMES = {"avx2": "AVX2", "avx512": "AVX-512", "avx512_bf16": "AVX-512-BF16", "amx": "AMX"}
# /proc/cpuinfo flag (Linux) and sysctl key (macOS) of each.
CPUINFO_FLAGS = {"avx2": "avx2", "avx512": "avx512f", "avx512_bf16": "avx512_bf16",
                 "amx": "amx_bf16"}
SYSCTL_KEYS = {"avx2": "hw.optional.avx2_0", "avx512": "hw.optional.avx512f"}
# How many of ISA_ORDER each cap leaves usable. ATEN_CPU_CAPABILITY picks torch's own kernels;
# ONEDNN_MAX_CPU_ISA oneDNN's (convolutions, and the bfloat16 matrix products).
ATEN_CAPS = {"default": 0, "avx2": 1, "avx512": len(ISA_ORDER)}
ONEDNN_CAPS = {
    "sse41": 0, "avx": 0, "avx2": 1, "avx2_vnni": 1, "avx2_vnni_2": 1,
    "avx512_core": 2, "avx512_core_vnni": 2,
    "avx512_core_bf16": 3, "avx512_core_fp16": 3, "avx10_1_512": 3, "avx10_2_512": 3,
    "avx512_core_amx": 4, "avx512_core_amx_fp16": 4, "avx10_1_512_amx": 4,
    "avx10_1_512_amx_fp16": 4, "avx10_2_512_amx_2": 4, "all": 4, "default": 4,
}
CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")

# Below this many multiply-adds in a training batch's forward pass, a second thread's sync costs
# about what it saves (the lab's mlp at batch 64: 6.5M, 1.1x at best; fastcnn at 128: 178M, 2x).
SMALL_STEP_MACS = 20_000_000
# A layout change has to save at least this much of a step to be worth the conversions.
PAYS = 1.10
# Training-step speed-up of channels-last over the default layout, measured per kind of CPU
# (benchmarks/NOTES.md, "Channels-last"). A model or CPU kind not listed is not measured: off.
CHANNELS_LAST_SPEEDUP: dict[str, dict[str, float]] = {
    # AMD EPYC, AVX2 only, float32, one thread (2026-12-01).
    "avx2": {"fastcnn": 1.67, "cnn": 0.90, "convnet": 1.25, "vgg5": 1.33},
    # AMD EPYC with AVX-512-BF16 under bfloat16 autocast (2026-11-21): fastcnn's convolutions
    # took half the time; the best recipe (vgg5) was timed with it, 14.5 min a run.
    "avx512_bf16": {"fastcnn": 2.0, "vgg5": PAYS},
}


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    capability: tuple[int, int]
    memory_gib: float

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass(frozen=True)
class Hardware:
    """The machine as mnistlab sees it. `describe()` fills it; tests build their own."""

    cpu: str = "CPU"
    arch: str = "x86_64"
    os: str = "Linux"
    os_isa: tuple[str, ...] = ()  # of ISA_ORDER, as the OS reports them
    torch_capability: str = "AVX2"  # torch.backends.cpu.get_cpu_capability()
    caps: tuple[tuple[str, str], ...] = ()  # (variable, value) of CAP_VARIABLES that are set
    cores: int = 1  # usable by this process: affinity, then the cgroup CPU quota
    idle_cores: int = 1  # of those, how many nothing else was running on when described
    torch_threads: int = 1  # torch's default thread count
    cuda: tuple[CudaDevice, ...] = ()
    mps: bool = False

    @property
    def isa(self) -> tuple[str, ...]:
        """The instruction sets torch and oneDNN may use: the OS's, less what a cap excludes."""
        keep = len(ISA_ORDER)
        capability = self.torch_capability.lower().replace(" ", "")
        if self.arch in ("x86_64", "amd64", "i386", "i686"):
            keep = min(keep, ATEN_CAPS.get(capability, keep))
        for name, value in self.caps:
            table = ATEN_CAPS if name == "ATEN_CPU_CAPABILITY" else ONEDNN_CAPS
            keep = min(keep, table.get(value.lower(), keep))
        return tuple(i for i in ISA_ORDER[:keep] if i in self.os_isa)

    @property
    def native_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware (AVX-512-BF16 or AMX); elsewhere torch emulates it."""
        return bool({"avx512_bf16", "amx"} & set(self.isa))

    @property
    def cpu_kind(self) -> str:
        """The key of CHANNELS_LAST_SPEEDUP: the highest instruction set that matters here."""
        isa = self.isa
        if self.native_bf16:
            return "avx512_bf16"
        return isa[-1] if isa else "other"

    def cpu_summary(self) -> str:
        """e.g. `AMD EPYC, 2 cores, AVX2 (no native bfloat16)`."""
        isa = self.isa
        sets = " + ".join(ISA_NAMES[i] for i in isa if i != "avx2" or len(isa) == 1) or self.arch
        notes = [f"capped by {k}={v}" for k, v in self.caps]
        if not self.native_bf16:
            notes.append("no native bfloat16")
        cores = f"{self.cores} core{'s' if self.cores != 1 else ''}"
        return f"{self.cpu}, {cores}, {sets}" + (f" ({'; '.join(notes)})" if notes else "")

    def summary(self) -> str:
        gpus = [f"{d.name} ({d.sm})" for d in self.cuda] + (["Apple MPS"] if self.mps else [])
        return ", ".join([*gpus, self.cpu_summary()])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["caps"] = dict(self.caps)
        d["isa"] = list(self.isa)
        d["native_bf16"] = self.native_bf16
        return d


# --- describing this machine ---------------------------------------------------------------


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo."""
    name, flags = None, set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
                if name is not None and flags:
                    break
    except OSError:
        pass
    return name, flags


def _sysctl(*keys: str) -> dict[str, str]:
    """macOS sysctl values that exist among `keys` (unknown keys are skipped)."""
    try:
        out = subprocess.run(["sysctl", *keys], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    values = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def cpu_name() -> str:
    """The CPU model name, for environment records and benchmark headers."""
    if sys.platform == "darwin":
        name = _sysctl("machdep.cpu.brand_string").get("machdep.cpu.brand_string")
    else:
        name, _ = _cpuinfo()
    return name or platform.processor() or platform.machine()


def os_instruction_sets() -> tuple[str, ...]:
    """Of ISA_ORDER, the instruction sets the OS says this CPU has."""
    if sys.platform == "darwin":
        values = _sysctl(*SYSCTL_KEYS.values(), "machdep.cpu.leaf7_features")
        leaf7 = set(values.get("machdep.cpu.leaf7_features", "").lower().split())
        found = {i for i, k in SYSCTL_KEYS.items() if values.get(k) == "1"}
        found |= {i for i, flag in CPUINFO_FLAGS.items() if flag in leaf7}
    else:
        _, flags = _cpuinfo()
        found = {i for i, flag in CPUINFO_FLAGS.items() if flag in flags}
    return tuple(i for i in ISA_ORDER if i in found)


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup",
                     ) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max, v1 cfs quota), if any."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    candidates: list[tuple[Path, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":
            candidates += [(Path(root) / rel / "cpu.max", "v2"), (Path(root) / "cpu.max", "v2")]
        elif "cpu" in controllers.split(","):
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                candidates.append((Path(root) / mount / rel, "v1"))
    for path, kind in candidates:
        try:
            if kind == "v2":
                quota, period = path.read_text().split()[:2]
                if quota != "max":
                    return int(quota) / int(period)
            else:
                quota = int((path / "cpu.cfs_quota_us").read_text())
                period = int((path / "cpu.cfs_period_us").read_text())
                if quota > 0 and period > 0:
                    return quota / period
        except (OSError, ValueError):
            continue
    return None


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity, bounded by the cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def idle_cores(samples: int = 5, interval: float = 0.004, stat: str = "/proc/stat",
               cores: int | None = None) -> int:
    """Usable CPU cores that no other process is running on right now.

    From the kernel's count of runnable tasks (/proc/stat procs_running, ourselves included),
    the median of a few samples; all usable cores where that count is not available.
    """
    cores = cores or usable_cores()
    counts = []
    for i in range(samples):
        try:
            with open(stat, "rb") as f:
                for line in f:
                    if line.startswith(b"procs_running"):
                        counts.append(int(line.split()[1]))
                        break
        except (OSError, ValueError):
            return cores
        if i + 1 < samples:
            time.sleep(interval)
    if not counts:
        return cores
    others = sorted(counts)[len(counts) // 2] - 1
    return max(1, min(cores, cores - others))


def _cuda_devices() -> tuple[CudaDevice, ...]:
    if not torch.cuda.is_available():
        return ()
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(CudaDevice(i, props.name, (props.major, props.minor),
                                  round(props.total_memory / 2**30, 1)))
    return tuple(devices)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def describe(environ: Mapping[str, str] | None = None) -> Hardware:
    """This machine, now (the idle-core count is a sample of this moment)."""
    environ = os.environ if environ is None else environ
    cores = usable_cores()
    return Hardware(
        cpu=cpu_name(),
        arch=platform.machine().lower(),
        os=platform.system(),
        os_isa=os_instruction_sets(),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        caps=tuple((k, environ[k]) for k in CAP_VARIABLES if environ.get(k)),
        cores=cores,
        idle_cores=idle_cores(cores=cores),
        torch_threads=DEFAULT_THREADS,
        cuda=_cuda_devices(),
        mps=_mps_available(),
    )


# --- what a model asks of the machine ------------------------------------------------------


def forward_macs(model: nn.Module, shape: tuple[int, ...] = (1, 1, 28, 28)) -> int:
    """Multiply-adds of a forward pass on a batch of `shape` (Conv2d and Linear layers)."""
    total = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * k * module.in_channels // module.groups

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


@dataclass(frozen=True)
class ModelTraits:
    """What the decisions need to know about a model."""

    name: str
    macs: int  # multiply-adds of a forward pass on one image
    convolutional: bool
    linear_stack: bool  # trained by mnistlab.mlpstep's written-out step (in float32)


@functools.lru_cache(maxsize=64)
def _traits(name: str, args_json: str) -> ModelTraits:
    from .mlpstep import linear_stack
    from .models import create_model

    with torch.random.fork_rng(devices=[]):  # a throwaway model: leave the seed alone
        model = create_model(name, **json.loads(args_json))
    return ModelTraits(
        name=name,
        macs=forward_macs(model),
        convolutional=any(isinstance(m, nn.Conv2d) for m in model.modules()),
        linear_stack=linear_stack(model) is not None,
    )


def model_traits(model: str, model_args: Mapping[str, Any] | None = None) -> ModelTraits:
    return _traits(model, json.dumps(dict(model_args or {}), sort_keys=True))


# --- the decisions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Execution:
    """How a run executes, each decision with its reason."""

    device: Choice  # "cpu", "cuda" or "mps"
    precision: Choice  # "float32", "bfloat16" or "float16" (autocast of the training forward)
    channels_last: Choice  # bool
    threads: Choice  # torch CPU threads
    grad_scaler: bool = False  # float16 needs its loss scaled
    warnings: tuple[str, ...] = field(default=())

    @property
    def autocast(self) -> torch.dtype | None:
        return PRECISIONS[self.precision.value]

    def summary(self) -> str:
        """e.g. `float32, 2 threads` (device first when it is not the CPU)."""
        parts = [] if self.device.value == "cpu" else [self.device.value]
        precision = self.precision.value + (" with loss scaling" if self.grad_scaler else "")
        parts.append(precision)
        if self.channels_last.value:
            parts.append("channels-last")
        n = self.threads.value
        parts.append(f"{n} thread{'s' if n != 1 else ''}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            name: {"value": c.value, "reason": c.reason}
            for name, c in (("device", self.device), ("precision", self.precision),
                            ("channels_last", self.channels_last), ("threads", self.threads))
        }
        out["grad_scaler"] = self.grad_scaler
        out["warnings"] = list(self.warnings)
        return out


# glibc's mallopt parameters, and the size under which freed memory is kept for reuse.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED = 1 << 30


def keep_freed_memory() -> str | None:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the OS.

    By default every large buffer (a convnet's activations) is mmap'ed and unmapped again, so
    each training step faults its pages in anew: measured on the AVX2 machine, the fast recipe
    spent 1-3 s of system time on ~900 page faults a step, a third of that with the memory kept
    (peak memory unchanged). Returns what was set, or None where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return None  # musl or another libc: leave its allocator alone
    if not (libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED) and libc.mallopt(M_TRIM_THRESHOLD,
                                                                          KEEP_FREED)):
        return None
    return f"glibc {version} malloc keeps freed memory up to {KEEP_FREED >> 30} GiB for reuse"


def spare_cores(hw: Hardware, execution: Execution) -> int:
    """Idle cores the run leaves unused (for work beside it, like drawing its report)."""
    busy = execution.threads.value if execution.device.value == "cpu" else 1
    return max(0, hw.idle_cores - busy)


def hardware_line(hw: Hardware, execution: Execution) -> str:
    """The line a run prints when it starts."""
    return f"Hardware: {hw.summary()} → {execution.summary()}"


def _device(hw: Hardware, asked: str) -> Choice:
    if asked == "auto":
        if hw.cuda:
            return Choice("cuda", f"auto: CUDA device {hw.cuda[0].name} ({hw.cuda[0].sm})")
        if hw.mps:
            return Choice("mps", "auto: Apple MPS, no CUDA device")
        return Choice("cpu", "auto: no CUDA or MPS device")
    if asked == "cuda" and not hw.cuda:
        raise MnistlabError("--device cuda: no CUDA device is available here; use --device cpu")
    if asked == "mps" and not hw.mps:
        raise MnistlabError("--device mps: Apple MPS is not available here; use --device cpu")
    return Choice(asked, f"asked for (--device {asked})")


AUTOCAST_PRECISION = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _precision(hw: Hardware, device: str, asked: str, traits: ModelTraits,
               ) -> tuple[Choice, list[str]]:
    if asked != "auto":
        precision = AUTOCAST_PRECISION[asked]
        reason = f"asked for (--autocast {asked})"
        warn = []
        if device == "cpu" and precision != "float32" and not (
            precision == "bfloat16" and hw.native_bf16
        ):
            what = "bfloat16" if precision == "bfloat16" else "float16"
            kind = ISA_NAMES.get(hw.cpu_kind, hw.arch)
            warn.append(
                f"warning: this CPU ({kind}) has no native {what}: torch emulates it, and "
                "training runs several times slower than in float32 (--autocast auto chooses "
                "float32 here)"
            )
        elif device == "cuda" and precision == "bfloat16" and hw.cuda[0].capability < (8, 0):
            warn.append(f"warning: {hw.cuda[0].name} ({hw.cuda[0].sm}) has no native bfloat16; "
                        "--autocast auto chooses float16 with loss scaling there")
        return Choice(precision, reason), warn
    if traits.linear_stack:
        return Choice("float32", "auto: the written-out MLP step runs in float32, and a model "
                      "this small gains nothing from 16-bit arithmetic"), []
    if device == "cpu":
        if hw.native_bf16:
            has = "AMX" if "amx" in hw.isa else "AVX-512-BF16"
            return Choice("bfloat16", f"auto: native bfloat16 on this CPU ({has})"), []
        return Choice("float32", "auto: no native bfloat16 on this CPU (no AVX-512-BF16 or "
                      "AMX); emulated, it trains 5-9x slower"), []
    if device == "cuda":
        gpu = hw.cuda[0]
        if gpu.capability >= (8, 0):
            return Choice("bfloat16", f"auto: {gpu.sm} has native bfloat16 (compute capability "
                          "8.0 or newer)"), []
        if gpu.capability >= (7, 0):
            return Choice("float16", f"auto: {gpu.sm} has float16 tensor cores but no "
                          "bfloat16; the loss is scaled against underflow"), []
        return Choice("float32", f"auto: {gpu.sm} has no tensor cores"), []
    return Choice("float32", f"auto: 16-bit autocast is not measured on {device}"), []


def _channels_last(hw: Hardware, device: str, asked: bool | None, traits: ModelTraits) -> Choice:
    if asked is not None:
        flag = "--channels-last" if asked else "--no-channels-last"
        return Choice(bool(asked), f"asked for ({flag})")
    if not traits.convolutional:
        return Choice(False, "auto: the model has no convolutions")
    if device != "cpu":
        return Choice(False, f"auto: channels-last is not measured on {device}")
    measured = CHANNELS_LAST_SPEEDUP.get(hw.cpu_kind, {}).get(traits.name)
    kind = ISA_NAMES.get(hw.cpu_kind, hw.cpu_kind)
    if measured is None:
        return Choice(False, f"auto: channels-last is not measured for {traits.name} on "
                      f"{kind} CPUs")
    if measured >= PAYS:
        return Choice(True, f"auto: measured {measured:.2f}x faster for {traits.name} on "
                      f"{kind} CPUs")
    return Choice(False, f"auto: measured {measured:.2f}x for {traits.name} on {kind} CPUs "
                  "(it does not pay)")


def _threads(hw: Hardware, asked: int, batch_size: int, traits: ModelTraits) -> Choice:
    if asked > hw.cores:
        raise MnistlabError(
            f"--threads {asked}: this machine has {hw.cores} usable CPU core"
            f"{'s' if hw.cores != 1 else ''}; use at most {hw.cores}, or 0 to choose "
            "automatically"
        )
    if asked:
        return Choice(asked, f"asked for (--threads {asked})")
    step = traits.macs * batch_size
    if step < SMALL_STEP_MACS:
        return Choice(1, f"auto: a small step ({step / 1e6:.1f}M multiply-adds a batch): a second "
                      "thread's synchronisation costs about what it saves")
    n = max(1, min(hw.torch_threads, hw.idle_cores, hw.cores))
    return Choice(n, f"auto: one per idle core ({hw.idle_cores} of {hw.cores} usable cores "
                  "idle; a thread on a busy core stalls every op)")


def decide(hw: Hardware, cfg: Any, *, device: str | None = None,
           traits: ModelTraits | None = None) -> Execution:
    """The execution of `cfg` (a TrainConfig) on `hw`; MnistlabError for what cannot run here.

    Pure: the same description and config always give the same decisions. `device` stands in
    for `cfg.device` (a model that is already on one).
    """
    traits = traits or model_traits(cfg.model, cfg.model_args)
    device = _device(hw, device or cfg.device)
    precision, warnings = _precision(hw, device.value, cfg.autocast, traits)
    return Execution(
        device=device,
        precision=precision,
        channels_last=_channels_last(hw, device.value, cfg.channels_last, traits),
        threads=_threads(hw, cfg.threads, cfg.batch_size, traits),
        grad_scaler=precision.value == "float16",  # float16 gradients underflow unscaled
        warnings=tuple(warnings),
    )


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; a named device must be available."""
    hw = Hardware(cuda=_cuda_devices() if name in ("auto", "cuda") else (),
                  mps=_mps_available() if name in ("auto", "mps") else False)
    return torch.device(_device(hw, name).value)


# --- inference ---------------------------------------------------------------------------------

INFERENCE_BACKENDS = ("auto", "eager", "onnxruntime")
INFERENCE_ENV = "MNISTLAB_INFERENCE"  # eager or onnxruntime: force one for every Predictor


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, or None (found without importing it)."""
    from importlib import metadata

    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return None


def choose_inference(
    asked: str, device: str, convolutional: bool, linear_stack: bool, onnxruntime: bool
) -> Choice:
    """The engine a Predictor runs its model on: eager PyTorch or onnxruntime (CPU)."""
    if asked not in INFERENCE_BACKENDS:
        raise MnistlabError(f"unknown inference backend {asked!r}; choose one of: "
                            f"{', '.join(INFERENCE_BACKENDS)}")
    if asked == "eager":
        return Choice("eager", "asked for (eager)")
    if device != "cpu":
        return Choice("eager", f"the model is on {device}; onnxruntime runs it on the CPU only")
    if not onnxruntime:
        return Choice("eager", "onnxruntime is not installed")
    if asked == "onnxruntime":
        return Choice("onnxruntime", "asked for (onnxruntime)")
    if linear_stack:
        return Choice("eager", "auto: a plain MLP runs as its chain of addmm in PyTorch, measured "
                      "as fast as onnxruntime at batch 1 and twice as fast at batch 1000")
    if convolutional:
        return Choice("onnxruntime", "auto: onnxruntime ran the convnets 3-4x faster than eager "
                      "PyTorch on CPU (AVX2 and AVX-512), with the same probabilities within 1e-4")
    return Choice("eager", "auto: onnxruntime is measured for convnets only")
