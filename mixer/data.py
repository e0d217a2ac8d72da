"""UNSW-NB15 CSV loading, categorical encoding, per-feature scaling, synthetic data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixer.config import DataConfig


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the column and row."""


@dataclass
class Dataset:
    """Arrays ready for the Mixer: x of shape (rows, n_features) float32, y of shape (rows,) in {0,1}.

    ``pipeline`` is the fitted preprocessing (fit on the training split only) that turns raw rows
    of either UNSW-NB15 layout into x; ``x_test``/``y_test`` are None without a test CSV.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    feature_names: list[str]
    pipeline: "Pipeline"
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def load(config: DataConfig) -> Dataset:
    raise NotImplementedError
