"""sweep.tracking against a real ``mlflow server`` and the local default store.

A fake trainer (a loop producing ``EpochMetrics``) stands in for ``mixer.train.fit``: what is
tested here is what reaches MLflow, read back with MLflow's own client, not the model. Everything
goes through the public interface (``Tracker``, ``TrialRun``, the module functions, the CLI);
server trouble is made with proxies between the tracker and the server.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import logging
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from mixer.config import DataConfig, MixerConfig, TrainConfig, dump_run_config, load_run_config
from mixer.diagnosis import LABELS, Diagnosis, diagnose
from mixer.train import EpochMetrics
from sweep.messages import redact
from sweep.tracking import (
    EXPERIMENT_ATTR,
    PARENT_RUN_ATTR,
    Tracker,
    TrackingUnavailable,
    check_reachable,
    default_tracking_uri,
    resolve_uri,
    ui_hint,
)
from tests.conftest import ROOT, MlflowServer, free_port

optuna.logging.set_verbosity(optuna.logging.WARNING)

EPOCHS = 4
METRIC_NAMES = ("train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1", "lr",
                "grad_norm_mean", "grad_norm_max", "update_ratio", "epoch_seconds")


def wait_until(condition, *, timeout: float = 60.0, what: str = "the condition"):
    """Poll ``condition()`` until it is truthy (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.1)
    return value


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
    for m in fake_history(seed, epochs, diverge_at=3 if outcome == "diverged" else None):
        history.append(m)
        run.log_epoch(m)
        if math.isfinite(m.val_loss):
            trial.report(m.val_loss, m.epoch)
        if outcome == "pruned" and m.epoch == 2:
            break
    reason = {"failed": "ValueError: boom", "diverged": "non-finite loss at epoch 3"}.get(outcome)
    diagnosis = diagnose(history, diverged=outcome == "diverged")  # once, by the caller
    run.end(outcome, history=history, reason=reason, pruned_epoch=2 if outcome == "pruned" else None,
            diagnosis=diagnosis, wait=wait)
    state = {"completed": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}.get(
        outcome, optuna.trial.TrialState.FAIL)
    study.tell(trial, history[-1].val_loss if outcome == "completed" else None, state=state)
    return {"number": trial.number, "run": run, "history": history, "config": config, "data": data,
            "seed": seed, "outcome": outcome, "created": created, "diagnosis": diagnosis}


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


