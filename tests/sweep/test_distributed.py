"""Many workers, one study, on the machine's PostgreSQL: what docker-compose.yml's `--scale worker=N`
relies on. Every worker here is a real ``python -m sweep.run`` process.

Workers are started through a tiny launcher that does the slow imports first and then waits for a
common start time, so that "started at the same instant" means within milliseconds, not within
the seconds that importing MLflow takes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, _missing, psycopg2_url, which_or_skip

# Each test starts 2-3 worker processes that import MLflow and Optuna: slow on a small machine.
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.mlflow_server]

SPACE = """\
study: {study}
seed: 0
data: {{source: synthetic, n_rows: {rows}}}
train: {{epochs: {epochs}, dim: 32, depth: 2, batch_size: 64}}
sampler: {{name: random}}
pruner: {{name: none}}
budget: {{n_trials: {n_trials}}}
params:
  lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
  patch_size: {{type: categorical, choices: [3, 7]}}
"""

# Imports first, then say "ready" and wait for "go", then run the CLI. With a heartbeat given and no
# `--heartbeat-interval` option in the CLI, the storage's defaults are set here instead.
LAUNCHER = r"""
import os, sys, time
import mlflow, optuna, sqlalchemy
import sweep.objective, sweep.run as run, sweep.study, sweep.tracking
ready, go, heartbeat, grace = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if heartbeat:
    sweep.study.HEARTBEAT_INTERVAL, sweep.study.GRACE_PERIOD = heartbeat, grace
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
sys.exit(run.main(sys.argv[5:]))
"""

FINISHED = ("COMPLETE", "PRUNED")


def _cli_has(option: str) -> bool:
    from sweep.run import build_parser

    return option in build_parser().format_help()


class Workers:
    """``sweep.run`` worker processes on one study; always stopped at teardown."""

    def __init__(self, tmp: Path, storage: str, tracking_uri: str, *, n_trials: int, epochs: int = 3,
                 rows: int = 1200, heartbeat: int = 0, grace: int = 0):
        self.tmp = tmp
        self.study = f"dist-{uuid.uuid4().hex[:8]}"
        self.storage = storage
        self.tracking_uri = tracking_uri
        self.n_trials = n_trials
        self.heartbeat, self.grace = heartbeat, grace
        self.space = tmp / "space.yaml"
        self.space.write_text(SPACE.format(study=self.study, rows=rows, epochs=epochs, n_trials=n_trials))
        self.procs: list[subprocess.Popen] = []

    def argv(self) -> list[str]:
        args = [str(self.space), "--storage", self.storage, "--tracking-uri", self.tracking_uri,
                "--out", str(self.tmp / "runs")]
        if self.heartbeat and _cli_has("--heartbeat-interval"):
            args += ["--heartbeat-interval", str(self.heartbeat), "--grace-period", str(self.grace)]
        return args

    def start(self, k: int) -> list[subprocess.Popen]:
        """Start ``k`` workers that all begin at the same instant, once each has done its imports."""
        patch = self.heartbeat if self.heartbeat and not _cli_has("--heartbeat-interval") else 0
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        env.pop("MLFLOW_TRACKING_URI", None)
        go = self.tmp / f"go-{len(self.procs)}"
        new, ready = [], []
        for _ in range(k):
            i = len(self.procs)
            ready.append(self.tmp / f"ready-{i}")
            log = open(self.tmp / f"worker-{i}.log", "wb")
            proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, str(ready[-1]), str(go), str(patch), str(self.grace),
                 *self.argv()],
                cwd=self.tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            self.procs.append(proc)
            new.append(proc)
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready):
            for p in new:
                i = self.procs.index(p)
                assert p.poll() is None, f"worker {i} died:\n{self.log(i)}"
            assert time.monotonic() < deadline, "workers not ready after 120 s"
            time.sleep(0.05)
        go.touch()
        return new

    def log(self, i: int) -> str:
        return (self.tmp / f"worker-{i}.log").read_text(errors="replace")[-4000:]

    def wait(self, procs: list[subprocess.Popen] | None = None, *, timeout: float = 240) -> None:
        """Wait for the workers to end; every one must exit 0."""
        deadline = time.monotonic() + timeout
        for p in procs if procs is not None else self.procs:
            code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            i = self.procs.index(p)
            assert code == 0, f"worker {i} exited {code}:\n{self.log(i)}"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def load_study(self) -> Any:
        import optuna
        import sqlalchemy.exc

        for attempt in range(20):
            try:
                return optuna.load_study(study_name=self.study, storage=self.storage)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Opening the storage creates Optuna's tables; racing the workers that are creating
                # them at this moment fails once ("duplicate key ... studydirection"): try again.
                time.sleep(0.1 * (attempt + 1))
        return optuna.load_study(study_name=self.study, storage=self.storage)


@pytest.fixture
def make_workers(tmp_path, postgres_url, mlflow_server):
    made: list[Workers] = []

    def make(**kwargs: Any) -> Workers:
        w = Workers(tmp_path, psycopg2_url(postgres_url), mlflow_server.uri, **kwargs)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def _runs(uri: str, study: Any) -> tuple[list[Any], list[Any]]:
    """(parent runs, child runs) of the study's MLflow experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([study.user_attrs["mlflow_experiment_id"]], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _states(study: Any) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


