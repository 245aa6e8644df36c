"""Evaluation figures from predictions: classification scores and language-model perplexity.

Pure Python on lists of ints and floats; it knows nothing of models, torch or files.
"""

from __future__ import annotations

import math
from typing import Any

from edgeft.artifact import Task


def confusion_matrix(y_true: list[int], y_pred: list[int], n: int) -> list[list[int]]:
    """``m[i][j]``: examples of true class ``i`` predicted as ``j``."""
    m = [[0] * n for _ in range(n)]
    for t, p in zip(y_true, y_pred, strict=True):
        m[t][p] += 1
    return m


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str],
                           loss: float | None = None) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 (over every label), per-label F1 and the confusion matrix."""
    n = len(labels)
    m = confusion_matrix(y_true, y_pred, n)
    precision, recall, f1 = [], [], []
    for c in range(n):
        tp = m[c][c]
        predicted = sum(m[r][c] for r in range(n))
        actual = sum(m[c])
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    total = len(y_true)
    out: dict[str, Any] = {
        "accuracy": sum(m[c][c] for c in range(n)) / total if total else 0.0,
        "macro_precision": sum(precision) / n,
        "macro_recall": sum(recall) / n,
        "macro_f1": sum(f1) / n,
        "f1_per_label": dict(zip(labels, f1, strict=True)),
        "confusion_matrix": {"labels": labels, "matrix": m},
        "examples": total,
    }
    if loss is not None:
        out["eval_loss"] = loss
    return out


def lm_metrics(loss_sum: float, tokens: int) -> dict[str, Any]:
    """Mean token loss and perplexity."""
    loss = loss_sum / tokens if tokens else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def score(metrics: dict[str, Any], task: Task) -> float:
    """Higher is better: accuracy for classification (loss breaks ties), minus loss for causal LM."""
    if task is Task.classification:
        return metrics["accuracy"] - 1e-6 * metrics.get("eval_loss", 0.0)
    return -metrics["eval_loss"]
