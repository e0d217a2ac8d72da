"""One trial: seeds, the value, pruning, failures, the user attributes and the tracking calls."""

from __future__ import annotations

import math
import textwrap

import optuna
import pytest

import mixer.train
from mixer.config import load_run_config
from mixer.diagnosis import LABELS
from mixer.train import EpochMetrics, FitResult
from sweep.objective import Objective, TrialFailed, trial_run_id, trial_seed
from sweep.space import load_space, split_flat

ATTRS = {"seed", "config", "history", "status", "reason", "diagnosis", "mlflow_run_id", "pruned_epoch"}

TINY = """\
study: tiny
seed: 3
data: {source: synthetic, n_rows: 300}
train: {epochs: 3, dim: 8, depth: 1, batch_size: 64}
params:
  lr: {type: float, low: 1e-3, high: 1e-2, log: true}
  patch_size: {type: categorical, choices: [7, 14]}
"""


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY))
    return load_space(path)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


class FakeRun:
    def __init__(self, log, number):
        self.log, self.run_id = log, f"run-{number}"

    def log_epoch(self, m):
        self.log.append(("epoch", m.epoch))

    def end(self, state, *, history=None, reason=None, pruned_epoch=None, diagnosis=None):
        self.log.append(("end", state, len(history), reason, pruned_epoch))
        self.diagnosis = diagnosis


class FakeTracker:
    """Records the calls sweep.objective makes, in the order of the sweep.tracking contract."""

    def __init__(self):
        self.log = []

    def start_trial(self, trial, config, data_config, *, seed, on_created=None):
        self.log.append(("start", trial.number, config.epochs, data_config.n_rows, seed))
        run = self.run = FakeRun(self.log, trial.number)
        if on_created is not None:  # as the real tracker's sending thread, once the run exists
            on_created(run.run_id)
            stored = trial.study.get_trials(deepcopy=False)[trial.number].user_attrs["mlflow_run_id"]
            self.log.append(("stored run id", stored))
        return run


def metrics(epoch: int, val_loss: float) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, train_loss=val_loss, val_loss=val_loss, val_accuracy=0.5,
                        val_precision=0.5, val_recall=0.5, val_f1=0.5, lr=1e-3, grad_norm_mean=1.0,
                        grad_norm_max=1.0, update_ratio=1e-3, epoch_seconds=0.01)


def test_trial_seed_is_fixed_by_study_seed_and_trial_number():
    assert trial_seed(0, 5) == trial_seed(0, 5)
    assert len({trial_seed(0, n) for n in range(50)}) == 50
    assert trial_seed(0, 5) != trial_seed(1, 5)
    assert 0 <= trial_seed(7, 3) < 2**32
    with pytest.raises(ValueError, match="trial_number=-1"):
        trial_seed(0, -1)


def test_completed_trial_returns_best_epoch_value_and_records_every_attr(space, tmp_path):
    tracker = FakeTracker()
    study = optuna.create_study(sampler=space.build_sampler(seed=0))
    study.optimize(Objective(space, study_seed=3, tracker=tracker), n_trials=1)
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.COMPLETE
    assert ATTRS <= set(t.user_attrs)
    history = t.user_attrs["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert t.value == min(h["val_loss"] for h in history)
    assert t.user_attrs["status"] == "completed" and t.user_attrs["reason"] is None
    assert t.user_attrs["seed"] == trial_seed(3, 0)
    assert t.user_attrs["diagnosis"] in LABELS
    # One diagnosis per trial: the one stored is the one the run was ended with.
    assert tracker.run.diagnosis.label == t.user_attrs["diagnosis"]
    assert t.user_attrs["mlflow_run_id"] == "run-0"
    assert t.user_attrs["config"]["lr"] == t.params["lr"]
    assert t.user_attrs["config"]["n_rows"] == 300
    # The run id is on the trial while it runs (for whoever fails it if its worker dies), not only at the end.
    assert tracker.log == [("start", 0, 3, 300, trial_seed(3, 0)), ("stored run id", "run-0"),
                           ("epoch", 1), ("epoch", 2), ("epoch", 3), ("end", "completed", 3, None, None)]
    assert list(t.intermediate_values) == [1, 2, 3]


class LateTracker(FakeTracker):
    """The server is down: the run is created (``create()``) only after the trial has ended."""

    def start_trial(self, trial, config, data_config, *, seed, on_created=None):
        self.run = FakeRun(self.log, trial.number)
        self.run_id, self.run.run_id = self.run.run_id, None
        self.create = lambda: on_created(self.run_id)
        return self.run


def test_a_run_created_after_its_trial_ended_is_still_found_from_the_trial(space, tmp_path):
    tracker = LateTracker()
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.optimize(Objective(space, study_seed=3, tracker=tracker), n_trials=1)
    assert "mlflow_run_id" not in study.trials[0].user_attrs  # unknown when the trial ended
    tracker.create()  # the server is back: the run exists now, and the trial no longer takes attrs
    study = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert trial_run_id(study, study.trials[0]) == "run-0"


@pytest.mark.mlflow_server
def test_a_trial_started_while_the_server_is_down_gets_its_run_id_once_the_run_exists(space, tmp_path,
                                                                                     mlflow_server):
    from mlflow import MlflowClient

    from sweep.tracking import Tracker
    from tests.sweep.test_tracking import CuttableProxy, wait_until

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="late-run", storage=storage)
    proxy = CuttableProxy(mlflow_server.port)
    tracker = Tracker(proxy.uri, max_backoff=0.5)
    try:
        tracker.ensure_parent_run(study)
        proxy.cut()
        study.optimize(Objective(space, study_seed=3, tracker=tracker), n_trials=1)
        assert "mlflow_run_id" not in study.trials[0].user_attrs  # the trial ended before its run
        proxy.restore()
        wait_until(lambda: tracker.flush(5), what="the delivery")
    finally:
        proxy.close()
        assert tracker.close(timeout=0) == 0
    study = optuna.load_study(study_name="late-run", storage=storage)
    run = MlflowClient(mlflow_server.uri).get_run(trial_run_id(study, study.trials[0]))
    assert run.info.status == "FINISHED" and run.data.tags["trial_number"] == "0"


