"""sweep.tracking against a real ``mlflow server`` and the local default store.

A fake trainer (a loop producing ``EpochMetrics``) stands in for ``mixer.train.fit``: what is
tested here is what reaches MLflow, not the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from mixer.config import DataConfig, MixerConfig, TrainConfig, dump_run_config, load_run_config
from mixer.train import EpochMetrics
from sweep.tracking import (
    EXPERIMENT_ATTR,
    PARENT_RUN_ATTR,
    Tracker,
    TrackingUnavailable,
    default_tracking_uri,
)
from tests.conftest import ROOT, MlflowServer, free_port

optuna.logging.set_verbosity(optuna.logging.WARNING)

EPOCHS = 4
METRIC_NAMES = ("train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1", "lr",
                "grad_norm_mean", "grad_norm_max", "update_ratio", "epoch_seconds")
CURVATURE_NAMES = ("hessian_max_eig", "hessian_min_eig", "neg_curvature_ratio", "curvature_seconds")


# ----------------------------------------------------------------------------------------------
# A fake trainer and a small study
# ----------------------------------------------------------------------------------------------

def fake_history(seed: int, epochs: int = EPOCHS, *, diverge_at: int | None = None) -> list[EpochMetrics]:
    """Deterministic made-up epochs; curvature on even epochs; NaN/inf losses from ``diverge_at`` on."""
    rng = np.random.default_rng(seed)
    out = []
    for epoch in range(1, epochs + 1):
        loss = float(0.7 / epoch + rng.uniform(0, 0.05))
        curvature = {}
        if epoch % 2 == 0:
            curvature = dict(hessian_max_eig=float(rng.uniform(1, 5)),
                             hessian_min_eig=float(-rng.uniform(0, 1)),
                             neg_curvature_ratio=float(rng.uniform(0, 0.2)), curvature_seconds=0.01)
        m = EpochMetrics(
            epoch=epoch, train_loss=loss, val_loss=loss * 1.1, val_accuracy=float(rng.uniform(0.5, 1)),
            val_precision=float(rng.uniform(0.5, 1)), val_recall=float(rng.uniform(0.5, 1)),
            val_f1=float(rng.uniform(0.5, 1)), lr=1e-3 * (0.9 ** epoch),
            grad_norm_mean=float(rng.uniform(0, 1)),
            grad_norm_max=float(rng.uniform(1, 2)), update_ratio=float(rng.uniform(0, 1e-2)),
            epoch_seconds=float(rng.uniform(0.01, 0.02)), **curvature)
        if diverge_at is not None and epoch >= diverge_at:
            m = EpochMetrics(**{**m.__dict__, "train_loss": math.inf, "val_loss": math.nan})
        out.append(m)
    return out


def run_trial(study: optuna.Study, tracker: Tracker, outcome: str, *, epochs: int = EPOCHS,
              wait: bool = True) -> dict:
    """One trial through the tracker as sweep.objective drives it; returns what was logged."""
    trial = study.ask()
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    patch = trial.suggest_categorical("patch_size", [1, 2, 3])
    config = TrainConfig(lr=lr, epochs=epochs, model=MixerConfig(patch_size=patch))
    data = DataConfig(n_rows=500, scaling="standard")
    seed = 1000 + trial.number
    created: list[str] = []
    run = tracker.start_trial(trial, config, data, seed=seed, on_created=created.append)
    history = []
    full = fake_history(seed, epochs, diverge_at=3 if outcome == "diverged" else None)
    for m in full:
        history.append(m)
        run.log_epoch(m)
        if math.isfinite(m.val_loss):
            trial.report(m.val_loss, m.epoch)
        if outcome == "pruned" and m.epoch == 2:
            break
    reason = {"failed": "ValueError: boom", "diverged": "non-finite loss at epoch 3"}.get(outcome)
    run.end(outcome, history=history, reason=reason, pruned_epoch=2 if outcome == "pruned" else None,
            wait=wait)
    state = {"completed": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}.get(
        outcome, optuna.trial.TrialState.FAIL)
    study.tell(trial, history[-1].val_loss if outcome == "completed" else None, state=state)
    return {"number": trial.number, "run": run, "history": history, "config": config, "data": data,
            "seed": seed, "outcome": outcome, "created": created}


def stored(value: float) -> float:
    """What an MLflow store keeps of a value: infinities are clipped to the largest float."""
    if math.isinf(value):
        return math.copysign(sys.float_info.max, value)
    return value


def assert_history_equal(client: MlflowClient, run_id: str, history: list[EpochMetrics]) -> None:
    """Every epoch's every metric is on the server, point by point, step = epoch."""
    names = {k for m in history for k in m.as_dict()}
    assert set(METRIC_NAMES) <= names
    for name in names:
        got = sorted((p.step, p.value) for p in client.get_metric_history(run_id, name))
        want = sorted((m.epoch, stored(m.as_dict()[name])) for m in history if name in m.as_dict())
        assert len(got) == len(want), (name, got, want)
        for (gs, gv), (ws, wv) in zip(got, want, strict=True):
            assert gs == ws, (name, got, want)
            assert (math.isnan(gv) and math.isnan(wv)) or gv == wv, (name, got, want)


