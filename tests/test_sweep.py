"""`mnistlab sweep` end to end on real storage: a worker killed mid-trial (SQLite and a real
PostgreSQL server), pruning, Ctrl-C and resume, validation only, status/report/best, and bad
input as one line with nothing half-created."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from PIL import Image

from mnistlab import data as data_module
from mnistlab import runs

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = pytest.mark.usefixtures("one_thread")

KILL_SPACE = """
[fixed]
epochs = 3
train_limit = 6000
threads = 1
[search]
lr = { low = 1e-4, high = 1e-2, log = true }
[sweep]
trials = 3
sampler = "random"
pruner = "none"
"""


def load(url: str, name: str):
    # SQLAlchemy 2.1 gives bare postgresql:// URLs psycopg 3; mnistlab installs psycopg2.
    url = url.replace("postgresql://", "postgresql+psycopg2://")
    return optuna.load_study(study_name=name, storage=url)


def sweep_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "mnistlab", "sweep", *map(str, args)]


def kill_a_worker_mid_trial(tmp_path: Path, url: str, storage: list[str]) -> dict:
    """Run a 3-trial study on two workers, SIGKILL the worker of the first trial caught with
    a saved epoch and one under way, let the other finish; what happened."""
    space = tmp_path / "space.toml"
    space.write_text(KILL_SPACE)
    runs_dir = tmp_path / "runs"
    proc = subprocess.Popen(
        sweep_cmd("kills", "--space", space, "--workers", 2, "--heartbeat", 1,
                  "--no-trial-reports", "--runs-dir", runs_dir, *storage),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed = study = None
    deadline = time.monotonic() + 120
    try:
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
            if study is None:
                try:  # one storage for the whole watch: opening one costs a schema check
                    study = load(url, "kills")
                except Exception:  # the study is not made yet
                    time.sleep(0.2)
                    continue
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if "worker" not in t.user_attrs:
                    continue
                saved = runs.read_metrics(runs_dir / "kills" / f"trial-{t.number}")
                if 1 <= len(saved) < 3:  # a saved epoch, and one under way
                    os.kill(int(t.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
                    killed = (t.number, int(t.user_attrs["worker"].rsplit(":", 1)[1]))
                    epochs_saved = saved
                    break
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no trial reached a saved epoch to kill it in"
    return {"proc": proc, "out": out, "err": err, "killed": killed, "saved": epochs_saved,
            "study": load(url, "kills"), "folder": runs_dir / "kills"}  # fmt: skip


def assert_every_trial_accounted_for(r: dict) -> None:
    proc, study, (number, pid) = r["proc"], r["study"], r["killed"]
    assert proc.returncode == 0, r["err"]
    assert "Traceback" not in r["err"], r["err"]
    assert f"(pid {pid}) was killed by SIGKILL; the others retry its trial" in r["out"]
    trials = study.get_trials(deepcopy=False)
    states = {t.number: t.state.name for t in trials}
    failed = [t for t in trials if t.state.name == "FAIL"]
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    # The killed trial is failed (its heartbeat stopped) and retried exactly once.
    assert [t.number for t in failed] == [number], states
    assert len(retries) == 1 and retries[0].system_attrs["retry_history"] == [number]
    retry = retries[0]
    assert retry.state.name == "COMPLETE" and retry.params == failed[0].params
    # No trial lost: the budget of 3 trials, each complete; nothing left running or waiting.
    fresh = [t for t in trials if "failed_trial" not in t.system_attrs]
    assert len(fresh) == 3 and len(trials) == 4
    assert all(s in ("COMPLETE", "FAIL") for s in states.values()), states
    # None run twice: the retry continued from the killed trial's saved epoch instead of
    # training it again (its first record is the killed trial's, timing included).
    assert retry.user_attrs["continues"] == number
    retry_history = runs.read_metrics(r["folder"] / f"trial-{retry.number}")
    assert retry_history[: len(r["saved"])] == r["saved"]
    assert [rec["epoch"] for rec in retry_history] == [1, 2, 3]
    assert retry.intermediate_values == {rec["epoch"]: rec["val_acc"] for rec in retry_history}
    # Every finished trial is a complete run folder; the killed one stays incomplete.
    for t in trials:
        folder = r["folder"] / f"trial-{t.number}"
        assert runs.is_complete(folder) == (t.state.name == "COMPLETE"), t.number
        if t.state.name == "COMPLETE":
            assert (folder / "model.pt").is_file()
            assert t.value == runs.read_metrics(folder)[-1]["val_acc"]
    assert not (r["folder"] / f"trial-{number}" / runs.SUMMARY).exists()


@pytest.mark.slow
def test_sqlite_study_survives_a_worker_killed_mid_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs' / 'kills' / 'study.db'}"
    result = kill_a_worker_mid_trial(tmp_path, url, [])
    assert_every_trial_accounted_for(result)
    assert json.loads((tmp_path / "runs" / "kills" / "sweep.json").read_text())["storage"] == url


@pytest.mark.slow
def test_postgres_study_survives_a_worker_killed_mid_trial(tmp_path, postgres):
    url = postgres.new_database()
    result = kill_a_worker_mid_trial(tmp_path, url, ["--storage", url])
    assert_every_trial_accounted_for(result)
    assert not (tmp_path / "runs" / "kills" / "study.db").exists()  # the study is in PostgreSQL
    # status finds the study from sweep.json, which holds the URL (no password here).
    status = subprocess.run(sweep_cmd("status", "kills", "--runs-dir", tmp_path / "runs"),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "4 trials: 3 complete, 0 pruned, 1 failed (1 retried); budget 3 (done)" in status.stdout
    assert f"postgresql://postgres@127.0.0.1:{postgres.port}/" in status.stdout


# ---- one sweep, in this process: pruning, validation only, status, report, best ---------------

PRUNE_SPACE = """
[fixed]
epochs = 2
train_limit = 3000
threads = 1
[search]
lr = { choices = [0.003, 1e-7] }    # 1e-7: the weights barely move, hopeless
[sweep]
sampler = "random"
seed = 6          # draws good, good, hopeless, good, hopeless, hopeless
trials = 6
startup_trials = 1
"""


@pytest.fixture(scope="module")
def pruned_sweep(tmp_path_factory, data_root):
    """A 6-trial sweep with a hopeless region, run in this process with every split that
    mnistlab.data loads recorded."""
    from mnistlab.cli import main

    tmp = tmp_path_factory.mktemp("prune")
    (tmp / "space.toml").write_text(PRUNE_SPACE)
    loads: list[str] = []
    original = data_module.load_split

    def spy(root=None, split="train", *args, **kwargs):
        loads.append(split)
        return original(root, split, *args, **kwargs)

    data_module.load_split = spy
    try:
        with pytest.raises(SystemExit) as done:
            main(["sweep", "prune", "--space", str(tmp / "space.toml"), "--runs-dir",
                  str(tmp / "runs"), "--no-trial-reports", "--root", str(data_root)])
        sweep_loads = list(loads)
        loads.clear()
        with pytest.raises(SystemExit) as reported:
            main(["sweep", "report", "prune", "--runs-dir", str(tmp / "runs"),
                  "--root", str(data_root)])  # fmt: skip
        report_loads = list(loads)
    finally:
        data_module.load_split = original
    assert done.value.code == 0 and reported.value.code == 0
    url = f"sqlite:///{(tmp / 'runs' / 'prune' / 'study.db').resolve()}"
    return {"tmp": tmp, "folder": tmp / "runs" / "prune", "study": load(url, "prune"),
            "sweep_loads": sweep_loads, "report_loads": report_loads}  # fmt: skip


def test_pruning_stops_hopeless_trials_after_one_epoch(pruned_sweep):
    trials = pruned_sweep["study"].get_trials(deepcopy=False)
    assert [t.params["lr"] for t in trials] == [0.003, 0.003, 1e-7, 0.003, 1e-7, 1e-7]
    # Once a good trial is complete (one startup trial), the median at epoch 1 is a good
    # trial's value (equal good trials tie, and ties are not pruned).
    for t in trials:
        history = runs.read_metrics(pruned_sweep["folder"] / f"trial-{t.number}")
        summary = runs.read_json(pruned_sweep["folder"] / f"trial-{t.number}" / runs.SUMMARY)
        if t.params["lr"] == 0.003:
            assert t.state.name == "COMPLETE" and len(history) == 2, t.number
            assert summary["stop_reason"] is None
        else:  # hopeless once a good trial has finished: stopped after its first epoch
            assert t.state.name == "PRUNED", (t.number, t.intermediate_values)
            assert len(history) == 1 and list(t.intermediate_values) == [1]
            assert summary["epochs"] == 1 and summary["stopped_early"]
            assert summary["stop_reason"] == "pruned by the median pruner"
            assert history[0]["val_acc"] < 30


def test_trials_choose_on_validation_and_the_report_uses_the_test_set_once(pruned_sweep):
    assert "test" not in pruned_sweep["sweep_loads"]  # no trial ever loaded the test set
    for t in pruned_sweep["study"].get_trials(deepcopy=False):
        summary = runs.read_json(pruned_sweep["folder"] / f"trial-{t.number}" / runs.SUMMARY)
        assert summary["test_acc"] is None and summary["best_val_acc"] is not None
        config = runs.read_json(pruned_sweep["folder"] / f"trial-{t.number}" / runs.CONFIG)
        assert config["eval_test"] is False and round(3000 * config["val_split"]) == 500
    assert pruned_sweep["report_loads"].count("test") == 1  # the best trial, once
    study = pruned_sweep["study"]
    [record] = study.user_attrs["test_evaluations"]
    assert record["trial"] == study.best_trial.number and 80 < record["test_acc"] < 100
    html = (pruned_sweep["folder"] / "report.html").read_text()
    for fig in ("history", "importances", "parallel", "intermediate", "best_curves"):
        assert f'id="fig-{fig}"' in html or fig == "importances", fig  # importances: 1 param
        assert fig == "importances" or (pruned_sweep["folder"] / "report" / f"{fig}.png"
                                        ).is_file()  # fmt: skip
    assert f'<div class="value" id="test-acc">{record["test_acc"]:.2f}%</div>' in html
    assert 'id="status">complete' in html and "http" not in html.split("<footer>")[0]
    assert html.count('<tr class="pruned">') == len(study.get_trials(states=(
        optuna.trial.TrialState.PRUNED,)))  # fmt: skip


def test_status_best_and_train_with_the_winning_config(pruned_sweep, cli, tmp_path, data_root):
    runs_dir = pruned_sweep["tmp"] / "runs"
    status = cli("sweep", "status", "prune", "--runs-dir", runs_dir)
    assert status.returncode == 0, status.stderr
    study = pruned_sweep["study"]
    best = study.best_trial
    assert f"best: trial {best.number}, val acc {best.value:.2f}% (lr=0.003)" in status.stdout
    lines = [line.split() for line in status.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(line[0]) for line in lines] == list(range(6))
    assert {line[1] for line in lines} <= {"complete", "pruned"}
    as_json = json.loads(cli("sweep", "status", "prune", "--runs-dir", runs_dir, "--json").stdout)
    assert as_json["done"] and as_json["counts"]["fresh"] == 6

    out = tmp_path / "best.json"
    made = cli("sweep", "best", "prune", "--runs-dir", runs_dir, "--config", out)
    assert made.returncode == 0, made.stderr
    config = json.loads(out.read_text())
    assert config["lr"] == 0.003 and config["eval_test"] is True and config["epochs"] == 2
    again = cli("sweep", "best", "prune", "--runs-dir", runs_dir, "--config", out)
    assert again.returncode == 1 and "--force" in again.stderr
    trained = cli("train", "--config", out, "--epochs", "1", "--runs-dir", tmp_path / "runs",
                  "--name", "final", "--no-report", "--json", "--root", data_root)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["epochs"] == 1 and summary["test_acc"] > 80  # --epochs beat the file's 2
    saved = runs.read_json(tmp_path / "runs" / "final" / runs.CONFIG)
    assert {k: v for k, v in saved.items() if k != "epochs"} == {
        k: v for k, v in config.items() if k != "epochs"}  # fmt: skip


def test_a_trial_is_a_normal_run(pruned_sweep, cli, tmp_path, data_root):
    folder = pruned_sweep["folder"]
    best = pruned_sweep["study"].best_trial.number
    listed = cli("runs", "--runs-dir", folder, "--json")
    assert listed.returncode == 0
    assert sorted(r["name"] for r in json.loads(listed.stdout)) == [f"trial-{n}" for n in range(6)]
    trial = folder / f"trial-{best}"
    assert cli("evaluate", trial, "--root", data_root).returncode == 0
    images, _ = data_module.load_mnist(data_root, "test")
    Image.fromarray(images[0].numpy()).save(tmp_path / "digit.png")
    predicted = cli("predict", "--model", trial, tmp_path / "digit.png", "--json")
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[0]["label"] in range(10)
    report = cli("report", trial, "--out", tmp_path / "trial.html", "--root", data_root)
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "trial.html").read_text()
    assert "500 validation images" in html and "kept the test set out" in html


# ---- Ctrl-C -----------------------------------------------------------------------------------

INTERRUPT_SPACE = """
[fixed]
epochs = 2
train_limit = 9000
threads = 1
[search]
lr = { low = 1e-3, high = 3e-3 }
[sweep]
trials = 2
pruner = "none"
"""


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_continues(tmp_path):
    (tmp_path / "space.toml").write_text(INTERRUPT_SPACE)
    cmd = sweep_cmd("stop", "--space", tmp_path / "space.toml", "--runs-dir", tmp_path / "runs",
                    "--no-trial-reports", "--heartbeat", 1)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "runs" / "stop" / "trial-0"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if (folder / "checkpoint.pt").is_file():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == (
        "mnistlab: error: interrupted; sweep stop is saved: rerun `mnistlab sweep stop` to "
        "continue it")
    assert "Traceback" not in err
    url = f"sqlite:///{tmp_path / 'runs' / 'stop' / 'study.db'}"
    states = [t.state.name for t in load(url, "stop").get_trials(deepcopy=False)]
    assert states == ["FAIL", "WAITING"]  # the interrupted trial, queued to continue
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "trial 1: lr=" in again.stdout and "(continuing trial 0 after epoch 1)" in again.stdout
    trials = load(url, "stop").get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == trials[0].params


# ---- bad input: one line, nothing made ------------------------------------------------------


def assert_one_line(proc, *fragments: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnistlab: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(("space", "args", "fragments"), [
    ("[search]\nlrr = { low = 1e-4, high = 1e-2 }\n", [], ["unknown key 'lrr'"]),
    ("[search]\nlr = { low = 1e-2, high = 1e-3 }\n", [], ["empty range"]),
    ("[search]\nbatch_size = { low = 'a', high = 64 }\n", [], ["low must be a number"]),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n", ["--workers", "0"],
     ["--workers must be at least 1, got 0"]),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n", ["--storage", "postgresql://postgres@"
     "127.0.0.1:9/nowhere"], ["cannot open the study database postgresql://postgres@127.0.0.1:9"
                              "/nowhere"]),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n", ["--storage", "nonsense"],
     ["cannot open the study database"]),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n", ["--sampler", "grid"],
     ["--sampler grid needs choices or stepped ranges"]),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n", ["--trials", "0"], ["--trials must be"]),
])  # fmt: skip
def test_bad_input_is_one_line_and_makes_nothing(cli, tmp_path, space, args, fragments):
    (tmp_path / "space.toml").write_text(space)
    proc = cli("sweep", "bad", "--space", tmp_path / "space.toml", "--runs-dir",
               tmp_path / "runs", *args)
    assert_one_line(proc, *fragments)
    assert not (tmp_path / "runs" / "bad").exists()


def test_sweep_commands_refuse_what_is_not_there(cli, tmp_path):
    assert_one_line(cli("sweep", "status", "none", "--runs-dir", tmp_path), "no sweep 'none'")
    assert_one_line(cli("sweep", "new", "--runs-dir", tmp_path / "runs"),
                    "sweep 'new' is new: give its search space with --space FILE")
    assert not (tmp_path / "runs" / "new").exists()
    assert_one_line(cli("sweep", "x", "--space", tmp_path / "missing.toml"), "no such file")
    assert_one_line(cli("sweep", "a/b", "--space", "lab-mlp"), "bad sweep name")
    help_text = cli("sweep", "--help").stdout
    assert "status|report|best NAME" in help_text and "NAME --space SPACE.toml" in help_text
