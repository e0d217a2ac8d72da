"""MLflow tracking of a study: one parent run per study (its id in the study's user attributes), one
child run per trial; every write is queued and sent in order by one retrying background thread (the
guarantees: docs/architecture.md, "What tracking guarantees")."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import os
import shlex
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlparse

import optuna
import requests
import sqlalchemy.exc
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import get_default_host_creds
from mlflow.utils.rest_utils import http_request
from mlflow.utils.time import get_current_time_millis as _now_ms

from mixer.config import DataConfig, TrainConfig, dump_run_config
from mixer.diagnosis import Diagnosis
from mixer.train import EpochMetrics
from sweep.locks import file_lock, study_lock
from sweep.messages import one_line, redact
from sweep.sampling import flat_config

__all__ = ["EXPERIMENT_ATTR", "PARENT_RUN_ATTR", "STATES", "Tracker", "TrackingUnavailable", "TrialRun",
           "check_reachable", "default_tracking_uri", "resolve_uri", "ui_hint"]

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
#: Trial outcome -> (MLflow run status, Optuna state for the ``optuna_state`` tag).
_OUTCOMES = {"completed": ("FINISHED", "COMPLETE"), "pruned": ("KILLED", "PRUNED"),
             "failed": ("FAILED", "FAIL"), "diverged": ("FAILED", "FAIL")}
STATES = tuple(_OUTCOMES)

# MLflow takes 1000 values per log_batch, at most 100 of them params or tags (a run has fewer).
_MAX_METRICS, _MAX_TAG_CHARS = 800, 5000
# MLflow error codes that retrying cannot fix: the write is dropped (its metric points counted).
_PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                        "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
                        "ENDPOINT_NOT_FOUND", "INVALID_REQUEST"})


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or used; the message names the (redacted) URI."""


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The store that ``mlflow ui`` started in ``cwd`` opens: MLflow 3's ``sqlite:///mlflow.db``, or an
    existing ``./mlruns`` file store with experiments; absolute, for workers in other folders."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    mlruns = base / "mlruns"
    if mlruns.is_dir() and any(p.name.isdigit() and (p / "meta.yaml").exists() for p in mlruns.iterdir()):
        return mlruns.resolve().as_uri()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def resolve_uri(tracking_uri: str | None) -> str:
    """``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def ui_hint(tracking_uri: str, experiment_id: str | None, *, metric: str | None = None,
            direction: str = "minimize") -> str | None:
    """Where to see the study's curves: its completed trials, best ``metric`` (last value) first, in the
    chart view, which draws the first 10 runs listed; for a local store, how to serve it without MLflow
    3's job runner (which takes CPU and memory from training)."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be minimize or maximize, got {direction=}")
    if experiment_id is None:
        return None
    # workflowType: MLflow 3 would open its GenAI pages. The filter leaves the parent out, so that
    # the trials are listed flat instead of folded under it.
    query = {"workflowType": "machine_learning", "compareRunsMode": "CHART",
             "searchFilter": "tags.trial_state = 'completed'"}
    if metric:
        query |= {"orderByKey": f"metrics.`{metric}`", "orderByAsc": str(direction == "minimize").lower()}
    page = f"#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return f"curves: {redact(tracking_uri).rstrip('/')}/{page}"
    serve = ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --port 5000 "
             f"--backend-store-uri {shlex.quote(redact(tracking_uri))}")
    return f"curves: run `{serve}`, then open http://127.0.0.1:5000/{page}"


