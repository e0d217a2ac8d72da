from __future__ import annotations

import dataclasses

import pytest
import yaml

from mixer.config import (
    ConfigError,
    DataConfig,
    MixerConfig,
    TrainConfig,
    divisors,
    dump_run_config,
    load_run_config,
)


def test_patch_size_that_does_not_divide_features_names_the_valid_sizes():
    with pytest.raises(ValueError, match=r"valid: 1, 2, 3, 6, 7, 14, 21, 42\), got patch_size=4"):
        MixerConfig(n_features=42, patch_size=4)


def test_divisors_of_42():
    assert divisors(42) == [1, 2, 3, 6, 7, 14, 21, 42]


def test_hidden_sizes_follow_the_expansions():
    config = MixerConfig(n_features=42, patch_size=3, dim=198)
    assert (config.n_tokens, config.token_hidden, config.channel_hidden) == (14, 56, 99)


def test_flat_round_trip_keeps_every_field():
    config = TrainConfig(model=MixerConfig(patch_size=7, depth=2), lr=0.01, scheduler="cosine")
    flat = config.to_flat()
    assert flat["patch_size"] == 7 and flat["lr"] == 0.01
    assert TrainConfig.from_flat(flat) == config


def test_from_flat_rejects_unknown_settings():
    with pytest.raises(KeyError, match="learning_rate"):
        TrainConfig.from_flat({"learning_rate": 0.1})


@pytest.mark.parametrize("bad, message", [
    ({"eta_min": 0.5, "lr": 0.1}, "eta_min"),
    ({"scheduler": "linear"}, "scheduler"),
    ({"epochs": 0}, "epochs"),
])
def test_train_config_names_the_bad_value(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_run_config_round_trips_through_yaml(tmp_path):
    data = DataConfig(n_rows=500, seed=3)
    train = TrainConfig(model=MixerConfig(dim=16, depth=1), epochs=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(dump_run_config(data, train, 7)))
    assert load_run_config(path) == (data, train, 7)


def test_run_config_csv_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text("data: {source: csv, train_csv: ../rows.csv}\n")
    data, _, _ = load_run_config(path)
    assert data.train_csv == str(tmp_path / "rows.csv")


@pytest.mark.parametrize("text, key", [
    ("train: {dim: 8, colour: red}\n", "train.colour"),
    ("data: {rows: 5}\n", "data.rows"),
    ("extra: 1\n", "'extra'"),
    ("train: {patch_size: 5}\n", "patch_size"),
    ("seed: one\n", "seed"),
    ("train: [1, 2]\n", "train must be a mapping"),
])
def test_bad_run_config_names_the_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_field_names_are_unique_across_records():
    names = [f.name for cls in (MixerConfig, DataConfig) for f in dataclasses.fields(cls)]
    names += [n for n in TrainConfig().to_flat() if n not in names]
    assert len(names) == len(set(names))


def test_run_config_reads_exponent_notation_as_a_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 1e-4, eta_min: 1e-6}\n")
    _, train, _ = load_run_config(path)
    assert train.lr == 1e-4 and train.eta_min == 1e-6


def test_run_config_refuses_a_duplicate_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=rf"{path}.*duplicate key 'lr'"):
        load_run_config(path)