def runs_named(client: MlflowClient, experiment_id: str, name: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{name}'")


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
    assert tags["trial_state"] == t["outcome"]
    assert tags["trial_number"] == str(t["number"])
    assert tags["study_name"] == tracked["study"].study_name
    assert tags["seed"] == str(t["seed"])
    assert tags.get("pruned_epoch") == ("2" if t["outcome"] == "pruned" else None)
    reasons = {"failed": "ValueError: boom", "diverged": "non-finite loss at epoch 3"}
    assert tags.get("failure_reason") == reasons.get(t["outcome"])


@pytest.mark.mlflow_server
@pytest.mark.parametrize("index", range(len(OUTCOMES)))
def test_the_diagnosis_given_to_end_is_on_the_trial_run(tracked, index):
    t = tracked["trials"][index]
    run = tracked["client"].get_run(t["run"].run_id)
    diagnosis = t["diagnosis"]
    assert run.data.tags["diagnosis"] == diagnosis.label
    assert {k: run.data.tags[k] for k in diagnosis.tags} == diagnosis.tags
    epoch_names = {k for m in t["history"] for k in m.as_dict()}
    for name, value in diagnosis.metrics.items():
        key = f"diagnosis_{name}" if name in epoch_names else name
        assert run.data.metrics[key] == pytest.approx(stored(value))
    assert (index == 3) == (diagnosis.label == "diverged")


@pytest.mark.mlflow_server
def test_diagnosis_metrics_named_like_an_epoch_metric_are_prefixed(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    study = optuna.create_study(study_name=f"diagnosis-{time.time_ns()}")
    diagnosis = Diagnosis(label="saddle", metrics={"val_loss": 0.125, "plateau_length": 3.0},
                          tags={"diagnosis": "saddle", "plateau_start_epoch": "2",
                                "diagnosis_reason": "made up"})
    with Tracker(mlflow_server.uri) as tracker:
        tracker.ensure_parent_run(study)
        run = tracker.start_trial(study.ask(), TrainConfig(), DataConfig(), seed=0)
        history = fake_history(0)
        for m in history:
            run.log_epoch(m)
        run.end("completed", history=history, diagnosis=diagnosis)
    got = client.get_run(run.run_id)
    assert {k: got.data.tags[k] for k in diagnosis.tags} == diagnosis.tags
    assert got.data.metrics["diagnosis_val_loss"] == 0.125 and got.data.metrics["plateau_length"] == 3.0
    assert_history_equal(client, run.run_id, history)  # val_loss itself holds the epochs alone


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
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml"}
    path = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(path).read_text()) == dump_run_config(t["data"], t["config"], t["seed"])
    data, train, seed = load_run_config(path)
    assert (data, train, seed) == (t["data"], t["config"], t["seed"])


@pytest.mark.mlflow_server
def test_parent_run_holds_the_study_summary_and_the_study_files(tracked, tmp_path):
    client, study, summary = tracked["client"], tracked["study"], tracked["summary"]
    parent = client.get_run(tracked["parent_id"])
    assert parent.info.status == "FINISHED"
    metrics, tags = parent.data.metrics, parent.data.tags
    counts = (metrics["n_complete"], metrics["n_pruned"], metrics["n_failed"], metrics["n_trials"])
    assert counts == (2, 1, 2, 5)
    assert {k: summary[k] for k in ("n_complete", "n_pruned", "n_failed", "n_trials")} == {
        "n_complete": 2, "n_pruned": 1, "n_failed": 2, "n_trials": 5}
    assert metrics["best_value"] == pytest.approx(study.best_value) == pytest.approx(summary["best_value"])
    assert tags["best_trial_number"] == str(study.best_trial.number)
    assert float(tags["best_param.lr"]) == pytest.approx(study.best_params["lr"])
    assert tags["optuna_direction"] == "minimize" and tags["study_name"] == study.study_name
    # The best trial's parameters are the parent's params too, for Compare across studies.
    best = study.best_trial
    assert parent.data.params == {"best.trial_number": str(best.number),
                                  **{f"best.{k}": str(v) for k, v in best.params.items()}}
    # Every file sweep.report wrote is on the parent run, trials.csv at the top, plots under plots/.
    files = [Path(p) for p in summary["files"]]
    assert files and all(p.is_file() for p in files)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    logged |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {p.name if p.parent.name != "plots" else f"plots/{p.name}" for p in files} <= logged
    import pandas as pd

    frame = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    assert list(frame["number"]) == [t.number for t in study.trials]
    assert list(frame["state"]) == ["COMPLETE", "PRUNED", "FAIL", "FAIL", "COMPLETE"]


@pytest.mark.mlflow_server
def test_a_resumed_study_whose_best_changed_finishes_and_keeps_one_trials_params(mlflow_server, tmp_path,
                                                                                 caplog):
    caplog.set_level(logging.WARNING, logger="sweep.tracking")
    client = MlflowClient(mlflow_server.uri)
    study = optuna.create_study(study_name=f"resumed-{time.time_ns()}")
    with Tracker(mlflow_server.uri) as tracker:
        tracker.ensure_parent_run(study)
        first = run_trial(study, tracker, "completed")
        tracker.finish_study(study, tmp_path / "out")
    # Resumed: a better trial, with a parameter the first best did not have.
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 0.05, "patch_size": 3, "t_0": 4}, value=-1.0,
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                       "patch_size": optuna.distributions.CategoricalDistribution([1, 2, 3]),
                       "t_0": optuna.distributions.IntDistribution(1, 10)}))
    with Tracker(mlflow_server.uri) as tracker:
        tracker.ensure_parent_run(study)
        summary = tracker.finish_study(study, tmp_path / "out")
    assert tracker.close() == 0 and summary["best_value"] == -1.0
    assert not [r for r in caplog.records if "dropping" in r.getMessage()]
    parent = client.get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_number"] == "1" and parent.data.tags["best_param.t_0"] == "4"
    # MLflow params cannot change: they stay those of the first best trial, all of them and only them.
    assert parent.data.params == {"best.trial_number": str(first["number"]),
                                  **{f"best.{k}": str(v) for k, v in study.trials[0].params.items()}}


