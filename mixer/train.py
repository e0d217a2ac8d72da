"""Training: ``fit`` runs epochs of mini-batches and reports each epoch to a callback.

``fit`` knows nothing of Optuna or MLflow: the sweep passes ``on_epoch``, which
receives each epoch's ``EpochMetrics`` and returns True to ask the run to stop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mixer.config import TrainConfig
from mixer.data import Dataset

STATUSES = ("completed", "stopped", "diverged")


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured. ``epoch`` counts from 1.

    The curvature fields are None on epochs without a curvature probe.
    """

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_precision: float
    val_recall: float
    val_f1: float
    lr: float
    grad_norm_mean: float
    grad_norm_max: float
    update_ratio: float
    epoch_seconds: float
    hessian_max_eig: float | None = None
    hessian_min_eig: float | None = None
    neg_curvature_ratio: float | None = None
    curvature_seconds: float | None = None

    def as_dict(self) -> dict[str, float]:
        """Metric name -> value, leaving out what this epoch did not measure (no ``epoch``)."""
        return {k: float(v) for k, v in dataclasses.asdict(self).items()
                if k != "epoch" and v is not None}


@dataclass
class FitResult:
    """The outcome of ``fit``.

    Attributes:
        history: one EpochMetrics per epoch run, in order.
        status: "completed" (all epochs), "stopped" (on_epoch asked) or "diverged"
            (a NaN or infinite loss; ``reason`` says where).
        reason: why the run did not complete, else None.
        best_epoch: the epoch with the lowest val_loss (0 if none finished).
        best_params: the parameters at the end of ``best_epoch``.
        params: the parameters at the end of the run.
    """

    history: list[EpochMetrics]
    status: str
    reason: str | None
    best_epoch: int
    best_params: dict[str, np.ndarray]
    params: dict[str, np.ndarray] = field(repr=False)


OnEpoch = Callable[[EpochMetrics], "bool | None"]


def fit(config: TrainConfig, data: Dataset, *, seed: int, on_epoch: OnEpoch | None = None) -> FitResult:
    """Train one Mixer. Same seed and inputs give a bit-identical history."""
    raise NotImplementedError
