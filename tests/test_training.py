"""The training library: train_epoch, evaluate, fit, optimizers, schedules, reproducibility."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnistlab import runs, training
from mnistlab.config import TrainConfig
from mnistlab.data import BatchLoader, load_mnist
from mnistlab.errors import MnistlabError
from mnistlab.experiment import train_run
from mnistlab.models import create_model
from mnistlab.optim import FusedAdam
from mnistlab.training import (
    FitState,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    select_device,
    train_epoch,
)

STEP_LINE = re.compile(r"^Step (\d+)/(\d+) - Loss: (\d+\.\d{3}) \| Acc: (\d+\.\d{2})%$")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist(data_root):
    return load_mnist(data_root, "train"), load_mnist(data_root, "test")


def loader(mnist, n: int, batch: int = 64, shuffle: bool = True, split: int = 0) -> BatchLoader:
    images, labels = mnist[split]
    return BatchLoader(images[:n], labels[:n], batch, shuffle=shuffle, seed=0)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def tiny_run(tmp_path, data_root, name: str, **overrides) -> dict:
    """A few-second train_run on the first training images; returns its summary and history."""
    values = {"epochs": 2, "train_limit": 640, "threads": 1, "device": "cpu", **overrides}
    log: list[str] = []
    summary = train_run(
        TrainConfig(**values), root=data_root, runs_dir=tmp_path, name=name, log=log.append
    )
    summary["history"] = runs.read_metrics(tmp_path / name)
    summary["log"] = log
    return summary


def test_train_epoch_logs_the_lab_lines_over_each_interval(mnist):
    torch.manual_seed(0)
    model = create_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lines: list[str] = []
    loss, acc = train_epoch(
        model, loader(mnist, 640), opt, nn.CrossEntropyLoss(), log_every=3, log=lines.append
    )
    parsed = [STEP_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(int(m[1]), int(m[2])) for m in parsed] == [(3, 10), (6, 10), (9, 10), (10, 10)]
    # Each line covers only its own interval: weighted by interval size they give the epoch's mean.
    sizes = [3 * 64, 3 * 64, 3 * 64, 64]
    mean_loss = sum(float(m[3]) * n for m, n in zip(parsed, sizes, strict=True)) / 640
    mean_acc = sum(float(m[4]) * n for m, n in zip(parsed, sizes, strict=True)) / 640
    assert mean_loss == pytest.approx(loss, abs=6e-4)
    assert mean_acc == pytest.approx(acc, abs=6e-3)
    assert float(parsed[0][3]) > float(parsed[-1][3])  # it learns within one epoch
    assert model.training


def test_evaluate_matches_a_direct_computation(mnist):
    torch.manual_seed(0)
    model = create_model("mlp")
    test = loader(mnist, 3000, batch=1000, shuffle=False, split=1)
    loss, acc = evaluate(model, test)
    with torch.no_grad():
        logits = model(torch.cat([x for x, _ in test]))
    assert loss == pytest.approx(float(F.cross_entropy(logits, test.y)), rel=1e-5)
    assert acc == pytest.approx(100.0 * float((logits.argmax(1) == test.y).float().mean()))
    assert not model.training


def test_fit_early_stop_restores_the_best_weights(mnist, monkeypatch):
    torch.manual_seed(0)
    model = create_model("mlp")
    train, test = loader(mnist, 320), loader(mnist, 1000, 1000, shuffle=False, split=1)
    val = loader(mnist, 500, 500, shuffle=False)
    scripted = iter([1.0, 0.5, 0.6, 0.7, 0.4])  # best at epoch 2, then two worse epochs
    real_evaluate = training.evaluate

    def fake_evaluate(m, data, loss_fn=None):
        return (next(scripted), 50.0) if data is val else real_evaluate(m, data, loss_fn)

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    snapshots = {}

    def remember(state: FitState) -> None:
        snapshots[state.epoch] = copy.deepcopy(model.state_dict())

    cfg = TrainConfig(epochs=5, val_split=0.1, early_stop=2)
    opt = build_optimizer(cfg, model.parameters())
    lines: list[str] = []
    state = fit(model, opt, train, test, cfg, val_loader=val, on_epoch_end=remember,
                log=lines.append)  # fmt: skip
    assert state.stopped_early and state.epoch == 4 and len(state.history) == 4
    assert (state.best_epoch, state.best_val_loss) == (2, 0.5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[2][key])
        assert torch.equal(state.best_state[key], snapshots[2][key])
    assert not torch.equal(snapshots[4]["fc1.weight"], snapshots[2]["fc1.weight"])
    assert any("Early stop" in line and "epoch 2" in line for line in lines)

    # A resumed run that had already stopped early trains no further.
    before = copy.deepcopy(model.state_dict())
    again = fit(model, opt, train, test, cfg, val_loader=val, state=state, log=lines.append)
    assert again.epoch == 4 and len(again.history) == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_optimizers_are_built_with_their_options():
    params = list(create_model("logreg").parameters())

    def build(**kw):
        return build_optimizer(TrainConfig(**kw).validate(), params)

    # Adam and AdamW are mnistlab's FusedAdam: torch's fused kernel without torch.optim's
    # machinery (a torch.optim.Optimizer all the same, so schedules drive it).
    assert type(build(optimizer="adam")) is FusedAdam
    adamw = build(optimizer="adamw", lr=0.01, weight_decay=0.05, schedule="onecycle")
    assert type(adamw) is FusedAdam and isinstance(adamw, torch.optim.Optimizer)
    assert adamw.param_groups[0]["decoupled_weight_decay"]
    assert adamw.param_groups[0]["weight_decay"] == 0.05 and adamw.param_groups[0]["lr"] == 0.01
    assert not build(optimizer="adam").param_groups[0]["decoupled_weight_decay"]
    sgd = build(optimizer="sgd", momentum=0.9, nesterov=True)
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"] is True
    rms = build(optimizer="rmsprop", momentum=0.5)
    assert type(rms) is torch.optim.RMSprop and rms.param_groups[0]["momentum"] == 0.5


def lrs(schedule: str, epochs: int = 3, steps: int = 4, **kw) -> list[float]:
    """The learning rate before each optimizer step of a run."""
    cfg = TrainConfig(schedule=schedule, epochs=epochs, lr=0.1, **kw).validate()
    opt = build_optimizer(cfg, create_model("logreg").parameters())
    sched = build_scheduler(cfg, opt, steps)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


def test_schedules_shape_the_learning_rate():
    assert build_scheduler(TrainConfig(), None, 10) is None
    assert lrs("none") == [0.1] * 12
    step = lrs("step", step_size=1, gamma=0.5)  # decays once per epoch of 4 steps
    assert step == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)
    cosine = lrs("cosine")
    assert cosine[0] == pytest.approx(0.1) and all(a > b for a, b in itertools.pairwise(cosine))
    assert cosine[-1] < 0.01
    one = lrs("onecycle", epochs=4, steps=10)
    peak = max(range(len(one)), key=one.__getitem__)
    assert one[0] < 0.1 / 10 and one[peak] == pytest.approx(0.1, rel=0.02)
    assert 5 <= peak <= 20 and one[-1] < one[0]  # warms up over ~30%, then anneals below start


def test_grad_clip_bounds_every_update(mnist):
    def update_norm(clip: float) -> float:
        torch.manual_seed(0)
        model = create_model("mlp")
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train_epoch(model, loader(mnist, 64), opt, nn.CrossEntropyLoss(), grad_clip=clip, log=None)
        deltas = [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before,
                                                             strict=True)]  # fmt: skip
        return float(torch.cat(deltas).norm())

    assert update_norm(0.0) > 0.1  # unclipped, one SGD step at lr 1 moves far
    assert update_norm(1e-3) == pytest.approx(1e-3, rel=1e-3)


def test_select_device():
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(MnistlabError, match="no CUDA device"):
            select_device("cuda")
    assert select_device("cpu") == torch.device("cpu")


def test_same_seed_same_metrics_and_weights(tmp_path, data_root):
    # mlp-dropout with a validation split: data order, split, init and dropout all draw randomness.
    kw = {"model": "mlp-dropout", "epochs": 2, "train_limit": 2000, "val_split": 0.2}
    a = tiny_run(tmp_path, data_root, "a", **kw)
    b = tiny_run(tmp_path, data_root, "b", **kw)
    c = tiny_run(tmp_path, data_root, "c", seed=1, **kw)
    assert len(a["history"]) == 2
    assert without_timing(a["history"]) == without_timing(b["history"])
    assert without_timing(a["history"]) != without_timing(c["history"])
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_label_smoothing_applies_to_training_loss_only(tmp_path, data_root):
    plain = tiny_run(tmp_path, data_root, "plain", epochs=1)
    smooth = tiny_run(tmp_path, data_root, "smooth", epochs=1, label_smoothing=0.2)
    # Smoothing puts a floor under the training loss; the test loss stays plain cross-entropy.
    assert smooth["history"][0]["train_loss"] > plain["history"][0]["train_loss"] + 0.1
    model = create_model("mlp")
    model.load_state_dict(torch.load(tmp_path / "smooth" / "model.pt", weights_only=True))
    images, labels = load_mnist(data_root, "test")
    test_loss, test_acc = evaluate(model, BatchLoader(images, labels, 1000))
    assert smooth["test_loss"] == pytest.approx(test_loss, rel=1e-6)
    assert smooth["test_acc"] == pytest.approx(test_acc)


COMBOS = [
    {"optimizer": "adam", "schedule": "onecycle", "lr": 0.003},
    {"optimizer": "adamw", "schedule": "cosine", "weight_decay": 0.01, "grad_clip": 1.0},
    {"optimizer": "sgd", "schedule": "step", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"optimizer": "rmsprop", "schedule": "none", "lr": 0.0005, "momentum": 0.5,
     "label_smoothing": 0.1, "model": "mlp-dropout"},  # dropout: the RNG state must resume too
    # FusedAdam and the written-out MLP step (the lab's default path), with smoothing.
    {"optimizer": "adamw", "schedule": "none", "weight_decay": 0.01, "label_smoothing": 0.1},
]  # fmt: skip


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c['optimizer']}-{c['schedule']}")
def test_optimizer_and_schedule_state_survive_a_resume(tmp_path, data_root, monkeypatch, combo):
    kw = {"epochs": 3, "train_limit": 640, **combo}
    whole = tiny_run(tmp_path, data_root, "whole", **kw)
    assert all(math.isfinite(r["train_loss"]) for r in whole["history"])
    assert whole["test_acc"] > 50.0  # learns something in 30 small steps
    if combo["schedule"] != "none":
        assert len({r["lr"] for r in whole["history"]}) == 3  # the schedule moved the rate

    # Interrupt right after epoch 1's checkpoint is on disk, as a Ctrl-C would.
    real_write = runs.write_metrics

    def interrupt(run_dir, history):
        real_write(run_dir, history)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "write_metrics", interrupt)
    with pytest.raises(MnistlabError) as e:
        tiny_run(tmp_path, data_root, "cut", **kw)
    assert "saved after epoch 1/3" in str(e.value)
    assert f"mnistlab train --resume {tmp_path / 'cut'}" in str(e.value)
    monkeypatch.setattr(runs, "write_metrics", real_write)

    resumed = train_run(resume=tmp_path / "cut", root=data_root, log=lambda line: None)
    assert resumed["epochs"] == 3
    assert without_timing(runs.read_metrics(tmp_path / "cut")) == without_timing(whole["history"])
    assert resumed["test_acc"] == whole["test_acc"]


def test_a_resume_keeps_the_thread_count_the_run_started_with(tmp_path, data_root, monkeypatch):
    from mnistlab import hardware

    # CPU results depend on the thread count, and automatic threads follow the machine's load.
    kw = {"model": "mlp", "epochs": 2, "train_limit": 640, "threads": 0}
    machine = hardware.describe()
    monkeypatch.setattr(hardware, "SMALL_STEP_MACS", 0)  # the mlp gets one thread per idle core
    try:
        monkeypatch.setattr(hardware, "describe", lambda: dataclasses.replace(
            machine, cores=2, idle_cores=2, torch_threads=2))
        whole = tiny_run(tmp_path, data_root, "whole", **kw)
        real_write = runs.write_metrics

        def interrupt(run_dir, history):
            real_write(run_dir, history)
            raise KeyboardInterrupt

        monkeypatch.setattr(runs, "write_metrics", interrupt)
        with pytest.raises(MnistlabError, match="saved after epoch 1/2"):
            tiny_run(tmp_path, data_root, "cut", **kw)
        monkeypatch.setattr(runs, "write_metrics", real_write)
        monkeypatch.setattr(hardware, "describe", lambda: dataclasses.replace(
            machine, cores=2, idle_cores=1, torch_threads=2))  # the machine got busier
        train_run(resume=tmp_path / "cut", root=data_root, log=lambda line: None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert without_timing(runs.read_metrics(tmp_path / "cut")) == without_timing(whole["history"])