# ----------------------------------------------------------------------------------------------
# What reaches the server, and when
# ----------------------------------------------------------------------------------------------

class RecordingProxy:
    """An HTTP proxy to the server that sees each request (method, path, JSON body) before passing it on.

    ``before(method, path, body)`` runs first; ``lose(method, path, body)`` True passes the request
    on and then drops the connection without answering, as a network that loses a response does.
    ``auth`` lists each request's Authorization header.
    """

    def __init__(self, target_port: int, *, before=None, lose=None):
        self.auth: list[str | None] = []
        auth = self.auth

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                auth.append(self.headers.get("Authorization"))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    parsed = json.loads(body) if "json" in self.headers.get("Content-Type", "") else {}
                except ValueError:
                    parsed = {}
                if before is not None:
                    before(self.command, self.path, parsed)
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                upstream.close()
                if lose is not None and lose(self.command, self.path, parsed):
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.mlflow_server
def test_a_runs_status_is_set_only_after_all_its_epochs_are_on_the_server(mlflow_server):
    reader = MlflowClient(mlflow_server.uri)
    seen_at_status: dict[str, int] = {}

    def before(method, path, body):
        if path.endswith("/runs/update") and body.get("status"):
            # What the server holds at the moment the run's status is about to be set.
            seen_at_status[body["run_id"]] = len(reader.get_metric_history(body["run_id"], "val_loss"))

    proxy = RecordingProxy(mlflow_server.port, before=before)
    study = optuna.create_study(study_name=f"order-{time.time_ns()}")
    tracker = Tracker(proxy.uri, batch_seconds=600)  # epochs held until the trial ends
    try:
        tracker.ensure_parent_run(study)
        trials = [run_trial(study, tracker, outcome, wait=False) for outcome in ("completed", "pruned")]
        assert tracker.flush(60)
    finally:
        assert tracker.close() == 0
        proxy.close()
    assert seen_at_status == {t["run"].run_id: len(t["history"]) for t in trials}


