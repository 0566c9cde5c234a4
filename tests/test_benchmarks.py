"""Smoke tests of the benchmark suite: the reference is the lab's pipeline, the helpers measure
what they claim, and the table reports met and missed targets as they are."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_inference  # noqa: E402
import benchutil  # noqa: E402
import labref  # noqa: E402
import run_all  # noqa: E402
from mnistlab.data import BatchLoader, load_mnist  # noqa: E402
from mnistlab.models import create_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def raw(data_root) -> Path:
    return data_root / "MNIST" / "raw"


def test_reference_reads_the_same_data_as_mnistlab(raw, data_root):
    images, labels = labref.load_split(raw, "test")
    ours = load_mnist(data_root, "test")
    assert torch.equal(images, ours[0]) and torch.equal(labels, ours[1])


def test_reference_dataset_yields_mnistlabs_normalized_tensors(raw, data_root):
    images, labels = labref.load_split(raw, "train")
    dataset = labref.LabMNIST(images[:256], labels[:256])
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    ours = BatchLoader(*load_mnist(data_root, "train"), batch_size=64)
    for (x_ref, y_ref), (x, y) in zip(loader, ours, strict=False):
        assert x_ref.shape == x.shape == (64, 1, 28, 28)
        assert x_ref.dtype == x.dtype == torch.float32
        torch.testing.assert_close(x_ref, x, rtol=0, atol=2e-6)
        assert torch.equal(y_ref, y)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_reference_models_are_mnistlabs_architectures(name):
    ref = labref.MODELS[name]().state_dict()
    ours = create_model(name).state_dict()
    assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in ours.items()}


def test_reference_pipeline_trains_and_stops_at_its_target(raw):
    out = labref.run(raw, "mlp", epochs=3, limit=1000, target=0.0)
    assert out["epochs"] == 1 and out["reached"]  # target 0%: the first epoch reaches it
    assert len(out["accs"]) == 1 and 50.0 < out["test_acc"] <= 100.0
    assert out["seconds"] > 0
    never = labref.run(raw, "mlp", epochs=2, limit=500, target=100.1)
    assert never["epochs"] == 2 and not never["reached"]


def test_stats_median_and_spread():
    s = benchutil.stats([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert s["spread_pct"] == pytest.approx(100.0)


def test_peak_rss_is_the_childs_own(tmp_path):
    code = "import numpy as np; a = np.ones(300 * 2**20 // 8); print(a.sum())"
    rss, _ = benchutil.peak_rss_mib([sys.executable, "-c", code])
    assert 300 < rss < 600, rss
    small, _ = benchutil.peak_rss_mib([sys.executable, "-c", "print(1)"])
    assert small < 100, small


def test_inference_paths_agree_on_the_labels(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp").eval()
    paths = bench_inference.paths_for(model, tmp_path, threads=1)
    assert {"eager", "mnistlab", "onnxruntime"} <= set(paths)
    x = torch.rand(64, 28, 28)
    labels = {k: np.asarray(fn(x)) for k, fn in paths.items()}
    for name, got in labels.items():
        assert np.array_equal(got, labels["eager"]), name
    speeds = bench_inference.throughput(paths["eager"], x, seconds=0.01, repeats=2)
    assert len(speeds) == 2 and all(s > 0 for s in speeds)


def fake_results() -> dict:
    hw = {"date": "d", "cpu": "cpu", "cores": 2, "avx512": True, "avx512_bf16": True,
          "torch": "t", "python": "p", "gpu": None, "loadavg": [0.1, 0.2, 0.3]}
    seconds = benchutil.stats([2.0, 2.5, 3.0])
    return {
        "lab": {"hardware": hw, "command": "c", "ratio": 16.0, "met": True,
                "mnistlab": {"seconds": seconds, "test_acc": [97.5, 97.6, 97.4]},
                "reference": {"seconds": benchutil.stats([40.0, 42.0, 41.0])}},
        "memory": {"hardware": hw, "command": "c", "met": False,
                   "mnistlab": {"peak_rss_mib": benchutil.stats([1100.0, 1200.0, 1000.0])},
                   "reference": {"peak_rss_mib": benchutil.stats([500.0, 500.0, 500.0])}},
    }


def test_table_marks_met_and_missed_targets():
    rows = run_all.table(fake_results())
    lab = next(r for r in rows if r.startswith("| Lab recipe"))
    mem = next(r for r in rows if r.startswith("| Peak RSS"))
    assert "2.50 s" in lab and "42.0 s" not in lab and "41.0 s" in lab and "16.0×" in lab
    assert lab.endswith("| **yes** | d |")  # and the figure's date
    assert "1200 MiB" in mem and mem.endswith("| **no** | d |")


def result(name: str, cpu: str, isa: list[str], date: str, met: bool) -> dict:
    hw = {"date": date, "cpu": cpu, "cores": 2, "isa": isa, "caps": {}, "avx512": False,
          "avx512_bf16": False, "torch": "t", "python": "p", "gpu": None,
          "loadavg": [0.1, 0.2, 0.3], "cpu_flags": isa}
    return {"name": name, "hardware": hw, "command": f"python benchmarks/bench_{name}.py",
            "met": met, "rows": [benchutil.row(f"figure {name}", "1 s", "2 s", "2×", "≥ 2×", met)]}


def test_each_machine_keeps_its_own_section(tmp_path, monkeypatch):
    monkeypatch.setattr(benchutil, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(benchutil, "REPO", tmp_path)
    monkeypatch.setattr(benchutil, "HERE", tmp_path)
    avx2 = result("lab", "EPYC", ["avx2"], "2026-12-01 10:00 UTC", True)
    bf16 = result("lab", "EPYC", ["avx2", "avx512", "avx512_bf16"], "2026-11-21 10:00 UTC", False)
    for r in (avx2, bf16):
        benchutil.save_result("lab", r)
    assert benchutil.machine_label(avx2["hardware"]) == "EPYC, 2 cores, AVX2"
    run_all.write_markdown()
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.index("## EPYC, 2 cores, AVX2\n") < text.index(
        "## EPYC, 2 cores, AVX-512 + AVX-512-BF16\n")  # newest first
    assert "| figure lab | 1 s | 2 s | 2× | ≥ 2× | **yes** | 2026-12-01 |" in text
    assert "| **no** | 2026-11-21 |" in text and "CPU flags: `avx2 avx512 avx512_bf16`" in text
    # A new run on one machine replaces its figures and leaves the other machine's alone.
    newer = result("lab", "EPYC", ["avx2"], "2026-12-02 09:00 UTC", False)
    benchutil.save_result("lab", newer)
    run_all.write_markdown()
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "2026-12-01" not in text and "| **no** | 2026-12-02 |" in text
    assert "| **no** | 2026-11-21 |" in text
    assert len(list((tmp_path / "results").iterdir())) == 2


def test_sweep_rows_are_reported_not_targeted():
    import bench_sweep

    measured = {"workers": 2, "pruner": "median", "trials": 8, "pruned": 3,
                "trials_per_hour": 120.4, "epochs_per_hour": 400.0, "loadavg": [2.5, 2, 2]}
    figures = {"space": "lab-mlp", "rows_measured": [measured],
               "search": {"trials": 20, "best": {"val_acc": 98.1}, "test_acc": 97.9},
               "lab": {"val_acc": 97.6, "test_acc": 97.5}}
    first, last = bench_sweep.table_rows(figures)
    assert first["figure"].startswith("Sweep `lab-mlp`, 2 worker(s), pruner median")
    assert first["mnistlab"] == "120/h (400 epochs/h)" and first["met"] is None
    assert "98.10%" in last["mnistlab"] and "97.90%" in last["mnistlab"]
    assert last["ratio"] == "+0.50 points" and last["met"] is None
    hw = fake_results()["lab"]["hardware"]
    lines = run_all.table({"sweep": {"hardware": hw, "rows": [first, last]}})
    assert all(line.endswith("| reported, not targeted | – | d |") for line in lines[2:])
