"""Trial diagnosis: histories with known shapes get the right label and the right numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixer.diagnosis import LABELS, Diagnosis, Thresholds, diagnose, plateau_run, stalled, val_wiggle
from mixer.train import EpochMetrics


def history(train, val=None, *, grad=None, lr=1e-3, probes=None, escapes=None) -> list[EpochMetrics]:
    """EpochMetrics from curves; ``probes`` maps epoch -> (λ_min, λ_max), ``escapes`` epoch -> gain."""
    n = len(train)
    val = list(train) if val is None else val
    grad = [1.0] * n if grad is None else grad
    lrs = [lr] * n if np.isscalar(lr) else lr
    probes = probes or {}
    escapes = escapes or {}
    out = []
    for i in range(n):
        epoch = i + 1
        lam = probes.get(epoch)
        ratio = None if lam is None else (0.0 if lam[0] >= 0 else abs(lam[0]) / lam[1])
        out.append(EpochMetrics(
            epoch=epoch, train_loss=train[i], val_loss=val[i], val_accuracy=0.9, val_precision=0.9,
            val_recall=0.9, val_f1=0.9, lr=lrs[i], grad_norm_mean=grad[i], grad_norm_max=2 * grad[i],
            update_ratio=1e-3, epoch_seconds=1.0,
            hessian_min_eig=None if lam is None else lam[0],
            hessian_max_eig=None if lam is None else lam[1],
            neg_curvature_ratio=ratio, curvature_seconds=None if lam is None else 0.5,
            neg_curvature_share=None if lam is None else 0.03, escape_gain=escapes.get(epoch),
        ))
    return out


DECLINE = [0.69 * 0.85 ** i + 0.05 for i in range(12)]           # every epoch improves >= 1.5 %
# 0.69 -> 0.51 in two epochs, stuck at 0.51 (±0.1 %) for epochs 3..10, then down again.
PLATEAU = [0.69, 0.60, 0.51, 0.5105, 0.5100, 0.5098, 0.5101, 0.5099, 0.5097, 0.5096, 0.45, 0.40]


def test_a_steady_decline_is_healthy():
    d = diagnose(history(DECLINE))
    assert d.label == "healthy"
    assert d.tags["diagnosis"] == "healthy"
    assert d.metrics["plateau_length"] == 0 and d.tags["plateau_length"] == "0"
    assert d.tags["plateau_start_epoch"] == "none"
    assert d.metrics["val_wiggle"] == pytest.approx(0.0, abs=1e-12)
    assert "plateau_grad_norm" not in d.metrics


def test_a_flat_stretch_is_a_plateau_with_its_start_and_length():
    grad = [1.0, 0.9, 0.8, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9, 1.0]
    d = diagnose(history(PLATEAU, grad=grad, lr=2e-4))
    assert d.label == "plateau"
    # Epoch 4 is the first whose loss barely differs from the one before; 4..10 are flat.
    assert d.tags["plateau_start_epoch"] == "4"
    assert d.tags["plateau_length"] == "7"
    assert d.metrics["plateau_length"] == 7
    assert d.metrics["plateau_grad_norm"] == pytest.approx(0.5)
    assert d.metrics["plateau_grad_ratio"] == pytest.approx(0.5)
    assert d.metrics["plateau_lr"] == pytest.approx(2e-4)
    assert d.metrics["plateau_loss"] == pytest.approx(np.mean(PLATEAU[3:10]))
    assert "plateau_min_eig" not in d.metrics  # no probe: nothing to say about curvature
    assert "no curvature probe" in d.tags["diagnosis_reason"]


# Train loss of the notebook's experiment 1 (patch 1, dim 48, lr 0.01, global scaling) on the real
# sample, as `python -m sweep.run search_spaces/seed_experiments.yaml` recorded it: stuck near 0.52,
# bouncing by up to 0.5 % from epoch to epoch.
STUCK = [0.5515, 0.5354, 0.5295, 0.5266, 0.5255, 0.5261, 0.5251, 0.5229, 0.5224, 0.5244,
         0.5224, 0.5228, 0.5215, 0.5243, 0.5217, 0.5209, 0.5224, 0.5228, 0.5216, 0.5239]


def test_a_noisy_real_plateau_is_one_plateau_not_several():
    d = diagnose(history(STUCK))
    assert d.label == "plateau"
    # 0.5266 -> 0.5255 is the first epoch that no longer improves by 0.5 %; none does after it.
    assert d.tags["plateau_start_epoch"] == "5" and d.tags["plateau_length"] == "16"


# Experiment 3 (lr 0.1, warm restarts every 10 epochs) on the real sample: the model collapses to
# the class prior (loss ln 2 ≈ 0.69) until the restart at epoch 11 throws it out with a spike.
COLLAPSED = [0.7848, 0.6883, 0.6921, 0.6994, 0.6979, 0.6882, 0.6881, 0.6875, 0.6869, 0.6868,
             0.8731, 0.636, 0.63]


def test_a_restart_spike_ends_a_plateau():
    d = diagnose(history(COLLAPSED))
    assert d.label == "plateau"
    assert d.tags["plateau_start_epoch"] == "3" and d.tags["plateau_length"] == "8"  # epochs 3..10
    assert d.metrics["plateau_loss"] == pytest.approx(np.mean(COLLAPSED[2:10]))


def test_the_real_stuck_run_with_curvature_probes_is_a_saddle():
    # Experiment 1 again, with probes every 4 epochs (train loss, mean grad norm, probes as recorded).
    train = [0.5599, 0.5318, 0.5304, 0.5226, 0.5217, 0.5208, 0.5215, 0.5199, 0.5214, 0.5218,
             0.52, 0.5209, 0.5199, 0.5217, 0.5207, 0.5195, 0.5199, 0.5206, 0.5185, 0.5181]
    grad = [0.312, 0.229, 0.247, 0.207, 0.2, 0.186, 0.184, 0.181, 0.192, 0.184,
            0.172, 0.177, 0.174, 0.183, 0.185, 0.183, 0.187, 0.185, 0.167, 0.176]
    probes = {4: (-0.1453, 0.6388), 8: (-0.9770, 0.5611), 12: (-0.1145, 0.6318), 16: (-0.3673, 0.5053),
              20: (-0.4302, 3.8127)}
    d = diagnose(history(train, grad=grad, lr=0.01, probes=probes))
    assert d.label == "saddle"
    assert d.tags["plateau_start_epoch"] == "5" and d.tags["plateau_length"] == "16"
    assert d.metrics["plateau_probe_epoch"] == 12  # nearest the middle of epochs 5..20
    assert d.metrics["plateau_neg_ratio"] == pytest.approx(0.1145 / 0.6318)
    assert d.metrics["plateau_grad_ratio"] == pytest.approx(np.mean(grad[4:]) / 0.312)
    # Without the probes the same curves are only a plateau: curvature is what tells them apart.
    assert diagnose(history(train, grad=grad, lr=0.01)).label == "plateau"


def test_a_plateau_with_small_gradient_and_negative_curvature_is_a_saddle():
    grad = [1.0, 0.9, 0.8, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.9, 1.0]
    probes = {1: (-0.001, 5.0), 7: (-0.8, 4.0), 12: (0.0, 3.0)}
    d = diagnose(history(PLATEAU, grad=grad, probes=probes))
    assert d.label == "saddle"
    assert d.metrics["plateau_min_eig"] == -0.8 and d.metrics["plateau_max_eig"] == 4.0
    assert d.metrics["plateau_neg_ratio"] == pytest.approx(0.2)
    assert d.metrics["plateau_probe_epoch"] == 7  # the probe inside the plateau, not epoch 1 or 12
    assert d.metrics["plateau_grad_norm"] == pytest.approx(np.mean(grad[3:10]))


def test_a_plateau_with_a_flat_spectrum_is_not_a_saddle():
    grad = [1.0, 0.9, 0.8, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.9, 1.0]
    d = diagnose(history(PLATEAU, grad=grad, probes={7: (-0.01, 4.0)}))
    assert d.label == "plateau"
    assert d.metrics["plateau_neg_ratio"] == pytest.approx(0.0025)


def test_negative_curvature_with_a_large_gradient_is_not_a_saddle():
    d = diagnose(history(PLATEAU, grad=[1.0] * 12, probes={7: (-0.8, 4.0)}))
    assert d.label == "plateau"
    assert d.metrics["plateau_grad_ratio"] == pytest.approx(1.0)


def test_a_probe_far_from_the_plateau_does_not_speak_for_it():
    grad = [1.0, 0.9, 0.8, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.9, 1.0]
    plateau = PLATEAU[:10] + [0.45, 0.40, 0.35, 0.30, 0.25]
    d = diagnose(history(plateau, grad=grad + [1.0] * 3, probes={15: (-0.8, 4.0)}))
    assert d.label == "plateau" and "plateau_min_eig" not in d.metrics
    # ... but one within probe_slack epochs of its end does.
    near = diagnose(history(plateau, grad=grad + [1.0] * 3, probes={12: (-0.8, 4.0)}))
    assert near.label == "saddle" and near.metrics["plateau_probe_epoch"] == 12


def test_a_wiggling_validation_loss_is_oscillating_with_its_wiggle():
    val = [0.5, 0.4, 0.5, 0.4, 0.5, 0.4, 0.5, 0.4]
    d = diagnose(history(DECLINE[:8], val=val))
    assert d.label == "oscillating"
    # Travel 7 × 0.1, net change 0.1, mean 0.45.
    assert d.metrics["val_wiggle"] == pytest.approx((0.7 - 0.1) / 0.45)


def test_small_validation_noise_stays_healthy():
    rng = np.random.default_rng(0)
    val = [v * (1 + 0.002 * rng.standard_normal()) for v in DECLINE]
    d = diagnose(history(DECLINE, val=val))
    assert d.label == "healthy" and 0 < d.metrics["val_wiggle"] < 0.25


@pytest.mark.parametrize("train", [
    DECLINE[:5] + [math.nan],
    DECLINE[:5] + [math.inf],
])
def test_a_non_finite_loss_is_diverged_at_its_epoch(train):
    d = diagnose(history(train))
    assert d.label == "diverged"
    assert d.metrics["diverged_epoch"] == 6
    assert "epoch 6" in d.tags["diagnosis_reason"]


def test_fit_reported_divergence_wins_over_everything():
    d = diagnose(history(PLATEAU), diverged=True)
    assert d.label == "diverged" and d.tags["diagnosis"] == "diverged"


def test_plateau_needs_min_plateau_epochs():
    short = [0.69, 0.60, 0.51, 0.5101, 0.5100, 0.45, 0.40, 0.35]
    assert diagnose(history(short)).label == "healthy"
    assert diagnose(history(short), thresholds=Thresholds(min_plateau_epochs=2)).label == "plateau"


def test_history_as_stored_dicts_gives_the_same_diagnosis():
    h = history(PLATEAU, grad=[1.0, 0.9, 0.8] + [0.2] * 7 + [0.9, 1.0], probes={7: (-0.8, 4.0)})
    as_dicts = [{"epoch": m.epoch, **m.as_dict()} for m in h]
    assert diagnose(as_dicts) == diagnose(h)
    assert diagnose(as_dicts).label == "saddle"


def test_an_empty_history_is_not_judged():
    d = diagnose([])
    assert isinstance(d, Diagnosis) and d.label == "too_short" and d.label in LABELS
    assert d.tags["diagnosis_reason"] == "no epochs to judge"


@pytest.mark.parametrize("epochs", [1, 2, 3, 4])
def test_a_trial_shorter_than_the_plateau_rule_needs_is_too_short_never_healthy(epochs):
    # A pruned trial's 2-3 epochs of steady decline used to be called healthy.
    d = diagnose(history(DECLINE[:epochs]))
    assert d.label == "too_short"
    assert f"min_plateau_epochs={Thresholds().min_plateau_epochs}" in d.tags["diagnosis_reason"]
    # ... even when they wiggle: 4 epochs cannot tell a plateau from a pause.
    assert diagnose(history(DECLINE[:epochs], val=[0.5, 0.3, 0.5, 0.3][:epochs])).label == "too_short"
    # One epoch more than the rule needs is judged.
    assert diagnose(history(DECLINE[:5])).label == "healthy"
    assert diagnose(history(DECLINE[:3]), thresholds=Thresholds(min_plateau_epochs=2)).label == "healthy"


SADDLE_GRAD = [1.0, 0.9, 0.8, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.9, 1.0]


@pytest.mark.parametrize("gain, confirmed", [(0.9, "yes"), (0.2, "no"), (None, "untested")])
def test_the_escape_test_at_the_plateau_probe_confirms_a_saddle_or_not(gain, confirmed):
    escapes = {} if gain is None else {7: gain}
    d = diagnose(history(PLATEAU, grad=SADDLE_GRAD, probes={7: (-0.8, 4.0)}, escapes=escapes))
    assert d.label == "saddle"
    assert d.tags["saddle_confirmed"] == confirmed
    assert d.metrics.get("plateau_escape_gain") == gain
    assert d.metrics["plateau_neg_share"] == pytest.approx(0.03)
    if gain is not None:
        assert f"escape gain {gain:.3g}" in d.tags["diagnosis_reason"]
    # The threshold is a named setting.
    strict = diagnose(history(PLATEAU, grad=SADDLE_GRAD, probes={7: (-0.8, 4.0)}, escapes={7: 0.9}),
                      thresholds=Thresholds(escape_gain=0.95))
    assert strict.tags["saddle_confirmed"] == "no"


def test_an_escape_gain_at_a_probe_far_from_the_plateau_is_not_used():
    d = diagnose(history(PLATEAU, grad=SADDLE_GRAD, probes={7: (-0.8, 4.0), 1: (-0.8, 4.0)},
                         escapes={1: 0.9}))
    assert d.tags["saddle_confirmed"] == "untested" and "plateau_escape_gain" not in d.metrics


def test_stalled_fires_once_at_the_epoch_a_plateau_becomes_long_enough():
    # PLATEAU is flat from epoch 4 (index 3) to 10: with 4 flat epochs needed, it counts at epoch 7.
    fired = [epoch for epoch in range(1, len(PLATEAU) + 1) if stalled(PLATEAU[:epoch])]
    assert fired == [7]
    two = Thresholds(min_plateau_epochs=2)
    assert [e for e in range(1, 13) if stalled(PLATEAU[:e], thresholds=two)] == [5]
    assert not any(stalled(DECLINE[:e]) for e in range(1, len(DECLINE) + 1))


def test_plateau_run_and_wiggle_helpers():
    assert plateau_run([1.0, 0.5, 0.25], tol=0.01) == (-1, 0)
    assert plateau_run([1.0, 1.0, 1.0, 0.5, 0.5], tol=0.01) == (1, 2)  # earliest of equal runs
    assert plateau_run([1.0, 1.001, 1.0, 1.0005], tol=0.01) == (1, 3)  # small rises are flat too
    assert plateau_run([1.0, 1.5, 1.2, 1.1, 0.5], tol=0.01) == (1, 3)  # no new best: no progress
    assert plateau_run([1.0, 1.5, 1.2, 1.1, 0.5], tol=0.01, band=0.3) == (2, 2)  # but a spike is not flat
    assert plateau_run([1.0, math.nan, 1.0], tol=0.01) == (2, 1)  # a NaN ends a run
    assert val_wiggle([1.0, 0.5]) == 0.0
    assert val_wiggle([1.0, 0.8, 0.6, 0.4]) == pytest.approx(0.0)


@pytest.mark.parametrize("kwargs, name", [
    ({"plateau_tol": 0.0}, "plateau_tol"),
    ({"plateau_band": 0.0}, "plateau_band"),
    ({"min_plateau_epochs": 0}, "min_plateau_epochs"),
    ({"small_grad_ratio": -1.0}, "small_grad_ratio"),
    ({"saddle_neg_ratio": 0.0}, "saddle_neg_ratio"),
    ({"probe_slack": -1}, "probe_slack"),
    ({"oscillation_wiggle": 0.0}, "oscillation_wiggle"),
    ({"escape_gain": 0.0}, "escape_gain"),
])
def test_thresholds_reject_out_of_range_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Thresholds(**kwargs)