def _open_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` whose store exists. A new SQLite file store is created under a file lock: two
    processes creating it at once would both run its migrations, and one would fail."""
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0]) if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        return MlflowClient(tracking_uri=uri)
    db = Path(path)
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(str(db) + ".lock"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates (or migrates) the store
    return client


def check_reachable(uri: str, *, timeout: float = 3.0) -> None:
    """Raise :class:`TrackingUnavailable` within about ``timeout`` s if ``uri`` cannot be used. A server
    must answer an API call made as MLflow makes it, with MLflow's credentials (``user:password@`` in
    the URI, or ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``); ``/health`` alone is not
    enough, since it answers while the API may fail."""
    http = urlparse(uri).scheme in ("http", "https")
    where = f"MLflow tracking {'server at' if http else 'store'} {redact(uri)}"
    try:
        if not http:
            _open_client(uri).search_experiments(max_results=1)
            return
        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                            max_retries=0, timeout=timeout, raise_on_status=False, json={"max_results": 1})
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot track there"
        while exc.__cause__ or exc.__context__:  # the root cause reads best: "Connection refused"
            exc = exc.__cause__ or exc.__context__
        raise TrackingUnavailable(f"{where} is not usable: {one_line(exc)}") from None
    if resp.status_code != 200:
        raise TrackingUnavailable(f"{where} answered its API call with HTTP {resp.status_code}: "
                                  f"{redact(resp.text.strip()[:200])}")


def _is_transient(exc: BaseException) -> bool:
    """True for a failure that may go away (server down, timeout, database busy)."""
    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT
    return isinstance(exc, (OSError, requests.RequestException, sqlalchemy.exc.OperationalError))


@dataclasses.dataclass(eq=False)
class _Run:
    """A run as the sender knows it; ``run_id`` is None until the run exists."""

    label: str
    run_id: str | None = None
    on_created: Callable[[str], Any] = lambda run_id: None
    created: threading.Event = dataclasses.field(default_factory=threading.Event)  # or dropped


@dataclasses.dataclass(eq=False)
class _Write:
    """One queued write: create, batch, params_once, barrier, or an ``MlflowClient`` method (``args``)."""

    kind: str
    run: _Run | None
    args: tuple = ()
    metrics: list = dataclasses.field(default_factory=list)
    params: list = dataclasses.field(default_factory=list)
    tags: list = dataclasses.field(default_factory=list)
    sealed: bool = False  # taken by the sender: later epochs go into a new write
    attempts: int = 0
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class _Sender:
    """Drains the queue in order on one daemon thread, retrying the head with backoff."""

    def __init__(self, client: MlflowClient | None, uri: str, batch_seconds: float, max_backoff: float,
                 warn_every: float):
        self.client, self.uri, self.queue, self.cond = client, uri, deque(), threading.Condition()
        self.batch_seconds, self.max_backoff, self.warn_every = batch_seconds, max_backoff, warn_every
        self.pending = self.dropped = 0  # metric points queued / dropped
        self.failing, self.stopping, self.deadline = False, False, math.inf  # deadline: set by stop()
        self.thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self.thread.start()

    def put(self, write: _Write) -> _Write:
        with self.cond:
            if self.stopping:
                raise RuntimeError("the tracker is closed")
            self.queue.append(write)
            self.pending += len(write.metrics)
            self.cond.notify_all()
        return write

    def add(self, run: _Run, metrics: list, tags: Sequence[RunTag] = ()) -> None:
        """Add to the run's open batch at the tail of the queue, or queue a new batch."""
        with self.cond:
            tail = self.queue[-1] if self.queue else None
            if (self.stopping or tail is None or tail.run is not run or tail.kind != "batch" or tail.sealed
                    or len(tail.metrics) + len(metrics) > _MAX_METRICS):
                tail = self.put(_Write("batch", run))  # raises once the tracker is closed
            tail.metrics += metrics
            tail.tags += tags
            self.pending += len(metrics)  # no notify: the batch is due when it was, the sender sleeps on

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event``; not at all while the server is down."""
        return event.wait(0 if self.failing else timeout)

    def stop(self, timeout: float) -> int:
        """Drain for at most ``timeout`` s and stop; returns the metric points not delivered."""
        with self.cond:
            self.stopping, self.deadline = True, time.monotonic() + timeout
            self.cond.notify_all()
        self.thread.join(timeout + 15)  # a call in flight ends within MLFLOW_HTTP_REQUEST_TIMEOUT
        return self.pending + self.dropped

    def _next(self) -> _Write | None:
        """The head of the queue once it is due; None once stopped. Called with the lock held."""
        while not self.stopping or (self.queue and time.monotonic() < self.deadline):
            hold = math.inf
            if self.queue:
                head, hold = self.queue[0], 0.0
                if head.kind == "batch" and len(self.queue) == 1 and not (self.stopping or head.attempts):
                    hold = head.queued_at + self.batch_seconds - time.monotonic()
                if hold <= 0:
                    head.sealed = True
                    return head
            self.cond.wait(min(hold, self.deadline - time.monotonic(), 3600))
        return None  # stopped: what is still queued counts as undelivered

    def _loop(self) -> None:
        backoff, last_warning = 0.0, -math.inf
        while True:
            with self.cond:
                if (head := self._next()) is None:
                    return
            lost = 0
            try:
                self._send(head)
            except Exception as exc:  # noqa: BLE001 - every failure is either retried or dropped
                if _is_transient(exc):
                    head.attempts, self.failing = head.attempts + 1, True
                    backoff = min(self.max_backoff, max(0.25, 2 * backoff))
                    if time.monotonic() - last_warning >= self.warn_every:
                        last_warning = time.monotonic()
                        log.warning("MLflow tracking at %s unavailable (%s); %d metric points waiting",
                                    redact(self.uri), one_line(exc), self.pending)
                    with self.cond:
                        self.cond.wait(max(0.0, min(backoff, self.deadline - time.monotonic())))
                    continue
                lost = len(head.metrics)
                log.warning("MLflow tracking at %s: dropping a %s of %s (%d metric points): %s",
                            redact(self.uri), head.kind, head.run.label, lost, one_line(exc))
                head.run.created.set()  # if it was the creation: its run's later writes are dropped too
            self.failing, backoff = False, 0.0
            with self.cond:
                self.queue.popleft()
                self.pending -= len(head.metrics)
                self.dropped += lost
                head.done.set()
                self.cond.notify_all()

    def _send(self, write: _Write) -> None:
        run, client = write.run, self.client
        if write.kind == "create":
            self._create(run, *write.args, retry=write.attempts > 0)
        elif write.kind != "barrier" and run.run_id is None:
            raise RuntimeError(f"run {run.label} was never created")  # not transient: dropped
        elif write.kind == "batch":
            client.log_batch(run.run_id, metrics=write.metrics, params=write.params, tags=write.tags)
        elif write.kind == "params_once":  # params cannot change: all of them, or none if one is there
            if not {p.key for p in write.params} & client.get_run(run.run_id).data.params.keys():
                client.log_batch(run.run_id, params=write.params)
        elif write.kind != "barrier":  # log_text, log_artifact, set_terminated
            getattr(client, write.kind)(run.run_id, *write.args)

    def _create(self, run: _Run, experiment_id: str, tags: dict, start_time: int, *, retry: bool) -> None:
        if retry:  # the last attempt may have created the run and lost the answer
            found = self.client.search_runs([experiment_id], max_results=1,
                                            filter_string=f"tags.tracking_key = '{tags['tracking_key']}'")
            run.run_id = found[0].info.run_id if found else None
        if run.run_id is None:
            run.run_id = self.client.create_run(experiment_id, start_time=start_time, tags=tags,
                                                run_name=run.label).info.run_id
        run.created.set()
        try:
            run.on_created(run.run_id)
        except Exception as exc:  # noqa: BLE001 - the caller's business; the run is fine
            log.warning("%s: on_created failed: %s", run.label, one_line(exc))


def _epoch_values(item: EpochMetrics | Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """``(epoch, metrics)`` from an ``EpochMetrics`` or a ``{"epoch": n, ...}`` mapping."""
    if isinstance(item, Mapping):
        return int(item["epoch"]), {k: float(v) for k, v in item.items() if k != "epoch" and v is not None}
    return int(item.epoch), item.as_dict()


def _tags(tags: Mapping[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)[:_MAX_TAG_CHARS]) for k, v in tags.items()]


class TrialRun:
    """The child run of one trial, made by :meth:`Tracker.start_trial`."""

    def __init__(self, tracker: Tracker, run: _Run):
        self._tracker, self._run, self._ended, self._logged = tracker, run, False, {}

    @property
    def run_id(self) -> str | None:
        """The run id, waiting up to ``end_timeout`` for its creation; None while the server is down."""
        self._tracker._sender.wait(self._run.created, self._tracker.end_timeout)
        return self._run.run_id

    def log_epoch(self, metrics: EpochMetrics | Mapping[str, Any]) -> None:
        """Queue one epoch's metrics (step = epoch). Never waits for the server."""
        if self._ended:
            raise RuntimeError(f"{self._run.label}: log_epoch after end")
        epoch, values = _epoch_values(metrics)
        self._logged[epoch], now = values, _now_ms()
        self._tracker._sender.add(self._run, [Metric(k, v, now, epoch) for k, v in values.items()])

    def end(self, state: str, *, history: Sequence[Any] | None = None, reason: str | None = None,
            pruned_epoch: int | None = None, diagnosis: Diagnosis | None = None, wait: bool = False) -> None:
        """Close the run; its status, set after all its metrics are stored, tells the outcome: ``state``
        "completed" -> FINISHED, "pruned" -> KILLED, "failed" or "diverged" -> FAILED. The epochs of
        ``history`` not logged yet are sent now. Tags: ``failure_reason`` (``reason``), ``pruned_epoch``,
        ``diagnosis`` (its label) and its tags; its metrics are ``diagnosis_<name>`` where an epoch
        metric has the name. ``wait``: wait (up to ``end_timeout``, not while the server is down)."""
        if state not in _OUTCOMES:
            raise ValueError(f"state must be one of {STATES}, got state={state!r}")
        if self._ended:
            raise RuntimeError(f"{self._run.label}: end called twice")
        if pruned_epoch is not None and pruned_epoch < 0:
            raise ValueError(f"pruned_epoch must be >= 0, got pruned_epoch={pruned_epoch}")
        for item in history or ():
            if _epoch_values(item)[0] not in self._logged:
                self.log_epoch(item)
        self._ended = True
        status, optuna_state = _OUTCOMES[state]
        tags = {"optuna_state": optuna_state, "trial_state": state}
        if pruned_epoch is not None:
            tags["pruned_epoch"] = str(int(pruned_epoch))
        if state in ("failed", "diverged"):
            tags["failure_reason"] = reason or state
        metrics = []
        if diagnosis is not None:
            tags.update({**diagnosis.tags, "diagnosis": diagnosis.label})
            taken = {name for values in self._logged.values() for name in values}
            metrics = [Metric(f"diagnosis_{k}" if k in taken else k, float(v), _now_ms(), 0)
                       for k, v in diagnosis.metrics.items()]
        sender = self._tracker._sender
        sender.add(self._run, metrics, _tags(tags))
        last = sender.put(_Write("set_terminated", self._run, (status, _now_ms())))
        if wait:
            sender.wait(last.done, self._tracker.end_timeout)


class Tracker(contextlib.AbstractContextManager):
    """Logs a study to MLflow: one parent run, one child run per trial (see the module docstring).

    Args:
        tracking_uri: where runs go; None -> :func:`resolve_uri`.
        experiment_name: the MLflow experiment; None -> the study's name.
        batch_seconds: a run's epochs wait at most this long to go together in one ``log_batch``.
        end_timeout: longest wait in ``TrialRun.run_id``, ``end(wait=True)`` and ``finish_study``.
        close_timeout: default longest wait in ``flush`` and ``close``.
        max_backoff: longest pause, in seconds, between retries while the server is down.
        warn_every: at most one "N metric points waiting" warning per this many seconds.
        connect_timeout: seconds ``check_reachable`` waits for a server to answer."""

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None, *,
                 batch_seconds: float = 10.0, end_timeout: float = 10.0, close_timeout: float = 30.0,
                 max_backoff: float = 15.0, warn_every: float = 10.0, connect_timeout: float = 3.0):
        for name, value in dict(batch_seconds=batch_seconds, end_timeout=end_timeout, max_backoff=max_backoff,
                                close_timeout=close_timeout, warn_every=warn_every,
                                connect_timeout=connect_timeout).items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {name}={value}")
            setattr(self, name, value)
        if experiment_name is not None and not experiment_name.strip():
            raise ValueError(f"experiment_name must not be blank, got {experiment_name=}")
        # Our sender retries with backoff: with MLflow's own retries a dead server costs minutes per
        # call; and set_terminated would print "View run" lines on stdout. A value the user set wins.
        for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
                           ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")):
            os.environ.setdefault(key, value)
        self.uri, self.experiment_name = resolve_uri(tracking_uri), experiment_name
        self.experiment_id = self.parent_run_id = self._parent = self._study_name = None
        self._client = self._open_error = self._undelivered = None
        try:  # a store that cannot be opened is reported by check_reachable / ensure_parent_run
            self._client = _open_client(self.uri)
        except Exception as exc:  # noqa: BLE001 - anything here means "cannot track there"
            self._open_error = TrackingUnavailable(f"cannot open MLflow tracking store {redact(self.uri)}: "
                                                   f"{one_line(exc)}")
        self._sender = _Sender(self._client, self.uri, batch_seconds, max_backoff, warn_every)
        _open_trackers.add(self)

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending_metrics(self) -> int:
        """Metric points queued and not yet stored."""
        return self._sender.pending

    def check_reachable(self) -> None:
        """Raise TrackingUnavailable (naming the URI) within seconds if the store cannot be used."""
        if self._open_error is not None:
            raise self._open_error
        check_reachable(self.uri, timeout=self.connect_timeout)

    def ensure_parent_run(self, study: optuna.Study) -> str:
        """The study's parent run id: read from ``study.user_attrs``, else created once per study;
        TrackingUnavailable if the store cannot be reached (after a few brief retries)."""
        if self._open_error is not None:
            raise self._open_error
        for attempt in range(4):
            try:
                if (run := self._parent_of(study)) is None:
                    with study_lock(study, study.study_name, "parent"):
                        run = self._parent_of(study) or self._create_parent(study)
                if run.info.status != "RUNNING":  # a resumed study: its parent runs again
                    self._client.update_run(run.info.run_id, status="RUNNING")
                break
            except Exception as exc:
                # RESOURCE_ALREADY_EXISTS: another study's worker created the experiment just now.
                if not (_is_transient(exc) or getattr(exc, "error_code", None) == "RESOURCE_ALREADY_EXISTS"):
                    raise
                if attempt == 3:
                    raise TrackingUnavailable(f"MLflow tracking at {redact(self.uri)}: no parent run: "
                                              f"{one_line(exc)}") from exc
                time.sleep(0.5 * 2 ** attempt)
        self._study_name = study.study_name
        self.parent_run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._parent = _Run(f"{study.study_name} (parent)", self.parent_run_id)
        return self.parent_run_id

    def _parent_of(self, study: optuna.Study) -> Any:
        """The live run of this store that the study's attributes name, or None."""
        # One read: the creator writes the experiment, then the run, so a snapshot never has the run
        # without its experiment (two reads could, and MLflow refuses experiment id None for good).
        attrs = study.user_attrs
        experiment_id, run_id = attrs.get(EXPERIMENT_ATTR), attrs.get(PARENT_RUN_ATTR)
        runs = run_id and self._client.search_runs([experiment_id], f"attributes.run_id = '{run_id}'")
        return runs[0] if runs else None

    def _create_parent(self, study: optuna.Study) -> Any:
        name, client = self.experiment_name or study.study_name, self._client
        if (found := client.get_experiment_by_name(name)) is None:
            found = client.get_experiment(client.create_experiment(name))
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        run = client.create_run(found.experiment_id, run_name=study.study_name,
                                tags={"study_name": study.study_name})
        study.set_user_attr(EXPERIMENT_ATTR, found.experiment_id)
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
        return run

    def start_trial(self, trial: optuna.trial.BaseTrial, config: TrainConfig, data_config: DataConfig,
                    *, seed: int, on_created: Callable[[str], None] | None = None) -> TrialRun:
        """Queue the child run ``trial-<n>`` under the parent run, the full flat config as its params and
        the resolved config as ``config.yaml`` (``mixer.config.load_run_config`` reads it); never waits
        for the server. ``on_created(run_id)`` is called on the sending thread once the run exists."""
        if self.parent_run_id is None:
            if getattr(trial, "study", None) is None:
                raise RuntimeError("call ensure_parent_run(study) before start_trial")
            self.ensure_parent_run(trial.study)
        run = _Run(f"trial-{trial.number}", on_created=on_created or (lambda run_id: None))
        tags = {"mlflow.parentRunId": self.parent_run_id, "trial_number": str(trial.number),
                "study_name": str(self._study_name), "seed": str(int(seed)), "optuna_state": "RUNNING",
                "tracking_key": uuid.uuid4().hex}
        self._sender.put(_Write("create", run, (self.experiment_id, tags, _now_ms())))
        text = yaml.safe_dump(dump_run_config(data_config, config, seed), sort_keys=False)
        self._sender.put(_Write("log_text", run, (text, "config.yaml")))
        params = flat_config(data_config, config)
        # Last in the queue: the first epochs join this write, and the params go with them.
        self._sender.put(_Write("batch", run, params=[Param(k, str(v)) for k, v in params.items()]))
        return TrialRun(self, run)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is stored (at most ``timeout`` s, default
        ``close_timeout``; False at once while the server is down). True if it all arrived."""
        barrier = self._sender.put(_Write("barrier", None))
        return self._sender.wait(barrier.done, self.close_timeout if timeout is None else timeout)

    def finish_study(self, study: optuna.Study, out_dir: str | Path) -> dict[str, Any]:
        """Summarise the study on its parent run (docs/architecture.md, "What a study leaves in MLflow"),
        with the files ``sweep.report.write_study_files`` writes into ``out_dir``, and mark it FINISHED.
        Returns the counts, ``best_value`` (None without a completed trial) and ``files``."""
        from sweep.report import write_study_files  # sweep.report imports this module

        if self.parent_run_id is None or self._study_name != study.study_name:
            self.ensure_parent_run(study)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        counts = {"n_trials": len(states), "n_complete": states.count("COMPLETE"),
                  "n_pruned": states.count("PRUNED"), "n_failed": states.count("FAIL")}
        now, step, best_value = _now_ms(), counts["n_trials"], None
        metrics = [Metric(k, float(v), now, step) for k, v in counts.items()]
        tags = {"study_name": study.study_name,
                "optuna_direction": ",".join(d.name.lower() for d in study.directions)}
        if len(study.directions) == 1 and counts["n_complete"]:
            best_value = (best := study.best_trial).value
            metrics.append(Metric("best_value", float(best.value), now, step))
            tags.update({f"best_param.{k}": v for k, v in best.params.items()}, best_trial_number=best.number)
            params = {"best.trial_number": best.number, **{f"best.{k}": v for k, v in best.params.items()}}
            self._sender.put(_Write("params_once", self._parent,
                                    params=[Param(k, str(v)) for k, v in params.items()]))
        files = write_study_files(study, Path(out_dir))
        self._sender.put(_Write("batch", self._parent, metrics=metrics, tags=_tags(tags)))
        for path, folder in files:
            self._sender.put(_Write("log_artifact", self._parent, (str(path), folder)))
        last = self._sender.put(_Write("set_terminated", self._parent, ("FINISHED", _now_ms())))
        self._sender.wait(last.done, max(self.end_timeout, 30.0))
        return {**counts, "best_value": best_value, "files": [Path(p) for p, _ in files]}

    def close(self, *, timeout: float | None = None) -> int:
        """Deliver what is queued, waiting at most ``timeout`` s (default ``close_timeout``); returns
        the metric points never delivered (0 if all arrived). A second call returns it at once."""
        if self._undelivered is None:
            if timeout is not None and not timeout >= 0:
                raise ValueError(f"timeout must be >= 0, got {timeout=}")
            _open_trackers.discard(self)
            self._undelivered = self._sender.stop(self.close_timeout if timeout is None else timeout)
            if self._undelivered:
                log.warning("MLflow tracking at %s: %d metric points could not be delivered",
                            redact(self.uri), self._undelivered)
        return self._undelivered


_open_trackers: set[Tracker] = set()  # closed briefly at exit if the script forgot to


@atexit.register
def _close_open_trackers() -> None:
    for tracker in list(_open_trackers):
        with contextlib.suppress(Exception):
            tracker.close(timeout=min(tracker.close_timeout, 10.0))
