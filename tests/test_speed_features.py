"""Speed features of training: fused optimizers, automatic threads, bf16 autocast, channels-last,
the fastcnn model and the fast/best recipes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mnistlab import hardware
from mnistlab.config import TrainConfig, resolve_config
from mnistlab.data import BatchLoader, load_mnist
from mnistlab.errors import MnistlabError
from mnistlab.experiment import train_run
from mnistlab.hardware import Hardware, decide, idle_cores
from mnistlab.models import create_model
from mnistlab.training import build_optimizer, evaluate, fit, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist(data_root):
    return load_mnist(data_root, "train"), load_mnist(data_root, "test")


@pytest.mark.parametrize(
    ("optimizer", "fused"), [("adam", True), ("adamw", True), ("sgd", True), ("rmsprop", False)]
)
def test_optimizers_are_fused_where_torch_has_a_fused_kernel(optimizer, fused):
    model = create_model("mlp")
    opt = build_optimizer(TrainConfig(optimizer=optimizer), model.parameters())
    group = opt.param_groups[0]
    assert bool(group.get("fused")) is fused
    assert bool(group.get("foreach")) is not fused


def test_fused_adam_takes_the_same_steps_as_plain_adam():
    torch.manual_seed(0)
    a = create_model("mlp")
    b = create_model("mlp")
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(TrainConfig(), a.parameters())
    plain = torch.optim.Adam(b.parameters(), lr=0.001, foreach=False)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for model, opt in ((a, fused), (b, plain)):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def fake_stat(tmp_path, running: int):
    path = tmp_path / "stat"
    path.write_text(f"cpu  1 2 3 4\nprocs_running {running}\nprocs_blocked 0\n")
    return str(path)


@pytest.mark.parametrize(("running", "idle"), [(1, 2), (2, 1), (3, 1), (9, 1)])
def test_idle_cores_counts_the_other_running_processes(tmp_path, running, idle):
    stat = fake_stat(tmp_path, running)  # procs_running counts this process too
    assert idle_cores(samples=3, interval=0, stat=stat, cores=2) == idle


def test_idle_cores_without_proc_stat_is_every_core(tmp_path):
    assert idle_cores(samples=1, stat=str(tmp_path / "missing"), cores=3) == 3


def auto_threads(cfg: TrainConfig, idle: int = 2, torch_threads: int = 2, cores: int = 2) -> int:
    hw = Hardware(os_isa=("avx2",), cores=cores, idle_cores=idle, torch_threads=torch_threads)
    return decide(hw, cfg).threads.value


def test_auto_threads_stay_within_torch_default_and_idle_cores():
    big = resolve_config("fast")
    assert auto_threads(big, idle=64, torch_threads=2, cores=64) == 2
    assert auto_threads(big, idle=1) == 1
    assert auto_threads(big, idle=2) == 2


def test_bf16_autocast_trains_float32_weights_to_the_same_place(mnist):
    (images, labels), _ = mnist
    results = []
    for autocast in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = create_model("mlp")
        opt = build_optimizer(TrainConfig(), model.parameters())
        loader = BatchLoader(images[:2000], labels[:2000], 64, shuffle=True, seed=0)
        loss, acc = train_epoch(model, loader, opt, nn.CrossEntropyLoss(), log=None,
                                autocast=autocast)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        results.append((loss, acc))
    (loss32, acc32), (loss16, acc16) = results
    assert loss16 == pytest.approx(loss32, abs=0.05)
    assert acc16 == pytest.approx(acc32, abs=2.0)
    assert acc16 > 60.0  # it learned: 10% is chance


def test_channels_last_changes_the_layout_not_the_answers():
    torch.manual_seed(0)
    model = create_model("fastcnn").eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x)
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fastcnn_ignores_the_border_it_crops():
    torch.manual_seed(0)
    model = create_model("fastcnn").eval()
    crop = model.crop
    assert crop > 0
    x = torch.randn(4, 1, 28, 28)
    y = x.clone()
    y[:, :, :crop] = 5.0
    y[:, :, :, -crop:] = -5.0
    with torch.no_grad():
        torch.testing.assert_close(model(y), model(x))
        assert not torch.allclose(model(x), model(torch.randn(4, 1, 28, 28)))


def test_unknown_autocast_is_refused():
    with pytest.raises(MnistlabError, match="unknown autocast 'fp8'; choose one of: auto, none"):
        resolve_config("lab", autocast="fp8")


@pytest.mark.parametrize("recipe", ["fast", "best"])
def test_speed_recipes_resolve_and_validate(recipe):
    cfg = resolve_config(recipe)
    assert cfg.recipe == recipe
    model = create_model(cfg.model, **cfg.model_args)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert resolve_config(recipe, seed=3, epochs=1).seed == 3  # flags still win


def test_fast_recipe_runs_end_to_end_with_its_settings(tmp_path, data_root, mnist):
    cfg = resolve_config("fast", train_limit=4000, epochs=1, threads=1)
    summary = train_run(cfg, root=data_root, runs_dir=tmp_path, name="fast", log=lambda _: None)
    run = tmp_path / "fast"
    saved = json.loads((run / "config.json").read_text())
    assert saved["autocast"] == "auto" and saved["channels_last"] is None  # decided per machine
    assert saved["model"] == "fastcnn"
    env = json.loads((run / "environment.json").read_text())
    assert env["threads"] == 1 and env["execution"]["threads"]["value"] == 1
    assert summary["test_acc"] > 85.0  # 4,000 images, one epoch
    # The saved weights are ordinary float32 and reproduce the reported accuracy.
    model = create_model("fastcnn")
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    _, (test_images, test_labels) = mnist
    _, acc = evaluate(model, BatchLoader(test_images, test_labels, 1000))
    assert acc == pytest.approx(summary["test_acc"], abs=0.01)


def test_automatic_threads_are_recorded(tmp_path, data_root):
    cfg = TrainConfig(train_limit=640, epochs=1, threads=0, device="cpu")
    train_run(cfg, root=data_root, runs_dir=tmp_path, name="auto", log=lambda _: None)
    env = json.loads((tmp_path / "auto" / "environment.json").read_text())
    assert 1 <= env["threads"] <= hardware.DEFAULT_THREADS
    assert env["execution"]["threads"]["value"] == env["threads"]


def ema_fit(mnist, stop_after: int | None = None, resume_from=None):
    """fit() of the mlp with EMA on 640 images for 2 epochs; optionally stop or resume."""
    (images, labels), (test_images, test_labels) = mnist
    cfg = TrainConfig(epochs=2, ema=0.9, log_every=1000)
    torch.manual_seed(0)
    model = create_model("mlp")
    opt = build_optimizer(cfg, model.parameters())
    state = None
    if resume_from is not None:
        weights, opt_state, state = resume_from
        model.load_state_dict(weights)
        opt.load_state_dict(opt_state)
    train = BatchLoader(images[:640], labels[:640], 64, shuffle=True, seed=0)
    test = BatchLoader(test_images[:1000], test_labels[:1000], 1000)
    saved = []

    class Stop(Exception):
        pass

    def on_epoch_end(s):
        saved.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
                      copy.deepcopy(s)))
        if stop_after is not None and s.epoch == stop_after:
            raise Stop

    try:
        state = fit(model, opt, train, test, cfg, state=state,
                             on_epoch_end=on_epoch_end, log=lambda _: None)
    except Stop:
        return None, None, saved[-1]
    return model, state, saved[-1]


def test_ema_weights_are_evaluated_kept_and_resumed_exactly(mnist):
    model, state, (raw_weights, _, _) = ema_fit(mnist)
    # The model ends with the average, which differs from the raw weights of the last step...
    assert not torch.allclose(model.fc1.weight, raw_weights["fc1.weight"])
    ema = {k.removeprefix("module."): v for k, v in state.ema_state.items()}
    torch.testing.assert_close(model.fc1.weight, ema["fc1.weight"])
    # ...and the reported accuracy is the average's.
    (_, _), (test_images, test_labels) = mnist
    _, acc = evaluate(model, BatchLoader(test_images[:1000], test_labels[:1000], 1000))
    assert acc == pytest.approx(state.history[-1]["test_acc"])
    # Stopping after epoch 1 and resuming from its saved state gives the same final average.
    _, _, checkpoint = ema_fit(mnist, stop_after=1)
    resumed, resumed_state, _ = ema_fit(mnist, resume_from=checkpoint)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    assert resumed_state.history[-1]["test_acc"] == state.history[-1]["test_acc"]


def test_bad_ema_decay_is_refused():
    with pytest.raises(MnistlabError, match=r"EMA decay must be in \[0, 1\)"):
        resolve_config("lab", ema=1.0)


@pytest.mark.parametrize(
    ("name", "macs"),
    [
        ("logreg", 784 * 10),
        ("mlp", 784 * 128 + 128 * 10),
        # conv1: 26×26 outputs × 32 channels × 9; conv2: 24×24 × 64 × 32·9; then 9216·128 + 128·10
        ("cnn", 26 * 26 * 32 * 9 + 24 * 24 * 64 * 288 + 9216 * 128 + 128 * 10),
    ],
)
def test_forward_macs_counts_conv_and_linear_layers(name, macs):
    model = create_model(name).train()
    assert hardware.forward_macs(model) == macs
    assert hardware.forward_macs(model, (4, 1, 28, 28)) == 4 * macs
    assert model.training  # the count leaves the mode as it was


def test_small_models_train_on_one_thread():
    state = torch.get_rng_state()
    assert auto_threads(resolve_config("lab")) == 1  # mlp, batch 64: 6.5M multiply-adds a step
    assert auto_threads(resolve_config("fast")) == 2  # fastcnn, batch 128: 178M
    assert auto_threads(resolve_config("lab", batch_size=1024)) == 2
    assert torch.equal(torch.get_rng_state(), state)  # counting did not move the seed