def png_shape(path: str | Path) -> tuple[int, ...]:
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape


# ----------------------------------------------------------------------------------------------
# One tracked study on the shared server, read back by several tests
# ----------------------------------------------------------------------------------------------

OUTCOMES = ("completed", "pruned", "failed", "diverged", "completed")


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked-study")
    study = optuna.create_study(study_name=f"tracked-{os.getpid()}-{time.time_ns()}",
                                storage=f"sqlite:///{out / 'optuna.db'}")
    tracker = Tracker(mlflow_server.uri)
    tracker.check_reachable()
    parent_id = tracker.ensure_parent_run(study)
    trials = [run_trial(study, tracker, outcome) for outcome in OUTCOMES]
    summary = tracker.finish_study(study, out / "study")
    undelivered = tracker.close()
    return {"client": MlflowClient(mlflow_server.uri), "study": study, "parent_id": parent_id,
            "trials": trials, "summary": summary, "undelivered": undelivered, "out": out,
            "experiment_id": tracker.experiment_id}


@pytest.mark.mlflow_server
def test_every_trial_run_hangs_under_the_one_parent_named_after_the_study(tracked):
    client, study = tracked["client"], tracked["study"]
    assert study.user_attrs[PARENT_RUN_ATTR] == tracked["parent_id"]
    assert study.user_attrs[EXPERIMENT_ATTR] == tracked["experiment_id"]
    assert client.get_experiment(tracked["experiment_id"]).name == study.study_name
    runs = client.search_runs([tracked["experiment_id"]])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.run_id for r in parents] == [tracked["parent_id"]]
    assert sorted(r.info.run_name for r in children) == [f"trial-{t['number']}" for t in tracked["trials"]]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {tracked["parent_id"]}
    assert tracked["undelivered"] == 0
    # start_trial's on_created got each run's id, once (sweep.objective stores it on the trial).
    assert [t["created"] for t in tracked["trials"]] == [[t["run"].run_id] for t in tracked["trials"]]


@pytest.mark.mlflow_server
@pytest.mark.parametrize("index, status, optuna_state", [
    (0, "FINISHED", "COMPLETE"), (1, "KILLED", "PRUNED"), (2, "FAILED", "FAIL"), (3, "FAILED", "FAIL")])
def test_run_status_and_tags_tell_the_trials_outcome(tracked, index, status, optuna_state):
    t = tracked["trials"][index]
    run = tracked["client"].get_run(t["run"].run_id)
    tags = run.data.tags
    assert run.info.status == status
    assert tags["optuna_state"] == optuna_state
    assert tags["trial_number"] == str(t["number"])
    assert tags["study_name"] == tracked["study"].study_name
    assert tags["seed"] == str(t["seed"])
    assert tags.get("pruned_epoch") == ("2" if t["outcome"] == "pruned" else None)
    reasons = {"failed": "ValueError: boom", "diverged": "non-finite loss at epoch 3"}
    assert tags.get("failure_reason") == reasons.get(t["outcome"])


@pytest.mark.mlflow_server
def test_diagnosis_tags_are_on_the_trial_runs(tracked):
    pytest.importorskip("mixer.diagnosis")
    client = tracked["client"]
    labels = {t["outcome"]: client.get_run(t["run"].run_id).data.tags.get("diagnosis")
              for t in tracked["trials"]}
    assert labels["diverged"] == "diverged"
    assert labels["completed"] in {"healthy", "plateau", "saddle", "oscillating"}


