"""How good a model's outputs are: binary cross-entropy, precision / recall / F1, ROC AUC; and the
standard normal's quantiles that quantile scaling and the model's piecewise-linear encoding share.
The loss is the differentiable op ``layers.bce_with_logits_forward``, so the loss a run reports
is the one its gradients descend."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mixer import layers as L

__all__ = ["BinaryMetrics", "bce_with_logits", "binary_metrics", "classification_metrics",
           "normal_quantiles", "precision_recall_f1", "roc_auc"]


def normal_quantiles(n: int, *, tail: float) -> np.ndarray:
    """The standard normal's quantiles (float64) at ``n`` evenly spaced levels from 0 to 1, kept in
    ``[tail, 1 - tail]`` so that all are finite; by the standard library (no scipy at run time)."""
    normal = statistics.NormalDist()
    return np.array([normal.inv_cdf(float(p)) for p in np.clip(np.linspace(0.0, 1.0, n), tail, 1.0 - tail)])


def bce_with_logits(logits: np.ndarray, y: np.ndarray, *, pos_weight: float = 1.0) -> float:
    """Mean binary cross-entropy of ``logits`` against labels ``y``, computed in float64."""
    return L.bce_with_logits_forward(np.asarray(logits, dtype=np.float64), y, pos_weight=pos_weight)[0]


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, ...]:
    """(tn, fp, fn, tp) of boolean predictions against boolean truth: the counts of 2 * truth + pred."""
    return tuple(int(c) for c in np.bincount(2 * truth + pred, minlength=4))


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from confusion counts; each is 0 when its denominator is 0."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def classification_metrics(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of ``logits > 0`` against labels ``y`` in {0, 1}."""
    tn, fp, fn, tp = _counts(np.asarray(logits) > 0, np.asarray(y) > 0.5)
    precision, recall, f1 = precision_recall_f1(tp, fp, fn)
    return {"accuracy": (tp + tn) / len(y) if len(y) else 0.0,
            "precision": precision, "recall": recall, "f1": f1}


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (Mann-Whitney U), ties counted as half; NaN if a
    class is absent."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true and scores must be 1-D of one length, got {y.shape} and {s.shape}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Tied scores share the mean of the 1-based ranks they span.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class BinaryMetrics:
    """Classification quality of probabilities against 0/1 labels at one threshold. ``roc_auc`` is NaN
    for a single class; precision, recall and F1 are 0 when their denominator is 0."""

    rows: int
    positives: int
    threshold: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float
    tn: int
    fp: int
    fn: int
    tp: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict; NaN becomes None so that the result is valid JSON."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def binary_metrics(y_true: np.ndarray, proba: np.ndarray, *, threshold: float = 0.5) -> BinaryMetrics:
    """Accuracy, precision, recall, F1, ROC AUC and confusion counts; predicted 1 iff proba >= threshold."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got threshold={threshold}")
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(proba, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true and proba must have one shape, got {y.shape} and {p.shape}")
    tn, fp, fn, tp = _counts(p >= threshold, y)
    precision, recall, f1 = precision_recall_f1(tp, fp, fn)
    return BinaryMetrics(rows=len(y), positives=int(y.sum()), threshold=float(threshold),
                         accuracy=(tp + tn) / len(y) if len(y) else float("nan"), precision=precision,
                         recall=recall, f1=f1, roc_auc=roc_auc(y, p), tn=tn, fp=fp, fn=fn, tp=tp)