def test_trial_config_and_seed_reproduce_its_curve_with_fit(space, tmp_path):
    study = optuna.create_study(sampler=space.build_sampler(seed=0))
    study.optimize(Objective(space, study_seed=3), n_trials=1)
    t = study.trials[0]
    data_config, config = split_flat(t.user_attrs["config"])
    from mixer.data import load

    result = mixer.train.fit(config, load(data_config), seed=t.user_attrs["seed"])
    assert [m.val_loss for m in result.history] == [h["val_loss"] for h in t.user_attrs["history"]]


def test_pruned_trial_stops_early_and_says_at_which_epoch(space):
    tracker = FakeTracker()
    study = optuna.create_study(sampler=space.build_sampler(seed=0), pruner=AlwaysPrune())
    study.optimize(Objective(space, study_seed=0, tracker=tracker), n_trials=1)
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert t.user_attrs["status"] == "pruned" and t.user_attrs["pruned_epoch"] == 1
    assert len(t.user_attrs["history"]) == 1
    assert tracker.log[-1] == ("end", "pruned", 1, None, 1)


def test_no_trial_is_pruned_during_its_learning_rate_warmup(tmp_path):
    path = tmp_path / "warm.yaml"
    warm = "epochs: 5, scheduler: cosine, warmup_epochs: 2,"
    path.write_text(textwrap.dedent(TINY).replace("epochs: 3,", warm))
    space = load_space(path)
    study = optuna.create_study(pruner=AlwaysPrune())
    study.optimize(Objective(space, study_seed=0), n_trials=1)
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["pruned_epoch"] == 3


def test_diverged_trial_fails_with_its_reason_and_the_study_goes_on(space, monkeypatch):
    tracker = FakeTracker()

    def diverging_fit(config, data, *, seed, on_epoch=None):
        on_epoch(metrics(1, 0.7))
        return FitResult(history=[metrics(1, 0.7)], status="diverged",
                         reason="training loss is nan at epoch 2, step 3", best_epoch=1,
                         best_params={}, params={})

    monkeypatch.setattr(mixer.train, "fit", diverging_fit)
    study = optuna.create_study(sampler=space.build_sampler(seed=0))
    study.optimize(Objective(space, study_seed=0, tracker=tracker), n_trials=2, catch=(TrialFailed,))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    t = study.trials[0]
    assert t.user_attrs["status"] == "diverged"
    assert t.user_attrs["reason"] == "training loss is nan at epoch 2, step 3"
    assert t.user_attrs["diagnosis"] == "diverged"
    assert ("end", "diverged", 1, "training loss is nan at epoch 2, step 3", None) in tracker.log
    # Divergence comes from the fit's status, not from reading the reason's words.
    assert tracker.run.diagnosis.label == "diverged"


