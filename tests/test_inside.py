"""Inside the model, on real MNIST: first layers, integrated gradients (faithful at a small
size), the embedding map, test-time augmentation and the learning-rate finder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mnistlab import inside, plots, tta
from mnistlab.catalog import MNIST
from mnistlab.config import resolve_config
from mnistlab.data import load_mnist
from mnistlab.errors import MnistlabError
from mnistlab.lrfind import FALLBACK_RULE, RULE, lr_find, suggest
from mnistlab.models import create_model
from mnistlab.predict import Predictor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def test_set(data_root):
    images, labels = load_mnist(data_root, "test")
    return images, labels


@pytest.fixture(scope="module")
def bundled():
    return Predictor.default().model


def test_first_layer_of_each_kind():
    torch.manual_seed(0)
    logreg = create_model("logreg")
    layer = inside.first_layer(logreg)
    assert layer.kind == "linear" and layer.count == 10
    assert torch.equal(layer.weights, logreg.linear.weight.detach().reshape(10, 28, 28))
    assert inside.first_layer(create_model("mlp")).weights.shape == (128, 28, 28)
    assert inside.first_layer(create_model("mlp-bn")).weights.shape == (256, 28, 28)
    conv = inside.first_layer(create_model("convnet"))
    assert conv.kind == "conv" and conv.weights.shape == (16, 5, 5)
    assert inside.first_layer(create_model("cnn")).weights.shape == (32, 3, 3)


def test_feature_maps_follow_batchnorm_and_relu(bundled, test_set):
    images, _ = test_set
    maps = inside.feature_maps(bundled, images[0])
    assert maps.shape == (16, 28, 28) and maps.min() >= 0
    # The same numbers by hand: conv → BatchNorm → ReLU of the normalized digit.
    f = bundled.features
    x = inside.normalize(images[:1].float() / 255)
    with torch.no_grad():
        expected = f[2](f[1](f[0](x)))[0]
    torch.testing.assert_close(maps, expected)
    with pytest.raises(MnistlabError, match="no convolution"):
        inside.feature_maps(create_model("mlp"), images[0])


def test_first_layer_figures_render():
    for name in ("logreg", "mlp", "convnet"):
        layer = inside.first_layer(create_model(name))
        fig = plots.plot_first_layer(layer.weights, layer.kind)
        assert len(fig.axes) == 1 and str(min(layer.count, 64)) in fig.axes[0].get_title()
        plots.figure_png(fig)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, (3, 28, 28), elements=st.floats(0, 1, width=32)),
       st.integers(0, 9))
def test_integrated_gradients_of_a_linear_model_are_exact(pixels, target):
    # logit_t = w_t · (x − mean) / std + b: the gradient is w_t / std everywhere on the path, so
    # integrated gradients from black are exactly x · w_t / std, whatever the steps.
    torch.manual_seed(1)
    model = create_model("logreg")
    x = torch.from_numpy(pixels)
    targets = torch.full((3,), target)
    e = inside.integrated_gradients(model, x, targets=targets, steps=4)
    w = model.linear.weight.detach()[target].reshape(28, 28) / MNIST.std
    torch.testing.assert_close(e.attributions, x * w, rtol=1e-4, atol=1e-6)
    assert torch.equal(e.attributions[x == 0], torch.zeros(int((x == 0).sum())))


def test_integrated_gradients_are_complete_and_batched(bundled, test_set):
    images, _ = test_set
    x = images[:8].float() / 255
    e = inside.integrated_gradients(bundled, x, steps=32)
    with torch.no_grad():
        logits = bundled(inside.normalize(x))
        black = bundled(inside.normalize(torch.zeros(1, 28, 28)))[0]
    gap = logits.gather(1, e.targets[:, None]).squeeze(1) - black[e.targets]
    # Completeness: the attributions add up to the logit's change from black (within 3%).
    assert ((e.attributions.sum((1, 2)) - gap).abs() / gap.abs()).max() < 0.03
    assert torch.equal(e.labels, logits.argmax(1)) and torch.equal(e.targets, e.labels)
    torch.testing.assert_close(e.probabilities, logits.softmax(1))
    assert (e.attributions[x == 0] == 0).all()  # the baseline is black: no ink, no credit
    one = inside.integrated_gradients(bundled, x[3], steps=32)
    torch.testing.assert_close(one.attributions[0], e.attributions[3], rtol=1e-4, atol=1e-5)


def test_explanations_are_faithful_at_a_small_size(bundled, test_set):
    # The benchmark's targets (benchmarks/bench_explain.py: 500 digits) on 60 digits.
    images, _ = test_set
    x = images[1000:1060]
    e = inside.integrated_gradients(bundled, x, steps=16)
    f = inside.faithfulness(bundled, x, e)
    assert f.top_beats_random >= 0.9, f.top_beats_random
    assert f.near_ink_share >= 0.8, f.near_ink_share
    # And a control that must fail: a heat map of random numbers on the ink is no better than
    # chance at the deletion test.
    noise = inside.Explanation(torch.rand(x.shape) * (x > 0), e.probabilities, e.labels,
                               e.targets)
    assert inside.faithfulness(bundled, x, noise).top_beats_random < 0.8


def test_dilate_grows_a_mask_by_its_radius():
    mask = torch.zeros(1, 28, 28, dtype=torch.bool)
    mask[0, 10, 10] = True
    assert int(inside.dilate(mask, 2).sum()) == 25
    assert torch.equal(inside.dilate(mask, 0), mask)


def test_penultimate_features_and_the_embedding_map(test_set):
    images, labels = test_set
    torch.manual_seed(0)
    model = create_model("mlp").eval()
    feats, logits = inside.penultimate_features(model, images[:50])
    x = inside.normalize(images[:50].float() / 255)
    with torch.no_grad():
        torch.testing.assert_close(feats, torch.relu(model.fc1(x.flatten(1))))
        torch.testing.assert_close(logits, model(x))
    emap = inside.embedding_map(Predictor.default().model, images, labels, n=200, seed=0)
    assert emap.xy.shape == (200, 2) and emap.xy.min() >= 0 and emap.xy.max() <= 1
    assert len(set(emap.indices.tolist())) == 200
    assert torch.equal(torch.as_tensor(emap.labels), labels[emap.indices])
    # Same-digit neighbours: the map keeps the model's clusters (the bundled model reads 99.5%).
    xy, y = emap.xy, emap.labels
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1) + np.eye(len(xy)) * 9
    assert (y[d.argmin(1)] == y).mean() > 0.9
    d = emap.to_dict()
    assert set(d) == {"x", "y", "index", "label", "prediction", "probability"}
    plots.figure_png(plots.plot_embedding(emap.xy, emap.labels, emap.predictions))


def test_tta_views_shift_exactly_and_rotate(test_set):
    images, _ = test_set
    x = images[:4].float() / 255
    v = tta.views(x)
    assert v.shape == (len(tta.VIEWS), 4, 28, 28)
    torch.testing.assert_close(v[0], x, atol=1e-5, rtol=0)
    torch.testing.assert_close(v[1][:, :, 1:], x[:, :, :-1], atol=1e-5, rtol=0)  # right
    torch.testing.assert_close(v[2][:, :, :-1], x[:, :, 1:], atol=1e-5, rtol=0)  # left
    torch.testing.assert_close(v[3][:, 1:], x[:, :-1], atol=1e-5, rtol=0)  # down
    torch.testing.assert_close(v[4][:, :-1], x[:, 1:], atol=1e-5, rtol=0)  # up
    # A rotation keeps the ink's centre and roughly its amount.
    for k in (5, 6):
        assert abs(float(v[k].sum() / x.sum()) - 1) < 0.05
        assert not torch.allclose(v[k], x, atol=0.1)


def test_tta_predictions_and_what_they_change(test_set):
    images, labels = test_set
    p = Predictor.default()
    x = images[:120].float() / 255
    plain = p.predict_pixels(x)
    with_tta = p.predict_pixels(x, tta=True)
    torch.testing.assert_close(with_tta.probabilities.sum(1), torch.ones(120))
    expected = tta.tta_probabilities(lambda v: p.model(inside.normalize(v)), x)
    torch.testing.assert_close(with_tta.probabilities, expected, atol=1e-5, rtol=1e-4)
    change = tta.compare(plain.probabilities, with_tta.probabilities, labels[:120])
    assert change.count == 120
    assert change.fixed - change.broken == round(1.2 * (change.tta_accuracy - change.accuracy))
    assert change.changed >= change.fixed + change.broken
    assert "→" in change.line()


def test_lr_find_sweeps_exponentially_and_restores_the_rng(data_root):
    cfg = resolve_config("lab", train_limit=3200)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r = lr_find(cfg, data_root, start_lr=1e-5, end_lr=1.0, steps=60)
    assert torch.equal(torch.get_rng_state(), before)
    lrs = np.array(r.lrs)
    assert lrs[0] == pytest.approx(1e-5) and len(lrs) <= 60
    np.testing.assert_allclose(np.diff(np.log(lrs)), math.log(1e5) / 59, rtol=1e-6)
    assert len(r.losses) == len(r.raw_losses) == len(r.lrs)
    assert r.rule in (RULE, FALLBACK_RULE) and lrs[0] <= r.suggested_lr <= lrs[-1]
    again = lr_find(cfg, data_root, start_lr=1e-5, end_lr=1.0, steps=60)
    assert again.raw_losses == r.raw_losses  # seeded: the same sweep twice
    d = r.to_dict()
    assert {"suggested_lr", "rule", "lrs", "losses"} <= set(d)
    plots.figure_png(plots.plot_lr_find(r.lrs, r.losses, r.suggested_lr, r.raw_losses, r.rule))


def test_lr_find_stops_on_divergence(data_root):
    cfg = resolve_config("lab", train_limit=3200, optimizer="sgd")
    r = lr_find(cfg, data_root, start_lr=1e-3, end_lr=1e4, steps=100)
    assert r.stopped == "diverged" and len(r.lrs) < 100
    assert r.suggested_lr < r.lrs[-1]


@settings(max_examples=50, deadline=None)
@given(st.floats(-4, -1), st.floats(0.2, 2.0), st.integers(60, 300))
def test_suggest_picks_the_steepest_fall_before_the_minimum(centre, width, n):
    # A smooth sigmoid fall centred at 10**centre, then a rise: the steepest point is the centre.
    lrs = np.logspace(-6, 1, n)
    t = np.log10(lrs)
    loss = 2.3 / (1 + np.exp((t - centre) / (width / 4))) + 0.1 + np.exp(3 * (t - 0.5))
    lr, rule = suggest(lrs.tolist(), loss.tolist())
    low = lrs[int(np.argmin(loss))]
    assert lr <= low
    if rule == RULE:
        assert abs(math.log10(lr) - centre) <= 7 / n + 0.05
    with pytest.raises(MnistlabError):
        suggest([1e-3], [1.0])
