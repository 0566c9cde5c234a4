"""Classification metrics from logits and labels: accuracy, loss, the per-class report
(precision, recall, F1, support, as scikit-learn's classification_report gives them, with
zero_division=0), the confusion matrix, calibration.

Counted with numpy from the confusion matrix: the same numbers as scikit-learn without its
1-5 s import (tests check them against it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where used: the report's figure workers run without torch
    import torch


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = 10
) -> np.ndarray:
    """int64 [num_classes, num_classes]: rows the true class, columns the prediction."""
    flat = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _scores(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        total = precision + recall
        f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int = 10
) -> dict[str, Any]:
    """Accuracy (%), mean cross-entropy, the per-class report with averages, confusion matrix."""
    import torch.nn.functional as F

    y_true = labels.cpu().numpy()
    y_pred = logits.argmax(1).cpu().numpy()
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    s = _scores(tp, cm.sum(0).astype(np.float64), support.astype(np.float64))
    per_class = [
        {
            "label": c,
            "precision": float(s["precision"][c]),
            "recall": float(s["recall"][c]),
            "f1": float(s["f1"][c]),
            "support": int(support[c]),
        }
        for c in range(num_classes)
    ]
    total = int(support.sum())
    weights = support / total if total else np.zeros(num_classes)
    averages = {
        name: {
            **{k: float(np.sum(s[k] * w)) for k in ("precision", "recall", "f1")},
            "support": total,
        }
        for name, w in (("macro", np.full(num_classes, 1 / num_classes)), ("weighted", weights))
    }
    return {
        "accuracy": 100.0 * float((y_true == y_pred).mean()),
        "loss": float(F.cross_entropy(logits.float(), labels.long())),
        "count": len(y_true),
        "per_class": per_class,
        "averages": averages,
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm),
    }


def most_confused(cm: np.ndarray, top: int = 5) -> list[dict[str, int]]:
    """The largest off-diagonal cells: how often `true` was read as `predicted`."""
    off = np.array(cm, copy=True)
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:top]
    pairs = []
    for flat in order:
        t, p = divmod(int(flat), off.shape[1])
        if off[t, p] > 0:
            pairs.append({"true": t, "predicted": p, "count": int(off[t, p])})
    return pairs


def format_report(m: dict[str, Any]) -> str:
    """The metrics as text: summary, per-class table, confusion matrix, most-confused pairs."""
    lines = [f"accuracy {m['accuracy']:.2f}%  loss {m['loss']:.4f}  ({m['count']} images)", ""]
    lines.append(f"{'':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}")
    for r in m["per_class"]:
        lines.append(
            f"{r['label']:>12} {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} "
            f"{r['support']:9d}"
        )
    for name, r in m["averages"].items():
        lines.append(
            f"{name + ' avg':>12} {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} "
            f"{r['support']:9d}"
        )
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    lines.append("     " + "".join(f"{c:>6}" for c in range(len(m["confusion_matrix"]))))
    for t, row in enumerate(m["confusion_matrix"]):
        lines.append(f"{t:>5}" + "".join(f"{v:>6}" for v in row))
    if m["most_confused"]:
        lines += [
            "",
            "most confused: "
            + ", ".join(f"{p['true']}→{p['predicted']} ({p['count']})" for p in m["most_confused"]),
        ]
    return "\n".join(lines)


def calibration_bins(
    probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, bins: int = 15
) -> dict[str, np.ndarray]:
    """Top-1 confidence binned into `bins` equal widths on [0, 1]: per bin its count, mean
    confidence and accuracy (NaN where empty), and the bin edges."""
    p = _numpy(probs).astype(np.float32)
    y = _numpy(labels).astype(np.int64)
    predicted = p.argmax(1)
    correct = (predicted == y).astype(np.float64)
    confidence = p[np.arange(len(p)), predicted].astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lo, hi], so a confidence of exactly 1.0 lands in the last bin and 0 in the first.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def expected_calibration_error(
    probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, bins: int = 15
) -> float:
    """ECE as a fraction: the count-weighted mean gap between accuracy and confidence per bin."""
    b = calibration_bins(probs, labels, bins)
    total = int(b["count"].sum())
    if total == 0:
        return float("nan")
    seen = b["count"] > 0
    gaps = np.abs(b["accuracy"][seen] - b["confidence"][seen])
    return float((b["count"][seen] * gaps).sum() / total)
