"""`mnistlab train` end to end: config precedence, bad input, --json, kill -9 and Ctrl-C resume."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnistlab import runs
from mnistlab.cli import main
from mnistlab.config import RECIPES, TrainConfig, resolve_config
from mnistlab.errors import MnistlabError

# Fast, deterministic runs: one thread (CPU results depend on the thread count), a subset.
QUICK = ["--threads", "1", "--device", "cpu", "--no-report"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def data_env(monkeypatch, data_root):
    monkeypatch.setenv("MNISTLAB_DATA", str(data_root))


def invoke(capsys, *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Run `mnistlab ARGS` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_clean_error(code: int, err: str, *fragments: str, status: int = 1) -> None:
    assert code == status
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("mnistlab: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


# ---- configuration ------------------------------------------------------------------------------


def test_defaults_are_the_lab():
    cfg = resolve_config()
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.weight_decay) == ("mlp", "adam", 0.001, 0.0)
    assert (cfg.batch_size, cfg.eval_batch_size, cfg.epochs, cfg.seed) == (64, 1000, 5, 0)
    assert cfg.device == "auto" and cfg.recipe == "lab"
    assert cfg == TrainConfig().validate()


def test_precedence_defaults_then_recipe_then_flags():
    cfg = resolve_config("advanced", epochs=2, lr=None)
    assert cfg.model == "mlp-bn" and cfg.weight_decay == 1e-5  # from the recipe
    assert cfg.epochs == 2  # the flag beats the recipe's 10
    assert cfg.lr == 0.001 and cfg.batch_size == 64  # untouched defaults; None is "not given"
    assert resolve_config("logreg").optimizer == "sgd"
    assert resolve_config("logreg", optimizer="adam").optimizer == "adam"
    assert set(RECIPES) >= {"lab", "logreg", "advanced", "cnn"}


def test_resolved_config_is_printed_and_saved(tmp_path, data_root, capsys):
    code, out, err = invoke(capsys, "train", "--recipe", "logreg", "--lr", "0.05", "--epochs", "1",
                            "--train-limit", "640", "--runs-dir", tmp_path, "--name", "p",
                            "--json", *QUICK)  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    # The recipe and the flags that differ from it are printed; the whole config is saved.
    assert "Recipe: logreg with --lr 0.05 --epochs 1 --device cpu --threads 1 --train-limit 640" \
        in err.splitlines()
    assert "Config:" not in err and len(max(err.splitlines(), key=len)) < 200
    assert (saved["recipe"], saved["model"], saved["optimizer"]) == ("logreg", "logreg", "sgd")
    assert (saved["lr"], saved["epochs"], saved["batch_size"]) == (0.05, 1, 64)
    assert len(out.splitlines()) == 1 and json.loads(out)["model"] == "logreg"


def test_config_file_then_flags_then_model_args(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('recipe = "logreg"\nlr = 0.02\nepochs = 3\ntrain_limit = 640\n')
    code, out, err = invoke(capsys, "train", "--config", toml, "--epochs", "1", "--runs-dir",
                            tmp_path, "--name", "t", "--json", *QUICK)  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "t" / "config.json").read_text())
    assert (saved["recipe"], saved["optimizer"], saved["lr"]) == ("logreg", "sgd", 0.02)
    assert saved["epochs"] == 1  # the flag beats the file
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "mlp", "train_limit": 640, "epochs": 1,
                                  "model_args": {"hidden": 32, "depth": 2}}))  # fmt: skip
    code, out, err = invoke(capsys, "train", "--config", config, "--model-arg", "hidden=48",
                            "--runs-dir", tmp_path, "--name", "m", "--json", *QUICK)  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_args"] == {"hidden": 48, "depth": 2} and saved["recipe"] == "lab"
    assert json.loads(out)["parameters"] == (784 * 48 + 48) + (48 * 48 + 48) + (48 * 10 + 10)


@pytest.mark.parametrize(("text", "suffix", "fragment"), [
    ('lrr = 0.1\n', ".toml", "unknown key 'lrr'"),
    ('{"lr": 0.1, "epoch": 2}', ".json", "unknown key 'epoch'"),
    ('lr = \n', ".toml", "not valid TOML"),
    ('[1, 2]', ".json", "expected an object of TrainConfig keys"),
    ('lr: 0.1', ".yaml", "give a .toml or .json file"),
])  # fmt: skip
def test_bad_config_files_are_one_line(tmp_path, capsys, text, suffix, fragment):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    code, _, err = invoke(capsys, "train", "--config", path, "--runs-dir", tmp_path / "runs")
    assert_clean_error(code, err, f"--config {path}", fragment)
    assert not (tmp_path / "runs").exists()


def test_bad_model_args_are_one_line(tmp_path, capsys):
    for arg, fragment in (("hidden", "write it as KEY=VALUE"), ("width=3", "bad arguments"),
                          ("hidden=0", "bad arguments for model 'mlp'")):  # fmt: skip
        code, _, err = invoke(capsys, "train", "--model-arg", arg, "--runs-dir", tmp_path / "r",
                              "--epochs", "1", "--train-limit", "640", *QUICK)  # fmt: skip
        assert_clean_error(code, err, fragment)
        assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# ---- bad input: one line, non-zero exit, no traceback, no run folder ----------------------------

BAD_FLAGS = [
    (["--model", "nope"], ["unknown model 'nope'", "logreg, mlp, mlp-dropout, mlp-bn, cnn"]),
    (["--optimizer", "nope"], ["unknown optimizer 'nope'", "adam, adamw, sgd, rmsprop"]),
    (["--schedule", "nope"], ["unknown schedule 'nope'", "none, step, cosine, onecycle"]),
    (["--recipe", "nope"], ["unknown recipe 'nope'", "lab"]),
    (["--epochs", "0"], ["epochs must be positive, got 0"]),
    (["--epochs", "-3"], ["epochs must be positive, got -3"]),
    (["--batch-size", "0"], ["batch size must be positive"]),
    (["--batch-size", "-64"], ["batch size must be positive"]),
    (["--lr", "0"], ["learning rate must be a positive number"]),
    (["--lr", "-0.001"], ["learning rate must be a positive number"]),
    (["--lr", "nan"], ["learning rate must be a positive number"]),
    (["--val-split", "1"], ["validation fraction must be between 0 and 1"]),
    (["--val-split", "1.5"], ["validation fraction must be between 0 and 1"]),
    (["--val-split", "-0.2"], ["validation fraction must be between 0 and 1"]),
    (["--early-stop", "2"], ["needs a validation split"]),
]


@pytest.mark.parametrize(("flags", "fragments"), BAD_FLAGS, ids=lambda v: " ".join(v)[:30])
def test_bad_flags(tmp_path, capsys, flags, fragments):
    code, out, err = invoke(capsys, "train", "--runs-dir", tmp_path / "runs", *flags)
    assert_clean_error(code, err, *fragments)
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "runs").exists()


def test_a_flag_of_the_wrong_type_is_a_usage_error(tmp_path, capsys):
    code, _, err = invoke(capsys, "train", "--runs-dir", tmp_path / "runs", "--epochs", "five")
    assert_clean_error(code, err, "--epochs", status=2)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_refused(tmp_path, capsys):
    code, _, err = invoke(capsys, "train", "--runs-dir", tmp_path / "runs", "--device", "cuda")
    assert_clean_error(code, err, "no CUDA device", "--device cpu")
    assert not (tmp_path / "runs").exists()


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    code, _, err = invoke(capsys, "train", "--runs-dir", tmp_path / "runs", "--root",
                          tmp_path / "no-data", *QUICK)  # fmt: skip
    assert_clean_error(code, err, "train-images-idx3-ubyte")
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def unfinished(tmp_path, capsys) -> Path:
    """An mlp run whose process died after its last epoch, before writing the summary."""
    code, _, err = invoke(capsys, "train", "--runs-dir", tmp_path, "--name", "u", "--epochs", "1",
                          "--train-limit", "320", *QUICK)  # fmt: skip
    assert code == 0, err
    (tmp_path / "u" / "summary.json").unlink()
    return tmp_path / "u"


def test_resume_refusals(unfinished, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["--resume", tmp_path / "nope"], ["no run", "nope"]),
        (["--resume", "nope", "--runs-dir", tmp_path], ["no run 'nope'"]),
        (["--resume", unfinished, "--model", "cnn"], ["was made with model 'mlp', not 'cnn'"]),
        (["--resume", unfinished, "--epochs", "9"], ["epochs 1, not 9"]),
        (["--resume", unfinished, "--recipe", "cnn"], ["recipe 'lab', not 'cnn'"]),
        (["--resume", unfinished, "--name", "other"], ["--resume"]),
        (["--resume", tmp_path], ["not a run folder"]),
    ]
    for args, fragments in cases:
        code, _, err = invoke(capsys, "train", *args, *QUICK)
        assert_clean_error(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    # Runtime settings may change; then the run finishes, and a finished run is refused.
    code, out, err = invoke(capsys, "train", "--resume", unfinished, "--log-every", "2", "--json",
                            *QUICK)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["epochs"] == 1
    code, _, err = invoke(capsys, "train", "--resume", unfinished, *QUICK)
    assert_clean_error(code, err, "already complete")


def test_resume_check_names_every_difference(unfinished):
    from mnistlab.experiment import _check_resume

    with pytest.raises(MnistlabError) as e:
        _check_resume(unfinished, {"model": "cnn", "lr": 0.1, "threads": 2})
    assert "model 'mlp', not 'cnn'" in str(e.value) and "lr 0.001, not 0.1" in str(e.value)
    assert "threads" not in str(e.value)
    assert _check_resume(unfinished, {"threads": 2, "device": "cpu"}).threads == 2


# ---- the real command, in its own process -------------------------------------------------------


def test_json_summary_progress_lines_and_early_stop(tmp_path, run_cli):
    begin = time.perf_counter()
    proc = run_cli("train", "--epochs", "2", "--train-limit", "2480", "--val-split", "0.1",
                   "--early-stop", "3", "--runs-dir", tmp_path, "--name", "j", "--json",
                   *QUICK)  # fmt: skip
    wall = time.perf_counter() - begin
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1  # stdout holds the summary only
    summary = json.loads(proc.stdout)
    assert {"run_dir", "model", "epochs", "test_acc", "test_loss", "best_val_acc",
            "seconds"} <= set(summary)  # fmt: skip
    records = runs.read_metrics(tmp_path / "j")
    assert summary["run_dir"] == str(tmp_path / "j") and summary["epochs"] == 2
    assert summary["best_val_acc"] == max(r["val_acc"] for r in records)
    assert 50 < summary["test_acc"] <= 100  # a percentage
    # From the start of the work (after imports) to the final evaluation, data loading included.
    assert sum(r["seconds"] for r in records) < summary["seconds"] < wall

    # The lab's lines: 7 progress lines an epoch (2,232 images: 35 steps, one line every 5).
    steps = re.findall(r"^Step (\d+)/35 - Loss: \d+\.\d{3} \| Acc: \d+\.\d{2}%$",
                       proc.stderr, re.M)  # fmt: skip
    assert [int(s) for s in steps] == [5, 10, 15, 20, 25, 30, 35] * 2
    epochs = re.findall(r"^Epoch (\d)/2 \| train loss [\d.]+ acc [\d.]+% \| val loss [\d.]+ acc "
                        r"[\d.]+% \| test loss [\d.]+ acc [\d.]+% \| [\d.]+s$",
                        proc.stderr, re.M)  # fmt: skip
    assert epochs == ["1", "2"]
    assert re.search(r"^Hardware: .+, \d+ cores?, .+ → float32, 1 thread$", proc.stderr, re.M)

    # Early stopping on: the best validation weights are restored into model.pt.
    best = torch.load(tmp_path / "j" / "best.pt", weights_only=True)
    final = torch.load(tmp_path / "j" / "model.pt", weights_only=True)
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert summary["best_epoch"] == min(records, key=lambda r: r["val_loss"])["epoch"]


def start(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "mnistlab", "train", "--runs-dir", str(tmp_path)]
    return subprocess.Popen(
        [*command, "--name", name, *args, *QUICK],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epochs(proc: subprocess.Popen, run: Path, n: int, timeout: float = 120) -> None:
    """Poll the run's metrics.jsonl until it holds `n` epochs (it is replaced atomically)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(runs.read_metrics(run)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {n} epochs in {timeout}s")


