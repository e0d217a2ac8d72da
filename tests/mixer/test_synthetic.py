"""Synthetic rows: the real layout and pathology, reproducible, learnable only when scaled per feature."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mixer.config import DataConfig
from mixer.data import CATEGORICAL, FEATURE_NAMES, Dataset, load
from mixer.optim import Adam
from mixer.synthetic import synthetic_frame

RAW_COLUMNS = ["id", *FEATURE_NAMES, "label"]


def logreg_val_accuracy(data: Dataset, *, steps: int = 300, lr: float = 0.05) -> float:
    """Validation accuracy of a full-batch logistic regression trained with mixer.optim.Adam."""
    params = {"w": np.zeros(data.n_features, np.float32), "b": np.zeros(1, np.float32)}
    opt = Adam(params, lr=lr)
    x, y = data.x_train, data.y_train.astype(np.float32)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ params["w"] + params["b"][0])))
        d = (p - y) / len(y)
        opt.step(params, {"w": x.T @ d, "b": np.array([d.sum()], np.float32)})
    pred = (data.x_val @ params["w"] + params["b"][0]) > 0
    return float((pred == data.y_val).mean())


def test_synthetic_frame_has_the_real_csv_layout():
    frame = synthetic_frame(50, 0)
    assert list(frame.columns) == RAW_COLUMNS
    assert len(frame) == 50
    assert frame["id"].tolist() == list(range(1, 51))
    for name in CATEGORICAL:
        assert all(isinstance(v, str) for v in frame[name])
    numeric = [c for c in RAW_COLUMNS if c not in CATEGORICAL]
    assert all(pd.api.types.is_numeric_dtype(frame[c]) for c in numeric)


def test_synthetic_frame_matches_the_real_files_header_and_dtypes(real_csv):
    real = pd.read_csv(real_csv, nrows=200)
    synthetic = synthetic_frame(200, 0)
    assert list(synthetic.columns) == list(real.columns)
    assert synthetic.dtypes.astype(str).tolist() == real.dtypes.astype(str).tolist()


def test_synthetic_frame_is_reproducible_by_seed():
    pd.testing.assert_frame_equal(synthetic_frame(300, 5), synthetic_frame(300, 5))
    assert not synthetic_frame(300, 5).equals(synthetic_frame(300, 6))


def test_synthetic_frame_has_the_real_datas_pathology():
    frame = synthetic_frame(6000, 0)
    assert frame["sttl"].between(0, 255).all() and frame["swin"].isin([0, 255]).all()
    assert frame["stcpb"].max() > 1e9 and frame["sload"].max() > 1e9  # counters up to ~4.3e9
    # Heavy tails: the largest source byte count is orders of magnitude above the median.
    assert frame["sbytes"].max() > 50 * frame["sbytes"].median()
    for name in CATEGORICAL:
        share = frame[name].value_counts(normalize=True)
        assert share.min() < 0.01, f"{name} has no rare category"
    assert frame["proto"].nunique() > 10
    assert 0.45 < frame["label"].mean() < 0.65


def test_synthetic_label_is_learnable_with_per_feature_scaling_and_not_with_global():
    # The point of the study: one table-wide mean/std hides the small-scale features.
    acc = {s: logreg_val_accuracy(load(DataConfig(n_rows=6000, seed=0, scaling=s)))
           for s in ("global", "standard", "log_standard")}
    assert acc["standard"] > 0.78 and acc["log_standard"] > 0.78, acc
    assert acc["global"] < 0.65, acc
    assert min(acc["standard"], acc["log_standard"]) - acc["global"] > 0.15, acc




def test_the_generator_is_also_offered_by_mixer_data():
    import mixer.data

    assert mixer.data.synthetic_frame is synthetic_frame