# --------------------------------------------------------------------------------------------------


def test_workers_started_at_the_same_instant_create_one_study_and_one_parent_run(make_workers,
                                                                                  mlflow_server):
    import optuna

    w = make_workers(n_trials=4, epochs=2, rows=600)
    w.wait(w.start(3))
    summaries = optuna.get_all_study_summaries(storage=w.storage)
    assert [s.study_name for s in summaries] == [w.study]
    study = w.load_study()
    parents, children = _runs(mlflow_server.uri, study)
    assert [r.info.run_id for r in parents] == [study.user_attrs["mlflow_parent_run_id"]]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    # Also the other study-creation side effects happened once: the recorded seed is the file's.
    assert study.user_attrs["study_seed"] == 0


def test_three_workers_share_the_study_budget_and_never_repeat_a_trial(make_workers, mlflow_server):
    w = make_workers(n_trials=12, epochs=3, rows=1200)
    w.wait(w.start(3))
    study = w.load_study()
    trials = study.get_trials(deepcopy=False)
    assert sorted(_states(study).values()) == ["COMPLETE"] * 12, _states(study)
    assert sorted(t.number for t in trials) == list(range(12))
    assert len({t.user_attrs["worker"] for t in trials}) >= 2, "the trials were shared out"
    # Workers that start together must not draw the same parameters (same sampler seed).
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == len(drawn), f"parameters drawn more than once: {sorted(drawn)}"
    # Each trial ran once: one MLflow child run per trial number, the one the trial points to.
    _, children = _runs(mlflow_server.uri, study)
    assert sorted(r.info.run_name for r in children) == sorted(f"trial-{n}" for n in range(12))
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    assert all(len(t.user_attrs["history"]) == 3 for t in trials)


def _wait_for_running_trial(w: Workers, proc: subprocess.Popen, *, timeout: float = 120) -> Any:
    """The trial ``proc`` is training (its MLflow run exists), polling the storage."""
    me = f"{socket.gethostname()}:{proc.pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the worker to kill ended early:\n{w.log(w.procs.index(proc))}"
        try:
            study = w.load_study()
        except KeyError:  # not created yet
            time.sleep(0.2)
            continue
        for t in study.get_trials(deepcopy=False):
            if (t.state.name == "RUNNING" and t.user_attrs.get("worker") == me
                    and t.user_attrs.get("mlflow_run_id") and "config" in t.user_attrs):
                return t
        time.sleep(0.2)
    raise AssertionError(f"worker {me} never ran a trial")


def test_a_sigkilled_workers_trial_is_failed_after_the_grace_period_and_retried_elsewhere(
        make_workers, mlflow_server):
    from mlflow import MlflowClient

    # Two trials, one per worker. The dead trial turns stale (after the grace period) only after the
    # survivor has finished its own: the survivor must wait for it and re-run it, not leave the
    # study one trial short because the dead trial still counted as running. Enough epochs that the
    # victim is still training when it is killed: its run id reaches the storage asynchronously, and
    # on a loaded machine an 8-epoch trial had finished by then (seen once in CI).
    w = make_workers(n_trials=2, epochs=40, rows=2000, heartbeat=1, grace=10)
    victim, survivor = w.start(2)
    killed = _wait_for_running_trial(w, victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    w.wait([survivor], timeout=240)

    study = w.load_study()
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert len(trials) > 2, f"the dead trial was never retried: {_states(study)}"

    assert trials[killed.number].state.name == "FAIL"
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, _states(study)
    retry = retries[0]
    assert retry.state.name in FINISHED
    assert retry.params == killed.params
    assert retry.user_attrs["seed"] == killed.user_attrs["seed"]
    assert retry.user_attrs["worker"] != killed.user_attrs["worker"]
    # The study's budget is still met: n_trials trials with a result, the dead one not counted.
    assert sum(t.state.name in FINISHED for t in trials.values()) == 2, _states(study)

    # The dead trial's MLflow run does not stay RUNNING forever: FAILED, with the reason.
    client = MlflowClient(mlflow_server.uri)
    dead_run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "FAILED", (
        f"the SIGKILLed trial's run is {dead_run.info.status}; tags {dead_run.data.tags}")
    assert dead_run.data.tags.get("failure_reason")
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).info.status in ("FINISHED", "KILLED")


