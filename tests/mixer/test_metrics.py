"""The one loss value and the classification metrics that training and evaluation share."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest

from mixer import layers as L
from mixer.metrics import bce_with_logits, binary_metrics, classification_metrics, roc_auc


def test_bce_with_logits_is_the_weighted_definition_in_float64():
    z = np.array([3.0, -2.0, 0.5, -40.0, 40.0], dtype=np.float32)
    y = np.array([1.0, 1.0, 0.0, 0.0, 1.0])
    expected = np.mean(2.5 * y * np.log1p(np.exp(-z.astype(np.float64)))
                       + (1 - y) * np.log1p(np.exp(z.astype(np.float64))))
    assert bce_with_logits(z, y, pos_weight=2.5) == pytest.approx(expected, rel=1e-12)
    # The same loss the model's gradients come from (the differentiable op in mixer.layers).
    z64 = z.astype(np.float64)
    assert bce_with_logits(z, y, pos_weight=2.5) == L.bce_with_logits_forward(z64, y, pos_weight=2.5)[0]


def test_classification_metrics_by_hand():
    logits = np.array([2.0, -1.0, 0.5, -3.0])
    y = np.array([1.0, 1.0, 0.0, 0.0])
    m = classification_metrics(logits, y)
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5}


def test_classification_metrics_without_positives_or_rows_are_zero_not_an_error():
    assert classification_metrics(np.array([-1.0, -2.0]), np.array([0.0, 0.0])) == {
        "accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert classification_metrics(np.array([]), np.array([]))["accuracy"] == 0.0


def test_classification_metrics_agree_with_binary_metrics_at_one_half():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(200)
    y = (rng.random(200) < 0.4).astype(np.float64)
    m = binary_metrics(y, 1 / (1 + np.exp(-logits)), threshold=0.5)
    assert classification_metrics(logits, y) == pytest.approx(
        {"accuracy": m.accuracy, "precision": m.precision, "recall": m.recall, "f1": m.f1})


def test_roc_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * y, 1)  # coarse rounding: many ties
    pos, neg = scores[y == 1], scores[y == 0]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in product(pos, neg)]
    assert roc_auc(y, scores) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_roc_auc_is_one_for_a_perfect_ranking_and_nan_for_one_class():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.3, 0.1])) == 0.0
    assert np.isnan(roc_auc(np.ones(4), np.arange(4.0)))


def test_binary_metrics_count_the_confusion_matrix_at_the_threshold():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.5])
    m = binary_metrics(y, p, threshold=0.5)
    assert (m.tp, m.fn, m.fp, m.tn) == (2, 1, 2, 2)
    assert m.accuracy == pytest.approx(4 / 7)
    assert m.precision == pytest.approx(0.5) and m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert binary_metrics(y, p, threshold=0.95).tp == 0
