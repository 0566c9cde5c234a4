"""Run folders: contents, atomic never-overwritten writes, safe loading, full disks, evaluate."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mnistlab
from mnistlab import runs
from mnistlab.cli import main
from mnistlab.config import TrainConfig
from mnistlab.data import BatchLoader, load_mnist
from mnistlab.errors import MnistlabError
from mnistlab.experiment import train_run
from mnistlab.models import create_model
from mnistlab.training import evaluate

# SPEC part 4: the test set's class supports.
TEST_SUPPORTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
RUN_FILES = {
    "config.json",
    "environment.json",
    "metrics.jsonl",
    "steps.jsonl",
    "checkpoint.pt",
    "best.pt",
    "model.pt",
    "summary.json",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def data_env(monkeypatch, data_root):
    monkeypatch.setenv("MNISTLAB_DATA", str(data_root))  # every command honours it


def invoke(capsys, *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Run `mnistlab ARGS` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnistlab: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


CONFIG = {"epochs": 2, "train_limit": 3000, "val_split": 0.2, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> tuple[Path, dict]:
    """A finished 2-epoch mlp run with a validation split (read-only for the tests)."""
    parent = tmp_path_factory.mktemp("runs")
    summary = train_run(
        TrainConfig(**CONFIG), root=data_root, runs_dir=parent, name="done", log=lambda s: None
    )
    return parent / "done", summary


@pytest.fixture
def unfinished(finished, tmp_path) -> Path:
    """A copy of the finished run without its summary: resumable as far as the folder says."""
    run = tmp_path / "unfinished"
    shutil.copytree(finished[0], run)
    (run / "summary.json").unlink()
    return run


def test_run_folder_describes_itself(finished, data_root):
    run, summary = finished
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no temporary files left behind
    config = json.loads((run / "config.json").read_text())
    assert config == TrainConfig(**CONFIG).to_dict()

    env = json.loads((run / "environment.json").read_text())
    assert env["mnistlab"] == mnistlab.__version__
    assert env["torch"] == torch.__version__
    assert env["python"] == platform.python_version()
    assert env["device"] == "cpu" and env["threads"] == 1

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                "lr", "seconds"} <= set(r)  # fmt: skip

    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    assert saved["test_acc"] == records[-1]["test_acc"]
    assert saved["best_val_acc"] == max(r["val_acc"] for r in records)
    assert saved["epochs"] == 2 and saved["model"] == "mlp"


def test_final_weights_load_into_a_fresh_model_with_plain_pytorch(finished, data_root):
    run, summary = finished
    model = create_model("mlp")
    model.load_state_dict(torch.load(run / "model.pt"))  # the lab's way, nothing of mnistlab's
    images, labels = load_mnist(data_root, "test")
    loss, acc = evaluate(model, BatchLoader(images, labels, 1000))
    assert acc == summary["test_acc"]
    assert loss == pytest.approx(summary["test_loss"], rel=1e-6)


def test_best_weights_are_those_of_the_lowest_validation_loss(finished):
    run, _ = finished
    records = runs.read_metrics(run)
    best_epoch = min(records, key=lambda r: r["val_loss"])["epoch"]
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "state", "config"} <= set(checkpoint)
    assert checkpoint["state"]["epoch"] == 2 and checkpoint["state"]["best_epoch"] == best_epoch
    best = torch.load(run / "best.pt", weights_only=True)
    assert all(torch.equal(best[k], checkpoint["best"][k]) for k in best)


def test_an_existing_run_is_never_overwritten(finished, tmp_path, data_root, capsys):
    run, _ = finished
    before = digest(run)
    code, _, err = invoke(capsys, "train", "--runs-dir", run.parent, "--name", "done",
                          "--epochs", "1", "--train-limit", "64", "--root", data_root)  # fmt: skip
    assert_clean_error(code, err, "already exists", "--name")
    assert digest(run) == before
    with pytest.raises(MnistlabError, match="already exists"):
        runs.create_run_dir(run.parent, "done")


def test_timestamped_names_never_collide(tmp_path):
    made = {runs.create_run_dir(tmp_path) for _ in range(3)}
    assert len(made) == 3 and all(p.is_dir() and not any(p.iterdir()) for p in made)


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_unwritable_runs_folder_is_one_clear_line(tmp_path, data_root, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    runs_dir = blocker / "runs" if where == "under-a-file" else blocker
    code, _, err = invoke(capsys, "train", "--runs-dir", runs_dir, "--epochs", "1",
                          "--train-limit", "64", "--threads", "1", "--root", data_root)  # fmt: skip
    assert_clean_error(code, err, "runs folder", str(blocker))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    assert blocker.read_text() == "a regular file"


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path: Path, marker: Path, how: str) -> Path:
    payload = {"fc1.weight": Exploit(marker)}
    if how == "zip":  # what torch.save writes today
        torch.save(payload, path)
    elif how == "legacy":  # torch's pre-1.6 format
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle named .pt
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
def test_crafted_weights_never_run_code(tmp_path, capsys, how):
    armed = crafted(tmp_path / "armed.pt", tmp_path / "armed-fired", how)
    # Proof the file is armed: unsafe loading runs it.
    if how == "pickle":
        pickle.loads(armed.read_bytes())
    else:
        torch.load(armed, weights_only=False)
    assert (tmp_path / "armed-fired").exists()

    marker = tmp_path / "fired"
    evil = crafted(tmp_path / "evil.pt", marker, how)
    code, _, err = invoke(capsys, "evaluate", evil)
    assert_clean_error(code, err, "refusing to load", str(evil))
    assert not marker.exists()


def test_crafted_weights_in_a_run_folder_are_refused(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    marker = tmp_path / "fired"
    crafted(run / "model.pt", marker, "zip")
    code, _, err = invoke(capsys, "evaluate", run)
    assert_clean_error(code, err, "refusing to load")
    assert not marker.exists()


def test_crafted_resume_checkpoint_is_refused(unfinished, tmp_path, data_root, capsys):
    marker = tmp_path / "fired"
    crafted(unfinished / "checkpoint.pt", marker, "zip")
    before = digest(unfinished)
    code, _, err = invoke(capsys, "train", "--resume", unfinished, "--root", data_root,
                          "--no-report")  # fmt: skip
    assert_clean_error(code, err, "refusing to load", "checkpoint.pt")
    assert not marker.exists()
    assert digest(unfinished) == before


def test_damaged_resume_checkpoint_is_one_clear_line(unfinished, data_root, capsys):
    checkpoint = torch.load(unfinished / "checkpoint.pt", weights_only=True)
    del checkpoint["optimizer"]
    torch.save(checkpoint, unfinished / "checkpoint.pt")
    code, _, err = invoke(capsys, "train", "--resume", unfinished, "--root", data_root)
    assert_clean_error(code, err, "checkpoint.pt", "not a usable mnistlab checkpoint")


def test_resume_checkpoint_of_another_architecture_is_refused(unfinished, data_root, capsys):
    checkpoint = torch.load(unfinished / "checkpoint.pt", weights_only=True)
    checkpoint["model"] = create_model("logreg").state_dict()
    torch.save(checkpoint, unfinished / "checkpoint.pt")
    code, _, err = invoke(capsys, "train", "--resume", unfinished, "--root", data_root)
    assert_clean_error(code, err, "another architecture", "logreg")


@pytest.mark.parametrize("failure", ["ENOSPC", "torch-writer"])
def test_a_disk_that_fills_mid_save_keeps_the_previous_checkpoint(
    tmp_path, data_root, capsys, monkeypatch, failure
):
    real_save = torch.save
    calls = []
    before_failure = {}

    def filling_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # epoch 2's checkpoint: epoch 1's is on disk
            before_failure["digest"] = digest(tmp_path / "full")["checkpoint.pt"]
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, "/dev/full")  # torch's own error for a full device
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_save)
    args = ["train", "--runs-dir", tmp_path, "--name", "full", "--epochs", "3",
            "--train-limit", "640", "--threads", "1", "--device", "cpu", "--root", data_root,
            "--no-report"]  # fmt: skip
    code, _, err = invoke(capsys, *args)
    run = tmp_path / "full"
    reason = "No space left on device" if failure == "ENOSPC" else "is the disk full?"
    assert_clean_error(code, err, reason, "checkpoint.pt", "epoch 1/3",
                       f"mnistlab train --resume {run}")  # fmt: skip
    assert len(calls) == 2
    # The previous checkpoint is byte for byte the one before the failure, and it loads.
    assert digest(run)["checkpoint.pt"] == before_failure["digest"]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 1
    assert len(runs.read_metrics(run)) == 1
    assert {p.name for p in run.iterdir()} == {"config.json", "environment.json",
                                               "metrics.jsonl", "steps.jsonl",
                                               "checkpoint.pt"}  # fmt: skip

    # Space freed: the run resumes and ends exactly where an unfailing run ends.
    monkeypatch.setattr(torch, "save", real_save)
    code, out, err = invoke(capsys, "train", "--resume", run, "--root", data_root, "--no-report",
                            "--json")  # fmt: skip
    assert code == 0, err
    code, _, err = invoke(capsys, *[a if a != "full" else "whole" for a in args])
    assert code == 0, err

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert strip(runs.read_metrics(run)) == strip(runs.read_metrics(tmp_path / "whole"))
    assert json.loads(out)["epochs"] == 3


# ---- mnistlab evaluate ------------------------------------------------------------------------


def test_evaluate_json_on_a_run(finished, capsys):
    run, summary = finished
    code, out, err = invoke(capsys, "evaluate", run, "--json")
    assert code == 0, err
    m = json.loads(out)
    assert {"accuracy", "loss", "per_class", "confusion_matrix"} <= set(m)
    assert m["accuracy"] == summary["test_acc"]  # a percentage, same weights, same images
    assert m["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (10, 10)
    assert cm.sum(1).tolist() == TEST_SUPPORTS
    assert 100.0 * np.trace(cm) / cm.sum() == pytest.approx(m["accuracy"])
    assert [r["label"] for r in m["per_class"]] == list(range(10))
    for r in m["per_class"]:
        c = r["label"]
        assert set(r) == {"label", "precision", "recall", "f1", "support"}
        assert r["support"] == TEST_SUPPORTS[c]
        assert r["recall"] == pytest.approx(cm[c, c] / cm[c].sum())
        assert r["precision"] == pytest.approx(cm[c, c] / cm[:, c].sum())
        assert r["f1"] == pytest.approx(2 * r["precision"] * r["recall"]
                                        / (r["precision"] + r["recall"]))  # fmt: skip
    macro, weighted = m["averages"]["macro"], m["averages"]["weighted"]
    assert macro["f1"] == pytest.approx(np.mean([r["f1"] for r in m["per_class"]]))
    assert weighted["recall"] == pytest.approx(m["accuracy"] / 100)
    off = cm - np.diag(np.diag(cm))
    top = m["most_confused"][0]
    assert off[top["true"], top["predicted"]] == off.max() == top["count"]


def test_evaluate_text_report(finished, capsys):
    code, out, _ = invoke(capsys, "evaluate", finished[0])
    assert code == 0
    for part in ("accuracy", "precision", "recall", "f1", "support", "macro avg",
                 "weighted avg", "confusion matrix", "most confused"):  # fmt: skip
        assert part in out
    assert f"{finished[1]['test_acc']:.2f}%" in out


def test_evaluate_val_and_train_splits_are_the_runs_own(finished, capsys):
    run, _ = finished
    last = runs.read_metrics(run)[-1]
    _, out, _ = invoke(capsys, "evaluate", run, "--split", "val", "--json")
    val = json.loads(out)
    assert val["count"] == 600 and val["split"] == "val"  # 20% of the run's 3,000 images
    assert val["accuracy"] == pytest.approx(last["val_acc"])
    assert val["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    _, out, _ = invoke(capsys, "evaluate", run, "--split", "train", "--json")
    assert json.loads(out)["count"] == 2400


def test_evaluate_a_bare_weights_file(finished, tmp_path, capsys):
    bare = tmp_path / "weights.pt"
    shutil.copy(finished[0] / "model.pt", bare)
    code, out, err = invoke(capsys, "evaluate", bare, "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["model"] == "mlp" and m["accuracy"] == finished[1]["test_acc"]
    code, _, err = invoke(capsys, "evaluate", bare, "--split", "val")
    assert_clean_error(code, err, "no validation split")


def test_evaluate_refuses_weights_of_another_architecture(finished, tmp_path, capsys):
    code, _, err = invoke(capsys, "evaluate", finished[0] / "model.pt", "--model", "cnn")
    assert_clean_error(code, err, "another architecture", "'mlp'")
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    torch.save(create_model("logreg").state_dict(), run / "model.pt")
    code, _, err = invoke(capsys, "evaluate", run)
    assert_clean_error(code, err, "another architecture", "'logreg'")
    stranger = tmp_path / "stranger.pt"
    torch.save({"w": torch.zeros(3, 3)}, stranger)
    code, _, err = invoke(capsys, "evaluate", stranger)
    assert_clean_error(code, err, "match none of mnistlab's models")


def test_evaluate_missing_source(tmp_path, capsys):
    code, _, err = invoke(capsys, "evaluate", tmp_path / "nothing-here", "--runs-dir", tmp_path)
    assert_clean_error(code, err, "nothing-here")


def test_step_log_appends_lines_and_a_resume_drops_unsaved_epochs(tmp_path):
    log = runs.StepLog(tmp_path)
    for epoch in (1, 2):
        for step in (10, 20):
            log({"epoch": epoch, "step": step, "steps": 20, "loss": 0.5, "acc": 90.0})
    log.close()
    seen = runs.read_steps(tmp_path)
    assert [(r["epoch"], r["step"]) for r in seen] == [(1, 10), (1, 20), (2, 10), (2, 20)]
    assert all(isinstance(r["time"], float) for r in seen)
    with open(tmp_path / runs.STEPS, "a") as f:
        f.write('{"epoch": 3, "st')  # a line torn by a kill
    assert len(runs.read_steps(tmp_path)) == 4
    again = runs.StepLog(tmp_path, keep_epochs=1)  # resuming after epoch 1
    again({"epoch": 2, "step": 10, "steps": 20, "loss": 0.4, "acc": 91.0})
    again.close()
    assert [(r["epoch"], r["step"], r["loss"]) for r in runs.read_steps(tmp_path)] == [
        (1, 10, 0.5), (1, 20, 0.5), (2, 10, 0.4)]