RESUMABLE = ["--epochs", "5", "--train-limit", "10000"]


@pytest.mark.slow
def test_kill_9_during_epoch_3_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    reference = start(tmp_path, "reference", *RESUMABLE)
    victim = start(tmp_path, "victim", *RESUMABLE)
    run = tmp_path / "victim"
    wait_for_epochs(victim, run, 2)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert len(runs.read_metrics(run)) == 2, "killed after epoch 3 had finished"
    assert not (run / "summary.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 2

    code, out, err = invoke(capsys, "train", "--resume", run, "--json", "--no-report")
    assert code == 0, err
    assert f"Resuming {run} after epoch 2/5" in err
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    expected = runs.read_metrics(tmp_path / "reference")
    assert len(expected) == 5
    assert without_timing(runs.read_metrics(run)) == without_timing(expected)
    summary = json.loads(out)
    assert summary["test_acc"] == expected[-1]["test_acc"] and summary["epochs"] == 5
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_exits_cleanly_and_says_how_to_resume(tmp_path, capsys, sig):
    proc = start(tmp_path, "stopped", "--epochs", "4", "--train-limit", "5000")
    run = tmp_path / "stopped"
    wait_for_epochs(proc, run, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mnistlab: error: interrupted;"), last
    match = re.search(r"Resume with: (mnistlab train --resume \S+)$", last)
    assert match and match[1] == f"mnistlab train --resume {run}"
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    assert f"saved after epoch {saved}/4" in last and saved >= 1
    assert not (run / "summary.json").exists()

    # The printed command works as it stands.
    code, out, err = invoke(capsys, *shlex.split(match[1])[1:], "--no-report", "--json")
    assert code == 0, err
    assert json.loads(out)["epochs"] == 4
    assert [r["epoch"] for r in runs.read_metrics(run)] == [1, 2, 3, 4]
