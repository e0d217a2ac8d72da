"""The held-out test split: selection never sees it; the winner and the top-k ensemble are scored on it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optuna
import pandas as pd
import pytest

from mixer.config import DataConfig, MixerConfig, TrainConfig
from mixer.data import load
from mixer.metrics import binary_metrics
from mixer.train import fit
from sweep.objective import load_data
from sweep.publish import publish_best
from sweep.run import main
from sweep.space import SpaceError, parse_space
from tests.sweep.test_run import journal_study, write_space

SPLIT = """\
study: split
seed: 0
data: {source: synthetic, n_rows: 400, test_fraction: 0.25, scaling: quantile}
train: {epochs: 3, dim: 8, depth: 1, batch_size: 64, patch_size: 7}
sampler: {name: random}
pruner: {name: none}
budget: {n_trials: 4}
publish: {ensemble_top_k: 3}
params:
  lr: {type: float, low: 1.0e-3, high: 0.03, log: true}
  label_smoothing: {type: float, low: 0.0, high: 0.2}
  sam_rho: {type: categorical, choices: [0.0, 0.05]}
"""


def test_the_objective_never_sees_a_test_row():
    config = DataConfig(n_rows=400, seed=3, test_fraction=0.25, scaling="standard")
    full, seen = load(config), load_data(config)
    assert full.x_test is not None and seen.x_test is None and seen.y_test is None
    # Identify rows by their values: every row the objective trains or validates on is one of the
    # train or validation rows, none of the test rows.
    test_rows = {r.tobytes() for r in full.x_test}
    used = [r.tobytes() for r in np.concatenate([seen.x_train, seen.x_val])]
    assert len(test_rows) == len(full.x_test) and not test_rows & set(used)
    ids = {k: set(v.tolist()) for k, v in full.rows.items()}
    assert not ids["test"] & (ids["train"] | ids["val"]) and len(ids["test"]) == 100


def test_a_study_scores_the_best_trial_and_the_mean_of_the_top_three_on_the_test_rows(in_tmp, capsys):
    assert main([str(write_space(in_tmp, SPLIT)), "--no-tracking", "--out", "out"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # Not a terminal: a progress line per retrained model (the best and two members).
    progress = [line.split(" to epoch")[0] for line in captured.err.splitlines() if "retrained model" in line]
    assert progress == [f"  retrained model {i}" for i in (1, 2, 3)]
    study = journal_study(in_tmp / "out", "split")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    top = sorted(done, key=lambda t: t.value)[:3]
    assert top[0].number == study.best_trial.number

    frame = pd.read_csv(in_tmp / "out" / "split" / "test_predictions.csv")
    members = [f"trial_{t.number}" for t in top]
    assert list(frame.columns) == ["row", "label", *members, "ensemble"]
    np.testing.assert_allclose(frame["ensemble"], frame[members].mean(axis=1), rtol=0, atol=1e-15)
    # The rows are the test split's, in the source's row numbers, with their labels.
    data = load(DataConfig(n_rows=400, seed=0, test_fraction=0.25, scaling="quantile"))
    assert frame["row"].tolist() == data.rows["test"].tolist()
    assert frame["label"].tolist() == data.y_test.astype(int).tolist()
    # What is printed is what the saved probabilities score.
    best = binary_metrics(frame["label"], frame[members[0]])
    mean = binary_metrics(frame["label"], frame["ensemble"])
    assert f"best trial {top[0].number}: accuracy {best.accuracy:.4f}" in out
    assert f"mean of trials {', '.join(str(t.number) for t in top)}: accuracy {mean.accuracy:.4f}" in out
    assert "never used for selection or pruning" in out
    # No trial's recorded curves carry a test metric.
    assert not any(k.startswith("test") for t in study.trials for h in t.user_attrs["history"] for k in h)
    assert math.isfinite(best.roc_auc) and math.isfinite(mean.roc_auc)


@pytest.mark.parametrize(("patch", "match"), [
    ({"params": {"test_fraction": {"type": "float", "low": 0.1, "high": 0.3}}}, "params.test_fraction"),
    ({"publish": {"ensemble_top_k": 0}}, "publish.ensemble_top_k: must be >= 1"),
    ({"publish": {"top_k": 3}}, "publish.top_k: unknown key"),
    ({"data": {"source": "synthetic", "n_rows": 400, "test_fraction": 0.9}}, "data.test_fraction"),
])
def test_bad_test_split_settings_name_the_key(patch, match):
    doc = {"study": "x", "budget": {"n_trials": 1},
           "params": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}
    with pytest.raises(SpaceError, match=match):
        parse_space({**doc, **patch}, path="x.yaml")


def test_the_ensemble_of_one_is_the_best_trial_alone(in_tmp, capsys):
    text = SPLIT.replace("publish: {ensemble_top_k: 3}", "").replace("n_trials: 4", "n_trials: 2")
    assert main([str(write_space(in_tmp, text)), "--no-tracking", "--out", "out"]) == 0
    frame = pd.read_csv(in_tmp / "out" / "split" / "test_predictions.csv")
    best = journal_study(in_tmp / "out", "split").best_trial.number
    assert list(frame.columns) == ["row", "label", f"trial_{best}"]
    assert "mean of trials" not in capsys.readouterr().out


def test_test_fraction_with_a_test_csv_is_refused():
    with pytest.raises(ValueError, match="test_fraction and test_csv"):
        dataclasses.replace(DataConfig(), source="csv", train_csv="a.csv", test_csv="b.csv",
                            test_fraction=0.1)


def test_a_member_that_cannot_be_retrained_is_left_out_and_the_best_model_still_ships(tmp_path):
    data_config = DataConfig(n_rows=400, seed=0, test_fraction=0.25)
    train = TrainConfig(model=MixerConfig(patch_size=7, dim=8, depth=1), epochs=2, batch_size=64)
    study = optuna.create_study()
    for number, attrs in enumerate([None, {"config": {"lr": "not a number"}, "seed": 1}, None]):
        if attrs is None:
            result = fit(train, load(data_config), seed=number)
            attrs = {"config": {**train.to_flat(), **dataclasses.asdict(data_config)}, "seed": number,
                     "history": [{"epoch": m.epoch, **m.as_dict()} for m in result.history]}
        study.add_trial(optuna.trial.create_trial(
            value=0.1 * (number + 1), params={"lr": 1e-3}, user_attrs=attrs,
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}))
    with pytest.warns(RuntimeWarning, match="ensemble: trial 1 left out"):
        published = publish_best(study, out_dir=tmp_path, log_model=False, ensemble_top_k=3)
    assert published.trial_number == 0 and published.ensemble_trials == [0, 2]
    assert (tmp_path / "best_model.npz").is_file()
    frame = pd.read_csv(tmp_path / "test_predictions.csv")
    assert list(frame.columns) == ["row", "label", "trial_0", "trial_2", "ensemble"]