@pytest.mark.mlflow_server
def test_a_runs_held_epochs_go_together_after_batch_seconds_without_end_or_flush(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    study = optuna.create_study(study_name=f"held-{time.time_ns()}")
    tracker = Tracker(mlflow_server.uri, batch_seconds=5)
    try:
        tracker.ensure_parent_run(study)
        trial = study.ask()
        run = tracker.start_trial(trial, TrainConfig(epochs=8), DataConfig(), seed=0)
        history = fake_history(0, 8)
        for m in history[:4]:
            run.log_epoch(m)
        run_id = run.run_id
        assert run_id is not None  # the run itself is created at once
        assert client.get_metric_history(run_id, "val_loss") == []  # the epochs are held
        points = wait_until(lambda: client.get_metric_history(run_id, "val_loss"), what="the held epochs")
        assert sorted(p.step for p in points) == [1, 2, 3, 4]  # in one call, none left behind
        assert client.get_run(run_id).data.params["epochs"] == "8"  # the params rode with them
        run.end("completed", history=history)
    finally:
        assert tracker.close() == 0
    assert_history_equal(client, run_id, history)


@pytest.mark.mlflow_server
def test_a_creation_whose_answer_is_lost_makes_no_second_run(mlflow_server):
    lost: list[str] = []

    def lose(method, path, body):
        if path.endswith("/runs/create") and body.get("run_name", "").startswith("trial-") and not lost:
            lost.append(body["run_name"])  # the server made the run; the tracker never hears of it
            return True
        return False

    proxy = RecordingProxy(mlflow_server.port, lose=lose)
    client = MlflowClient(mlflow_server.uri)
    study = optuna.create_study(study_name=f"lost-answer-{time.time_ns()}")
    tracker = Tracker(proxy.uri, max_backoff=0.5)
    try:
        tracker.ensure_parent_run(study)
        t = run_trial(study, tracker, "completed", wait=False)
        wait_until(lambda: tracker.flush(5), what="the flush")
    finally:
        assert tracker.close() == 0
        proxy.close()
    assert lost == ["trial-0"]
    (run,) = runs_named(client, tracker.experiment_id, "trial-0")
    assert run.info.run_id == t["run"].run_id == t["created"][0]
    assert run.info.status == "FINISHED"
    assert_history_equal(client, run.info.run_id, t["history"])


@pytest.mark.mlflow_server
def test_bad_state_and_misuse_raise_naming_the_value(mlflow_server):
    with Tracker(mlflow_server.uri) as tracker:
        study = optuna.create_study(study_name=f"misuse-{time.time_ns()}")
        with pytest.raises(RuntimeError, match="ensure_parent_run"):
            tracker.start_trial(optuna.trial.FixedTrial({}), TrainConfig(), DataConfig(), seed=0)
        tracker.ensure_parent_run(study)
        run = tracker.start_trial(study.ask(), TrainConfig(), DataConfig(), seed=0)
        with pytest.raises(ValueError, match="state=.*'finished'"):
            run.end("finished")
        with pytest.raises(ValueError, match="pruned_epoch=-1"):
            run.end("pruned", pruned_epoch=-1)
        run.end("completed")
        with pytest.raises(RuntimeError, match="log_epoch after end"):
            run.log_epoch(fake_history(0)[0])
        with pytest.raises(RuntimeError, match="end called twice"):
            run.end("completed")
        open_run = tracker.start_trial(study.ask(), TrainConfig(), DataConfig(), seed=1)
    with pytest.raises(RuntimeError, match="closed"):
        tracker.start_trial(study.ask(), TrainConfig(), DataConfig(), seed=0)
    with pytest.raises(RuntimeError, match="closed"):
        open_run.log_epoch(fake_history(1)[0])
    assert tracker.close() == 0  # a second close returns at once
    for bad in ({"end_timeout": -1}, {"batch_seconds": -0.5}, {"max_backoff": float("nan")}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"{name}="):
            Tracker(mlflow_server.uri, **bad)
    with pytest.raises(ValueError, match="experiment_name"):
        Tracker(mlflow_server.uri, "  ")


# ----------------------------------------------------------------------------------------------
# Where the runs go, and whether they can
# ----------------------------------------------------------------------------------------------

def test_resolve_uri_takes_the_argument_then_the_environment_then_the_local_default(in_tmp, monkeypatch):
    assert resolve_uri(None) == default_tracking_uri() == f"sqlite:///{in_tmp.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_uri(None) == "http://env:5000"
    assert resolve_uri("http://arg:5000") == "http://arg:5000"
    for arg, uri in (("sqlite:///x.db", "sqlite:///x.db"), (None, "http://env:5000")):
        tracker = Tracker(arg)
        assert tracker.uri == uri
        tracker.close(timeout=0)


def test_unreachable_server_raises_naming_the_uri():
    uri = f"http://user:secret@127.0.0.1:{free_port()}"
    shown = uri.replace("secret", "***")
    with pytest.raises(TrackingUnavailable, match=re.escape(shown)) as raised:
        check_reachable(uri, timeout=2)
    assert "secret" not in str(raised.value)
    tracker = Tracker(uri)
    try:
        with pytest.raises(TrackingUnavailable, match=r"127\.0\.0\.1"):
            tracker.check_reachable()
    finally:
        tracker.close(timeout=0)


class _HealthyButBroken(http.server.BaseHTTPRequestHandler):
    """/health answers 200 OK; every API call fails with 500."""

    def log_message(self, *args):
        pass

    def _answer(self):
        ok = self.path.rstrip("/") == "/health"
        body = b"OK" if ok else b'{"error_code": "INTERNAL_ERROR", "message": "database is gone"}'
        self.send_response(200 if ok else 500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


def test_a_server_whose_health_answers_but_whose_api_fails_is_refused():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthyButBroken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(uri + "/health", timeout=5) as resp:
            assert resp.status == 200  # the stand-in really is healthy by /health alone
        with pytest.raises(TrackingUnavailable, match=re.escape(uri) + ".*500"):
            check_reachable(uri, timeout=3)
    finally:
        server.shutdown()
        server.server_close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.mlflow_server
def test_credentials_in_the_uri_reach_the_server_and_every_write_carries_them(mlflow_server, tmp_path):
    proxy = RecordingProxy(mlflow_server.port)
    uri = proxy.uri.replace("http://", "http://alice:s3cret@")
    study = optuna.create_study(study_name=f"credentials-{time.time_ns()}")
    try:
        check_reachable(uri)  # refused before as "Name or service not known"
        assert proxy.auth == [basic("alice", "s3cret")]
        with Tracker(uri) as tracker:
            tracker.check_reachable()
            tracker.ensure_parent_run(study)
            t = run_trial(study, tracker, "completed")
            tracker.finish_study(study, tmp_path / "out")
        assert tracker.close() == 0
    finally:
        proxy.close()
    assert set(proxy.auth) == {basic("alice", "s3cret")}  # artifacts included
    assert_history_equal(MlflowClient(mlflow_server.uri), t["run"].run_id, t["history"])


@pytest.mark.mlflow_server
def test_credentials_from_mlflows_environment_variables_are_used_and_never_shown(mlflow_server,
                                                                                monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    proxy = RecordingProxy(mlflow_server.port)
    try:
        check_reachable(proxy.uri)
    finally:
        proxy.close()
    assert proxy.auth == [basic("bob", "hunter2")]
    with pytest.raises(TrackingUnavailable, match="Connection refused") as raised:
        check_reachable(f"http://carol:pw2@127.0.0.1:{free_port()}", timeout=2)
    assert "hunter2" not in str(raised.value) and "pw2" not in str(raised.value)


@pytest.mark.mlflow_server
def test_a_live_server_and_a_new_local_store_are_reachable(mlflow_server, tmp_path):
    check_reachable(mlflow_server.uri)
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert (tmp_path / "new" / "mlflow.db").is_file()


def test_unopenable_local_store_is_reported_by_check_reachable(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    with pytest.raises(TrackingUnavailable, match="not-a-folder"):
        check_reachable(uri)
    tracker = Tracker(uri)  # does not raise: sweep.run reports the problem from check_reachable
    try:
        with pytest.raises(TrackingUnavailable, match="not-a-folder"):
            tracker.check_reachable()
        with pytest.raises(TrackingUnavailable):
            tracker.ensure_parent_run(optuna.create_study())
    finally:
        tracker.close(timeout=0)


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
    parent = client.get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 1
    assert summary["best_value"] == pytest.approx(study.best_value)
    assert "trials.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_existing_mlruns_file_store_stays_the_default_as_mlflow_ui_does(tmp_path):
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    assert default_tracking_uri(tmp_path) == (tmp_path / "mlruns").resolve().as_uri()


def hint_query(hint: str) -> dict[str, str]:
    """The query of the runs page a ``curves:`` hint links to."""
    from urllib.parse import parse_qsl, urlsplit

    url = hint.split("open ")[-1] if "`" in hint else hint.removeprefix("curves: ")
    page = urlsplit(url).fragment
    assert page.startswith("/experiments/7/runs?"), hint
    return dict(parse_qsl(page.split("?", 1)[1], strict_parsing=True))


def test_ui_hint_opens_the_completed_trials_best_first_in_the_chart_view():
    shown = {"workflowType": "machine_learning", "compareRunsMode": "CHART",
             "searchFilter": "tags.trial_state = 'completed'"}
    assert hint_query(ui_hint("http://h:5000", "7", metric="val_loss", direction="minimize")) == {
        **shown, "orderByKey": "metrics.`val_loss`", "orderByAsc": "true"}
    assert hint_query(ui_hint("http://h:5000", "7", metric="val_f1", direction="maximize")) == {
        **shown, "orderByKey": "metrics.`val_f1`", "orderByAsc": "false"}
    assert hint_query(ui_hint("http://h:5000", "7")) == shown  # the old call: no order, the UI's own
    with pytest.raises(ValueError, match="direction='up'"):
        ui_hint("http://h:5000", "7", metric="val_loss", direction="up")


def test_ui_hint_says_how_to_open_the_runs_page_of_each_kind_of_store(in_tmp):
    page = "#/experiments/7/runs?" + ui_hint("http://h", "7", metric="val_loss").split("?", 1)[1]
    assert ui_hint("http://u:secret@host:5000/", "7", metric="val_loss") == (
        f"curves: http://u:***@host:5000/{page}")
    serve = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --port 5000 --backend-store-uri"
    for uri in (default_tracking_uri(), f"sqlite:///{in_tmp / 'other dir' / 'mlflow.db'}",
                "postgresql://mixer:pw@db/mlflow"):
        assert ui_hint(uri, "7", metric="val_loss") == (
            f"curves: run `{serve} {shlex.quote(redact(uri))}`, then open http://127.0.0.1:5000/{page}")
    assert ui_hint(default_tracking_uri(), None) is None


# ----------------------------------------------------------------------------------------------
# Server trouble
# ----------------------------------------------------------------------------------------------

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
        # Two whole trials logged and ended while nothing reaches the server: training went on.
        during = [run_trial(study, tracker, outcome, wait=False) for outcome in ("completed", "pruned")]
        assert all(t["run"].run_id is None for t in during)  # not created yet, and no waiting for it
        # Every epoch point is waiting (plus the diagnosis metrics logged at each trial's end).
        assert tracker.pending_metrics >= sum(len(m.as_dict()) for t in during for m in t["history"])
        assert not tracker.flush(0.5)
        wait_until(lambda: any("metric points waiting" in r.getMessage() for r in caplog.records),
                   what="the warning")
        proxy.restore()
        undelivered = tracker.close(timeout=60)
    finally:
        proxy.restore()
        tracker.close(timeout=0)
    assert undelivered == 0
    client = MlflowClient(mlflow_server.uri)
    for t in (before, *during):
        run_id = t["run"].run_id
        run = client.get_run(run_id)
        assert run.info.status == {"completed": "FINISHED", "pruned": "KILLED"}[t["outcome"]]
        assert run.data.tags["mlflow.parentRunId"] == study.user_attrs[PARENT_RUN_ATTR]
        assert_history_equal(client, run_id, t["history"])
        # The creation callback came once the server was back, with the run's id, once.
        assert t["created"] == [run_id]
    assert [len(runs_named(client, tracker.experiment_id, f"trial-{n}")) for n in range(3)] == [1, 1, 1]


@pytest.mark.mlflow_server
def test_close_counts_the_metric_points_a_dead_server_never_got(proxy):
    study = optuna.create_study(study_name=f"dead-{time.time_ns()}")
    tracker = Tracker(proxy.uri, max_backoff=0.2)
    tracker.ensure_parent_run(study)
    proxy.cut()
    t = run_trial(study, tracker, "completed", wait=False)
    waiting = tracker.pending_metrics
    assert waiting == sum(len(m.as_dict()) for m in t["history"]) + len(t["diagnosis"].metrics)
    assert tracker.close(timeout=1.0) == waiting
    assert tracker.close() == waiting  # a second close returns the same, at once


@pytest.mark.mlflow_server
def test_a_write_the_server_refuses_for_good_is_dropped_and_counted(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    study = optuna.create_study(study_name=f"refused-{time.time_ns()}")
    tracker = Tracker(mlflow_server.uri)
    try:
        tracker.ensure_parent_run(study)
        bad = tracker.start_trial(study.ask(), TrainConfig(), DataConfig(), seed=0)
        bad.log_epoch({"epoch": 1, "val_loss": 0.5, "bad name?!": 1.0})  # INVALID_PARAMETER_VALUE
        bad.end("completed")
        good = run_trial(study, tracker, "completed")  # the queue goes on after the dropped write
    finally:
        undelivered = tracker.close()
    assert undelivered == 2
    assert client.get_run(bad.run_id).info.status == "FINISHED"
    assert_history_equal(client, good["run"].run_id, good["history"])


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
        trials += [run_trial(study, tracker, outcome, wait=False) for outcome in ("completed", "failed")]
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
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
tracker = Tracker(uri or None)  # a fresh local store is created here, by both at once
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
        deadline = time.monotonic() + 120
        while not all(ready.exists() for ready, _ in procs):
            assert time.monotonic() < deadline, "workers did not get ready"
            assert all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs]
            time.sleep(0.05)
        go.touch()  # both workers open the store and ask for the parent run at the same instant
        results = []
        for _, p in procs:
            out, err = p.communicate(timeout=180)
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
    study = optuna.create_study(study_name="workers-pg", storage=postgres_url)
    results = run_workers(tmp_path, postgres_url, study.study_name, mlflow_server.uri)
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
    # The last line links to this experiment's completed trials, best val_loss first.
    assert capsys.readouterr().out.splitlines()[-1] == ui_hint(
        mlflow_server.uri, experiment.experiment_id, metric="val_loss", direction="minimize")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == ["trial-0", "trial-1", "trial-2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 3
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) >= 1
        assert {"lr", "patch_size", "dim", "n_rows", "scaling"} <= set(child.data.params)
        assert child.data.tags["diagnosis"] in LABELS
