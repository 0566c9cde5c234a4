"""Classification metrics from logits and labels, via scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int = 10
) -> dict[str, Any]:
    """Accuracy (%), mean cross-entropy, the per-class report with averages, confusion matrix."""
    from sklearn.metrics import classification_report, confusion_matrix

    y_true = labels.cpu().numpy()
    y_pred = logits.argmax(1).cpu().numpy()
    classes = list(range(num_classes))
    report = classification_report(
        y_true, y_pred, labels=classes, output_dict=True, zero_division=0
    )
    per_class = [
        {
            "label": c,
            "precision": report[str(c)]["precision"],
            "recall": report[str(c)]["recall"],
            "f1": report[str(c)]["f1-score"],
            "support": int(report[str(c)]["support"]),
        }
        for c in classes
    ]
    averages = {
        key.split()[0]: {
            "precision": report[key]["precision"],
            "recall": report[key]["recall"],
            "f1": report[key]["f1-score"],
            "support": int(report[key]["support"]),
        }
        for key in ("macro avg", "weighted avg")
    }
    cm = confusion_matrix(y_true, y_pred, labels=classes)
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
    p = torch.as_tensor(probs).detach().float().cpu()
    y = torch.as_tensor(labels).detach().long().cpu()
    confidence, predicted = p.max(1)
    correct = (predicted == y).double().numpy()
    confidence = confidence.double().numpy()
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lo, hi], so a confidence of exactly 1.0 lands in the last bin and 0 in the first.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


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
