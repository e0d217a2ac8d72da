"""UNSW-NB15 loading: validation messages, encoding, scaling, the pipeline, the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mixer.config import DataConfig
from mixer.data import (
    FEATURE_NAMES,
    DataError,
    Pipeline,
    labels,
    load,
    read_csv,
    stratified_split,
    synthetic_frame,
)

RAW_COLUMNS = ["id", *FEATURE_NAMES, "label"]


def write_csv(tmp_path: Path, frame: pd.DataFrame, name: str = "rows.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def write_lines(tmp_path: Path, lines: list[str], name: str = "bad.csv") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def csv_lines(frame: pd.DataFrame) -> list[str]:
    return frame.to_csv(index=False).splitlines()


def set_cell(lines: list[str], data_row: int, column: str, value: str) -> list[str]:
    """Replace one cell; ``data_row`` is 1-based (line data_row + 1 of the file)."""
    header = lines[0].split(",")
    cells = lines[data_row].split(",")
    cells[header.index(column)] = value
    return lines[:data_row] + [",".join(cells)] + lines[data_row + 1:]


# --------------------------------------------------------------------------- load


def test_load_synthetic_gives_float32_splits_with_int_labels():
    data = load(DataConfig(n_rows=1000, seed=3, val_fraction=0.25))
    assert data.x_train.shape == (750, 42) and data.x_val.shape == (250, 42)
    assert data.x_train.dtype == np.float32 and data.x_val.dtype == np.float32
    assert data.y_train.dtype == np.int64 and set(np.unique(data.y_train)) == {0, 1}
    assert data.feature_names == list(FEATURE_NAMES) and data.n_features == 42
    assert data.x_test is None and data.y_test is None
    assert np.isfinite(data.x_train).all() and np.isfinite(data.x_val).all()


def test_split_is_stratified_and_seeded():
    y = np.array([1] * 300 + [0] * 700)
    train, val = stratified_split(y, val_fraction=0.2, seed=0)
    assert len(val) == 200 and y[val].sum() == 60  # 20 % of each class
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(1000))
    again = stratified_split(y, val_fraction=0.2, seed=0)
    other = stratified_split(y, val_fraction=0.2, seed=1)
    assert np.array_equal(val, again[1]) and not np.array_equal(val, other[1])


def test_load_is_reproducible_by_seed():
    a, b = load(DataConfig(n_rows=500, seed=1)), load(DataConfig(n_rows=500, seed=1))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.x_train, load(DataConfig(n_rows=500, seed=2)).x_train)


def test_pipeline_is_fitted_on_the_training_split_only():
    data = load(DataConfig(n_rows=2000, seed=0, scaling="standard"))
    # Per-feature standardised with the training split's statistics: exactly centred there...
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    # ...and the statistics are not those of train + validation together.
    frame = synthetic_frame(2000, 0)
    both = Pipeline.fit(frame, scaling="standard", source="all")
    assert not np.allclose(both.mean, data.pipeline.mean)


def test_load_csv_with_a_separate_test_file(tmp_path):
    train = write_csv(tmp_path, synthetic_frame(400, 0), "train.csv")
    test_frame = synthetic_frame(100, 9)
    test = write_csv(tmp_path, test_frame, "test.csv")
    data = load(DataConfig(source="csv", train_csv=str(train), test_csv=str(test), scaling="log_standard"))
    assert data.x_train.shape == (320, 42) and data.x_val.shape == (80, 42)
    assert data.x_test.shape == (100, 42) and data.x_test.dtype == np.float32
    np.testing.assert_array_equal(data.y_test, test_frame["label"].to_numpy())
    # The test rows go through the train-fitted pipeline, not one of their own.
    np.testing.assert_array_equal(data.x_test, data.pipeline.transform(test_frame, source="t"))

    unlabelled = write_csv(tmp_path, test_frame.drop(columns=["label"]), "unlabelled.csv")
    data = load(DataConfig(source="csv", train_csv=str(train), test_csv=str(unlabelled)))
    assert data.x_test.shape == (100, 42) and data.y_test is None


def test_feature_order_follows_the_file(tmp_path):
    frame = synthetic_frame(200, 0)
    reordered = frame[["label", *reversed(FEATURE_NAMES), "id"]]
    data = load(DataConfig(source="csv", train_csv=str(write_csv(tmp_path, reordered))))
    assert data.feature_names == list(reversed(FEATURE_NAMES))
    # Frames in either column order transform to the pipeline's order.
    np.testing.assert_array_equal(data.pipeline.transform(frame, source="a"),
                                  data.pipeline.transform(reordered, source="b"))


def test_load_real_csv_is_stratified(real_csv):
    data = load(DataConfig(source="csv", train_csv=str(real_csv), scaling="log_standard"))
    assert data.x_train.shape == (16000, 42) and data.x_val.shape == (4000, 42)
    assert abs(data.y_train.mean() - data.y_val.mean()) < 1e-3  # 55.7 % attacks on both sides
    assert np.isfinite(data.x_train).all()
    assert data.pipeline.categories["state"] == ["FIN", "INT", "CON", "REQ"]  # by frequency


def test_real_rows_with_an_unseen_state_transform_to_the_unknown_code(real_csv):
    data = load(DataConfig(source="csv", train_csv=str(real_csv), scaling="standard"))
    rows = pd.read_csv(real_csv, nrows=5)
    rows["state"] = "RST"  # never seen in the sample
    x = data.pipeline.transform(rows, source="rows")
    assert x.shape == (5, 42) and np.isfinite(x).all()
    j = data.feature_names.index("state")
    pipe = data.pipeline
    unknown = (len(pipe.categories["state"]) - pipe.mean[j]) / pipe.std[j]
    np.testing.assert_allclose(x[:, j], unknown, rtol=1e-6)


# --------------------------------------------------------------------------- pipeline


def test_categories_are_coded_by_frequency_ties_alphabetical_unseen_last():
    frame = synthetic_frame(30, 0)
    frame["state"] = ["INT"] * 5 + ["CON"] * 10 + ["ACC"] * 5 + ["FIN"] * 10
    pipe = Pipeline.fit(frame, scaling="standard", source="f")
    assert pipe.categories["state"] == ["CON", "FIN", "ACC", "INT"]
    j = pipe.feature_names.index("state")
    probe = frame.iloc[:5].copy()
    probe["state"] = ["CON", "FIN", "ACC", "INT", "RST"]
    codes = pipe.transform(probe, source="probe")[:, j] * pipe.std[j] + pipe.mean[j]
    np.testing.assert_allclose(codes, [0, 1, 2, 3, 4], atol=1e-5)


def test_global_scaling_uses_one_mean_and_std_for_the_whole_table():
    frame = synthetic_frame(500, 0)
    pipe = Pipeline.fit(frame, scaling="global", source="f")
    raw = Pipeline.fit(frame, scaling="standard", source="f")
    encoded = raw.transform(frame, source="f").astype(np.float64) * raw.std + raw.mean
    assert np.all(pipe.mean == pipe.mean[0]) and np.all(pipe.std == pipe.std[0])
    assert pipe.mean[0] == pytest.approx(encoded.mean(), rel=1e-6)
    assert pipe.std[0] == pytest.approx(encoded.std(), rel=1e-6)
    # The 1e9-sized counters dominate, so the TTL column is squashed to near-constant values.
    x = pipe.transform(frame, source="f")
    assert x[:, pipe.feature_names.index("sttl")].std() < 1e-6


def test_log_standard_takes_the_signed_log_before_standardising():
    frame = synthetic_frame(500, 0)
    pipe = Pipeline.fit(frame, scaling="log_standard", source="f")
    j = pipe.feature_names.index("stcpb")
    row = frame.iloc[:1].copy()
    row["stcpb"] = 4_000_000_000
    x = pipe.transform(row, source="row")
    assert x[0, j] == pytest.approx((np.log1p(4e9) - pipe.mean[j]) / pipe.std[j], rel=1e-6)
    logged = np.log1p(frame["stcpb"].to_numpy(np.float64))
    assert pipe.mean[j] == pytest.approx(logged.mean()) and pipe.std[j] == pytest.approx(logged.std())


def test_a_constant_column_is_centred_not_divided_by_zero():
    frame = synthetic_frame(200, 0)
    frame["is_sm_ips_ports"] = 7
    pipe = Pipeline.fit(frame, scaling="standard", source="f")
    j = pipe.feature_names.index("is_sm_ips_ports")
    assert pipe.std[j] == 1.0
    x = pipe.transform(frame, source="f")
    assert np.isfinite(x).all() and np.all(x[:, j] == 0.0)


def test_transform_accepts_both_layouts_with_or_without_id_and_label():
    frame = synthetic_frame(100, 0)
    pipe = Pipeline.fit(frame, scaling="log_standard", source="f")
    public = frame.copy()
    public.insert(len(public.columns) - 1, "attack_cat", "Normal")  # the full release's layout
    bare = frame.drop(columns=["id", "label"])
    want = pipe.transform(frame, source="f")
    np.testing.assert_array_equal(pipe.transform(public, source="public"), want)
    np.testing.assert_array_equal(pipe.transform(bare, source="bare"), want)


def test_public_release_layout_loads_from_csv(tmp_path):
    frame = synthetic_frame(200, 0)
    frame.insert(len(frame.columns) - 1, "attack_cat", np.where(frame["label"] == 1, "Generic", "Normal"))
    data = load(DataConfig(source="csv", train_csv=str(write_csv(tmp_path, frame))))
    assert data.feature_names == list(FEATURE_NAMES) and data.x_train.shape[1] == 42


def test_transform_names_a_missing_feature_column():
    frame = synthetic_frame(50, 0)
    pipe = Pipeline.fit(frame, scaling="standard", source="f")
    with pytest.raises(DataError, match=r"^rows: missing feature column\(s\) 'sttl'$"):
        pipe.transform(frame.drop(columns=["sttl"]), source="rows")


def test_transform_names_column_and_row_of_a_bad_value():
    frame = synthetic_frame(50, 0)
    pipe = Pipeline.fit(frame, scaling="standard", source="f")
    bad = frame.copy()
    bad["dur"] = bad["dur"].astype(object)
    bad.loc[6, "dur"] = "fast"
    with pytest.raises(DataError, match=r"rows: column 'dur', data row 7: non-numeric value 'fast'"):
        pipe.transform(bad, source="rows")


def test_pipeline_round_trips_through_json_to_identical_output():
    frame = synthetic_frame(300, 0)
    for scaling in ("global", "standard", "log_standard"):
        pipe = Pipeline.fit(frame, scaling=scaling, source="f")
        again = Pipeline.from_dict(json.loads(json.dumps(pipe.to_dict())))
        assert again.feature_names == pipe.feature_names and again.categories == pipe.categories
        np.testing.assert_array_equal(again.transform(frame, source="f"), pipe.transform(frame, source="f"))


@pytest.mark.parametrize(("change", "match"), [
    (lambda d: d.pop("std"), "pipeline: missing key 'std'"),
    (lambda d: d.update(extra=1), "pipeline: unknown key 'extra'"),
    (lambda d: d.update(scaling="minmax"), "scaling must be one of"),
    (lambda d: d.update(mean=d["mean"][:-1]), r"mean has shape \(41,\), expected \(42,\)"),
    (lambda d: d["categories"].update(flags=["a"]), "categories.flags: not one of feature_names"),
    (lambda d: d["std"].__setitem__(3, 0.0), r"std\[3\] \(state\) must be > 0"),
    (lambda d: d["feature_names"].__setitem__(1, "dur"), "feature_names: duplicate 'dur'"),
])
def test_pipeline_from_dict_names_what_is_wrong(change, match):
    assert_from_dict_refuses(change, match, scaling="standard")


def assert_from_dict_refuses(change, match: str, *, scaling: str) -> None:
    """A pipeline fitted with ``scaling``, saved as JSON and spoiled by ``change``, fails naming it."""
    pipe = Pipeline.fit(synthetic_frame(100, 0), scaling=scaling, source="f")
    d = json.loads(json.dumps(pipe.to_dict()))
    change(d)
    with pytest.raises(DataError, match=match):
        Pipeline.from_dict(d)


# --------------------------------------------------------------------------- read_csv errors


def test_read_csv_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(DataError, match=f"^{path}: no such file$"):
        read_csv(path)


def test_a_directory_given_as_a_csv_is_named_as_a_directory(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(DataError, match=f"^{folder}: is a directory, not a CSV file$"):
        read_csv(folder)
    for config in (DataConfig(source="csv", train_csv=str(folder)),
                   DataConfig(source="csv", train_csv=str(write_csv(tmp_path, synthetic_frame(50, 0))),
                              test_csv=str(folder))):
        with pytest.raises(DataError, match=f"^{folder}: is a directory"):
            load(config)


def test_read_csv_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=f"^{empty}: empty file"):
        read_csv(empty)
    header_only = write_lines(tmp_path, csv_lines(synthetic_frame(3, 0))[:1], "header.csv")
    with pytest.raises(DataError, match=f"^{header_only}: no data rows$"):
        read_csv(header_only)


def test_read_csv_names_file_column_row_and_line_of_a_non_numeric_value(tmp_path):
    lines = set_cell(csv_lines(synthetic_frame(10, 0)), 4, "sttl", "abc")
    path = write_lines(tmp_path, lines)
    want = rf"^{path}: column 'sttl', data row 4 \(line 5\): non-numeric value 'abc'$"
    with pytest.raises(DataError, match=want):
        read_csv(path)


def test_read_csv_names_a_missing_value(tmp_path):
    path = write_lines(tmp_path, set_cell(csv_lines(synthetic_frame(10, 0)), 2, "dur", ""))
    with pytest.raises(DataError, match=r"column 'dur', data row 2 \(line 3\): missing value"):
        read_csv(path)


def test_read_csv_names_a_label_that_is_not_0_or_1(tmp_path):
    path = write_lines(tmp_path, set_cell(csv_lines(synthetic_frame(10, 0)), 3, "label", "2"))
    want = rf"^{path}: column 'label', data row 3 \(line 4\): label must be 0 or 1, got 2$"
    with pytest.raises(DataError, match=want):
        read_csv(path)


def test_read_csv_names_a_missing_feature_column(tmp_path):
    path = write_csv(tmp_path, synthetic_frame(10, 0).drop(columns=["ct_srv_src", "proto"]))
    with pytest.raises(DataError, match=rf"^{path}: missing feature column\(s\) 'proto', 'ct_srv_src'$"):
        read_csv(path)


def test_read_csv_names_an_unexpected_column(tmp_path):
    frame = synthetic_frame(10, 0)
    frame["comment"] = "x"
    path = write_csv(tmp_path, frame)
    with pytest.raises(DataError, match=rf"^{path}: unexpected column 'comment'"):
        read_csv(path)


def test_read_csv_names_a_ragged_line(tmp_path):
    lines = csv_lines(synthetic_frame(10, 0))
    lines[5] += ",1"
    path = write_lines(tmp_path, lines)
    with pytest.raises(DataError, match=rf"^{path}: not a readable CSV: .*line 6"):
        read_csv(path)


def test_missing_label_is_an_error_for_training_but_not_for_reading(tmp_path):
    path = write_csv(tmp_path, synthetic_frame(10, 0).drop(columns=["label"]))
    frame = read_csv(path)  # rows to predict on have no label
    with pytest.raises(DataError, match=rf"^{path}: no 'label' column"):
        labels(frame, source=str(path))
    with pytest.raises(DataError, match=rf"^{path}: no 'label' column"):
        load(DataConfig(source="csv", train_csv=str(path)))


def test_labels_names_the_row_of_a_bad_label():
    frame = synthetic_frame(10, 0)
    frame.loc[4, "label"] = -1
    with pytest.raises(DataError, match=r"^frame: column 'label', data row 5: label must be 0 or 1, got -1$"):
        labels(frame, source="frame")
    good = synthetic_frame(10, 0)
    np.testing.assert_array_equal(labels(good, source="ok"), good["label"].to_numpy())


def test_a_bad_test_csv_fails_the_whole_load(tmp_path):
    train = write_csv(tmp_path, synthetic_frame(100, 0), "train.csv")
    test = write_lines(tmp_path, set_cell(csv_lines(synthetic_frame(10, 1)), 1, "rate", "n/a?"), "test.csv")
    with pytest.raises(DataError, match=rf"^{test}: column 'rate', data row 1 \(line 2\)"):
        load(DataConfig(source="csv", train_csv=str(train), test_csv=str(test)))


def test_a_single_class_file_is_refused(tmp_path):
    frame = synthetic_frame(50, 0)
    frame["label"] = 1
    path = write_csv(tmp_path, frame)
    with pytest.raises(DataError, match="every label is 1"):
        load(DataConfig(source="csv", train_csv=str(path)))