@pytest.mark.mlflow_server
@pytest.mark.parametrize("index", range(len(OUTCOMES)))
def test_metric_histories_equal_the_trials_histories_point_by_point(tracked, index):
    t = tracked["trials"][index]
    assert_history_equal(tracked["client"], t["run"].run_id, t["history"])


@pytest.mark.mlflow_server
def test_curvature_metrics_are_logged_only_on_epochs_that_measured_them(tracked):
    t = tracked["trials"][0]
    steps = [p.step for p in tracked["client"].get_metric_history(t["run"].run_id, "hessian_min_eig")]
    assert sorted(steps) == [e for e in range(1, EPOCHS + 1) if e % 2 == 0]


@pytest.mark.mlflow_server
def test_params_are_the_full_flat_config_and_config_yaml_reloads_to_it(tracked, tmp_path):
    client = tracked["client"]
    t = tracked["trials"][0]
    run = client.get_run(t["run"].run_id)
    expected = {**t["data"].__dict__, **t["config"].to_flat()}
    assert run.data.params == {k: str(v) for k, v in expected.items()}
    path = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(path).read_text()) == dump_run_config(t["data"], t["config"], t["seed"])
    data, train, seed = load_run_config(path)
    assert (data, train, seed) == (t["data"], t["config"], t["seed"])


@pytest.mark.mlflow_server
@pytest.mark.parametrize("index", [0, 1, 3])
def test_each_trial_run_has_a_curves_png_that_opens(tracked, tmp_path, index):
    client = tracked["client"]
    run_id = tracked["trials"][index]["run"].run_id
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "curves.png"}
    height, width, _ = png_shape(client.download_artifacts(run_id, "curves.png", str(tmp_path)))
    assert height > 200 and width > 400


@pytest.mark.mlflow_server
def test_parent_run_holds_the_study_summary_table_and_plots(tracked, tmp_path):
    client, study = tracked["client"], tracked["study"]
    parent = client.get_run(tracked["parent_id"])
    assert parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    counts = (metrics["n_complete"], metrics["n_pruned"], metrics["n_failed"], metrics["n_trials"])
    assert counts == (2, 1, 2, 5)
    assert metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial_number"] == str(study.best_trial.number)
    assert float(parent.data.tags["best_param.lr"]) == pytest.approx(study.best_params["lr"])
    table = client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    import pandas as pd

    frame = pd.read_csv(table)
    assert list(frame["number"]) == [t.number for t in study.trials]
    assert list(frame["state"]) == ["COMPLETE", "PRUNED", "FAIL", "FAIL", "COMPLETE"]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{n}.png" for n in ("optimization_history", "intermediate_values",
                                                "param_importances", "parallel_coordinate")}
    for plot in plots:
        height, width, _ = png_shape(client.download_artifacts(parent.info.run_id, plot, str(tmp_path)))
        assert height > 100 and width > 100


@pytest.mark.mlflow_server
def test_a_runs_status_is_set_only_after_all_its_epochs_are_on_the_server(mlflow_server):
    study = optuna.create_study(study_name=f"order-{time.time_ns()}")
    tracker = Tracker(mlflow_server.uri, batch_seconds=60)  # epochs held until the trial ends
    reader = MlflowClient(mlflow_server.uri)
    seen_at_status = {}
    set_terminated = tracker._sender.client.set_terminated

    def spy(run_id, **kwargs):
        # What the server holds at the moment the status is about to be set.
        seen_at_status[run_id] = len(reader.get_metric_history(run_id, "val_loss"))
        return set_terminated(run_id, **kwargs)

    tracker._sender.client.set_terminated = spy
    try:
        tracker.ensure_parent_run(study)
        trials = [run_trial(study, tracker, outcome, wait=False) for outcome in ("completed", "pruned")]
        assert tracker.flush(30)
    finally:
        assert tracker.close() == 0
    assert {t["run"].run_id: len(t["history"]) for t in trials} == seen_at_status