def test_an_exception_in_training_fails_the_trial_with_its_message(space, monkeypatch):
    def broken_fit(config, data, *, seed, on_epoch=None):
        raise MemoryError("no room for the activations")

    monkeypatch.setattr(mixer.train, "fit", broken_fit)
    study = optuna.create_study()
    study.optimize(Objective(space, study_seed=0), n_trials=1, catch=(TrialFailed,))
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.FAIL
    assert t.user_attrs["status"] == "error"
    assert "MemoryError: no room for the activations" in t.user_attrs["reason"]


def test_maximised_metric_takes_the_highest_epoch(tmp_path, monkeypatch):
    path = tmp_path / "max.yaml"
    path.write_text(textwrap.dedent(TINY) + "metric: val_f1\n")
    space = load_space(path)
    assert space.direction == "maximize"
    f1 = [0.2, 0.9, 0.5]

    def fake_fit(config, data, *, seed, on_epoch=None):
        history = []
        for i, v in enumerate(f1, 1):
            m = EpochMetrics(**{**metrics(i, 0.5).__dict__, "val_f1": v})
            history.append(m)
            on_epoch(m)
        return FitResult(history=history, status="completed", reason=None, best_epoch=1,
                         best_params={}, params={})

    monkeypatch.setattr(mixer.train, "fit", fake_fit)
    study = optuna.create_study(direction="maximize")
    study.optimize(Objective(space, study_seed=0), n_trials=1)
    assert study.trials[0].value == 0.9
    assert study.trials[0].intermediate_values == {1: 0.2, 2: 0.9, 3: 0.5}


def test_a_retried_trial_keeps_the_seed_of_the_one_it_repeats(space):
    study = optuna.create_study()
    study.enqueue_trial({"lr": 0.005, "patch_size": 7}, user_attrs={"seed": 12345})
    study.optimize(Objective(space, study_seed=0), n_trials=1)
    assert study.trials[0].user_attrs["seed"] == 12345
    assert study.trials[0].params == {"lr": 0.005, "patch_size": 7}


def test_best_config_from_a_trial_is_a_valid_run_config(space, tmp_path):
    import yaml

    from mixer.config import dump_run_config

    study = optuna.create_study()
    study.optimize(Objective(space, study_seed=0), n_trials=1)
    t = study.trials[0]
    data, train = split_flat(t.user_attrs["config"])
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(dump_run_config(data, train, t.user_attrs["seed"])))
    data2, train2, seed2 = load_run_config(path)
    assert (data2, train2, seed2) == (data, train, t.user_attrs["seed"])
    assert math.isclose(train2.lr, t.params["lr"])


def test_a_probed_trial_records_its_ritz_spectrum_and_the_loss_slices_at_its_last_probe(tmp_path):
    path = tmp_path / "probed.yaml"
    path.write_text(textwrap.dedent(TINY).replace("batch_size: 64}", "batch_size: 64, curvature_every: 3}"))
    study = optuna.create_study()
    study.optimize(Objective(load_space(path), study_seed=0), n_trials=1)
    attrs = study.trials[0].user_attrs
    (probe,) = attrs["probes"]
    assert probe["epoch"] == 3 and len(probe["values"]) == len(probe["weights"]) >= 4
    assert probe["values"] == sorted(probe["values"])
    assert math.isclose(probe["values"][0], attrs["history"][-1]["hessian_min_eig"], rel_tol=1e-5)
    cut = attrs["slices"]
    assert cut["epoch"] == 3 and len(cut["alpha"]) == 15 and cut["alpha"][7] == 0.0
    assert cut["v_min"][7] == cut["gradient"][7]  # both start at the trained weights
    assert cut["gradient"][8] < cut["gradient"][7] < cut["gradient"][6]  # downhill for positive steps


def test_a_flat_stretch_is_recorded_as_the_trials_plateau_and_no_probe_as_none(space, monkeypatch):
    losses = [0.7, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]  # flat from epoch 3: no gain on the best before

    def flat_fit(config, data, *, seed, on_epoch=None):
        history = [metrics(i, v) for i, v in enumerate(losses, 1)]
        for m in history:
            on_epoch(m)
        return FitResult(history=history, status="completed", reason=None, best_epoch=2,
                         best_params={}, params={})

    monkeypatch.setattr(mixer.train, "fit", flat_fit)
    study = optuna.create_study()
    study.optimize(Objective(space, study_seed=0), n_trials=1)
    attrs = study.trials[0].user_attrs
    assert attrs["diagnosis"] == "plateau" and attrs["plateau"] == [3, 8]
    assert attrs["probes"] == [] and attrs["slices"] is None
