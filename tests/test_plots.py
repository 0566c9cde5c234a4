"""The figures, on real MNIST and a really trained model: panels, titles, colours, numbers."""

from __future__ import annotations

import re

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from mnistlab import plots
from mnistlab.config import TrainConfig
from mnistlab.data import BatchLoader, load_mnist
from mnistlab.errors import MnistlabError
from mnistlab.metrics import calibration_bins, classification_metrics, expected_calibration_error
from mnistlab.models import create_model
from mnistlab.training import build_optimizer, fit, predict_logits

RED = mcolors.to_rgba("red")
BLACK = mcolors.to_rgba("black")
TITLE = re.compile(r"^pred (\d) / true (\d)$")


@pytest.fixture(scope="module")
def trained(data_root):
    """Two quick epochs of the lab's model on 6,000 images (validation 1,000), all 10,000 test
    images predicted: a real history, real mistakes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = load_mnist(data_root, "train")
        test_images, test_labels = load_mnist(data_root, "test")
        torch.manual_seed(0)
        model = create_model("mlp")
        cfg = TrainConfig(epochs=2, batch_size=128, val_split=0.1)
        train = BatchLoader(images[:6000], labels[:6000], 128, shuffle=True, seed=0)
        val = BatchLoader(images[6000:7000], labels[6000:7000], 1000)
        test = BatchLoader(test_images, test_labels, 1000)
        state = fit(model, build_optimizer(cfg, model.parameters()), train, test, cfg,
                    val_loader=val, log=lambda line: None)
        logits, y = predict_logits(model, test)
    finally:
        torch.set_num_threads(threads)
    return {
        "history": state.history,
        "images": test_images,
        "labels": y,
        "logits": logits,
        "probs": logits.softmax(1),
        "metrics": classification_metrics(logits, y),
    }


@pytest.fixture(autouse=True)
def no_figures_left():
    yield
    plt.close("all")


def rgba(colour) -> tuple[float, ...]:
    return mcolors.to_rgba(colour)


def tiles(fig):
    """(title text, the 28×28 tile under it) of each image of a mosaic figure."""
    (ax,) = fig.axes
    canvas = np.asarray(ax.images[0].get_array())
    out = []
    for text in ax.texts:
        if text.get_va() != "bottom":  # the titles sit on their tile; other texts below it
            continue
        x, y = text.get_position()
        left, top = round(x - 14), round(y + 2)
        out.append((text, canvas[top : top + 28, left : left + 28]))
    return out


def test_display_predictions_titles_and_mistakes_in_red(trained):
    y, logits = trained["labels"], trained["logits"]
    predicted = logits.argmax(1)
    wrong = (predicted != y).nonzero().squeeze(1)[:3].tolist()
    right = (predicted == y).nonzero().squeeze(1)[:5].tolist()
    indices = [right[0], wrong[0], right[1], right[2], wrong[1], right[3], wrong[2], right[4]]
    fig = plots.display_predictions(trained["images"], y, logits, indices=indices, cols=4)
    shown = tiles(fig)
    assert len(shown) == 8
    frames = [p for p in fig.axes[0].patches if rgba(p.get_edgecolor()) == RED]
    assert len(frames) == 3
    for (title, tile), i in zip(shown, indices, strict=True):
        assert title.get_text() == f"pred {int(predicted[i])} / true {int(y[i])}"
        mistake = i in wrong
        assert rgba(title.get_color()) == (RED if mistake else BLACK)
        np.testing.assert_array_equal(tile, trained["images"][i].numpy())  # the image itself
        # A red frame around exactly the mistakes' tiles.
        x, y0 = title.get_position()
        framed = [f for f in frames if abs(f.get_x() + 15 - x) < 1 and abs(f.get_y() - y0) < 3]
        assert len(framed) == int(mistake)
    assert "(3 mistakes, in red)" in fig._suptitle.get_text()


def test_display_predictions_is_a_seeded_random_sample(trained):
    args = (trained["images"], trained["labels"], trained["logits"])

    def titles(fig):
        return [title.get_text() for title, _ in tiles(fig)]

    first = titles(plots.display_predictions(*args, n=16, seed=7))
    assert len(first) == 16 and all(TITLE.match(t) for t in first)
    assert titles(plots.display_predictions(*args, n=16, seed=7)) == first
    assert titles(plots.display_predictions(*args, n=16, seed=8)) != first
    # Class indices work as well as scores, and uint8 images keep the 0–255 colour range.
    fig = plots.display_predictions(args[0], args[1], args[2].argmax(1), n=16, seed=7)
    assert titles(fig) == first
    assert fig.axes[0].images[0].get_clim() == (0.0, 255.0)


def test_display_predictions_rejects_mismatched_lengths(trained):
    with pytest.raises(MnistlabError, match="differ"):
        plots.display_predictions(trained["images"][:10], trained["labels"][:9],
                                  trained["logits"][:10])


def test_plot_metrics_each_measure_on_its_splits_together(trained):
    history = trained["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    fig = plots.plot_metrics(history, title="lab")
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_title() == "Loss per epoch"
    assert acc_ax.get_title() == "Accuracy per epoch"
    assert loss_ax.get_xlabel() == acc_ax.get_xlabel() == "Epoch"
    assert [t for t in loss_ax.get_xticks()] == [1, 2]
    # Training, test and validation loss in one panel; the three accuracies in the other.
    assert [line.get_label() for line in loss_ax.get_lines()] == [
        "training loss", "test loss", "validation loss"]
    assert [line.get_label() for line in acc_ax.get_lines()] == [
        "training accuracy", "test accuracy", "validation accuracy"]
    curves = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    for split, name in (("train", "training"), ("test", "test"), ("val", "validation")):
        loss, acc = curves[f"{name} loss"], curves[f"{name} accuracy"]
        np.testing.assert_allclose(loss.get_ydata(), [r[f"{split}_loss"] for r in history])
        np.testing.assert_allclose(acc.get_ydata(), [r[f"{split}_acc"] for r in history])
        np.testing.assert_allclose(loss.get_xdata(), [1, 2])
        assert loss.get_color() == acc.get_color()  # a split has one colour in both panels
        assert loss.get_linestyle() == acc.get_linestyle() == ("--" if split == "val" else "-")
    assert len({curves[f"{n} loss"].get_color() for n in ("training", "test", "validation")}) == 3
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "training loss", "test loss", "validation loss"]
    assert fig._suptitle.get_text() == "lab"


def test_plot_metrics_without_validation_and_from_lists():
    fig = plots.plot_metrics({"train_loss": [0.5, 0.3, 0.2], "test_acc": [95.0, 96.5, 97.1]})
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["training loss"]
    assert [line.get_label() for line in acc_ax.get_lines()] == ["test accuracy"]
    np.testing.assert_allclose(acc_ax.get_lines()[0].get_xdata(), [1, 2, 3])
    with pytest.raises(MnistlabError):
        plots.plot_metrics([{"epoch": 1, "lr": 0.001}])


def test_plot_comparison_overlays_runs(trained):
    history = trained["history"]
    fig = plots.plot_comparison({"a": history, "b": [{**r, "val_loss": None} for r in history]})
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["a", "a (validation)", "b"]
    assert [line.get_label() for line in acc_ax.get_lines()] == [
        "a", "a (validation)", "b", "b (validation)"]
    a, b = loss_ax.get_lines()[0], loss_ax.get_lines()[2]
    assert a.get_color() != b.get_color()


def test_plot_confusion_matrix_annotates_every_count(trained):
    cm = np.array(trained["metrics"]["confusion_matrix"])
    assert cm.sum() == 10_000
    fig = plots.plot_confusion_matrix(cm)
    ax, colorbar = fig.axes
    assert colorbar.get_label() == "<colorbar>"
    assert ax.get_title() == "Confusion matrix"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted label", "True label")
    np.testing.assert_array_equal(ax.images[0].get_array(), cm)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(texts) == 100
    for (true, pred), text in texts.items():
        assert int(text.get_text()) == cm[true, pred]
    # Dark (large) cells get white text so the count stays readable.
    top = np.unravel_index(cm.argmax(), cm.shape)
    assert rgba(texts[top].get_color()) == rgba("white")
    with pytest.raises(MnistlabError, match="square"):
        plots.plot_confusion_matrix(np.zeros((2, 3), dtype=int))


def test_plot_misclassified_most_confident_first_with_top3(trained):
    y, probs = trained["labels"], trained["probs"]
    confidence, predicted = probs.max(1)
    wrong = (predicted != y).nonzero().squeeze(1)
    expected = wrong[confidence[wrong].argsort(descending=True)][:8].tolist()
    fig = plots.plot_misclassified(trained["images"], y, probs, n=8, cols=4)
    shown = tiles(fig)
    below = [t for t in fig.axes[0].texts if t.get_va() == "top"]
    assert len(shown) == len(below) == 8
    for (title, tile), text, i in zip(shown, below, expected, strict=True):
        assert title.get_text() == f"true {int(y[i])} → pred {int(predicted[i])}"
        assert rgba(title.get_color()) == RED
        np.testing.assert_array_equal(tile, trained["images"][i].numpy())
        lines = text.get_text().splitlines()
        assert len(lines) == 3
        top = probs[i].topk(3)
        for line, p, c in zip(lines, top.values, top.indices, strict=True):
            digit, pct = line.split(":")
            assert int(digit) == int(c)
            assert float(pct.strip().rstrip("%")) == pytest.approx(100 * float(p), abs=0.06)
        assert int(lines[0].split(":")[0]) == int(predicted[i]) != int(y[i])
    assert f"of {len(wrong)} mistakes" in fig._suptitle.get_text()


def test_plot_misclassified_when_there_are_none(trained):
    y = trained["labels"][:50]
    perfect = torch.nn.functional.one_hot(y, 10).float()
    fig = plots.plot_misclassified(trained["images"][:50], y, perfect)
    assert len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].texts] == ["No mistakes"]


def test_plot_per_class_bars_are_the_report(trained):
    per_class = trained["metrics"]["per_class"]
    fig = plots.plot_per_class(trained["metrics"])
    (ax,) = fig.axes
    assert ax.get_title() == "Precision, recall and F1 by digit"
    assert len(ax.containers) == 3
    for container, key in zip(ax.containers, ("precision", "recall", "f1"), strict=True):
        assert len(container) == 10
        np.testing.assert_allclose([bar.get_height() for bar in container],
                                   [r[key] for r in per_class])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["precision", "recall", "F1"]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [f"{r['label']}\n(n={r['support']})" for r in per_class]
    assert sum(r["support"] for r in per_class) == 10_000
    low, high = ax.get_ylim()
    assert high == 1.0 and low <= min(min(r[k] for k in ("precision", "recall", "f1"))
                                      for r in per_class)


def test_plot_calibration_reliability_diagram_with_ece(trained):
    y, probs = trained["labels"], trained["probs"]
    fig = plots.plot_calibration(probs, y, bins=10)
    reliability, counts = fig.axes
    ece = expected_calibration_error(probs, y, bins=10)
    assert 0 < ece < 0.2
    assert reliability.get_title() == f"Reliability diagram: ECE {100 * ece:.2f}% (10 bins)"
    b = calibration_bins(probs, y, bins=10)
    seen = b["count"] > 0
    bars = reliability.containers[0]
    np.testing.assert_allclose([bar.get_height() for bar in bars], b["accuracy"][seen])
    assert sum(bar.get_height() for bar in counts.containers[0]) == len(y)
    assert counts.get_xlabel() == "Confidence (top-1 probability)"


def test_expected_calibration_error_by_hand(trained):
    # Bins of width 0.25: 0.5 (wrong) in (0.25, 0.5]; 0.75 twice (both right) in (0.5, 0.75];
    # 1.0 (right) in (0.75, 1]. Gaps 0.5, 0.25, 0.25, 0 over 4 predictions = 0.25.
    p = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    assert expected_calibration_error(p, y, bins=4) == pytest.approx(0.25)
    assert expected_calibration_error(torch.eye(3), torch.arange(3)) == 0.0
    # On real probabilities it agrees with a plain loop over the bins.
    probs, labels = trained["probs"].double(), trained["labels"]
    conf, pred = probs.max(1)
    total = 0.0
    for lo in np.arange(15) / 15:
        hi = lo + 1 / 15
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else conf <= hi
        if in_bin.any():
            acc = (pred[in_bin] == labels[in_bin]).double().mean()
            total += float(in_bin.sum()) * abs(float(acc - conf[in_bin].mean()))
    assert expected_calibration_error(probs, labels) == pytest.approx(total / len(labels),
                                                                      abs=1e-6)


def test_figure_png_renders_and_closes(trained):
    fig = plots.plot_metrics(trained["history"])
    png = plots.figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
