"""Quantile scaling and the held-out test split: fitted on training rows only, saved exactly."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from mixer.bundle import BundleError, ModelBundle
from mixer.config import DataConfig, MixerConfig
from mixer.data import (
    CATEGORICAL,
    FEATURE_NAMES,
    DataError,
    Pipeline,
    labels,
    load,
    read_csv,
    stratified_split,
    synthetic_frame,
)
from mixer.model import init_params
from tests.mixer.test_data import assert_from_dict_refuses

NUMERIC = [name for name in FEATURE_NAMES if name not in CATEGORICAL]
# The keys every pipeline had before scaling "quantile"; such saved pipelines must keep loading.
OLD_KEYS = {"format", "feature_names", "categories", "scaling", "mean", "std"}
# The largest normal score quantile scaling gives: that of level 1 - 1e-7.
TOP_SCORE = NormalDist().inv_cdf(1 - 1e-7)


def write_csv(tmp_path: Path, frame: pd.DataFrame, name: str = "rows.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def with_continuous(frame: pd.DataFrame, column: str, seed: int) -> pd.DataFrame:
    """``frame`` with ``column`` replaced by heavy-tailed values that are all distinct."""
    frame = frame.copy()
    frame[column] = np.random.default_rng(seed).lognormal(0.0, 3.0, len(frame))
    return frame


def csv_config(path: Path, **kwargs) -> DataConfig:
    return DataConfig(source="csv", train_csv=str(path), **kwargs)


# --------------------------------------------------------------------------- quantile scaling


def test_load_fits_quantile_scaling_on_exactly_the_training_rows(tmp_path):
    path = write_csv(tmp_path, synthetic_frame(600, 0))
    data = load(csv_config(path, scaling="quantile", seed=5))
    frame = read_csv(path)
    alone = Pipeline.fit(frame.iloc[data.rows["train"]], scaling="quantile", source="train rows")
    assert alone.to_dict() == data.pipeline.to_dict()
    np.testing.assert_array_equal(data.x_val, alone.transform(frame.iloc[data.rows["val"]], source="v"))
    # Fitted on every row instead, the quantiles differ.
    assert Pipeline.fit(frame, scaling="quantile", source="all").to_dict() != alone.to_dict()


def test_extreme_validation_rows_do_not_move_the_quantile_scaling(tmp_path):
    frame = synthetic_frame(600, 0)
    frame[NUMERIC] = frame[NUMERIC].astype(np.float64)
    base = load(csv_config(write_csv(tmp_path, frame, "base.csv"), scaling="quantile"))
    wild = frame.copy()
    val = base.rows["val"]
    wild.loc[val[::2], NUMERIC] = 1e12
    wild.loc[val[1::2], NUMERIC] = -1e12
    moved = load(csv_config(write_csv(tmp_path, wild, "wild.csv"), scaling="quantile"))
    # The split depends on the labels and the seed only, so the same rows are validation rows.
    np.testing.assert_array_equal(moved.rows["val"], val)
    assert moved.pipeline.to_dict() == base.pipeline.to_dict()
    np.testing.assert_array_equal(moved.x_train, base.x_train)
    fixed = frame.iloc[[int(base.rows["train"][0])]]
    np.testing.assert_array_equal(moved.pipeline.transform(fixed, source="row"),
                                  base.pipeline.transform(fixed, source="row"))
    assert not np.array_equal(moved.x_val, base.x_val)


def test_unseen_extremes_map_to_the_training_extremes_outputs():
    frame = synthetic_frame(1500, 1)  # > 1000 rows: the quantiles are not the rows themselves
    pipe = Pipeline.fit(frame, scaling="quantile", source="train")
    x = pipe.transform(frame, source="train")
    probe = frame.iloc[:2].copy()
    probe[NUMERIC] = probe[NUMERIC].astype(np.float64)
    probe.loc[probe.index[0], NUMERIC] = 1e12
    probe.loc[probe.index[1], NUMERIC] = -1e12
    out = pipe.transform(probe, source="probe")
    assert np.isfinite(out).all()
    assert (out >= x.min(axis=0)).all() and (out <= x.max(axis=0)).all()
    # Exactly the training extremes' outputs, also where the minimum is tied (mostly-zero columns,
    # e.g. sloss), so an unseen value never scores further out than every training row.
    numeric = [pipe.feature_names.index(name) for name in NUMERIC]
    np.testing.assert_array_equal(out[0, numeric], x.max(axis=0)[numeric])
    np.testing.assert_array_equal(out[1, numeric], x.min(axis=0)[numeric])
    assert x[:, pipe.feature_names.index("sloss")].min() > -1.0


def test_quantile_scores_are_the_normal_scores_of_the_training_ranks():
    # With at most 1000 training rows there is one level per row, so each row scores exactly
    # Phi^-1(rank / (n - 1)), the ends kept within 1e-7 of 0 and 1.
    frame = with_continuous(synthetic_frame(500, 0), "sload", seed=1)
    pipe = Pipeline.fit(frame, scaling="quantile", source="f")
    got = pipe.transform(frame, source="f")[:, pipe.feature_names.index("sload")]
    ranks = frame["sload"].rank(method="first").to_numpy() - 1
    want = [NormalDist().inv_cdf(min(max(r / 499, 1e-7), 1 - 1e-7)) for r in ranks]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_quantile_output_is_roughly_standard_normal_and_monotone_in_the_input():
    frame = with_continuous(synthetic_frame(5000, 0), "sload", seed=2)
    pipe = Pipeline.fit(frame, scaling="quantile", source="f")
    j = pipe.feature_names.index("sload")
    x = pipe.transform(frame, source="f")[:, j]
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1.0) < 0.05
    order = np.argsort(frame["sload"].to_numpy(), kind="stable")
    assert (np.diff(x[order]) >= 0).all()
    # Also between the fitted quantiles and beyond the training range.
    grid = np.concatenate([[-1e12, -1.0, 0.0], np.geomspace(1e-8, 1e8, 4001), [1e12]])
    probe = frame.iloc[np.zeros(len(grid), dtype=int)].copy()
    probe["sload"] = grid
    scores = pipe.transform(probe, source="grid")[:, j]
    assert np.isfinite(scores).all() and (np.diff(scores) >= 0).all()
    assert scores[0] == x.min() and scores[-1] == x.max()


def test_a_mostly_zero_column_maps_every_zero_to_one_central_value():
    frame = synthetic_frame(1000, 0)
    rng = np.random.default_rng(3)
    values = np.zeros(1000)
    values[rng.permutation(1000)[:100]] = rng.lognormal(3.0, 1.0, 100)
    frame["sloss"] = values
    pipe = Pipeline.fit(frame, scaling="quantile", source="f")
    x = pipe.transform(frame, source="f")[:, pipe.feature_names.index("sloss")]
    zeros = values == 0
    assert np.isfinite(x).all()
    assert np.unique(x[zeros]).size == 1
    # The middle of the zeros' levels (about 0.45), not the clip bound and not the mean of the
    # tie run's two end scores.
    assert x[zeros][0] == pytest.approx(NormalDist().inv_cdf(0.45), abs=0.01)
    assert (x[~zeros] > x[zeros][0]).all()


def test_a_quantile_pipeline_round_trips_bit_identically_through_json_and_a_bundle(tmp_path):
    frame = synthetic_frame(1500, 2)
    pipe = Pipeline.fit(frame.iloc[:1200], scaling="quantile", source="train")
    want = pipe.transform(frame, source="all")  # includes rows the fit never saw
    d = json.loads(json.dumps(pipe.to_dict()))
    assert np.array(d["quantiles"]).shape == (1000, 42)
    again = Pipeline.from_dict(d)
    np.testing.assert_array_equal(again.transform(frame, source="all"), want)

    config = MixerConfig(n_features=42, patch_size=6, dim=8, depth=2)
    bundle = ModelBundle(init_params(config, 0), config, pipe)
    loaded = ModelBundle.load(bundle.save(tmp_path / "model.npz"))
    assert loaded.pipeline.to_dict() == pipe.to_dict()
    np.testing.assert_array_equal(loaded.pipeline.transform(frame, source="all"), want)
    np.testing.assert_array_equal(loaded.predict_proba(frame, source="all"),
                                  bundle.predict_proba(frame, source="all"))


@pytest.mark.parametrize("scaling", ["global", "standard", "log_standard"])
def test_a_pipeline_without_quantiles_keeps_its_old_format_and_loads(scaling):
    frame = synthetic_frame(300, 0)
    pipe = Pipeline.fit(frame, scaling=scaling, source="f")
    d = json.loads(json.dumps(pipe.to_dict()))
    assert set(d) == OLD_KEYS and d["format"] == "mixer.data.Pipeline/1"
    np.testing.assert_array_equal(Pipeline.from_dict(d).transform(frame, source="f"),
                                  pipe.transform(frame, source="f"))


def _drop_last_feature(d):
    d["quantiles"] = [row[:-1] for row in d["quantiles"]]


@pytest.mark.parametrize(("change", "match"), [
    (lambda d: d.pop("quantiles"), r"^pipeline: missing key 'quantiles' \(scaling 'quantile' needs it\)$"),
    (_drop_last_feature, r"^pipeline: quantiles has shape \(100, 41\), expected \(n_levels >= 2, 42\)"),
    (lambda d: d.update(quantiles=d["quantiles"][:1]), r"quantiles has shape \(1, 42\)"),
    (lambda d: d["quantiles"][3].__setitem__(5, float("nan")),
     r"quantiles\[3\]\[5\] \(dpkts\) is not finite"),
    (lambda d: d["quantiles"][10].__setitem__(0, 1e9),
     r"quantiles\[:, 0\] \(dur\) must be non-decreasing, but level 11 holds"),
    (lambda d: d["quantiles"][0].__setitem__(0, "low"), "quantiles must be a list of n_levels lists"),
    (lambda d: d["quantiles"].__setitem__(0, d["quantiles"][0][:-1]), "quantiles must be a list"),
    (lambda d: d.update(scaling="standard"), "key 'quantiles' belongs to scaling 'quantile' only"),
])
def test_a_corrupted_quantile_entry_is_named(change, match):
    assert_from_dict_refuses(change, match, scaling="quantile")


def test_a_bundle_with_corrupted_quantiles_is_refused_naming_them(tmp_path):
    config = MixerConfig(n_features=42, patch_size=6, dim=8, depth=2)
    pipe = Pipeline.fit(synthetic_frame(100, 0), scaling="quantile", source="f")
    path = ModelBundle(init_params(config, 0), config, pipe).save(tmp_path / "model.npz")
    with np.load(path) as archive:
        arrays = dict(archive)
    meta = json.loads(str(arrays["__bundle__"]))
    meta["pipeline"]["quantiles"][7][2] = -1.0  # below the lower levels' service codes (>= 0)
    arrays["__bundle__"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    want = r"bad pipeline: pipeline: quantiles\[:, 2\] \(service\) must be non-decreasing"
    with pytest.raises(BundleError, match=want):
        ModelBundle.load(path)


# --------------------------------------------------------------------------- test_fraction


@pytest.mark.parametrize("scaling", ["log_standard", "quantile"])
def test_test_fraction_holds_out_stratified_rows_the_pipeline_never_sees(scaling):
    data = load(DataConfig(n_rows=1000, seed=3, val_fraction=0.25, test_fraction=0.2, scaling=scaling))
    frame = synthetic_frame(1000, 3)
    y = labels(frame, source="frame")
    rows = data.rows
    assert set(rows) == {"train", "val", "test"}
    assert len(rows["test"]) == 200 and len(rows["val"]) == 200 and len(rows["train"]) == 600
    everything = np.sort(np.concatenate([rows["train"], rows["val"], rows["test"]]))
    np.testing.assert_array_equal(everything, np.arange(1000))  # disjoint, and every row
    # Stratified: each split holds its share of each label, within rounding.
    for side, share in (("test", 0.2), ("val", 0.8 * 0.25), ("train", 0.8 * 0.75)):
        for label in (0, 1):
            assert abs((y[rows[side]] == label).sum() - share * (y == label).sum()) <= 1, (side, label)
    pipe = Pipeline.fit(frame.iloc[rows["train"]], scaling=scaling, source="train")
    assert data.pipeline.to_dict() == pipe.to_dict()
    np.testing.assert_array_equal(data.x_test, pipe.transform(frame.iloc[rows["test"]], source="test"))
    np.testing.assert_array_equal(data.y_test, y[rows["test"]])
    np.testing.assert_array_equal(data.y_train, y[rows["train"]])
    np.testing.assert_array_equal(data.y_val, y[rows["val"]])


def test_the_test_split_is_seeded_and_drawn_from_its_own_stream():
    def rows(seed):
        return load(DataConfig(n_rows=500, seed=seed, val_fraction=0.2, test_fraction=0.2)).rows

    a, b, other = rows(1), rows(1), rows(2)
    for side in ("train", "val", "test"):
        np.testing.assert_array_equal(a[side], b[side])
    assert not np.array_equal(a["test"], other["test"])
    # Not the rows the validation split of the same seed and fraction would take.
    y = labels(synthetic_frame(500, 1), source="frame")
    assert not np.array_equal(a["test"], stratified_split(y, val_fraction=0.2, seed=1)[1])


def test_no_test_id_reaches_training_or_validation(tmp_path):
    frame = synthetic_frame(400, 0)
    frame["id"] = 100_000 + 7 * np.random.default_rng(0).permutation(400)  # unique, not positions
    path = write_csv(tmp_path, frame)
    data = load(csv_config(path, test_fraction=0.15, scaling="quantile"))
    ids = pd.read_csv(path)["id"].to_numpy()
    test_ids = set(ids[data.rows["test"]].tolist())
    assert len(test_ids) == len(data.rows["test"]) == 60
    assert test_ids.isdisjoint(ids[data.rows["train"]].tolist())
    assert test_ids.isdisjoint(ids[data.rows["val"]].tolist())
    # The positions are the file's data rows: the rows with those ids are the test arrays.
    test_rows = pd.read_csv(path).loc[lambda f: f["id"].isin(test_ids)]
    np.testing.assert_array_equal(data.x_test, data.pipeline.transform(test_rows, source="test"))
    np.testing.assert_array_equal(data.y_test, test_rows["label"].to_numpy())


def test_zero_test_fraction_gives_the_rows_and_arrays_of_before():
    # The validation split the sweep's recorded histories were drawn with (stream 1 of the seed).
    y = np.array([1] * 30 + [0] * 70)
    assert stratified_split(y, val_fraction=0.2, seed=0)[1].tolist() == [
        2, 6, 13, 18, 25, 28, 30, 35, 39, 40, 48, 51, 53, 57, 58, 80, 83, 86, 90, 95]

    data = load(DataConfig(n_rows=700, seed=4, val_fraction=0.3))
    frame = synthetic_frame(700, 4)
    train, val = stratified_split(labels(frame, source="f"), val_fraction=0.3, seed=4)
    assert set(data.rows) == {"train", "val"} and data.x_test is None and data.y_test is None
    np.testing.assert_array_equal(data.rows["train"], train)
    np.testing.assert_array_equal(data.rows["val"], val)
    pipe = Pipeline.fit(frame.iloc[train], scaling="log_standard", source="f")
    np.testing.assert_array_equal(data.x_train, pipe.transform(frame.iloc[train], source="f"))
    np.testing.assert_array_equal(data.x_val, pipe.transform(frame.iloc[val], source="f"))


def test_a_label_too_rare_for_three_splits_is_refused_naming_source_and_fractions(tmp_path):
    frame = synthetic_frame(60, 0)
    frame["label"] = 0
    frame.loc[[3, 40], "label"] = 1
    path = write_csv(tmp_path, frame, "rare.csv")
    want = (rf"^{path}: the 2 row\(s\) of label 1 leave no validation row of that label "
            rf"at test_fraction=0.2, val_fraction=0.2 \(each label needs 3 rows at least\)$")
    with pytest.raises(DataError, match=want):
        load(csv_config(path, test_fraction=0.2, val_fraction=0.2))
    # Three rows of the label: one on each side.
    frame.loc[50, "label"] = 1
    data = load(csv_config(write_csv(tmp_path, frame, "three.csv"), test_fraction=0.2, val_fraction=0.2))
    assert [int(data.y_train.sum()), int(data.y_val.sum()), int(data.y_test.sum())] == [1, 1, 1]


def test_quantile_scaling_of_the_real_sample_keeps_held_out_rows_in_range(real_csv):
    data = load(csv_config(real_csv, scaling="quantile", test_fraction=0.2))
    assert data.x_train.shape == (12800, 42) and data.x_test.shape == (4000, 42)
    for x in (data.x_train, data.x_val, data.x_test):
        assert np.isfinite(x).all() and np.abs(x).max() <= TOP_SCORE + 1e-5
        assert (x >= data.x_train.min(axis=0)).all() and (x <= data.x_train.max(axis=0)).all()
