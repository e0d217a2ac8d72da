"""What a trial's curves say: healthy, plateau, saddle, oscillating, diverged or too short — with the numbers.

``diagnose(history)`` labels one run from its per-epoch metrics by the rules of README.md's "Plateau or
saddle?", first match wins; docs/architecture.md says what is measured and why. ``stalled`` applies
the plateau rule to a growing history, so that ``fit`` can probe at a stall. The thresholds are the
fields of ``Thresholds`` (frozen; defaults there)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mixer.curvature import neg_ratio

__all__ = ["LABELS", "Diagnosis", "Thresholds", "diagnose", "plateau_run", "stalled", "val_wiggle"]

LABELS = ("healthy", "plateau", "saddle", "oscillating", "diverged", "too_short")


@dataclass(frozen=True)
class Thresholds:
    """The settings behind ``diagnose``'s rules."""

    plateau_tol: float = 0.005  # flat: an epoch beat the best train loss so far by less than this share
    plateau_band: float = 0.05  # ... and did not rise this share or more above it
    min_plateau_epochs: int = 4  # flat epochs in a row needed to call a plateau
    small_grad_ratio: float = 0.75  # plateau grad norm <= this × the run's largest epoch-mean one is small
    saddle_neg_ratio: float = 0.1  # |λ_min| / λ_max at the plateau for "clearly negative" curvature
    probe_slack: int = 2  # probes up to this many epochs outside the plateau still count
    oscillation_wiggle: float = 0.25  # val_wiggle at or above this is oscillating
    escape_gain: float = 0.5  # saddle confirmed: escape step's loss fall >= this share of the predicted one

    def __post_init__(self) -> None:
        for name in ("plateau_tol", "plateau_band", "small_grad_ratio", "saddle_neg_ratio",
                     "oscillation_wiggle", "escape_gain"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)}")
        for name, low in (("min_plateau_epochs", 1), ("probe_slack", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {name}={getattr(self, name)}")


@dataclass(frozen=True)
class Diagnosis:
    """A label (one of ``LABELS``) and the numbers behind it: ``metrics`` those known for this run (for
    MLflow), ``tags`` the MLflow tags ``diagnosis``, ``plateau_start_epoch``, ``plateau_length`` (``"none"``,
    ``"0"`` without a plateau), ``saddle_confirmed`` (yes/no/untested), ``diagnosis_reason`` (one line)."""

    label: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def _get(entry: Any, name: str, default: float | None = None) -> float | None:
    value = entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name, None)
    return default if value is None else float(value)


def _flat(losses: Sequence[float], tol: float, band: float) -> list[bool]:
    """Per epoch: did it bring no real improvement (see ``plateau_run``)? The first never counts."""
    flags, best = [], math.inf
    for cur in losses:
        flags.append(math.isfinite(cur) and math.isfinite(best)
                     and -band * abs(best) < best - cur < tol * abs(best))
        if math.isfinite(cur):
            best = min(best, cur)
    return flags


def plateau_run(losses: Sequence[float], *, tol: float, band: float = math.inf) -> tuple[int, int]:
    """The longest run of epochs that brought no real improvement: ``(start index, length)``.

    Epoch ``i >= 1`` is flat when ``-band < (best - losses[i]) / |best| < tol`` with ``best =
    min(losses[:i])``: compared with the best so far, so that mini-batch noise does not cut a plateau
    in pieces, and a jump far above it (a restart's spike, a blow-up) is not flat. A non-finite loss
    ends a run. ``(-1, 0)`` if no epoch is flat; ties go to the earliest run."""
    best_start, best_len, length = -1, 0, 0
    for i, flat in enumerate(_flat(losses, tol, band)):
        length = length + 1 if flat else 0
        if length > best_len:
            best_start, best_len = i - length + 1, length
    return best_start, best_len


def stalled(losses: Sequence[float], *, thresholds: Thresholds = Thresholds()) -> bool:
    """True when the last ``min_plateau_epochs`` losses are flat and the one before them is not:
    once per plateau, at the epoch it becomes long enough for the diagnosis to count it."""
    flat = _flat(losses, thresholds.plateau_tol, thresholds.plateau_band)
    k = thresholds.min_plateau_epochs
    return len(flat) > k and all(flat[-k:]) and not flat[-k - 1]


def val_wiggle(values: Sequence[float]) -> float:
    """Total variation minus |net change|, relative to the mean (0 for fewer than 3 points)."""
    mean = sum(values) / len(values) if values else 0.0
    if len(values) < 3 or mean == 0:
        return 0.0
    travel = sum(abs(b - a) for a, b in zip(values, values[1:], strict=False))
    return (travel - abs(values[-1] - values[0])) / abs(mean)


def diagnose(history: Sequence[Any], *, diverged: bool = False,
             thresholds: Thresholds = Thresholds()) -> Diagnosis:
    """Label one run: ``history`` holds ``EpochMetrics`` (or dicts with the same names and ``epoch``, as in
    a trial's ``history`` attribute) in epoch order, the curvature fields None or absent on epochs
    without a probe. ``diverged``: fit said so. The returns below are the rules, first match wins."""
    th = thresholds
    epochs = [int(_get(e, "epoch") or i + 1) for i, e in enumerate(history)]
    train_f = [_get(e, "train_loss", math.nan) for e in history]
    val_f = [_get(e, "val_loss", math.nan) for e in history]
    metrics: dict[str, float] = {"epochs_run": float(len(history))}
    tags = {"plateau_start_epoch": "none", "plateau_length": "0", "saddle_confirmed": "untested"}

    def done(label: str, reason: str) -> Diagnosis:
        tags.update(diagnosis=label, diagnosis_reason=reason)
        return Diagnosis(label=label, metrics=metrics, tags=tags)

    bad = [ep for ep, t, v in zip(epochs, train_f, val_f, strict=True)
           if not (math.isfinite(t) and math.isfinite(v))]
    if bad:
        metrics["diverged_epoch"] = float(bad[0])
    if diverged or bad:
        return done("diverged", f"non-finite loss at epoch {bad[0]}" if bad else "fit reported divergence")
    if not history:
        return done("too_short", "no epochs to judge")
    if len(history) <= th.min_plateau_epochs:
        return done("too_short", f"{len(history)} epochs; the plateau rule needs more than "
                                 f"min_plateau_epochs={th.min_plateau_epochs}")

    wiggle = val_wiggle(val_f)
    start_idx, length = plateau_run(train_f, tol=th.plateau_tol, band=th.plateau_band)
    metrics.update(val_wiggle=wiggle, plateau_length=float(length))
    plateau_note = ""
    if length:
        idx = range(start_idx, start_idx + length)
        first, last = epochs[start_idx], epochs[start_idx + length - 1]
        tags.update(plateau_start_epoch=str(first), plateau_length=str(length))
        metrics.update(plateau_start_epoch=float(first), plateau_loss=sum(train_f[i] for i in idx) / length)
        plateau_note = (f"train loss improved < {th.plateau_tol:.2%}/epoch for {length} epochs from "
                        f"epoch {first} at {metrics['plateau_loss']:.3g}")
        lrs = [_get(history[i], "lr") for i in idx]
        if all(v is not None for v in lrs):
            metrics["plateau_lr"] = sum(lrs) / length
            plateau_note += f", lr {metrics['plateau_lr']:.3g}"
        grads = [_get(history[i], "grad_norm_mean") for i in idx]
        if all(g is not None for g in grads):
            metrics["plateau_grad_norm"] = sum(grads) / length
            peak = max(g for g in (_get(e, "grad_norm_mean") for e in history) if g is not None)
            if peak > 0:
                metrics["plateau_grad_ratio"] = metrics["plateau_grad_norm"] / peak
                plateau_note += (f", grad norm {metrics['plateau_grad_norm']:.3g} "
                                 f"({metrics['plateau_grad_ratio']:.3g} of peak)")
        # The probe nearest the plateau's middle, among those close enough to speak for it.
        probes = [(ep, e) for ep, e in zip(epochs, history, strict=True)
                  if _get(e, "hessian_min_eig") is not None and _get(e, "hessian_max_eig") is not None
                  and first - th.probe_slack <= ep <= last + th.probe_slack]
        if probes:
            probe_epoch, probe = min(probes, key=lambda p: (abs(p[0] - (first + last) / 2), p[0]))
            lam_min, lam_max = _get(probe, "hessian_min_eig"), _get(probe, "hessian_max_eig")
            ratio = _get(probe, "neg_curvature_ratio", neg_ratio(lam_min, lam_max))
            metrics.update(plateau_min_eig=lam_min, plateau_max_eig=lam_max,
                           plateau_neg_ratio=ratio, plateau_probe_epoch=float(probe_epoch))
            plateau_note += (f", λ_min {lam_min:.3g} / λ_max {lam_max:.3g} (ratio {ratio:.3g}) "
                             f"at epoch {probe_epoch}")
            measured = {"plateau_neg_share": _get(probe, "neg_curvature_share"),
                        "plateau_escape_gain": _get(probe, "escape_gain")}
            metrics.update({key: value for key, value in measured.items() if value is not None})
            if "plateau_escape_gain" in metrics:
                tags["saddle_confirmed"] = "yes" if metrics["plateau_escape_gain"] >= th.escape_gain else "no"
                plateau_note += (f", escape gain {metrics['plateau_escape_gain']:.3g} "
                                 f"(saddle confirmed: {tags['saddle_confirmed']})")
        else:
            plateau_note += ", no curvature probe near it"

    if length >= th.min_plateau_epochs:
        saddle = (metrics.get("plateau_grad_ratio", math.inf) <= th.small_grad_ratio
                  and metrics.get("plateau_neg_ratio", 0.0) >= th.saddle_neg_ratio)
        return done("saddle" if saddle else "plateau", plateau_note)
    if wiggle >= th.oscillation_wiggle:
        return done("oscillating", f"validation loss wiggle {wiggle:.3g} >= {th.oscillation_wiggle}")
    return done("healthy", f"longest flat stretch {length} epochs, validation loss wiggle {wiggle:.3g}")
