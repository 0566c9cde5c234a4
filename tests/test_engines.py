"""The fast paths keep the answers: the training loop's device-side metrics (read at log points
only), the onnxruntime inference engine against eager PyTorch, figures drawn in worker processes
against figures drawn here, and the numpy metrics against scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mnistlab import training
from mnistlab.data import BatchLoader, load_mnist, normalize
from mnistlab.errors import MnistlabError
from mnistlab.metrics import classification_metrics
from mnistlab.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def test_set(data_root):
    return load_mnist(data_root, "test")


# --- the training loop ---------------------------------------------------------------------------


def test_interval_metrics_are_the_per_step_figures_read_only_at_log_points(test_set, monkeypatch):
    images, labels = test_set
    torch.manual_seed(0)
    model = create_model("mlp")
    loader = BatchLoader(images[:1000], labels[:1000], 64, shuffle=True, seed=0)
    # lr 0: the weights stay, so each batch's loss and hits can be recomputed afterwards.
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reads = {"n": 0}
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    def counted(real):
        def read(self, *a, **k):
            reads["n"] += 1
            return real(self, *a, **k)
        return read

    monkeypatch.setattr(torch.Tensor, "item", counted(real_item))
    monkeypatch.setattr(torch.Tensor, "tolist", counted(real_tolist))
    lines: list[str] = []
    loss, acc = training.train_epoch(model, loader, opt, nn.CrossEntropyLoss(), log=lines.append,
                                     log_every=4)
    monkeypatch.undo()
    steps = len(loader)  # 16: log points after steps 4, 8, 12, 16
    assert reads["n"] <= steps // 4 + 1  # one read per log point (and the epoch's end)
    loader.set_epoch(0)
    per_step = []
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            per_step.append((float(nn.functional.cross_entropy(logits, y)) * len(y),
                             int((logits.argmax(1) == y).sum()), len(y)))
    expected = []
    for start in range(0, steps, 4):
        chunk = per_step[start : start + 4]
        n = sum(c[2] for c in chunk)
        expected.append(f"Step {min(start + 4, steps)}/{steps} - Loss: "
                        f"{sum(c[0] for c in chunk) / n:.3f} | Acc: "
                        f"{100 * sum(c[1] for c in chunk) / n:.2f}%")
    assert lines == expected
    assert acc == pytest.approx(100 * sum(c[1] for c in per_step) / 1000, abs=1e-9)
    assert loss == pytest.approx(sum(c[0] for c in per_step) / 1000, rel=1e-5)


def test_running_metrics_fold_long_intervals_on_the_device(test_set):
    _, labels = test_set
    metrics = training.RunningMetrics()
    logits = torch.randn(len(labels), 10, generator=torch.Generator().manual_seed(0))
    total = correct = 0.0
    for start in range(0, 3000, 10):  # 300 steps: folded once on the way
        z, y = logits[start : start + 10], labels[start : start + 10]
        loss = nn.functional.cross_entropy(z, y)
        metrics.add(loss, z, y)
        total += float(loss) * 10
        correct += int((z.argmax(1) == y).sum())
    sums = metrics.sums().tolist()
    assert sums[2] == 3000 and sums[1] == correct
    assert sums[0] == pytest.approx(total, rel=1e-5)
    assert metrics.sums() is None  # read: the next interval starts empty


def test_evaluate_matches_a_per_batch_loop(test_set):
    images, labels = test_set
    torch.manual_seed(1)
    model = create_model("mlp").eval()
    x = normalize(images[:2500])
    loss, acc = training.evaluate(model, BatchLoader(x, labels[:2500], 1000))
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx(100 * float((logits.argmax(1) == labels[:2500]).float().mean()))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels[:2500])),
                                 rel=1e-5)


# --- inference engines ---------------------------------------------------------------------------


def test_onnxruntime_gives_eager_pytorchs_labels_and_probabilities(test_set):
    from mnistlab.predict import Predictor

    images, _ = test_set
    fast, eager = Predictor.default(), Predictor.default(backend="eager")
    assert fast.backend.value == "onnxruntime" and eager.backend.value == "eager"
    x = images[:1000].float() / 255
    for batch in (x[:1], x[:64], x):  # 1000 goes through in chunks
        a, b = fast.predict_pixels(batch), eager.predict_pixels(batch)
        assert torch.equal(a.labels, b.labels)
        assert (a.probabilities - b.probabilities).abs().max() <= 1e-4
        torch.testing.assert_close(a.images, batch, rtol=0, atol=0)
        assert a.probabilities.dtype == torch.float32 and a.labels.dtype == torch.int64
    # The same checks as eager: bad pixels are refused, nothing runs on an empty batch.
    with pytest.raises(MnistlabError, match=r"pixel values must be finite and in \[0, 1\]"):
        fast.predict_pixels(torch.full((1, 28, 28), float("nan")))
    with pytest.raises(MnistlabError, match="pixel values"):
        fast.predict_pixels(torch.full((2, 28, 28), 2.0))
    assert len(fast.predict_pixels(torch.empty(0, 28, 28))) == 0
    # The result keeps its own copy of the input.
    batch = x[:4].clone()
    out = fast.predict_pixels(batch)
    batch.zero_()
    assert out.images.sum() > 0


def test_the_bundled_graph_holds_the_bundled_weights():
    import onnxruntime as ort

    from mnistlab.export import STATE_KEY, engine_session, state_digest
    from mnistlab.predict import Predictor, bundled_onnx

    predictor = Predictor.default(backend="eager")
    meta = ort.InferenceSession(str(bundled_onnx())).get_modelmeta().custom_metadata_map
    assert meta[STATE_KEY] == state_digest(predictor.model)  # else it would be exported again
    # A model whose weights differ is never run on the bundled graph.
    other = create_model("convnet").eval()
    session = engine_session(other, 1, bundled_onnx())
    assert session.get_modelmeta().custom_metadata_map[STATE_KEY] == state_digest(other)


def test_the_engine_can_be_forced_and_small_models_stay_eager(monkeypatch):
    from mnistlab.predict import Predictor

    monkeypatch.setenv("MNISTLAB_INFERENCE", "eager")
    assert Predictor.default().backend.value == "eager"
    monkeypatch.delenv("MNISTLAB_INFERENCE")
    mlp = Predictor(create_model("mlp"), {"name": "mlp", "source": "test", "parameters": 0})
    assert mlp.backend.value == "eager" and "addmm" in mlp.backend.reason
    with pytest.raises(MnistlabError, match="unknown inference backend 'tpu'"):
        Predictor.default(backend="tpu")


# --- figures and metrics -------------------------------------------------------------------------


def test_figures_drawn_by_workers_are_the_figures_drawn_here(test_set):
    from mnistlab.render import FigureJob, FigurePool, LocalRenderer

    images, labels = test_set
    probs = torch.softmax(torch.randn(1000, 10, generator=torch.Generator().manual_seed(0)), 1)
    jobs = [
        FigureJob("plot_metrics", ([{"epoch": 1, "train_loss": 0.5, "test_loss": 0.4,
                                     "train_acc": 90.0, "test_acc": 92.0}],)),
        FigureJob("plot_calibration", (probs.numpy(), labels[:1000].numpy())),
        FigureJob("display_predictions", (images[:1000].numpy(), labels[:1000].numpy(),
                                          probs.argmax(1).numpy()), {"n": 8, "seed": 3}),
        FigureJob("no_such_figure"),
    ]
    with pytest.raises(AttributeError):
        LocalRenderer().start(jobs)
    jobs.pop()
    here = LocalRenderer().start(jobs)()
    with FigurePool(workers=2) as pool:
        there = pool.start(jobs)()
    assert there == here and all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in here)


def test_metrics_are_scikit_learns():
    from sklearn.metrics import classification_report, confusion_matrix

    g = torch.Generator().manual_seed(0)
    for case in range(3):
        y = torch.randint(0, 10, (600,), generator=g)
        logits = torch.randn(600, 10, generator=g)
        if case == 1:
            logits[:, 3] = -1e4  # a digit never predicted: precision 0 by zero_division
        if case == 2:
            y[y == 4] = 5  # a digit never present: recall 0
        m = classification_metrics(logits, y)
        pred = logits.argmax(1).numpy()
        ref = classification_report(y.numpy(), pred, labels=list(range(10)), output_dict=True,
                                    zero_division=0)
        for c, row in enumerate(m["per_class"]):
            for ours, theirs in (("precision", "precision"), ("recall", "recall"),
                                 ("f1", "f1-score"), ("support", "support")):
                assert row[ours] == pytest.approx(ref[str(c)][theirs], abs=1e-12)
        for name in ("macro", "weighted"):
            for ours, theirs in (("precision", "precision"), ("recall", "recall"),
                                 ("f1", "f1-score")):
                assert m["averages"][name][ours] == pytest.approx(
                    ref[f"{name} avg"][theirs], abs=1e-12)
        np.testing.assert_array_equal(m["confusion_matrix"],
                                      confusion_matrix(y.numpy(), pred, labels=list(range(10))))