def _pg_restart() -> None:
    """Restart the machine's PostgreSQL and wait until it accepts connections again."""
    ctl = which_or_skip("pg_ctlcluster")
    ready = which_or_skip("pg_isready")
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir()) if Path("/etc/postgresql").is_dir() \
        else []
    if not versions:
        _missing("no local PostgreSQL cluster to restart (/etc/postgresql is empty)")
    subprocess.run([ctl, "--skip-systemctl-redirect", versions[-1], "main", "restart"], check=True,
                   capture_output=True, timeout=120)
    deadline = time.monotonic() + 60
    while subprocess.run([ready, "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode != 0:
        assert time.monotonic() < deadline, "PostgreSQL did not come back within 60 s"
        time.sleep(0.5)


def test_workers_reconnect_and_finish_the_study_after_postgresql_restarts(make_workers, mlflow_server):
    w = make_workers(n_trials=8, epochs=4, rows=2000, heartbeat=1, grace=10)
    procs = w.start(2)
    deadline = time.monotonic() + 120
    while True:  # restart once a trial has finished and others are running
        assert time.monotonic() < deadline, "no trial finished within 120 s"
        try:
            states = _states(w.load_study())
        except KeyError:
            states = {}
        if "COMPLETE" in states.values() and "RUNNING" in states.values():
            break
        time.sleep(0.2)
    _pg_restart()
    w.wait(procs, timeout=300)
    study = w.load_study()
    # Every trial finished, none failed: the restart cost no trial, and nothing ran twice.
    assert sorted(_states(study).values()) == ["COMPLETE"] * 8, _states(study)
    # And the workers did see the database go (so the test tested something).
    logs = "".join(p.read_text() for p in (w.tmp / "runs").glob("*/sweep.log"))
    assert "lost the database connection" in logs and "reconnected" in logs


@pytest.mark.faults
def test_three_workers_that_finish_together_summarise_and_publish_the_model_once(make_workers,
                                                                                  mlflow_server):
    from mlflow import MlflowClient

    w = make_workers(n_trials=3, epochs=2, rows=600)
    name = f"race-{w.study}"
    w.space.write_text(w.space.read_text() + f"register_model: {name}\n")
    w.wait(w.start(3))  # one trial each, of the same length: they finish within moments
    logs = [w.log(i) for i in range(3)]
    assert sum("retraining the best trial" in text for text in logs) == 1, logs
    assert sum("another worker has summarised it" in text for text in logs) + sum(
        "other workers are still running" in text for text in logs) == 2, logs
    client = MlflowClient(mlflow_server.uri)
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    study = w.load_study()
    assert study.user_attrs["summarised_trials"] == 3


@pytest.mark.faults
def test_no_password_in_output_logs_or_worker_command_lines(tmp_path, postgres_url):
    sentinel = f"pw{uuid.uuid4().hex[:10]}"
    storage = psycopg2_url(postgres_url).replace("postgres@", f"postgres:{sentinel}@", 1)
    assert sentinel in storage  # trust authentication: any password is accepted
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(study="secret", rows=600, epochs=30, n_trials=50))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "sweep.run", str(space), "--storage", storage, "--workers",
                             "2", "--no-tracking", "--out", str(tmp_path / "runs")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while len(workers) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        time.sleep(0.1)
    assert len(workers) == 2
    time.sleep(8)  # the workers are training
    for pid in workers:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert "sweep.run" in cmdline and sentinel not in cmdline
    proc.send_signal(signal.SIGTERM)  # as `docker stop` does
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "Resume with" in err and "***" in err
    texts = [out, err] + [p.read_text(errors="replace") for p in (tmp_path / "runs").rglob("*.log")]
    assert len(texts) >= 4  # sweep.log and the two workers' logs
    assert not [t for t in texts if sentinel in t]
