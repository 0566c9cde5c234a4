"""mnistlab.mlpstep: the written-out MLP step agrees with autograd and trains like it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mnistlab.data import BatchLoader, load_mnist
from mnistlab.mlpstep import MLPStep, linear_stack
from mnistlab.models import create_model
from mnistlab.optim import FusedAdam
from mnistlab.training import evaluate, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("name", "args"), [("mlp", {}), ("logreg", {}),
                                           ("mlp", {"hidden": 96, "depth": 3})])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("batch", [64, 37])
def test_loss_logits_and_gradients_match_autograd(name, args, smoothing, batch):
    torch.manual_seed(batch)
    model = create_model(name, **args)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    expected_logits = model(x)
    expected_loss = loss_fn(expected_logits, y)
    expected_loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():  # stale values the step must overwrite, not add to
        p.grad = torch.full_like(p, float("nan"))
    step = MLPStep.for_model(model, loss_fn)
    assert step is not None
    loss, logits = step(x, y)
    assert not loss.requires_grad and not logits.requires_grad
    torch.testing.assert_close(logits, expected_logits.detach(), rtol=0, atol=0)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-6, atol=1e-7)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_only_plain_mlps_under_plain_cross_entropy_take_the_step():
    ce = nn.CrossEntropyLoss()
    assert [m.out_features for m in linear_stack(create_model("mlp"))] == [128, 10]
    assert MLPStep.for_model(create_model("logreg"), ce) is not None
    for name in ("mlp-dropout", "mlp-bn", "cnn", "convnet"):
        assert MLPStep.for_model(create_model(name), ce) is None, name
    mlp = create_model("mlp")
    assert MLPStep.for_model(mlp, nn.CrossEntropyLoss(weight=torch.ones(10))) is None
    assert MLPStep.for_model(mlp, nn.CrossEntropyLoss(reduction="sum")) is None
    assert MLPStep.for_model(mlp, nn.NLLLoss()) is None
    mlp.fc1.weight.requires_grad_(False)  # frozen layers are autograd's job
    assert MLPStep.for_model(mlp, ce) is None
    # A wider, deeper mlp is still a linear stack; with dropout only in eval mode (the
    # Predictor's addmm chain), never while training.
    assert [m.out_features for m in linear_stack(create_model("mlp", hidden=32, depth=2))] == [
        32, 32, 10]  # fmt: skip
    dropped = create_model("mlp", dropout=0.3)
    assert MLPStep.for_model(dropped.train(), ce) is None
    assert len(linear_stack(dropped.eval())) == 2


def test_an_epoch_with_the_step_trains_like_autograd(data_root):
    (images, labels), (test_x, test_y) = (load_mnist(data_root, s) for s in ("train", "test"))
    test = BatchLoader(test_x[:2000], test_y[:2000], 1000)
    results = {}
    for hand in (True, False, True):
        torch.manual_seed(0)
        model = create_model("mlp")
        train = BatchLoader(images[:6400], labels[:6400], 64, shuffle=True, seed=0)
        loss, acc = train_epoch(model, train, FusedAdam(model.parameters()), nn.CrossEntropyLoss(),
                                log=None, mlp_step=hand)  # fmt: skip
        results.setdefault(hand, []).append((loss, acc, evaluate(model, test), model.state_dict()))
    (a, b), (c,) = results[True], results[False]
    # Deterministic: the same seed gives the same weights, to the bit.
    assert a[:3] == b[:3] and all(torch.equal(a[3][k], b[3][k]) for k in a[3])
    # The same maths as autograd: the same run within float rounding after 100 steps.
    assert a[0] == pytest.approx(c[0], rel=1e-3) and a[1] == pytest.approx(c[1], abs=0.2)
    assert a[2][1] == pytest.approx(c[2][1], abs=0.3) and a[2][1] > 85.0
    for k in a[3]:
        torch.testing.assert_close(a[3][k], c[3][k], rtol=1e-3, atol=1e-4)
