"""Learning-rate schedules against hand-computed values and, where semantics match, torch."""

from __future__ import annotations

import warnings

import pytest

from mixer.config import TrainConfig
from mixer.schedules import (
    constant,
    cosine,
    cosine_warm_restarts,
    learning_rate,
    sharp_cosine,
    sharp_cosine_length,
)

# cos(pi/4) = 0.70710678..., so (1 + cos(pi/4)) / 2 = 0.85355339..., (1 + cos(3pi/4)) / 2 = 0.14644660...
C1, C3 = 0.8535533905932737, 0.14644660940672627


def test_constant_is_lr_at_every_epoch():
    assert [constant(e, lr=0.3) for e in (0, 1, 50)] == [0.3, 0.3, 0.3]


def test_cosine_warms_up_from_lr_over_warmup_then_decays_and_holds():
    # lr 1, warmup 2, 6 epochs -> T = 4 cosine epochs; epoch 0 runs at lr/2, never at 0.
    got = [cosine(e, lr=1.0, epochs=6, warmup_epochs=2) for e in range(9)]
    assert got == pytest.approx([0.5, 1.0, 1.0, C1, 0.5, C3, 0.0, 0.0, 0.0], abs=1e-15)


def test_cosine_decays_to_eta_min_not_zero():
    got = [cosine(e, lr=1.0, epochs=6, eta_min=0.2, warmup_epochs=2) for e in range(2, 10)]
    assert got == pytest.approx([1.0, 0.8828427124746190, 0.6, 0.3171572875253810, 0.2, 0.2, 0.2, 0.2],
                                abs=1e-15)


def test_cosine_with_explicit_t_max_reaches_eta_min_after_t_max_epochs():
    got = [cosine(e, lr=0.5, epochs=100, t_max=2) for e in range(5)]
    assert got == pytest.approx([0.5, 0.25, 0.0, 0.0, 0.0], abs=1e-15)


def test_warm_restarts_follow_sgdr_cycles_growing_by_t_mult():
    # warmup 1, then cycles of 2, 4, 8 epochs.
    got = [cosine_warm_restarts(e, lr=1.0, warmup_epochs=1, t_0=2, t_mult=2) for e in range(9)]
    assert got == pytest.approx([1.0, 1.0, 0.5, 1.0, C1, 0.5, C3, 1.0, 0.9619397662556434], abs=1e-15)


def test_warm_restarts_with_t_mult_1_repeat_the_same_cycle_above_eta_min():
    got = [cosine_warm_restarts(e, lr=1.0, eta_min=0.2, t_0=3) for e in range(7)]
    assert got == pytest.approx([1.0, 0.8, 0.4, 1.0, 0.8, 0.4, 1.0], abs=1e-15)


def test_sharp_cosine_reaches_eta_min_after_the_sharp_fraction_of_the_epochs():
    # 20 epochs * 0.15 = 3 epochs of cosine from 1 to 0.1, then 0.1 to the end.
    got = [sharp_cosine(e, lr=1.0, epochs=20, eta_min=0.1) for e in range(20)]
    assert got[:4] == pytest.approx([1.0, 0.775, 0.325, 0.1], abs=1e-15)
    assert got[4:] == [0.1] * 16
    # With warmup the sharp part starts after it.
    warm = [sharp_cosine(e, lr=1.0, epochs=20, eta_min=0.1, warmup_epochs=2) for e in range(7)]
    assert warm == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.325, 0.1, 0.1], abs=1e-15)


@pytest.mark.parametrize(("epochs", "fraction", "length"), [
    (20, 0.15, 3), (10, 0.15, 2), (30, 0.15, 5), (1, 0.15, 1), (40, 1.0, 40),
])
def test_sharp_cosine_length_rounds_half_up_and_is_at_least_one(epochs, fraction, length):
    assert sharp_cosine_length(epochs, fraction) == length


@pytest.mark.parametrize(("scheduler", "expected"), [
    ("constant", [0.01] * 6),
    ("cosine", [0.005, 0.01, 0.01, 0.001 + 0.009 * C1, 0.0055, 0.001 + 0.009 * C3]),
    ("cosine_warm_restarts", [0.005, 0.01, 0.01, 0.0055, 0.01, 0.0055]),
    ("sharp_cosine", [0.005, 0.01, 0.01, 0.001, 0.001, 0.001]),
])
def test_learning_rate_dispatches_on_the_configs_scheduler(scheduler, expected):
    config = TrainConfig(scheduler=scheduler, lr=0.01, eta_min=0.001, epochs=6, warmup_epochs=2, t_0=2,
                         t_mult=1, sharp_fraction=0.15)
    assert [learning_rate(config, e) for e in range(6)] == pytest.approx(expected, abs=1e-15)


def test_negative_epoch_is_refused():
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        learning_rate(TrainConfig(scheduler="cosine"), -1)


def _torch_lrs(torch, make_scheduler, n: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = make_scheduler(opt)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
    return lrs


def test_cosine_matches_torch_cosine_annealing_up_to_t_max():
    torch = pytest.importorskip("torch")  # optional: only to cross-check
    want = _torch_lrs(
        torch, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=0.01), 8)
    got = [cosine(e, lr=0.1, epochs=7, eta_min=0.01) for e in range(8)]
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(("t_0", "t_mult"), [(3, 1), (2, 2), (1, 3)])
def test_warm_restarts_match_torch(t_0, t_mult):
    torch = pytest.importorskip("torch")
    want = _torch_lrs(torch, lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=t_0, T_mult=t_mult, eta_min=0.005), 30)
    got = [cosine_warm_restarts(e, lr=0.1, eta_min=0.005, t_0=t_0, t_mult=t_mult) for e in range(30)]
    assert got == pytest.approx(want, rel=1e-9)
