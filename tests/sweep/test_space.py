"""Search-space files: what they may say, and the exact place a bad one is wrong."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from mixer.config import DATA_DIR_ENV, DataConfig, TrainConfig
from sweep.run import main
from sweep.space import SpaceError, load_space

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "search_spaces"
FIVE = {"lr", "eta_min", "patch_size", "depth", "scheduler"}

GOOD = """\
study: tiny
data: {source: synthetic, n_rows: 300}
train: {epochs: 3, dim: 8}
params:
  lr: {type: float, low: 1e-4, high: 0.1, log: true}
  eta_min: {type: float, low: 1e-6, high: 1e-2, log: true}
  patch_size: {type: categorical, choices: [3, 7, 14]}
  depth: {type: int, low: 1, high: 3}
  scheduler: {type: categorical, choices: [constant, cosine, cosine_warm_restarts, sharp_cosine]}
  t_0: {type: int, low: 2, high: 4, when: {scheduler: cosine_warm_restarts}}
  warmup_epochs: {type: int, low: 0, high: 2, when: {scheduler: [cosine, sharp_cosine]}}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def sample(space, n: int, seed: int = 0) -> list[tuple[dict, DataConfig, TrainConfig]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        data, train = space.suggest(trial)
        out.append((dict(trial.params), data, train))
        study.tell(trial, 0.0)
    return out


# ------------------------------------------------------------------------------------------ shipped


def test_default_space_searches_the_five_parameters_on_synthetic_data():
    space = load_space(SPACES / "default.yaml")
    assert FIVE <= set(space.params)
    assert space.data["source"] == "synthetic"
    assert space.n_trials and space.pruner.name != "none"
    assert space.params["lr"].log and space.params["eta_min"].log
    assert space.params["patch_size"].type == "categorical"
    assert space.params["depth"].type == "int"
    assert set(space.params["scheduler"].choices) == {
        "constant", "cosine", "cosine_warm_restarts", "sharp_cosine"}


def test_unsw_space_searches_the_five_knobs_regularisation_and_scaling_with_a_test_split(
        real_csv, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(real_csv.parent))
    space = load_space(SPACES / "unsw_nb15.yaml")
    assert Path(space.data["train_csv"]) == real_csv.resolve()
    assert 0 < space.data["test_fraction"] < 0.5 and space.ensemble_top_k >= 2
    p = space.params
    assert FIVE | {"dropout", "stochastic_depth", "weight_decay", "label_smoothing", "epochs",
                   "sam_rho", "grad_noise", "scaling"} <= set(p)
    assert space.train["optimizer"] == "adamw"  # so that weight_decay is decoupled
    # Each lever can also be off, and the scaling is chosen among the per-feature ones.
    for name in ("label_smoothing", "sam_rho", "grad_noise"):
        assert 0.0 in p[name].choices
    assert p["dropout"].contains(0.0) and p["stochastic_depth"].contains(0.0)
    assert {"log_standard", "quantile"} <= set(p["scaling"].choices) and "global" not in p["scaling"].choices
    assert p["lr"].log and len(p["scheduler"].choices) == 4
    # The enqueued trials are valid configurations of this space.
    assert all(space.build(entry) for entry in space.enqueue)


def test_seed_experiments_enqueue_the_notebook_runs_as_fixed_trials(real_csv, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(real_csv.parent))
    space = load_space(SPACES / "seed_experiments.yaml")
    assert space.data["scaling"] == "global" and space.pruner.name == "none" and space.n_trials == 5
    assert len(space.enqueue) == 5
    study = optuna.create_study(sampler=space.build_sampler(seed=0))
    for entry in space.enqueue:
        study.enqueue_trial(entry)
    configs = []
    for entry in space.enqueue:
        trial = study.ask()
        _, train = space.suggest(trial)
        assert trial.params == entry  # nothing left to chance
        configs.append(train)
        study.tell(trial, 0.0)
    assert all(c.model.depth == 10 for c in configs)
    first, second, third, fourth, fifth = configs
    assert (first.model.patch_size, first.model.dim, first.lr) == (1, 48, 0.01)
    assert (second.model.patch_size, second.scheduler, second.warmup_epochs) == (14, "cosine", 10)
    assert (third.model.patch_size, third.scheduler, third.lr) == (3, "cosine_warm_restarts", 0.1)
    assert (fourth.scheduler, fourth.lr) == ("cosine_warm_restarts", 1e-4)
    assert (fifth.scheduler, fifth.lr) == ("sharp_cosine", 0.1)


# --------------------------------------------------------------------------------------- sampling


def test_conditional_parameters_are_sampled_only_where_their_condition_holds(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    seen = set()
    for params, _, train in sample(space, 40):
        seen.add(train.scheduler)
        assert ("t_0" in params) == (train.scheduler == "cosine_warm_restarts")
        assert ("warmup_epochs" in params) == (train.scheduler in ("cosine", "sharp_cosine"))
        if "t_0" in params:
            assert train.t_0 == params["t_0"]
    assert len(seen) == 4


def test_eta_min_above_the_sampled_lr_is_clipped_to_lr(tmp_path):
    space = load_space(write(tmp_path, GOOD.replace("low: 1e-6, high: 1e-2", "low: 0.05, high: 0.5")
                             .replace("low: 1e-4, high: 0.1", "low: 1e-4, high: 1e-3")))
    for params, _, train in sample(space, 10):
        assert params["eta_min"] > params["lr"]  # the sampled value is kept as the Optuna param
        assert train.eta_min == train.lr == params["lr"]


def test_eta_min_ratio_sets_eta_min_as_a_fraction_of_lr(tmp_path):
    text = GOOD.replace("  eta_min: {type: float, low: 1e-6, high: 1e-2, log: true}\n",
                        "  eta_min_ratio: {type: float, low: 0.0, high: 0.5}\n")
    space = load_space(write(tmp_path, text))
    for params, _, train in sample(space, 10):
        assert train.eta_min == pytest.approx(params["eta_min_ratio"] * params["lr"])


def test_same_sampler_seed_gives_same_parameters_other_seed_other_parameters(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    a = [p for p, _, _ in sample(space, 5, seed=1)]
    b = [p for p, _, _ in sample(space, 5, seed=1)]
    c = [p for p, _, _ in sample(space, 5, seed=2)]
    assert a == b and a != c


def test_data_settings_can_be_searched_and_fixed_settings_reach_the_configs(tmp_path):
    text = GOOD + "  scaling: {type: categorical, choices: [global, standard]}\n"
    space = load_space(write(tmp_path, text))
    results = sample(space, 12)
    assert {d.scaling for _, d, _ in results} == {"global", "standard"}
    assert all(d.n_rows == 300 and t.epochs == 3 and t.model.dim == 8 for _, d, t in results)


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    assert space.params["lr"].low == 1e-4 and isinstance(space.params["lr"].low, float)


def test_relative_csv_paths_resolve_against_the_space_file(tmp_path, real_csv, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    rel = Path("..") / ".." / "data.csv"
    (tmp_path / "data.csv").symlink_to(real_csv)
    path = write(folder, f"data: {{source: csv, train_csv: {rel}}}\nbudget: {{n_trials: 1}}\n")
    space = load_space(path)
    assert Path(space.data["train_csv"]) == (tmp_path / "data.csv").resolve()


def test_grid_sampler_walks_categorical_and_stepped_parameters(tmp_path):
    space = load_space(write(tmp_path, """\
        sampler: grid
        params:
          patch_size: {type: categorical, choices: [3, 7]}
          depth: {type: int, low: 1, high: 3}
        """))
    study = optuna.create_study(sampler=space.build_sampler(seed=0))
    study.optimize(lambda trial: space.suggest(trial) and 0.0, n_trials=20)  # stops when the grid is done
    seen = [(t.params["patch_size"], t.params["depth"]) for t in study.trials]
    assert sorted(seen) == [(p, d) for p in (3, 7) for d in (1, 2, 3)]


def test_sampler_and_pruner_options_reach_optuna(tmp_path):
    space = load_space(write(tmp_path, GOOD + textwrap.dedent("""\
        sampler: {name: tpe, options: {n_startup_trials: 3}}
        pruner:
          name: patient
          options: {patience: 2}
          wrapped: {name: percentile, options: {percentile: 25.0}}
        """)))
    sampler, pruner = space.build_sampler(seed=0), space.build_pruner()
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 3
    assert isinstance(pruner, optuna.pruners.PatientPruner)
    assert isinstance(pruner._wrapped_pruner, optuna.pruners.PercentilePruner)


# ------------------------------------------------------------------------------------- validation

# (what is wrong, YAML, the key path the message must name)
BAD = [
    ("unknown top-level key", GOOD + "budjet: {n_trials: 3}\n", "budjet"),
    ("unknown knob", GOOD.replace("dim: 8", "dimm: 8"), "train.dimm"),
    ("unknown searched knob", GOOD + "  learning_rate: {type: float, low: 0.1, high: 1}\n",
     "params.learning_rate"),
    ("unknown param key", GOOD.replace("depth: {type: int,", "depth: {typ: x, type: int,"),
     "params.depth.typ"),
    ("wrong type of fixed value", GOOD.replace("epochs: 3", "epochs: three"), "train.epochs"),
    ("float type on an int knob", GOOD.replace("depth: {type: int", "depth: {type: float"),
     "params.depth.type"),
    ("non-integer bound", GOOD.replace("depth: {type: int, low: 1,", "depth: {type: int, low: 1.5,"),
     "params.depth.low"),
    ("low above high", GOOD.replace("low: 1e-4, high: 0.1", "low: 0.1, high: 1e-4"), "params.lr.low"),
    ("log with low <= 0", GOOD.replace("low: 1e-6, high: 1e-2, log: true", "low: 0.0, high: 1e-2, log: true"),
     "params.eta_min.low"),
    ("patch size not dividing 42", GOOD.replace("choices: [3, 7, 14]", "choices: [3, 7, 5]"),
     "params.patch_size.choices[2]"),
    ("fixed patch size not dividing 42", GOOD.replace("dim: 8", "dim: 8, patch_size: 4")
     .replace("  patch_size: {type: categorical, choices: [3, 7, 14]}\n", ""), "train.patch_size"),
    ("when names an unknown parameter", GOOD.replace("when: {scheduler: cosine_warm_restarts}",
                                                     "when: {schedule: cosine_warm_restarts}"),
     "params.t_0.when.schedule"),
    ("when names an impossible value", GOOD.replace("when: {scheduler: [cosine, sharp_cosine]}",
                                                    "when: {scheduler: [cosine, sharp]}"),
     "params.warmup_epochs.when.scheduler[1]"),
    ("fixed value out of range", GOOD.replace("dim: 8", "dim: 8, dropout: 1.5"), "train.dropout"),
    ("searched bound out of range", GOOD.replace("depth: {type: int, low: 1", "depth: {type: int, low: 0"),
     "params.depth.low"),
    ("categorical choice out of range", GOOD + "  dropout: {type: categorical, choices: [0.0, 0.1, 2.0]}\n",
     "params.dropout.choices[2]"),
    ("invalid categorical choice", GOOD.replace("sharp_cosine]}\n  t_0", "sharp]}\n  t_0"),
     "params.scheduler.choices[3]"),
    ("both fixed and searched", GOOD.replace("dim: 8", "dim: 8, depth: 2"), "params.depth"),
    ("data knob under train", GOOD.replace("dim: 8", "dim: 8, scaling: global"), "train.scaling"),
    ("n_features is the data's", GOOD.replace("dim: 8", "dim: 8, n_features: 40"), "train.n_features"),
    ("missing CSV", GOOD.replace("{source: synthetic, n_rows: 300}", "{source: csv, train_csv: nope.csv}"),
     "data.train_csv"),
    ("unknown sampler", GOOD + "sampler: {name: bayes}\n", "sampler.name"),
    ("unknown sampler option", GOOD + "sampler: {name: tpe, options: {n_startup: 3}}\n",
     "sampler.options.n_startup"),
    ("bad sampler option value", GOOD + "sampler: {name: qmc, options: {qmc_type: nope}}\n",
     "sampler.options"),
    ("unknown pruner option", GOOD + "pruner: {name: median, options: {warmup: 3}}\n",
     "pruner.options.warmup"),
    ("bad pruner option value", GOOD + "pruner: {name: percentile, options: {percentile: 150}}\n",
     "pruner.options"),
    ("grid over a continuous float", GOOD + "sampler: grid\n", "params.lr"),
    ("unknown metric", GOOD + "metric: val_auc\n", "metric"),
    ("bad budget", GOOD + "budget: {n_trials: 0}\n", "budget.n_trials"),
    ("eta_min and eta_min_ratio", GOOD + "  eta_min_ratio: {type: float, low: 0.0, high: 0.5}\n",
     "params.eta_min_ratio"),
    ("conditional cycle", GOOD.replace("depth: {type: int, low: 1, high: 3}",
                                       "depth: {type: int, low: 1, high: 3, when: {t_0: 2}}")
     .replace("when: {scheduler: cosine_warm_restarts}", "when: {depth: 2}"), "when"),
    ("enqueued value out of range", GOOD + "enqueue:\n  - {lr: 5.0}\n", "enqueue[0].lr"),
    ("enqueued fixed knob", GOOD + "enqueue:\n  - {dim: 16}\n", "enqueue[0].dim"),
    ("enqueued inactive conditional", GOOD + "enqueue:\n  - {scheduler: constant, t_0: 3}\n",
     "enqueue[0].t_0"),
    ("duplicate key", GOOD + "  lr: {type: float, low: 0.1, high: 0.2}\n", "duplicate key 'lr'"),
    # Absurd values: each would start a study that never ends, or whose every trial dies.
    ("n_trials 1e30", GOOD + "budget: {n_trials: 1e30}\n", "budget.n_trials"),
    ("n_trials 10**30", GOOD + "budget: {n_trials: 1000000000000000000000000000000}\n", "budget.n_trials"),
    ("infinite timeout", GOOD + "budget: {timeout: .inf}\n", "budget.timeout"),
    ("epochs 1e11", GOOD.replace("epochs: 3", "epochs: 100000000000"), "train.epochs"),
    ("batch_size 1e8", GOOD.replace("epochs: 3", "epochs: 3, batch_size: 100000000"), "train.batch_size"),
    ("dim 100000", GOOD.replace("dim: 8", "dim: 100000"), "train.dim"),
    ("searched dim up to 100000", GOOD.replace("dim: 8", "batch_size: 8")
     + "  dim: {type: int, low: 8, high: 100000}\n", "params.dim.high"),
    ("depth 100000", GOOD.replace("low: 1, high: 3}", "low: 1, high: 100000}"), "params.depth.high"),
    ("negative n_startup_trials", GOOD + "sampler: {name: tpe, options: {n_startup_trials: -5}}\n",
     "sampler.options.n_startup_trials"),
    ("float n_startup_trials", GOOD + "sampler: {name: tpe, options: {n_startup_trials: 10.5}}\n",
     "sampler.options.n_startup_trials"),
    ("zero candidates", GOOD + "sampler: {name: tpe, options: {n_ei_candidates: 0}}\n",
     "sampler.options.n_ei_candidates"),
    ("zero min_resource", GOOD + "pruner: {name: hyperband, options: {min_resource: 0}}\n",
     "pruner.options.min_resource"),
    ("huge max_resource", GOOD + "pruner: {name: hyperband, options: {max_resource: 1000000000000}}\n",
     "pruner.options.max_resource"),
    ("wrapped pruner's option", GOOD + "pruner: {name: patient, options: {patience: 1}, wrapped: "
     "{name: median, options: {n_warmup_steps: 1e9}}}\n", "pruner.wrapped.options.n_warmup_steps"),
    ("infinite float option", GOOD + "pruner: {name: patient, options: {patience: 1, min_delta: .inf}}\n",
     "pruner.options.min_delta"),
    ("largest model does not fit", GOOD.replace("dim: 8", "dim: 4096, batch_size: 65536")
     .replace("high: 3}", "high: 256}") + "  channel_expansion: {type: float, low: 0.5, high: 16}\n",
     "train.dim, params.depth, train.batch_size, params.channel_expansion, params.patch_size: "
     "training needs"),
]


@pytest.mark.parametrize("what, text, key", BAD, ids=[b[0] for b in BAD])
def test_bad_space_error_names_the_file_and_the_key_path(tmp_path, what, text, key):
    path = write(tmp_path, text, name="bad.yaml")
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    assert key in message, message


def test_patch_size_error_lists_the_valid_divisors(tmp_path):
    path = write(tmp_path, GOOD.replace("choices: [3, 7, 14]", "choices: [3, 7, 5]"))
    with pytest.raises(SpaceError, match=r"valid: 1, 2, 3, 6, 7, 14, 21, 42"):
        load_space(path)


def test_empty_or_missing_file_is_a_space_error(tmp_path):
    with pytest.raises(SpaceError, match="empty"):
        load_space(write(tmp_path, ""))
    with pytest.raises(SpaceError, match="cannot read"):
        load_space(tmp_path / "missing.yaml")


def test_a_long_value_or_key_is_cut_in_the_message(tmp_path):
    for letter, text in (("x", GOOD.replace("dim: 8", "dim: 8, gelu: " + "x" * 5000)),
                         ("y", GOOD + "enqueue:\n  - {scheduler: " + "y" * 5000 + "}\n"),
                         ("z", GOOD + "sampler: {name: tpe, options: {" + "z" * 1000 + ": 1}}\n")):
        path = write(tmp_path, text)
        with pytest.raises(SpaceError) as info:
            load_space(path)
        message = str(info.value)
        assert letter * 30 in message and letter * 81 not in message and "..." in message, message


# ------------------------------------------------------------------------------- the real data


def test_shipped_files_read_the_real_sample_from_the_projects_data_folder():
    for path in [SPACES / "unsw_nb15.yaml", SPACES / "seed_experiments.yaml",
                 ROOT / "configs" / "notebook_headline.yaml"]:
        csv = (path.parent / yaml.safe_load(path.read_text())["data"]["train_csv"]).resolve()
        assert csv == ROOT / "data" / "UNSWNB15_training_coursework.csv", path


def test_mixer_data_dir_finds_the_csv_by_its_file_name(tmp_path, monkeypatch):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "rows.csv").touch()
    path = write(tmp_path, GOOD.replace("{source: synthetic, n_rows: 300}",
                                        "{source: csv, train_csv: ../data/rows.csv}"))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "store"))
    assert load_space(path).data["train_csv"] == str(tmp_path / "store" / "rows.csv")
    monkeypatch.delenv(DATA_DIR_ENV)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    missing = tmp_path.parent / "data" / "rows.csv"
    assert message.startswith(f"{path}: data.train_csv: file not found: {missing}")
    assert "MIXER_DATA_DIR" in message and "--train-csv" in message and "data/README.md" in message


def test_train_csv_argument_replaces_the_spaces_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.csv").touch()
    space = load_space(write(tmp_path, GOOD), train_csv="mine.csv")
    assert space.data["source"] == "csv" and space.data["train_csv"] == str(tmp_path / "mine.csv")
    with pytest.raises(SpaceError, match="data.train_csv: file not found: .*other.csv"):
        load_space(write(tmp_path, GOOD), train_csv="other.csv")


# ------------------------------------------------------------------------------- hostile files


def test_a_space_that_is_not_utf8_exits_2_naming_the_byte_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.replace("study: tiny", "study: tiny\ndescription: café").encode("latin-1"))
    assert main([str(path), "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not UTF-8 text (byte 28 is 0xe9)" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["latin1.yaml"]


def _billion_laughs(path: Path) -> Path:
    """Nine aliases of nine: 9**9 "lol"s, some 3 GB once expanded, in a file of 400 bytes."""
    lines = ["seed:", '  - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  - &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("hostile", ["billion laughs", "/dev/zero", "a FIFO", "a directory"])
def test_a_hostile_file_exits_2_at_once_within_1_gib(tmp_path, hostile):
    path = {"billion laughs": lambda: _billion_laughs(tmp_path / "laughs.yaml"),
            "/dev/zero": lambda: Path("/dev/zero"),
            "a FIFO": lambda: os.mkfifo(tmp_path / "fifo.yaml") or tmp_path / "fifo.yaml",
            "a directory": lambda: tmp_path}[hostile]()

    def limit_memory() -> None:  # a loader that expands the aliases or reads /dev/zero hits this
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    # A loader that waits for a FIFO's writer would hang: the timeout only ends such a test.
    proc = subprocess.run([sys.executable, "-m", "sweep.run", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, preexec_fn=limit_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {path}: ") and len(proc.stderr) < 600, proc.stderr[-2000:]
    assert "aliases are not allowed" in proc.stderr if hostile == "billion laughs" else (
        "not a regular file" in proc.stderr)
    assert not (tmp_path / "out").exists()


def test_probe_switches_take_true_or_false_and_nothing_else(tmp_path):
    on = load_space(write(tmp_path, GOOD.replace("train: {epochs: 3, dim: 8}",
                                                 "train: {epochs: 3, dim: 8, curvature_at_end: true}")))
    assert sample(on, 1)[0][2].curvature_at_end is True
    with pytest.raises(SpaceError, match=r"train\.curvature_at_end: expected true or false, got 3"):
        load_space(write(tmp_path, GOOD.replace("train: {epochs: 3, dim: 8}",
                                                "train: {epochs: 3, dim: 8, curvature_at_end: 3}")))
