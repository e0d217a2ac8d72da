from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mixer.config import (
    DATA_DIR_ENV,
    ConfigError,
    DataConfig,
    MixerConfig,
    TrainConfig,
    divisors,
    dump_run_config,
    load_run_config,
    resolve_csv,
)

ROOT = Path(__file__).resolve().parents[2]


def test_patch_size_that_does_not_divide_features_names_the_valid_sizes():
    with pytest.raises(ValueError, match=r"valid: 1, 2, 3, 6, 7, 14, 21, 42\), got patch_size=4"):
        MixerConfig(n_features=42, patch_size=4)


def test_a_huge_n_features_is_refused_before_its_divisors_are_listed():
    # 10**12 + 1 is not divisible by 3: listing its divisors in the patch_size message would not end.
    with pytest.raises(ValueError, match=r"n_features must be <= 100,000, got n_features=1000000000001"):
        MixerConfig(n_features=10**12 + 1, patch_size=3)


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


def test_run_config_csv_paths_resolve_against_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    (tmp_path / "sub").mkdir()
    (tmp_path / "rows.csv").touch()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text("data: {source: csv, train_csv: ../rows.csv}\n")
    data, _, _ = load_run_config(path)
    assert data.train_csv == str(tmp_path / "rows.csv")


def test_mixer_data_dir_finds_a_relative_csv_by_its_file_name(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rows.csv").touch()
    (tmp_path / "rows.csv").touch()  # beside the file: not the one read while MIXER_DATA_DIR is set
    path = tmp_path / "run.yaml"
    path.write_text("data: {source: csv, train_csv: data/rows.csv, test_csv: /abs/kept.csv}\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(elsewhere))
    assert resolve_csv("../data/rows.csv", base=tmp_path) == str(elsewhere / "rows.csv")
    assert resolve_csv(str(tmp_path / "rows.csv"), base=tmp_path) == str(tmp_path / "rows.csv")
    with pytest.raises(ConfigError, match="data.test_csv: file not found: /abs/kept.csv"):
        load_run_config(path)  # an absolute path is used as it is


def test_a_missing_csv_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    path = tmp_path / "run.yaml"
    path.write_text("data: {source: csv, train_csv: ../data/rows.csv}\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    message = str(err.value)
    missing = tmp_path.parent / "data" / "rows.csv"
    assert message.startswith(f"{path}: data.train_csv: file not found: {missing}")
    assert "MIXER_DATA_DIR" in message and "--train-csv" in message and "data/README.md" in message
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ConfigError, match="data.train_csv: .*folder.csv is a directory, not a CSV file"):
        load_run_config(path, train_csv=tmp_path / "folder.csv")


def test_train_csv_argument_replaces_the_files_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "unused"))  # a command-line path is the cwd's
    (tmp_path / "mine.csv").touch()
    path = tmp_path / "run.yaml"
    path.write_text("data: {source: synthetic, n_rows: 100}\n")
    data, _, _ = load_run_config(path, train_csv="mine.csv")
    assert (data.source, data.train_csv) == ("csv", str(tmp_path / "mine.csv"))


def test_shipped_headline_config_reads_the_real_sample_from_the_data_folder(real_csv, monkeypatch):
    path = ROOT / "configs" / "notebook_headline.yaml"
    assert (path.parent / yaml.safe_load(path.read_text())["data"]["train_csv"]).resolve() == (
        ROOT / "data" / real_csv.name)
    monkeypatch.setenv(DATA_DIR_ENV, str(real_csv.parent))
    data, train, _ = load_run_config(path)
    assert data.train_csv == str(real_csv.resolve()) and train.model.dim == 198


# (YAML, the key path the message must name): each would start a run that never ends or dies.
ABSURD = [
    ("train: {epochs: 1e11}\n", "train.epochs"),
    ("train: {epochs: 100000000000}\n", "train.epochs"),
    ("train: {batch_size: 1e8}\n", "train.batch_size"),
    ("train: {batch_size: 100000000}\n", "train.batch_size"),
    ("train: {dim: 100000}\n", "train.dim"),
    ("train: {depth: 10.0}\n", "train.depth"),
    ("train: {depth: 100000}\n", "train.depth"),
    ("train: {channel_expansion: 1000.0}\n", "train.channel_expansion"),
    ("train: {lr: .inf}\n", "train.lr"),
    ("train: {lr: .nan}\n", "train.lr"),
    ("train: {warmup_epochs: 10000000}\n", "train.warmup_epochs"),
    ("train: {dropout: true}\n", "train.dropout"),
    ("data: {n_rows: 1000000000}\n", "data.n_rows"),
    ("data: {scaling: [1, 2]}\n", "data.scaling"),
    # Within every bound, but the largest model there is: far more memory than any machine has.
    ("train: {dim: 4096, depth: 256, patch_size: 1, batch_size: 65536, channel_expansion: 16}\n", "train"),
]


@pytest.mark.parametrize("text, key", ABSURD, ids=[a[0].strip() for a in ABSURD])
def test_absurd_values_are_refused_naming_the_key(tmp_path, text, key):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(err.value).startswith(f"{path}: {key}: "), str(err.value)


def test_the_memory_check_says_how_much_is_needed_and_what_the_machine_has(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(ABSURD[-1][0])
    with pytest.raises(ConfigError, match=r"training needs about [\d,.]+ GiB \(dim=4096, depth=256, "
                                          r"patch_size=1, batch_size=65536, dtype=float32\), more than "
                                          r"this machine's [\d,.]+ GiB"):
        load_run_config(path)


def test_a_long_value_is_cut_in_the_message(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"train: {{gelu: {'x' * 5000}}}\nseed: {'y' * 5000}\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert len(str(err.value)) < len(str(path)) + 130 and "..." in str(err.value), str(err.value)
    with pytest.raises(ValueError) as err:
        MixerConfig(gelu="z" * 5000)
    assert "gelu must be one of ('tanh', 'erf'), got gelu='zzz" in str(err.value)
    assert len(str(err.value)) < 140


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