@pytest.mark.mlflow_server
def test_artifacts_go_where_create_run_said_without_asking_the_server_for_the_run(mlflow_server, tmp_path):
    """One request less per trial: MlflowClient.log_artifact would get_run first to find the URI."""
    from sweep.tracking import _Calls

    client = MlflowClient(mlflow_server.uri)
    calls = _Calls(MlflowClient(mlflow_server.uri), mlflow_server.uri)  # as the sending process has
    asked: list[str] = []
    service = calls.client._tracking_client  # where MlflowClient's requests go out
    get_run = service.get_run
    service.get_run = lambda run_id: asked.append(run_id) or get_run(run_id)
    experiment_id = client.create_experiment(f"no-get-run-{time.time_ns()}")
    run_id, artifact_uri = calls.create_run(experiment_id, start_time=None, tags={}, run_name="r")
    (tmp_path / "config.yaml").write_text("lr: 0.001\n")
    calls.log_artifact(run_id, str(tmp_path / "config.yaml"), None, artifact_uri=artifact_uri)
    assert asked == []
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml"}
    calls.log_artifact(run_id, str(tmp_path / "config.yaml"), "asked", artifact_uri=None)  # URI unknown
    assert asked == [run_id]
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "asked"}

    # And through a Tracker (its calls in the sending process): both files of a trial arrive.
    study = optuna.create_study(study_name=f"no-get-run-{time.time_ns()}")
    tracker = Tracker(mlflow_server.uri)
    try:
        tracker.ensure_parent_run(study)
        trial = run_trial(study, tracker, "completed", wait=False)
        assert tracker.flush(30)
    finally:
        assert tracker.close() == 0
    assert {a.path for a in client.list_artifacts(trial["run"].run_id)} == {"config.yaml", "curves.png"}


