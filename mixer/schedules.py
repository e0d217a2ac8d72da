"""Learning-rate schedules, stepped once per epoch: pure functions of ``epoch``, the 0-based index of
the epoch about to run; ``learning_rate(config, epoch)`` picks the one ``config.scheduler`` names.

Warmup (every schedule but ``constant``) rises as ``lr * (epoch + 1) / warmup_epochs``, so the first
epoch already trains (a zero-lr epoch would be wasted) and the last runs at ``lr``; the schedule proper
then starts at ``lr`` with ``e = epoch - warmup_epochs`` (so the peak is held for two epochs).
``cosine`` is torch's ``CosineAnnealingLR(T_max=T)`` on ``e`` up to ``T``, then holds ``eta_min`` (torch
rises again); ``cosine_warm_restarts`` is torch's ``CosineAnnealingWarmRestarts(T_0=t_0,
T_mult=t_mult, eta_min)`` (SGDR) on ``e``; ``sharp_cosine`` (the seed notebook's last experiment) is
``cosine`` reaching ``eta_min`` after ``sharp_fraction`` of the run's epochs."""

from __future__ import annotations

import math

from mixer.config import SCHEDULERS, TrainConfig

__all__ = ["constant", "cosine", "cosine_warm_restarts", "learning_rate", "sharp_cosine",
           "sharp_cosine_length", "warmup"]


def _check_epoch(epoch: int) -> None:
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0 (0-based), got epoch={epoch}")


def _half_cosine(lr: float, eta_min: float, progress: float) -> float:
    """From ``lr`` at progress 0 to ``eta_min`` at progress 1."""
    return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * progress)) / 2.0


def constant(epoch: int, *, lr: float) -> float:
    """``lr`` at every epoch."""
    _check_epoch(epoch)
    return lr


def warmup(epoch: int, *, lr: float, warmup_epochs: int) -> float | None:
    """The warmup rate ``lr * (epoch + 1) / warmup_epochs``, or None once warmup is over."""
    _check_epoch(epoch)
    return lr * (epoch + 1) / warmup_epochs if epoch < warmup_epochs else None


def cosine(epoch: int, *, lr: float, epochs: int, eta_min: float = 0.0, warmup_epochs: int = 0,
           t_max: int = 0) -> float:
    """Warmup, then a half cosine from ``lr`` to ``eta_min`` over ``t_max`` epochs, then ``eta_min``;
    ``t_max=0`` means ``epochs - warmup_epochs`` (at least 1), ``epochs`` being the run's length."""
    if (warm := warmup(epoch, lr=lr, warmup_epochs=warmup_epochs)) is not None:
        return warm
    period = t_max if t_max > 0 else max(1, epochs - warmup_epochs)
    e = epoch - warmup_epochs
    return _half_cosine(lr, eta_min, e / period) if e <= period else eta_min


def cosine_warm_restarts(epoch: int, *, lr: float, eta_min: float = 0.0, warmup_epochs: int = 0,
                         t_0: int = 10, t_mult: int = 1) -> float:
    """Warmup, then SGDR: cosine cycles of ``t_0 * t_mult**i`` epochs from ``lr`` towards ``eta_min``."""
    if t_0 < 1 or t_mult < 1:
        raise ValueError(f"t_0 and t_mult must be >= 1, got t_0={t_0}, t_mult={t_mult}")
    if (warm := warmup(epoch, lr=lr, warmup_epochs=warmup_epochs)) is not None:
        return warm
    # Integer arithmetic finds the cycle exactly (torch's float log can land on the wrong side).
    t_cur, t_i = epoch - warmup_epochs, t_0
    while t_cur >= t_i:
        t_cur -= t_i
        t_i *= t_mult
    return _half_cosine(lr, eta_min, t_cur / t_i)


def sharp_cosine_length(epochs: int, sharp_fraction: float) -> int:
    """The epochs the sharp cosine takes to reach ``eta_min``: ``sharp_fraction * epochs``, half up, >= 1."""
    if not 0 < sharp_fraction <= 1:
        raise ValueError(f"sharp_fraction must be in (0, 1], got sharp_fraction={sharp_fraction}")
    return max(1, math.floor(sharp_fraction * epochs + 0.5))


def sharp_cosine(epoch: int, *, lr: float, epochs: int, eta_min: float = 0.0, warmup_epochs: int = 0,
                 sharp_fraction: float = 0.15) -> float:
    """Warmup, then a cosine reaching ``eta_min`` after ``sharp_fraction`` of ``epochs``, then held."""
    return cosine(epoch, lr=lr, epochs=epochs, eta_min=eta_min, warmup_epochs=warmup_epochs,
                  t_max=sharp_cosine_length(epochs, sharp_fraction))


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The rate for 0-based ``epoch`` under ``config.scheduler`` and its settings."""
    name = config.scheduler
    if name == "constant":
        return constant(epoch, lr=config.lr)
    common = {"lr": config.lr, "eta_min": config.eta_min, "warmup_epochs": config.warmup_epochs}
    if name == "cosine":
        return cosine(epoch, epochs=config.epochs, t_max=config.t_max, **common)
    if name == "cosine_warm_restarts":
        return cosine_warm_restarts(epoch, t_0=config.t_0, t_mult=config.t_mult, **common)
    if name == "sharp_cosine":
        return sharp_cosine(epoch, epochs=config.epochs, sharp_fraction=config.sharp_fraction, **common)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got scheduler={name!r}")
