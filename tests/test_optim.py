"""mnistlab.optim.FusedAdam: torch's fused Adam/AdamW updates, torch's state layout, no dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mnistlab.models import create_model
from mnistlab.optim import FusedAdam


def _grads(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _twins(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    a = create_model("mlp")
    b = create_model("mlp")
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "onecycle"])
@pytest.mark.parametrize("adamw", [False, True], ids=["adam", "adamw"])
def test_updates_are_bit_identical_to_torch_fused_adam(adamw, schedule):
    ours_model, torch_model = _twins()
    kw = {"lr": 0.003, "weight_decay": 0.01}
    ours = FusedAdam(ours_model.parameters(), decoupled_weight_decay=adamw, **kw)
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    theirs = cls(torch_model.parameters(), fused=True, **kw)
    pairs = [(ours_model, ours, None), (torch_model, theirs, None)]
    if schedule:  # torch's schedulers drive it: lr and beta1 move every step
        pairs = [(m, o, torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=25))
                 for m, o, _ in pairs]  # fmt: skip
    for step in range(25):
        for model, opt, sched in pairs:
            _grads(model, step)
            opt.step()
            if sched is not None:
                sched.step()
    if schedule:
        assert ours.param_groups[0]["betas"] == theirs.param_groups[0]["betas"] != (0.9, 0.999)
    for p, q in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(ours_model.fc1.weight, _twins()[0].fc1.weight)  # it did move
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd["param_groups"] == theirs_sd["param_groups"]
    for i, s in theirs_sd["state"].items():
        for key, value in s.items():
            assert torch.equal(ours_sd["state"][i][key], value), key


def test_state_dicts_move_between_fused_adam_and_torch_adam():
    a, b = _twins()
    ours = FusedAdam(a.parameters(), lr=0.01)
    for step in range(5):
        _grads(a, step)
        ours.step()
    # Ours → torch: continue in torch.optim.Adam; torch → ours: continue in FusedAdam.
    b.load_state_dict(a.state_dict())
    theirs = torch.optim.Adam(b.parameters(), lr=0.01, fused=True)
    theirs.load_state_dict(ours.state_dict())
    back = FusedAdam(a.parameters(), lr=0.5)  # lr comes from the state dict
    back.load_state_dict(theirs.state_dict())
    assert back.param_groups[0]["lr"] == 0.01
    for step in range(5, 10):
        for model, opt in ((a, back), (b, theirs)):
            _grads(model, step)
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_params_without_gradients_are_left_alone_and_zero_grad_clears():
    model = create_model("mlp")
    opt = FusedAdam(model.parameters())
    before = model.fc2.weight.detach().clone()
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    opt.step()
    assert torch.equal(model.fc2.weight, before) and model.fc2.weight not in opt.state
    assert float(opt.state[model.fc1.weight]["step"]) == 1.0
    model.fc2.weight.grad = torch.ones_like(model.fc2.weight)  # the set of params changes
    opt.step()
    assert not torch.equal(model.fc2.weight, before)
    assert float(opt.state[model.fc1.weight]["step"]) == 2.0
    opt.zero_grad()
    assert model.fc1.weight.grad is None
    opt.step()  # nothing to do
    assert float(opt.state[model.fc1.weight]["step"]) == 2.0


def test_bad_construction_and_mismatched_state_are_refused():
    with pytest.raises(ValueError, match="empty"):
        FusedAdam([])
    with pytest.raises(ValueError, match="floating-point"):
        FusedAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)])
    opt = FusedAdam(create_model("logreg").parameters())
    other = FusedAdam(create_model("mlp").parameters())
    with pytest.raises(ValueError, match="does not match"):
        opt.load_state_dict(other.state_dict())
    amsgrad = torch.optim.Adam(create_model("logreg").parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(amsgrad.state_dict())
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(NotImplementedError, match="hooks"):
        opt.register_step_pre_hook(lambda *a: None)


@pytest.mark.parametrize("recipe", ["lab", "fast"])
def test_adam_runs_never_import_torch_dynamo(data_root, tmp_path, recipe):
    # Building a torch.optim optimizer imports torch._dynamo (1.2 s); Adam runs, with or without
    # a schedule (fast: AdamW and one-cycle), avoid it.
    code = (
        "import sys\n"
        "from mnistlab.config import resolve_config\n"
        "from mnistlab.experiment import train_run\n"
        "cfg = resolve_config(sys.argv[3], epochs=1, train_limit=640, threads=1)\n"
        "s = train_run(cfg, root=sys.argv[1], runs_dir=sys.argv[2], log=lambda line: None)\n"
        "print(s['test_acc'] > 20, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(data_root), str(tmp_path), recipe],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
