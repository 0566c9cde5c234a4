"""How a run executes: the machine description, the decision function fed made-up machines, the
start-of-run line and environment.json, `--threads` bounds, and `mnistlab doctor`."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch

from mnistlab import hardware
from mnistlab.config import RECIPES, TrainConfig, resolve_config
from mnistlab.errors import MnistlabError
from mnistlab.experiment import train_run
from mnistlab.hardware import CudaDevice, Hardware, decide

pytestmark = pytest.mark.usefixtures("one_thread")

AVX2 = ("avx2",)
AVX512 = ("avx2", "avx512")
AVX512_BF16 = ("avx2", "avx512", "avx512_bf16")
AMX = ("avx2", "avx512", "avx512_bf16", "amx")


def machine(isa=AVX2, cores=2, idle=None, torch_threads=None, capability=None, **kw) -> Hardware:
    capability = capability or ("AVX512" if "avx512" in isa else "AVX2")
    return Hardware(cpu="Test CPU", os_isa=isa, torch_capability=capability, cores=cores,
                    idle_cores=cores if idle is None else idle,
                    torch_threads=torch_threads or cores, **kw)


SM70 = (CudaDevice(0, "Tesla V100", (7, 0), 16.0),)
SM80 = (CudaDevice(0, "A100", (8, 0), 40.0),)

# (machine, recipe) → (device, precision, channels-last, threads, loss scaling)
CASES = {
    "avx2-fast": (machine(AVX2), "fast", ("cpu", "float32", True, 2, False)),
    "avx2-lab": (machine(AVX2), "lab", ("cpu", "float32", False, 1, False)),
    "avx2-cnn": (machine(AVX2), "cnn", ("cpu", "float32", False, 2, False)),  # measured 0.90x
    "avx2-best": (machine(AVX2), "best", ("cpu", "float32", True, 2, False)),
    "avx512-fast": (machine(AVX512), "fast", ("cpu", "float32", False, 2, False)),  # unmeasured
    "avx512bf16-fast": (machine(AVX512_BF16), "fast", ("cpu", "bfloat16", True, 2, False)),
    "avx512bf16-best": (machine(AVX512_BF16), "best", ("cpu", "bfloat16", True, 2, False)),
    "avx512bf16-lab": (machine(AVX512_BF16), "lab", ("cpu", "float32", False, 1, False)),
    "amx-fast": (machine(AMX), "fast", ("cpu", "bfloat16", True, 2, False)),
    "sm70-fast": (machine(AVX2, cuda=SM70), "fast", ("cuda", "float16", False, 2, True)),
    "sm80-fast": (machine(AVX2, cuda=SM80), "fast", ("cuda", "bfloat16", False, 2, False)),
    "sm80-lab": (machine(AVX2, cuda=SM80), "lab", ("cuda", "float32", False, 1, False)),
    "mps-fast": (machine(AVX2, arch="arm64", mps=True), "fast",
                 ("mps", "float32", False, 2, False)),
    "one-core-fast": (machine(AVX2, cores=1), "fast", ("cpu", "float32", True, 1, False)),
    "many-cores-fast": (machine(AVX512_BF16, cores=64, torch_threads=32), "fast",
                        ("cpu", "bfloat16", True, 32, False)),
    "busy-many-cores": (machine(AVX2, cores=64, idle=3, torch_threads=32), "best",
                        ("cpu", "float32", True, 3, False)),
}


@pytest.mark.parametrize("case", CASES)
def test_decisions_for_each_kind_of_machine(case):
    hw, recipe, expected = CASES[case]
    e = decide(hw, resolve_config(recipe))
    got = (e.device.value, e.precision.value, e.channels_last.value, e.threads.value,
           e.grad_scaler)
    assert got == expected
    assert e.autocast == {"float32": None, "bfloat16": torch.bfloat16,
                          "float16": torch.float16}[expected[1]]
    assert not e.warnings  # auto never warns
    for choice in (e.device, e.precision, e.channels_last, e.threads):
        assert choice.reason.startswith("auto")  # every decision says why
    assert decide(hw, resolve_config(recipe)) == e  # pure: same inputs, same decisions


def test_reasons_name_the_hardware_fact_behind_them():
    e = decide(machine(AVX2), resolve_config("fast"))
    assert "no native bfloat16" in e.precision.reason
    assert "1.67x" in e.channels_last.reason and "AVX2" in e.channels_last.reason
    assert "AMX" in decide(machine(AMX), resolve_config("fast")).precision.reason
    assert "sm_70" in decide(machine(cuda=SM70), resolve_config("fast")).precision.reason
    assert "no convolutions" in decide(machine(), resolve_config("lab")).channels_last.reason
    assert "small step" in decide(machine(), resolve_config("lab")).threads.reason


def test_capped_instruction_sets_are_honoured():
    # An AVX-512-BF16 host capped to AVX2, as a user would to compare (the variables).
    for caps in ((("ONEDNN_MAX_CPU_ISA", "AVX2"),), (("ATEN_CPU_CAPABILITY", "avx2"),),
                 (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"))):
        hw = machine(AVX512_BF16, caps=caps)
        assert hw.isa == ("avx2",) and not hw.native_bf16
        assert decide(hw, resolve_config("fast")).precision.value == "float32"
        assert "capped by" in hw.cpu_summary()
    # Capped at AVX-512 without BF16: no bfloat16; capped at BF16: still native.
    assert not machine(AMX, caps=(("ONEDNN_MAX_CPU_ISA", "AVX512_CORE"),)).native_bf16
    assert machine(AMX, caps=(("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16"),)).isa == AVX512_BF16
    # torch's own capability counts too (it follows ATEN_CPU_CAPABILITY).
    assert machine(AVX512_BF16, capability="AVX2").isa == AVX2
    assert hardware.describe({"ONEDNN_MAX_CPU_ISA": "AVX2"}).caps == (
        ("ONEDNN_MAX_CPU_ISA", "AVX2"),)


def test_summary_line():
    assert machine(AVX2).cpu_summary() == "Test CPU, 2 cores, AVX2 (no native bfloat16)"
    assert machine(AVX512_BF16).cpu_summary() == "Test CPU, 2 cores, AVX-512 + AVX-512-BF16"
    e = decide(machine(AVX2), resolve_config("fast"))
    assert hardware.hardware_line(machine(AVX2), e) == (
        "Hardware: Test CPU, 2 cores, AVX2 (no native bfloat16) → float32, channels-last, "
        "2 threads")
    lab = decide(machine(AVX2), resolve_config("lab"))
    assert hardware.hardware_line(machine(AVX2), lab).endswith("→ float32, 1 thread")


def test_asked_values_win_and_emulated_bfloat16_warns_once():
    hw = machine(AVX2)
    e = decide(hw, resolve_config("fast", autocast="bf16", channels_last=False, threads=1))
    assert (e.precision.value, e.channels_last.value, e.threads.value) == ("bfloat16", False, 1)
    assert e.precision.reason == "asked for (--autocast bf16)"
    assert len(e.warnings) == 1 and "no native bfloat16" in e.warnings[0]
    assert e.warnings[0].startswith("warning: ")
    assert not decide(machine(AVX512_BF16), resolve_config("fast", autocast="bf16")).warnings
    assert decide(hw, resolve_config("fast", autocast="none")).precision.value == "float32"
    fp16 = decide(hw, resolve_config("fast", autocast="fp16"))
    assert fp16.grad_scaler and fp16.warnings


@pytest.mark.parametrize("threads", [3, 5000, 20000, 100000])
def test_threads_above_the_usable_cores_are_refused(threads):
    with pytest.raises(MnistlabError, match=rf"--threads {threads}: this machine has 2 usable"):
        decide(machine(AVX2, cores=2), resolve_config("lab", threads=threads))
    assert decide(machine(AVX2, cores=2), resolve_config("lab", threads=2)).threads.value == 2


def test_unavailable_devices_are_refused():
    with pytest.raises(MnistlabError, match="no CUDA device"):
        decide(machine(), resolve_config("lab", device="cuda"))
    with pytest.raises(MnistlabError, match="MPS is not available"):
        decide(machine(), resolve_config("lab", device="mps"))


def test_no_shipped_recipe_names_a_hardware_specific_precision_or_layout():
    for name, recipe in RECIPES.items():
        assert recipe.overrides.get("autocast", "auto") == "auto", name
        assert "channels_last" not in recipe.overrides, name
        cfg = resolve_config(name)
        assert (cfg.autocast, cfg.channels_last) == ("auto", None), name
    assert (TrainConfig().autocast, TrainConfig().channels_last) == ("auto", None)


def test_describe_reads_this_machine():
    hw = hardware.describe()
    assert 1 <= hw.idle_cores <= hw.cores <= (os.cpu_count() or 1)
    assert hw.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert set(hw.isa) <= set(hw.os_isa) <= set(hardware.ISA_ORDER)
    json.dumps(hw.to_dict())  # environment.json and doctor --json take it as it is


def test_cgroup_cpu_quota(tmp_path):
    cg = tmp_path / "cgroup"
    (cg / "app").mkdir(parents=True)
    own = tmp_path / "self"
    own.write_text("0::/app\n")
    (cg / "app" / "cpu.max").write_text("150000 100000\n")
    assert hardware.cgroup_cpu_limit(str(cg), str(own)) == 1.5
    (cg / "app" / "cpu.max").write_text("max 100000\n")
    assert hardware.cgroup_cpu_limit(str(cg), str(own)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "job").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    own.write_text("4:cpu,cpuacct:/job\n")
    assert hardware.cgroup_cpu_limit(str(v1), str(own)) == 3.0
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("-1\n")
    assert hardware.cgroup_cpu_limit(str(v1), str(own)) is None


# --- in a run ------------------------------------------------------------------------------------


def test_a_run_prints_one_hardware_line_and_records_the_decisions(tmp_path, data_root):
    lines: list[str] = []
    cfg = TrainConfig(train_limit=640, epochs=1, threads=1)
    train_run(cfg, root=data_root, runs_dir=tmp_path, name="r", log=lines.append)
    hw_lines = [line for line in lines if line.startswith("Hardware: ")]
    assert len(hw_lines) == 1 and hw_lines[0].endswith("→ float32, 1 thread")
    assert lines[0] == "Recipe: lab with --epochs 1 --threads 1 --train-limit 640"
    assert not any(line.startswith("Config:") for line in lines)
    env = json.loads((tmp_path / "r" / "environment.json").read_text())
    assert env["hardware"]["cores"] >= 1 and env["hardware"]["isa"] == list(
        hardware.describe().isa)
    ex = env["execution"]
    assert ex["precision"]["value"] == "float32" and ex["threads"] == {
        "value": 1, "reason": "asked for (--threads 1)"}
    assert ex["channels_last"]["value"] is False and ex["device"]["value"] == "cpu"


def test_emulated_bf16_on_request_still_trains_after_one_warning(tmp_path, data_root,
                                                                monkeypatch):
    monkeypatch.setattr(hardware, "describe", lambda environ=None: machine(AVX2, cores=2))
    lines: list[str] = []
    cfg = TrainConfig(train_limit=640, epochs=1, threads=1, autocast="bf16")
    summary = train_run(cfg, root=data_root, runs_dir=tmp_path, name="bf16", log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "no native bfloat16" in warnings[0]
    assert summary["test_acc"] > 50
    env = json.loads((tmp_path / "bf16" / "environment.json").read_text())
    assert env["execution"]["precision"]["value"] == "bfloat16"
    assert env["execution"]["warnings"] == warnings


def test_float16_trains_with_loss_scaling(tmp_path, data_root):
    cfg = TrainConfig(train_limit=640, epochs=2, threads=1, autocast="fp16")
    summary = train_run(cfg, root=data_root, runs_dir=tmp_path, name="fp16", log=lambda _: None)
    assert summary["test_acc"] > 50
    saved = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)
    assert saved["state"]["scaler_state"]["scale"] > 0  # the scale resumes with the run
    weights = torch.load(tmp_path / "fp16" / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() and w.dtype == torch.float32 for w in weights.values())


def test_recipe_fast_picks_what_doctor_says(tmp_path, data_root, cli):
    done = cli("doctor", "--json", "--root", data_root)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)["recipes"]["fast"]
    ran = cli("train", "--recipe", "fast", "--train-limit", "1280", "--threads", "1",
              "--runs-dir", tmp_path, "--name", "fast", "--no-report", "--root", data_root)
    assert ran.returncode == 0, ran.stderr
    got = json.loads((tmp_path / "fast" / "environment.json").read_text())["execution"]
    for key in ("device", "precision", "channels_last"):
        assert got[key] == said[key], key
    assert f"→ {said['precision']['value']}" in ran.stdout


@pytest.mark.parametrize("threads", ["100000", "20000", "5000"])
def test_threads_out_of_range_is_one_line_and_leaves_nothing(tmp_path, cli, threads):
    before = torch.get_num_threads()
    done = cli("train", "--threads", threads, "--runs-dir", tmp_path / "runs")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mnistlab: error: --threads {threads}: ")
    assert "usable CPU core" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
    assert torch.get_num_threads() == before


# --- doctor --------------------------------------------------------------------------------------


def test_doctor_with_a_good_data_root(cli, data_root):
    done = cli("doctor", "--root", data_root)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"hardware: {hardware.describe().cpu_summary()}" in out
    assert "data: verified in " in out and out.count("-ubyte: verified") == 4
    assert "auto decides, per recipe:" in out and "\n  fast: cpu, " in out
    assert "bundled model: convnet (CompactConvNet" in out and "checksum ok" in out
    assert "inference: onnxruntime" in out
    report = json.loads(cli("doctor", "--json", "--root", data_root).stdout)
    assert report["data"]["status"] == "verified"
    assert report["torch"]["version"] == torch.__version__
    assert report["bundled_model"]["inference"]["value"] == "onnxruntime"
    assert set(report["recipes"]) == set(RECIPES)
    assert report["hardware"]["isa"] == list(hardware.describe().isa)


def test_doctor_with_a_missing_data_root(cli, tmp_path):
    done = cli("doctor", "--root", tmp_path / "empty")
    assert done.returncode == 0, done.stderr
    assert "data: missing" in done.stdout and "mnistlab data download" in done.stdout
    report = json.loads(cli("doctor", "--json", "--root", tmp_path / "empty").stdout)
    assert {f["status"] for f in report["data"]["files"].values()} == {"missing"}
    assert not (tmp_path / "empty").exists()  # a doctor looks, it never writes


def test_doctor_with_a_corrupt_data_root(cli, tmp_path, raw_files):
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, path in raw_files.items():
        if name == "t10k-labels-idx1-ubyte":
            data = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz"
                             else path.read_bytes())
            data[100] ^= 0xFF  # one label changed
            (raw / name).write_bytes(bytes(data))
        else:
            (raw / path.name).symlink_to(path)
    report = json.loads(cli("doctor", "--json", "--root", tmp_path / "root").stdout)
    files = report["data"]["files"]
    assert report["data"]["status"] == "corrupt"
    assert files["t10k-labels-idx1-ubyte"]["status"] == "corrupt"
    assert "SHA-256" in files["t10k-labels-idx1-ubyte"]["detail"]
    assert sum(f["status"] == "verified" for f in files.values()) == 3
    text = cli("doctor", "--root", tmp_path / "root").stdout
    assert "data: corrupt" in text and "t10k-labels-idx1-ubyte: corrupt" in text
