"""Evaluation figures from predictions: classification scores and language-model perplexity.

Pure Python on lists of ints and floats; it knows nothing of models, torch or files.
"""

from __future__ import annotations

import math
from collections import Counter
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


# Labels are imbalanced when the most common is this many times the rarest (spam/ham 87/13: 6.7).
IMBALANCE_RATIO = 1.5
# "Predicts one label for nearly all texts": this share of the eval predictions or more.
ONE_LABEL_SHARE = 0.95


def select_metric(chosen: str, task: Task, train_labels: list[int]) -> str:
    """The metric the best evaluation is judged by: ``chosen``, or for ``auto`` macro F1 when the
    training labels are imbalanced (accuracy rewards predicting the majority), else accuracy."""
    if Task(task) is not Task.classification:
        return "loss"
    if chosen != "auto":
        return chosen
    counts = Counter(train_labels).values()
    return "macro_f1" if counts and max(counts) > IMBALANCE_RATIO * min(counts) else "accuracy"


def score(metrics: dict[str, Any], task: Task, metric: str = "accuracy") -> float:
    """Higher is better: ``metric`` for classification (loss breaks ties), minus loss for causal LM."""
    if Task(task) is Task.classification and metric != "loss":
        return metrics[metric] - 1e-6 * metrics.get("eval_loss", 0.0)
    return -metrics["eval_loss"]


def learning_warnings(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """Why a tuned classifier may have learnt nothing: one label for nearly every eval text, or a
    macro F1 no better than the base's. Empty when neither (and for causal LMs)."""
    if not after or "confusion_matrix" not in after:
        return []
    out = []
    labels, m = after["confusion_matrix"]["labels"], after["confusion_matrix"]["matrix"]
    predicted = [sum(row[j] for row in m) for j in range(len(labels))]
    actual = [sum(row) for row in m]
    total = sum(predicted)
    top = max(range(len(labels)), key=lambda j: predicted[j]) if total else 0
    if total and sum(1 for a in actual if a) > 1 and predicted[top] >= ONE_LABEL_SHARE * total:
        out.append(f"the tuned model predicts {labels[top]!r} for {100 * predicted[top] / total:.0f}% of the eval "
                   f"texts (macro F1 {after['macro_f1']:.4f}): it may have learnt nothing; train longer, try "
                   "--class-weights balanced, or check the labels")
    if before and "macro_f1" in before and after["macro_f1"] <= before["macro_f1"]:
        out.append(f"macro F1 did not improve ({before['macro_f1']:.4f} -> {after['macro_f1']:.4f})")
    return out