@pytest.mark.mlflow_server
def test_a_short_trials_png_is_drawn_at_close_and_a_long_ones_before_its_status(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    study = optuna.create_study(study_name=f"deferred-png-{time.time_ns()}")
    tracker = Tracker(mlflow_server.uri)  # fake trials take milliseconds: far under defer_png_below
    try:
        tracker.ensure_parent_run(study)
        short = run_trial(study, tracker, "completed")["run"].run_id
        assert tracker.flush(30)
        run = client.get_run(short)
        assert run.info.status == "FINISHED" and len(client.get_metric_history(short, "val_loss")) == EPOCHS
        assert {a.path for a in client.list_artifacts(short)} == {"config.yaml"}
        assert tracker.deferred_pngs == 1
    finally:
        assert tracker.close() == 0
    assert tracker.deferred_pngs == 0
    assert {a.path for a in client.list_artifacts(short)} == {"config.yaml", "curves.png"}

    tracker = Tracker(mlflow_server.uri, defer_png_below=0)
    seen_at_status = {}
    set_terminated = tracker._sender.client.set_terminated

    def spy(run_id, **kwargs):
        seen_at_status[run_id] = {a.path for a in client.list_artifacts(run_id)}
        return set_terminated(run_id, **kwargs)

    tracker._sender.client.set_terminated = spy
    try:
        tracker.ensure_parent_run(study)
        long = run_trial(study, tracker, "completed")["run"].run_id
        assert tracker.flush(30)
        assert tracker.deferred_pngs == 0
    finally:
        assert tracker.close() == 0
    assert seen_at_status == {long: {"config.yaml", "curves.png"}}


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_the_drawing_process_runs_only_on_cpu_time_nothing_else_wants(tmp_path):
    from sweep.tracking import _Drawer

    drawer = _Drawer()
    try:
        drawer.submit([(1, {"train_loss": 1.0, "val_loss": 1.0, "lr": 1e-3})], tmp_path / "a.png",
                      "idle").result(timeout=60)
        assert os.sched_getscheduler(drawer._proc.pid) == os.SCHED_IDLE
    finally:
        drawer.close()


def test_curves_are_drawn_even_if_the_drawing_process_dies(tmp_path):
    from sweep.tracking import _Drawer

    drawer = _Drawer()
    rows = [(e, {"train_loss": 1 / e, "val_loss": 1.1 / e, "lr": 1e-3}) for e in range(1, 4)]
    try:
        first = drawer.submit(rows, tmp_path / "a.png", "child").result(timeout=60)
        drawer._proc.kill()
        drawer._proc.wait()
        time.sleep(0.5)  # the reader sees the end of the child's output
        second = drawer.submit(rows, tmp_path / "b.png", "thread").result(timeout=60)
    finally:
        drawer.close()
    assert png_shape(first)[0] > 200 and png_shape(second)[0] > 200
    assert drawer.cpu_seconds > 0


def metric_points(client: MlflowClient, trials: list[dict]) -> dict[str, list[tuple[int, float]]]:
    return {t["run"].run_id: [(m.step, m.value)
                              for m in client.get_metric_history(t["run"].run_id, "val_loss")]
            for t in trials}


def expected_points(trials: list[dict]) -> dict[str, list[tuple[int, float]]]:
    return {t["run"].run_id: [(m.epoch, pytest.approx(stored(m.val_loss))) for m in t["history"]]
            for t in trials}


@pytest.mark.mlflow_server
def test_mlflow_calls_are_made_in_a_child_process_that_may_die_without_losing_a_point(mlflow_server):
    """Off this process's GIL; a sending process that dies is replaced and its call retried."""
    client = MlflowClient(mlflow_server.uri)
    study = optuna.create_study(study_name=f"send-worker-{time.time_ns()}")
    tracker = Tracker(mlflow_server.uri, max_backoff=0.5)
    sending = tracker._sender.client
    try:
        tracker.ensure_parent_run(study)  # starts the child; calls are made here until it is ready
        first = sending._proc
        assert first.pid != os.getpid() and first.poll() is None
        # The URI (a password may be in it) is not on the command line, where anyone could read it.
        assert mlflow_server.uri not in " ".join(first.args)
        deadline = time.monotonic() + 60
        while not sending._ready:
            assert time.monotonic() < deadline, "the sending process never said it was ready"
            with sending._lock:
                sending._child_ready(first)
            time.sleep(0.1)
        cpu = sending.cpu_seconds
        assert cpu > 0.3  # the child's import of MLflow, reported with its "ready"
        trials = [run_trial(study, tracker, "completed")]
        assert sending.cpu_seconds > cpu  # that trial's calls were made in the child
        first.kill()
        first.wait()
        trials += [run_trial(study, tracker, "completed", wait=False), run_trial(study, tracker, "pruned")]
        deadline = time.monotonic() + 60
        while not tracker.flush(5):  # flush returns at once while a failed call waits for its retry
            assert time.monotonic() < deadline, f"{tracker.pending_metrics} metric points still waiting"
            time.sleep(0.2)
        assert sending._proc is not None and sending._proc.pid != first.pid
    finally:
        assert tracker.close() == 0
    assert sending._proc is None
    assert metric_points(client, trials) == expected_points(trials)
    assert [client.get_run(t["run"].run_id).info.status for t in trials] == ["FINISHED", "FINISHED", "KILLED"]


@pytest.mark.mlflow_server
def test_without_a_sending_process_the_calls_are_made_from_the_thread(mlflow_server, monkeypatch):
    import sweep.tracking as tracking

    def no_process(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(tracking.subprocess, "Popen", no_process)
    client = MlflowClient(mlflow_server.uri)
    study = optuna.create_study(study_name=f"send-thread-{time.time_ns()}")
    tracker = Tracker(mlflow_server.uri, curves_png=False)
    try:
        tracker.ensure_parent_run(study)
        trials = [run_trial(study, tracker, "completed")]
        assert tracker.flush(30)
        assert tracker._sender.client._proc is None and tracker._sender.client._no_child
    finally:
        assert tracker.close() == 0
    assert metric_points(client, trials) == expected_points(trials)


@pytest.mark.mlflow_server
def test_the_sending_process_reports_which_errors_are_worth_retrying(mlflow_server):
    from sweep.tracking import _is_transient, _RemoteError, _SendingProcess

    sending = _SendingProcess(mlflow_server.uri, None)
    try:
        with pytest.raises(_RemoteError, match="RESOURCE_DOES_NOT_EXIST|not found") as raised:
            sending.set_terminated("0" * 32, status="FINISHED", end_time=None)
        assert not _is_transient(raised.value)
    finally:
        sending.close()
    down = _SendingProcess(f"http://127.0.0.1:{free_port()}", None)  # nothing listens there
    try:
        with pytest.raises(_RemoteError, match="onnection") as raised:
            down.create_run("0", start_time=None, tags={}, run_name="r")
        assert _is_transient(raised.value)
    finally:
        down.close()


# ----------------------------------------------------------------------------------------------
# The local default store
# ----------------------------------------------------------------------------------------------

def test_default_store_is_the_one_mlflow_ui_opens_in_that_folder(in_tmp):
    from mlflow.tracking._tracking_service.utils import _get_default_tracking_uri

    tracker = Tracker()
    try:
        # `mlflow ui` with no arguments opens mlflow's default URI, relative to where it runs.
        assert _get_default_tracking_uri() == "sqlite:///mlflow.db"
        assert tracker.uri == f"sqlite:///{in_tmp.resolve() / 'mlflow.db'}" == default_tracking_uri()
        study = optuna.create_study(study_name="local")
        tracker.check_reachable()
        tracker.ensure_parent_run(study)
        t = run_trial(study, tracker, "completed")
        summary = tracker.finish_study(study, in_tmp / "out")
    finally:
        assert tracker.close() == 0
    client = MlflowClient("sqlite:///mlflow.db")  # what `mlflow ui` would read
    experiment = client.get_experiment_by_name("local")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in runs} == {"local", "trial-0"}
    assert_history_equal(client, t["run"].run_id, t["history"])
    # One completed trial: no importances to compute, and the study still finishes.
    assert "param_importances" in summary["plots_skipped"]
    parent = client.get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.info.status == "FINISHED"
    assert "plot_skipped.param_importances" in parent.data.tags
    assert png_shape(in_tmp / "out" / "plots" / "optimization_history.png")[0] > 100


def test_ui_hint_says_how_to_open_the_runs_page_of_each_kind_of_store(in_tmp):
    from sweep.tracking import ui_hint

    page = "#/experiments/7/runs?workflowType=machine_learning"
    assert ui_hint("http://u:secret@host:5000/", "7") == f"curves: http://u:***@host:5000/{page}"
    assert ui_hint(default_tracking_uri(), "7") == f"curves: run `mlflow ui`, then open http://127.0.0.1:5000/{page}"
    elsewhere = in_tmp / "other dir"
    elsewhere.mkdir()
    assert ui_hint(f"sqlite:///{elsewhere / 'mlflow.db'}", "7") == (
        f"curves: run `cd '{elsewhere}' && mlflow ui`, then open http://127.0.0.1:5000/{page}")
    assert ui_hint(f"sqlite:///{in_tmp / 'x.db'}", "7") == (
        f"curves: run `mlflow ui --backend-store-uri sqlite:///{in_tmp / 'x.db'}`, "
        f"then open http://127.0.0.1:5000/{page}")
    assert ui_hint(default_tracking_uri(), None) is None


def test_existing_mlruns_file_store_stays_the_default_as_mlflow_ui_does(tmp_path):
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    assert default_tracking_uri(tmp_path) == (tmp_path / "mlruns").resolve().as_uri()


@pytest.mark.mlflow_server
def test_bad_state_and_misuse_raise_naming_the_value(mlflow_server):
    with Tracker(mlflow_server.uri) as tracker:
        study = optuna.create_study(study_name=f"misuse-{time.time_ns()}")
        tracker.ensure_parent_run(study)
        trial = study.ask()
        run = tracker.start_trial(trial, TrainConfig(), DataConfig(), seed=0)
        with pytest.raises(ValueError, match="state=.*'finished'"):
            run.end("finished")
        run.end("completed")
        with pytest.raises(RuntimeError, match="log_epoch after end"):
            run.log_epoch(fake_history(0)[0])
    with pytest.raises(ValueError, match="end_timeout=-1"):
        Tracker(end_timeout=-1)


# ----------------------------------------------------------------------------------------------
# Server trouble
# ----------------------------------------------------------------------------------------------

def test_unreachable_server_at_start_raises_quickly_naming_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(uri)
    try:
        start = time.monotonic()
        with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
            tracker.check_reachable()
        assert time.monotonic() - start < 5
    finally:
        tracker.close(timeout=0)


def test_unopenable_local_store_is_reported_by_check_reachable(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    tracker = Tracker(uri)  # does not raise: sweep.run reports the problem from check_reachable
    try:
        with pytest.raises(TrackingUnavailable, match="not-a-folder"):
            tracker.check_reachable()
        with pytest.raises(TrackingUnavailable):
            tracker.ensure_parent_run(optuna.create_study())
    finally:
        tracker.close(timeout=0)


class CuttableProxy:
    """A TCP forwarder to the server that can be cut (connections refused and dropped) and restored."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.up = True
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.open.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy(mlflow_server):
    p = CuttableProxy(mlflow_server.port)
    yield p
    p.close()


@pytest.mark.mlflow_server
def test_outage_mid_study_never_blocks_training_and_loses_no_metric_point(proxy, mlflow_server, caplog):
    caplog.set_level(logging.WARNING, logger="sweep.tracking")
    study = optuna.create_study(study_name=f"outage-{time.time_ns()}")
    tracker = Tracker(proxy.uri, max_backoff=0.5, warn_every=0.2)
    try:
        tracker.ensure_parent_run(study)
        before = run_trial(study, tracker, "completed")
        proxy.cut()
        start = time.monotonic()
        during = [run_trial(study, tracker, outcome) for outcome in ("completed", "pruned")]
        # Training went on: logging and ending two trials took no server round trip.
        assert time.monotonic() - start < 1.0
        time.sleep(1.0)
        # Every epoch point is waiting (plus the diagnosis metrics logged at each trial's end).
        assert tracker.pending_metrics >= sum(len(m.as_dict()) for t in during for m in t["history"])
        assert any("metric points waiting" in r.getMessage() for r in caplog.records)
        proxy.restore()
        undelivered = tracker.close(timeout=30)
    finally:
        proxy.restore()
        tracker.close(timeout=0)
    assert undelivered == 0
    client = MlflowClient(mlflow_server.uri)
    for t in (before, *during):
        run = client.get_run(t["run"].run_id)
        assert run.info.status == {"completed": "FINISHED", "pruned": "KILLED"}[t["outcome"]]
        assert run.data.tags["mlflow.parentRunId"] == study.user_attrs[PARENT_RUN_ATTR]
        assert_history_equal(client, t["run"].run_id, t["history"])
        # The creation callback came once the server was back, with the run's id, once.
        assert t["created"] == [t["run"].run_id]


@pytest.mark.mlflow_server
def test_close_counts_the_metric_points_a_dead_server_never_got(proxy):
    study = optuna.create_study(study_name=f"dead-{time.time_ns()}")
    tracker = Tracker(proxy.uri, max_backoff=0.2)
    tracker.ensure_parent_run(study)
    proxy.cut()
    t = run_trial(study, tracker, "completed")
    waiting = tracker.pending_metrics
    assert waiting >= sum(len(m.as_dict()) for m in t["history"])
    start = time.monotonic()
    undelivered = tracker.close(timeout=1.0)
    assert time.monotonic() - start < 15
    assert undelivered == waiting


@pytest.mark.slow
@pytest.mark.mlflow_server
def test_real_server_stopped_and_restarted_mid_study_loses_no_metric_point(tmp_path):
    server = MlflowServer(tmp_path / "own-server")
    server.start()
    try:
        study = optuna.create_study(study_name="restart")
        tracker = Tracker(server.uri, max_backoff=1.0)
        tracker.check_reachable()
        tracker.ensure_parent_run(study)
        trials = [run_trial(study, tracker, "completed")]
        server.stop()
        trials += [run_trial(study, tracker, outcome) for outcome in ("completed", "failed")]
        assert tracker.pending_metrics > 0
        server.start()
        assert tracker.close(timeout=60) == 0
        client = MlflowClient(server.uri)
        for t in trials:
            assert client.get_run(t["run"].run_id).info.status in {"FINISHED", "FAILED"}
            assert_history_equal(client, t["run"].run_id, t["history"])
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------
# Several worker processes: one parent run, every metric point
# ----------------------------------------------------------------------------------------------

WORKER = r"""
import json, sys, time
from pathlib import Path
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from sweep.tracking import Tracker
from tests.sweep.test_tracking import run_trial

storage, study_name, uri, ready, go, n_trials = sys.argv[1:]
if storage.endswith(".journal"):
    storage = JournalStorage(JournalFileBackend(storage))
study = optuna.load_study(study_name=study_name, storage=storage)
tracker = Tracker(uri or None)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
parent = tracker.ensure_parent_run(study)
trials = [run_trial(study, tracker, "completed") for _ in range(int(n_trials))]
undelivered = tracker.close()
print(json.dumps({"parent": parent, "undelivered": undelivered,
                  "runs": [[t["run"].run_id, [m.__dict__ for m in t["history"]]] for t in trials]}))
"""


def run_workers(tmp_path: Path, storage: str, study_name: str, uri: str, *, n_workers: int = 2,
                n_trials: int = 2, cwd: Path | None = None) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = []
    for i in range(n_workers):
        ready = tmp_path / f"ready-{i}"
        procs.append((ready, subprocess.Popen(
            [sys.executable, str(script), storage, study_name, uri, str(ready), str(go), str(n_trials)],
            cwd=cwd or tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    try:
        deadline = time.monotonic() + 60
        while not all(ready.exists() for ready, _ in procs):
            assert time.monotonic() < deadline, "workers did not get ready"
            assert all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs]
            time.sleep(0.05)
        go.touch()  # both workers ask for the parent run at the same instant
        results = []
        for _, p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def check_one_parent(client: MlflowClient, study: optuna.Study, results: list[dict]) -> None:
    parent_id = study.user_attrs[PARENT_RUN_ATTR]
    assert {r["parent"] for r in results} == {parent_id}
    runs = client.search_runs([study.user_attrs[EXPERIMENT_ATTR]])
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [parent_id]
    children = {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    logged = [run for r in results for run in r["runs"]]
    assert set(children) == {run_id for run_id, _ in logged}
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent_id}
    assert sorted(r.info.run_name for r in children.values()) == [f"trial-{n}" for n in range(len(logged))]
    for run_id, history in logged:
        assert children[run_id].info.status == "FINISHED"
        assert_history_equal(client, run_id, [EpochMetrics(**h) for h in history])
    assert all(r["undelivered"] == 0 for r in results)


def journal_study(tmp_path: Path, name: str) -> tuple[str, optuna.Study]:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = str(tmp_path / "optuna.journal")
    return path, optuna.create_study(study_name=name, storage=JournalStorage(JournalFileBackend(path)))


@pytest.mark.mlflow_server
def test_two_worker_processes_on_a_journal_study_share_one_parent_run(tmp_path, mlflow_server):
    path, study = journal_study(tmp_path, f"workers-{time.time_ns()}")
    results = run_workers(tmp_path, path, study.study_name, mlflow_server.uri)
    check_one_parent(MlflowClient(mlflow_server.uri), study, results)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.mlflow_server
def test_two_worker_processes_on_a_postgres_study_share_one_parent_run(tmp_path, mlflow_server,
                                                                         postgres_url):
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project ships psycopg2.
    url = postgres_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    study = optuna.create_study(study_name="workers-pg", storage=url)
    results = run_workers(tmp_path, url, study.study_name, mlflow_server.uri)
    check_one_parent(MlflowClient(mlflow_server.uri), study, results)


@pytest.mark.slow
def test_two_worker_processes_log_to_a_fresh_local_store_at_once(tmp_path):
    path, study = journal_study(tmp_path, "local-workers")
    results = run_workers(tmp_path, path, study.study_name, "", n_trials=3)
    assert (tmp_path / "mlflow.db").exists()
    check_one_parent(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), study, results)



# ----------------------------------------------------------------------------------------------
# Through the sweep CLI
# ----------------------------------------------------------------------------------------------

TINY_SPACE = """\
study: tiny-cli
seed: 0
data: {source: synthetic, n_rows: 400}
train: {epochs: 3, dim: 8, depth: 1, batch_size: 64, token_expansion: 1.0, channel_expansion: 1.0}
metric: val_loss
budget: {n_trials: 3}
params:
  lr: {type: float, low: 1.0e-4, high: 0.1, log: true}
  patch_size: {type: categorical, choices: [3, 7]}
"""


@pytest.mark.mlflow_server
def test_sweep_cli_logs_each_trial_under_the_study_parent_run(tmp_path, mlflow_server, capsys):
    run = pytest.importorskip("sweep.run")
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    name = f"tiny-cli-{time.time_ns()}"
    code = run.main([str(space), "--tracking-uri", mlflow_server.uri, "--out", str(tmp_path / "out"),
                     "--study-name", name])
    assert code == 0
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(name)
    # The last line names the page of this experiment's training runs.
    page = f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert capsys.readouterr().out.splitlines()[-1] == f"curves: {mlflow_server.uri}/{page}"
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == ["trial-0", "trial-1", "trial-2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 3
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) >= 1
        assert {"lr", "patch_size", "dim", "n_rows", "scaling"} <= set(child.data.params)
