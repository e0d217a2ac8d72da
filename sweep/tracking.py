"""MLflow tracking of a study: one parent run per study, one child run per trial.

Contract used by sweep.objective / sweep.run:

    tracker = Tracker(tracking_uri, experiment_name)   # None uri -> MLFLOW_TRACKING_URI or the local
                                                       # store `mlflow ui` opens (sqlite:///mlflow.db)
    tracker.check_reachable()                          # raises TrackingUnavailable naming the URI
    parent_id = tracker.ensure_parent_run(study)       # get-or-create, id in study.user_attrs
    run = tracker.start_trial(trial, config, data_config, seed=seed)  # child run "trial-<n>"
    run.log_epoch(metrics)                             # EpochMetrics; non-blocking, batched
    run.end(state, history=..., reason=None, pruned_epoch=None)   # state: completed|pruned|failed
                                                                  # (or diverged); non-blocking
    run.run_id                                         # waits for the run's creation (one round
                                                       # trip at the start; none at the end)
    tracker.flush(timeout)                             # wait until everything queued is stored
    tracker.finish_study(study, out_dir)               # parent-run summary, table, Optuna plots
    undelivered = tracker.close()                      # flush; number of metric points not delivered

How it stays off the training path: every write to MLflow (run creation, the epochs' metrics as
``log_batch`` calls, tags, artifacts, the final status) goes through one queue per process, drained
by a background thread. ``log_epoch`` only appends to that queue, so training never waits for the
network. The thread makes each call through a child process (``python -m sweep.tracking
--send-worker``), so the Python work of building and sending requests never holds the training
process's GIL. A run's epochs are held up to ``batch_seconds``
(10 s) and sent in one call (each call costs a server on the same machine ~12 ms of CPU that
training would otherwise have). Writes keep their order within a run, so a run's status is set only
after all of its metrics (and, for a trial of 30 s or more, its curves PNG) are stored; ``run.end``
sends the run's remaining epochs at once (``wait=True`` also waits until they are stored), and
``flush``/``close`` wait, bounded, for everything. The curves PNG is drawn by a child process under
``SCHED_IDLE`` (Linux; ``nice 19`` elsewhere), so that its ~0.1 s of CPU per trial mostly uses what
training leaves idle; a shorter trial's PNG is drawn when the tracker closes, since drawing it
during the next trial would cost that trial over 0.5 % (``defer_png_below``). Reading
``run.run_id`` waits for the run's creation (one round trip).

How it survives the server going away: a failed write stays at the head of the queue and is retried
with exponential backoff (our own: MLflow's HTTP retries are turned down for the process so that a
dead server costs one short timeout, not minutes); a warning on the ``sweep.tracking`` logger says
how many metric points are waiting. ``close`` waits (bounded) for the queue to drain and returns the
number of metric points that never reached the server.

How one study gets exactly one parent run, whatever the number of workers: the parent's id lives in
the study's user attribute ``mlflow_parent_run_id``. A worker that finds it absent takes a lock that
all workers of that study share *through the study's storage* (a PostgreSQL advisory lock or MySQL
``GET_LOCK`` for RDB storage, ``flock`` on a file beside a journal file or SQLite database, a Redis
lock for the Redis journal), re-reads the attribute under the lock and only then creates the run
and stores its id. For a storage offering no lock (gRPC proxy) it falls back to
write-then-settle-then-re-read: every worker adopts the id that stands after a short settling delay
and deletes its own candidate if it lost.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import re
import select
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from mixer.config import DataConfig, TrainConfig
    from mixer.train import EpochMetrics

__all__ = [
    "EXPERIMENT_ATTR",
    "PARENT_RUN_ATTR",
    "STATES",
    "Tracker",
    "TrackingUnavailable",
    "TrialRun",
    "default_tracking_uri",
]

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"

#: Trial outcome -> (MLflow run status, Optuna state name for the ``optuna_state`` tag).
_OUTCOMES = {
    "completed": ("FINISHED", "COMPLETE"),
    "pruned": ("KILLED", "PRUNED"),
    "failed": ("FAILED", "FAIL"),
    "diverged": ("FAILED", "FAIL"),
}
STATES = tuple(_OUTCOMES)
# fit's reasons for a diverged run ("training loss is nan at epoch 3, ...", "... is inf ...").
_DIVERGED_REASON = re.compile(r"diverg|non-finite|\b(nan|inf)\b", re.IGNORECASE)

# MLflow's per-request limits (mlflow.utils.validation).
_MAX_METRICS_PER_CALL = 1000
_MAX_PARAMS_TAGS_PER_CALL = 100
_MAX_TAG_CHARS = 5000

# Turned down for the process while a Tracker talks to a server: with MLflow's defaults a dead
# server costs ~2 minutes of retries per call; our sender does its own backoff instead.
_PROCESS_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # set_terminated would otherwise print two "View run" lines per trial on stdout.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_env_lock = threading.Lock()
_env_users = 0
_env_saved: dict[str, str | None] = {}

# MLflow error codes that retrying cannot fix: the write is dropped (and counted if it held metrics).
_PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND", "INVALID_REQUEST",
})


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; the message names the URI."""


# --------------------------------------------------------------------------------------------
# Where the runs go
# --------------------------------------------------------------------------------------------

def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The store that ``mlflow ui`` started in ``cwd`` with no arguments opens.

    MLflow 3 defaults to ``sqlite:///mlflow.db`` in the working folder, except that an existing
    ``./mlruns`` file store with experiments in it is kept (``mlflow ui --help``;
    ``mlflow.tracking._tracking_service.utils._get_default_tracking_uri``). The path is made
    absolute so worker processes that change folder still share the same file.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    mlruns = base / "mlruns"
    if mlruns.is_dir() and any(
        p.is_dir() and p.name.isdigit() and (p / "meta.yaml").exists() for p in mlruns.iterdir()
    ):
        return mlruns.resolve().as_uri()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def _resolve_uri(tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _is_http(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs or in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


# MLflow 3's UI opens on its GenAI pages (traces, sessions) and remembers the switch to "Model
# training" per browser; this query parameter selects the training runs' pages directly.
_UI_RUNS_PAGE = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_hint(tracking_uri: str, experiment_id: str | None) -> str | None:
    """Where to look at an experiment's runs: the page's address, and for a local store how to serve it."""
    if experiment_id is None:
        return None
    page = _UI_RUNS_PAGE.format(experiment_id=experiment_id)
    if _is_http(tracking_uri):
        return f"curves: {_redact(tracking_uri).rstrip('/')}/{page}"
    sqlite = _sqlite_path(tracking_uri)
    here = default_tracking_uri() == tracking_uri
    serve = "mlflow ui" if here else f"mlflow ui --backend-store-uri {shlex.quote(_redact(tracking_uri))}"
    if sqlite is not None and not here and default_tracking_uri(sqlite.parent) == tracking_uri:
        serve = f"cd {shlex.quote(str(sqlite.parent))} && mlflow ui"
    return f"curves: run `{serve}`, then open http://127.0.0.1:5000/{page}"


def _redact(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def _acquire_process_env() -> None:
    global _env_users
    with _env_lock:
        if _env_users == 0:
            _env_saved.clear()
            for key, value in _PROCESS_ENV.items():
                _env_saved[key] = os.environ.get(key)
                # A value the user set wins: they asked for it.
                os.environ.setdefault(key, value)
        _env_users += 1


def _release_process_env() -> None:
    global _env_users
    with _env_lock:
        _env_users -= 1
        if _env_users == 0:
            for key, value in _env_saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def _file_lock(path: Path, *, timeout: float) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if missing); yields False if it cannot be had."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no inter-process lock
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# The study-wide lock that makes "create the parent run once" race-free
# --------------------------------------------------------------------------------------------

_memory_locks: dict[tuple[int, str], threading.Lock] = {}
_memory_locks_guard = threading.Lock()


def _lock_key(study_name: str) -> str:
    return f"mixer-sweep:mlflow-parent:{study_name}"


def _advisory_key(study_name: str) -> int:
    """A signed 64-bit key for ``pg_advisory_lock`` derived from the study name."""
    digest = hashlib.sha256(_lock_key(study_name).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _study_lock(study: optuna.Study, *, timeout: float = 60.0) -> Iterator[bool]:
    """Hold a lock shared by every process working on ``study`` through its storage.

    Yields True when a real lock is held, False when the storage offers none (the caller then
    settles the race by re-reading after a delay).
    """
    from optuna.storages import InMemoryStorage, JournalStorage, RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    storage = study._storage
    if isinstance(storage, _CachedStorage):
        storage = storage._backend
    name = study.study_name

    if isinstance(storage, RDBStorage):
        dialect = storage.engine.dialect.name
        if dialect == "postgresql":
            with _pg_advisory_lock(storage.engine, _advisory_key(name), timeout=timeout) as held:
                yield held
            return
        if dialect in ("mysql", "mariadb"):
            with _mysql_named_lock(storage.engine, _lock_key(name)[-64:], timeout=timeout) as held:
                yield held
            return
        if dialect == "sqlite" and storage.engine.url.database not in (None, "", ":memory:"):
            lock_path = Path(storage.engine.url.database + ".mlflow-parent.lock")
            with _file_lock(lock_path, timeout=timeout) as held:
                yield held
            return
    elif isinstance(storage, JournalStorage):
        from optuna.storages.journal import JournalFileBackend

        backend = storage._backend
        if isinstance(backend, JournalFileBackend):
            with _file_lock(Path(backend._file_path + ".mlflow-parent.lock"), timeout=timeout) as held:
                yield held
            return
        redis = getattr(backend, "_redis", None)
        if redis is not None:
            lock = redis.lock(_lock_key(name), timeout=timeout, blocking_timeout=timeout)
            held = bool(lock.acquire())
            try:
                yield held
            finally:
                if held:
                    lock.release()
            return
    elif isinstance(storage, InMemoryStorage):
        # One process only: a thread lock is the whole story.
        with _memory_locks_guard:
            lock = _memory_locks.setdefault((id(storage), name), threading.Lock())
        with lock:
            yield True
        return
    yield False


@contextlib.contextmanager
def _pg_advisory_lock(engine: Any, key: int, *, timeout: float) -> Iterator[bool]:
    from sqlalchemy import text

    with engine.connect() as conn:
        deadline = time.monotonic() + timeout
        held = False
        while not held:
            held = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
            if not held:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        try:
            yield held
        finally:
            if held:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


@contextlib.contextmanager
def _mysql_named_lock(engine: Any, name: str, *, timeout: float) -> Iterator[bool]:
    from sqlalchemy import text

    with engine.connect() as conn:
        held = conn.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": name, "t": int(timeout)}).scalar() == 1
        try:
            yield held
        finally:
            if held:
                conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})


# --------------------------------------------------------------------------------------------
# The background sender
# --------------------------------------------------------------------------------------------

class _RunHandle:
    """An MLflow run as the sender knows it; ``run_id`` is None until the run exists."""

    def __init__(self, label: str, run_id: str | None = None):
        self.label = label
        self.run_id = run_id
        # Where its artifacts go, from create_run's answer: uploading then needs no get_run first.
        self.artifact_uri: str | None = None
        self.created = threading.Event()
        self.dropped = False  # its creation failed for good: later writes for it are dropped
        self.last_metrics: _Op | None = None  # the latest queued epoch batch (end() waits for it)
        self.on_created: Callable[[str], None] | None = None  # called once, on the sender thread
        if run_id is not None:
            self.created.set()

    def mark_created(self) -> None:
        self.created.set()
        callback, self.on_created = self.on_created, None
        if callback is not None and self.run_id is not None:
            try:
                callback(self.run_id)
            except Exception as exc:  # noqa: BLE001 - the caller's business; the run is fine
                log.warning("%s: on_created callback failed: %s", self.label, _short_error(exc))


@dataclasses.dataclass(eq=False)  # identity: ops are removed from the queue by identity
class _Op:
    """One write, in queue order. ``kind`` is create | batch | artifacts | terminate | barrier."""

    kind: str
    run: _RunHandle
    metrics: list[Any] = dataclasses.field(default_factory=list)
    params: list[Any] = dataclasses.field(default_factory=list)
    tags: list[Any] = dataclasses.field(default_factory=list)
    # create
    experiment_id: str | None = None
    run_name: str | None = None
    start_time: int | None = None
    create_tags: dict[str, str] = dataclasses.field(default_factory=dict)
    # artifacts: files to upload [(path, artifact_path or None)], or curves to draw first
    draw: tuple[list[Any], str] | None = None  # (rows, title) for curves.png
    files: list[tuple[Path, str | None]] | None = None
    future: concurrent.futures.Future | None = None  # the drawing, in the drawing process
    # terminate
    status: str | None = None
    end_time: int | None = None
    # progress, so a retried op never resends what already went through
    sent_metrics: int = 0
    sent_params: int = 0
    sent_tags: int = 0
    sent_files: int = 0
    attempts: int = 0
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def n_metrics(self) -> int:
        return len(self.metrics) - self.sent_metrics


def _is_transient(exc: BaseException) -> bool:
    """True for a failure that may go away (server down, timeout, database busy)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, _RemoteError):
        return exc.transient
    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT_ERROR_CODES
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    try:
        import requests
        import sqlalchemy.exc
    except ImportError:  # pragma: no cover - both come with mlflow
        return False
    return isinstance(exc, (requests.RequestException, sqlalchemy.exc.OperationalError))


class _Sender:
    """Drains the write queue (in order within each run) on one daemon thread, retrying with backoff.

    A write is taken when it is ready and no earlier write of its own run is still queued: run
    creation first, then metrics and tags (held up to ``batch_seconds``), then artifacts (a curves
    PNG is ready once the drawing process has drawn it). So a slow drawing or upload for one trial
    never holds up the next trial's run creation or epochs.
    """

    def __init__(self, client: _SendingProcess, uri: str, *, max_backoff: float,
                 warn_every: float, batch_seconds: float):
        self.client = client
        self.uri = uri
        self.batch_seconds = batch_seconds
        self.next_due: float | None = None  # when the earliest held batch becomes due
        self._barriers = 0  # flush() barriers queued: while any is, nothing is held back
        self.send_cpu_seconds = 0.0  # CPU of this thread (benchmarks report it)
        self.max_backoff = max_backoff
        self.warn_every = warn_every
        self._queue: collections.deque[_Op] = collections.deque()
        self._cond = threading.Condition()
        self._pending_metrics = 0
        self._dropped_metrics = 0
        self._deadline: float | None = None  # set by stop(): give up retrying after this
        self._stopping = False
        self.failing = False
        self.tmp = Path(tempfile.mkdtemp(prefix="mixer-tracking-"))
        self._drawer = _Drawer()
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------------
    def put(self, op: _Op) -> _Op:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the tracker is closed")
            if op.draw is not None:
                rows, title = op.draw
                path = Path(tempfile.mkdtemp(dir=self.tmp)) / "curves.png"
                op.future = self._drawer.submit(rows, path, title)
                op.future.add_done_callback(lambda _: self._wake())
            self._queue.append(op)
            self._pending_metrics += op.n_metrics
            self._barriers += op.kind == "barrier"
            self._cond.notify_all()
        return op

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def pending_metrics(self) -> int:
        with self._cond:
            return self._pending_metrics

    def wait(self, op: _Op, timeout: float) -> bool:
        """Wait for ``op`` to be processed; give up at once while the server is down."""
        deadline = time.monotonic() + timeout
        while not op.done.is_set():
            if self.failing:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            op.done.wait(min(remaining, 0.05))
        return True

    def stop(self, timeout: float) -> int:
        """Drain for at most ``timeout`` seconds, stop the thread; the metric points not delivered."""
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 15)
        self._drawer.close()
        self.client.close()
        with self._cond:
            undelivered = self._pending_metrics + self._dropped_metrics
        shutil.rmtree(self.tmp, ignore_errors=True)
        return undelivered

    # -- consumer side -------------------------------------------------------------------
    def _give_up_if_late(self) -> bool:
        """Past stop()'s deadline: drop the rest (counted as undelivered). Call with the lock held."""
        if self._deadline is None or time.monotonic() < self._deadline:
            return False
        if self._queue:
            log.warning("MLflow tracking at %s: giving up with %d metric points undelivered",
                        _redact(self.uri), self._pending_metrics)
        for op in self._queue:
            op.done.set()
        self._queue.clear()
        self._barriers = 0
        return True

    def _loop(self) -> None:
        backoff = 0.0
        last_warning = -math.inf
        down_since: float | None = None
        while True:
            with self._cond:
                batch = None
                while True:
                    if not self._queue and self._stopping:
                        return
                    batch = self._take_head() if self._queue else None
                    if batch is not None:
                        break
                    if self._stopping and self._give_up_if_late():
                        return
                    # Nothing ready (epochs held for batching, drawings in progress) or queued.
                    timeout = None
                    if self._queue:
                        timeout = 0.5 if self.next_due is None else max(0.0, self.next_due - time.monotonic())
                    self._cond.wait(timeout)
            start = time.thread_time()
            try:
                self._execute(batch)
            except Exception as exc:  # noqa: BLE001 - every failure is either retried or dropped
                self.send_cpu_seconds += time.thread_time() - start
                if not _is_transient(exc):
                    self._drop(batch, exc)
                    continue
                for op in batch:
                    op.attempts += 1
                self.failing = True
                now = time.monotonic()
                down_since = down_since or now
                backoff = min(self.max_backoff, max(0.5, backoff * 2))
                if now - last_warning >= self.warn_every:
                    last_warning = now
                    log.warning(
                        "MLflow tracking at %s unavailable for %.0f s (%s); %d metric points waiting, "
                        "retrying in %.1f s", _redact(self.uri), now - down_since,
                        _short_error(exc), self.pending_metrics, backoff)
                with self._cond:
                    if self._give_up_if_late():
                        return
                    wait = backoff
                    if self._deadline is not None:
                        wait = min(wait, max(0.0, self._deadline - time.monotonic()))
                    self._cond.wait(wait)
                continue
            self.send_cpu_seconds += time.thread_time() - start
            self._finish(batch)
            if self.failing:
                log.warning("MLflow tracking at %s reachable again after %.0f s; delivering the %d "
                            "metric points waiting", _redact(self.uri), time.monotonic() - (down_since or 0),
                            self.pending_metrics)
            self.failing = False
            backoff = 0.0
            down_since = None

    def _take_head(self) -> list[_Op] | None:
        """The next write to send, with the metrics-only writes of its run that can share its call.

        Order is kept per run, not across runs: a quick write (run creation, metrics, tags) goes
        ahead of another run's slow one (artifacts), so that a new trial's run exists, and its
        epochs arrive, while the previous trial's PNG is still being drawn or uploaded. A flush
        barrier goes only when it is first in the queue. None if nothing is ready.
        """
        queue = self._queue
        now = time.monotonic()
        # Epochs are held up to batch_seconds and go together: each call costs the server ~12 ms
        # of CPU taken from training on the same machine. A run that is ending, a flush or close
        # sends at once.
        force = self._stopping or self._barriers > 0
        ending = {id(op.run) for op in itertools.islice(queue, 5000) if op.kind == "terminate"}
        self.next_due = None
        pick = None
        first_slow = None
        behind: set[int] = set()  # runs with an earlier write still queued
        for i, op in enumerate(itertools.islice(queue, 2000)):
            if id(op.run) in behind:
                continue
            behind.add(id(op.run))
            if op.kind == "create":  # a trial waits for its run id (sweep.objective reads it)
                pick = i
                break
            if op.kind == "batch":
                due = op.queued_at + self.batch_seconds
                if force or id(op.run) in ending or now >= due or op.attempts:
                    pick = i if pick is None else pick
                else:
                    self.next_due = due if self.next_due is None else min(self.next_due, due)
                continue
            ready = op.future is None or op.future.done()
            if first_slow is None and ready and (op.kind != "barrier" or i == 0):
                first_slow = i
        if pick is None:
            pick = first_slow
        if pick is None:
            return None
        head = queue[pick]
        batch = [head]
        if head.kind == "batch" and _fits_one_call([head]):
            # The run's following batches ride along while they fit one call: typically the last
            # epoch and the end-of-trial tags, which then cost one round trip, not two.
            for op in itertools.islice(queue, pick + 1, pick + 2000):
                if op.run is not head.run:
                    continue
                if op.kind != "batch" or not _fits_one_call([*batch, op]):
                    break
                batch.append(op)
        return batch

    def _finish(self, batch: list[_Op]) -> None:
        with self._cond:
            for op in batch:
                self._queue.remove(op)
                self._pending_metrics -= op.n_metrics
                self._barriers -= op.kind == "barrier"
                op.sent_metrics = len(op.metrics)
                op.done.set()
            self._cond.notify_all()

    def _drop(self, batch: list[_Op], exc: BaseException) -> None:
        lost = sum(op.n_metrics for op in batch)
        log.warning("MLflow tracking at %s: dropping a %s for run %s (%d metric points): %s",
                    _redact(self.uri), batch[0].kind, batch[0].run.label, lost, _short_error(exc))
        log.debug("dropped write:\n%s", "".join(traceback.format_exception(exc)))
        if batch[0].kind == "create":
            batch[0].run.dropped = True
            batch[0].run.created.set()
        with self._cond:
            self._dropped_metrics += lost
        self._finish(batch)  # off the queue; counted in _dropped_metrics, not as delivered

    def _execute(self, batch: list[_Op]) -> None:
        head = batch[0]
        run = head.run
        if head.kind == "barrier":  # nothing to send: marks a point in the queue for flush()
            return
        if head.kind == "create":
            self._create(head)
            return
        if run.run_id is None:
            if run.dropped:
                raise _Dropped(f"run {run.label} was never created")
            raise RuntimeError(f"run {run.label} has no id yet")  # pragma: no cover - kept in order
        if head.kind == "batch":
            self._log_batch(run.run_id, batch)
        elif head.kind == "artifacts":
            self._log_artifacts(run.run_id, head)
        elif head.kind == "terminate":
            self.client.set_terminated(run.run_id, status=head.status, end_time=head.end_time)
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown op kind {head.kind!r}")

    def _create(self, op: _Op) -> None:
        run = op.run
        if run.run_id is None:
            key = op.create_tags["tracking_key"]
            if op.attempts:
                # The previous attempt may have created the run and lost the answer: look first.
                found = self.client.find_run(op.experiment_id, key)
                if found:
                    run.run_id, run.artifact_uri = found
            if run.run_id is None:
                run.run_id, run.artifact_uri = self.client.create_run(
                    op.experiment_id, start_time=op.start_time, tags=op.create_tags, run_name=op.run_name)
        run.mark_created()  # the id is known: TrialRun.run_id need not wait for the params
        while op.sent_params < len(op.params):
            chunk = op.params[op.sent_params:op.sent_params + _MAX_PARAMS_TAGS_PER_CALL]
            self.client.log_batch(run.run_id, params=chunk)
            op.sent_params += len(chunk)

    def _log_batch(self, run_id: str, batch: list[_Op]) -> None:
        if len(batch) > 1 or (_fits_one_call(batch) and not batch[0].sent_tags and not batch[0].sent_params):
            self.client.log_batch(
                run_id, metrics=[m for op in batch for m in op.metrics[op.sent_metrics:]],
                params=[p for op in batch for p in op.params], tags=[t for op in batch for t in op.tags])
            return
        # Too big for one call: in chunks, remembering progress so a retry resends nothing.
        head = batch[0]
        while head.sent_tags < len(head.tags):
            chunk = head.tags[head.sent_tags:head.sent_tags + _MAX_PARAMS_TAGS_PER_CALL]
            self.client.log_batch(run_id, tags=chunk)
            head.sent_tags += len(chunk)
        while head.sent_params < len(head.params):
            chunk = head.params[head.sent_params:head.sent_params + _MAX_PARAMS_TAGS_PER_CALL]
            self.client.log_batch(run_id, params=chunk)
            head.sent_params += len(chunk)
        while head.sent_metrics < len(head.metrics):
            chunk = head.metrics[head.sent_metrics:head.sent_metrics + _MAX_METRICS_PER_CALL]
            self.client.log_batch(run_id, metrics=chunk)
            with self._cond:
                head.sent_metrics += len(chunk)
                self._pending_metrics -= len(chunk)

    def _log_artifacts(self, run_id: str, op: _Op) -> None:
        if op.files is None:
            try:
                op.files = [(op.future.result(), None)] if op.future is not None else []
            except Exception as exc:  # noqa: BLE001 - a plotting failure must not stop the study
                raise _Dropped(f"could not render artifacts: {_short_error(exc)}") from exc
        while op.sent_files < len(op.files):
            path, artifact_path = op.files[op.sent_files]
            self.client.log_artifact(run_id, str(path), artifact_path, artifact_uri=op.run.artifact_uri)
            op.sent_files += 1


class _Calls:
    """The MLflow writes the sender makes, done with one ``MlflowClient``, in the sending process
    (or, if that process cannot start, in the sending thread). Results are plain values, so that
    they cross a pipe."""

    METHODS = frozenset({"find_run", "create_run", "log_batch", "set_terminated", "log_artifact"})

    def __init__(self, client: MlflowClient, uri: str):
        self.client = client
        self.uri = uri

    def find_run(self, experiment_id: str, key: str) -> tuple[str, str] | None:
        """(run id, artifact URI) of the run tagged ``tracking_key = key``, if it exists."""
        found = self.client.search_runs([experiment_id], filter_string=f"tags.tracking_key = '{key}'",
                                        max_results=1)
        return (found[0].info.run_id, found[0].info.artifact_uri) if found else None

    def create_run(self, experiment_id: str, *, start_time: int | None, tags: dict[str, str],
                   run_name: str | None) -> tuple[str, str]:
        """(run id, artifact URI) of a new run."""
        created = self.client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)
        return created.info.run_id, created.info.artifact_uri

    def log_batch(self, run_id: str, *, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
                  tags: Sequence[Any] = ()) -> None:
        self.client.log_batch(run_id, metrics=list(metrics), params=list(params), tags=list(tags))

    def set_terminated(self, run_id: str, *, status: str | None, end_time: int | None) -> None:
        self.client.set_terminated(run_id, status=status, end_time=end_time)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None, *,
                     artifact_uri: str | None) -> None:
        """Upload one file to the run's artifact repository, built from the URI create_run returned.

        ``MlflowClient.log_artifact`` would first ask the server for the run (one more request,
        ~10 ms of server CPU per trial) only to learn that same URI. Databricks URIs need the
        profile the client adds, so they take the client's way, as does a run whose URI is unknown.
        """
        if artifact_uri is None or self.uri.startswith("databricks"):
            self.client.log_artifact(run_id, path, artifact_path)
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(artifact_uri, tracking_uri=self.uri).log_artifact(path, artifact_path)


class _RemoteError(Exception):
    """A call that failed in the sending process: its error as text, and whether it may go away."""

    def __init__(self, text: str, *, transient: bool):
        super().__init__(text)
        self.transient = transient


class _SendingProcess:
    """Makes the sender's MLflow calls in a child process, so that their Python work (building
    requests, JSON, HTTP: ~16 ms of CPU per trial) never holds this process's GIL.

    From a thread of the training process that work also costs training the GIL hand-offs, each
    of which stalls the training thread: with one training thread, ``bench_tracking.py --trials 20
    --epoch-seconds 0.1`` (short trials, so that tracking weighs heavily) gave +6.9 +- 1.4 % of
    wall with the calls made from the thread and -0.8 +- 1.7 % with them in this child; in
    ``benchmarks/bench_gil.py`` (16 ms of Python beside a 0.8 s fit) a thread cost 3.2-8.6 %, a
    child process -5.5 to +2.5 % (three runs, standard errors 1.2-6.9 %).

    The child is ``python -m sweep.tracking --send-worker``; each call is one length-prefixed
    pickle each way over its stdin and stdout (calls come from the one sending thread, one at a
    time). Until the child has imported MLflow (~1.5 s) and said so, calls are made in this
    process, so that the first trials' runs are not created late. If the child dies the call
    fails as a transient error (the sender retries it) and the next call starts a new child; if
    no child can be started the calls are made in this process, as before.
    """

    def __init__(self, uri: str, local_client: MlflowClient | None):
        self.uri = uri
        self._here = _Calls(local_client, uri)  # until the child is ready, or if none can start
        self._can_here = local_client is not None
        self._no_child = False  # set if no child can be started
        self._proc: subprocess.Popen | None = None
        self._ready = False  # the current child has said it is ready
        self._lock = threading.Lock()
        self._cpu_done = 0.0  # CPU of children that have exited
        self._cpu_now = 0.0   # CPU of the current child, as it last reported

    @property
    def cpu_seconds(self) -> float:
        return self._cpu_done + self._cpu_now

    def start(self) -> None:
        """Start the child now (it imports MLflow, ~1.5 s of CPU), not with the first call."""
        with self._lock:
            self._child()

    def _child(self) -> subprocess.Popen | None:
        if self._no_child:
            return None
        if self._proc is None:
            root = str(Path(__file__).resolve().parents[1])
            path = os.environ.get("PYTHONPATH")
            # MLflow's retries turned down as for this process (a value the user set wins). The URI
            # goes in the environment, not the command line, where anyone could read a password in it.
            env = {**_PROCESS_ENV, **os.environ, "MLFLOW_TRACKING_URI": self.uri,
                   "PYTHONPATH": root + (os.pathsep + path if path else "")}
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "sweep.tracking", "--send-worker"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            except OSError as exc:
                log.info("sending process unavailable, sending from a thread: %s", exc)
                self._no_child = True
                return None
        return self._proc

    def _child_ready(self, proc: subprocess.Popen) -> bool:
        """Whether the child has said it is ready (without waiting for it)."""
        if not self._ready and select.select([proc.stdout], [], [], 0)[0]:
            status, _, self._cpu_now = _receive(proc.stdout)
            self._ready = status == "ready"
        return self._ready

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            proc = self._child()
            if proc is not None and self._can_here:
                try:
                    if not self._child_ready(proc):
                        proc = None  # still importing MLflow: this call is made here
                except (OSError, EOFError, ValueError, pickle.UnpicklingError):
                    self._stop_child(kill=True)  # it died starting: the next call starts another
                    proc = None
            if proc is None:
                return getattr(self._here, method)(*args, **kwargs)
            try:
                _send(proc.stdin, (method, args, kwargs))
                while True:  # (with no client here, the child's "ready" may come first)
                    status, payload, self._cpu_now = _receive(proc.stdout)
                    if status != "ready":
                        break
                    self._ready = True
            except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
                self._stop_child(kill=True)
                raise ConnectionError(f"the MLflow sending process ended ({_short_error(exc)})") from None
        if status == "ok":
            return payload
        text, transient = payload
        raise _RemoteError(text, transient=transient)

    def _stop_child(self, *, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if kill:
            proc.kill()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            proc.stdout.close()
        self._cpu_done += self._cpu_now
        self._cpu_now = 0.0
        self._ready = False

    def close(self) -> None:
        if not self._lock.acquire(timeout=5):  # a call hangs in the child: ending it ends the call
            proc = self._proc
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.kill()
            self._lock.acquire()
        try:
            self._stop_child()
        finally:
            self._lock.release()

    def __getattr__(self, method: str) -> Any:
        """``find_run``, ``create_run``, ``log_batch``, ``set_terminated``, ``log_artifact``: the
        ``_Calls`` method of that name, made in the child."""
        if method not in _Calls.METHODS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {method!r}")
        return functools.partial(self._call, method)


_FRAME = struct.Struct("<Q")


def _send(stream: Any, message: Any) -> None:
    """One length-prefixed pickle between the sending thread and the sending process."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_FRAME.pack(len(data)) + data)
    stream.flush()


def _receive(stream: Any) -> Any:
    header = stream.read(_FRAME.size)
    if len(header) < _FRAME.size:
        raise EOFError("no message")
    (size,) = _FRAME.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("a cut message")
    return pickle.loads(data)


def _send_worker() -> int:
    """The sending process: one pickled call per frame on stdin -> one pickled answer on stdout.
    It sends to ``MLFLOW_TRACKING_URI``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the sweep to handle, not us
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever MLflow prints goes to stderr, never into the answers
    sys.stdout = sys.stderr
    from mlflow import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    calls = _Calls(MlflowClient(tracking_uri=uri), uri)
    _send(answers, ("ready", None, time.process_time()))
    requests = sys.stdin.buffer
    while True:
        try:
            method, args, kwargs = _receive(requests)
        except EOFError:
            return 0
        try:
            if method not in _Calls.METHODS:
                raise ValueError(f"unknown call {method!r}")
            answer: tuple[str, Any] = ("ok", getattr(calls, method)(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the sending thread
            answer = ("error", (_short_error(exc), _is_transient(exc)))
        _send(answers, (*answer, time.process_time()))


_CURVES = ("train_loss", "val_loss", "lr")


class _Drawer:
    """Draws curves PNGs in a child process at the lowest CPU priority; a thread if that fails.

    Drawing one PNG takes matplotlib ~0.1 s of CPU. In the training process it would hold the GIL
    and a core that the training's shard threads need. A ``nice 19`` process still took about as
    much from training as it used (the training threads' run-queue wait grew by ~125 ms per trial,
    ``benchmarks/bench_tracking.py``); under ``SCHED_IDLE`` a training thread that wakes up takes
    the core back at once, and that wait grew by ~55 ms, most of it the server's. The child is
    ``python -m sweep.tracking --draw-worker`` (no multiprocessing: nothing of the caller's main
    module is re-run), reads one JSON job per line and answers one line per job; it exits when its
    stdin closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._broken = False
        self._jobs: dict[int, tuple[concurrent.futures.Future, list[Any], Path, str]] = {}
        self._next_job = 0
        self._child_cpu = 0.0
        self._thread_cpu = 0.0
        self._thread_pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def cpu_seconds(self) -> float:
        return self._child_cpu + self._thread_cpu

    def submit(self, rows: list[Any], path: Path, title: str) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self._broken:
                job = self._next_job
                self._next_job += 1
                try:
                    proc = self._child()
                    self._jobs[job] = (future, rows, path, title)
                    line = json.dumps({"job": job, "rows": rows, "path": str(path), "title": title})
                    proc.stdin.write(line + "\n")
                    proc.stdin.flush()
                    return future
                except (OSError, ValueError) as exc:
                    log.info("drawing process unavailable, drawing in a thread: %s", exc)
                    self._jobs.pop(job, None)
                    self._broken = True
        self._in_thread(future, rows, path, title)
        return future

    def _child(self) -> subprocess.Popen:
        if self._proc is None:
            env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sweep.tracking", "--draw-worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                cwd=str(Path(__file__).resolve().parents[1]))
            threading.Thread(target=self._read, args=(self._proc,), name="mlflow-draw-reader",
                             daemon=True).start()
        return self._proc

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                entry = self._jobs.pop(answer.get("job"), None)
                self._child_cpu = float(answer.get("cpu", self._child_cpu))
            if entry is None:
                continue
            future = entry[0]
            if answer.get("error"):
                future.set_exception(RuntimeError(answer["error"]))
            else:
                future.set_result(Path(answer["path"]))
        # The child is gone (closed, or killed): what it had not drawn is drawn here.
        with self._lock:
            self._broken = True
            orphans = list(self._jobs.values())
            self._jobs.clear()
        for future, rows, path, title in orphans:
            self._in_thread(future, rows, path, title)

    def _in_thread(self, future: concurrent.futures.Future, rows: list[Any], path: Path, title: str) -> None:
        with self._lock:
            if self._thread_pool is None:
                self._thread_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-draw")
            pool = self._thread_pool

        def draw() -> None:
            start = time.thread_time()
            try:
                future.set_result(_plot_curves(rows, path, title=title))
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits for the PNG
                future.set_exception(exc)
            finally:
                self._thread_cpu += time.thread_time() - start

        try:
            pool.submit(draw)
        except RuntimeError as exc:  # shut down
            future.set_exception(exc)

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            self._broken = True
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread_pool is not None:
            self._thread_pool.shutdown(wait=False, cancel_futures=True)


def _draw_worker() -> int:
    """The drawing process: one JSON job per stdin line -> one JSON answer per stdout line."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the sweep to handle, not us
    with contextlib.suppress(OSError):
        os.nice(19)
    with contextlib.suppress(OSError, AttributeError):  # Linux: run only on a CPU nothing else wants
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    # Import and warm up matplotlib before the first job; CPU is reported from here on.
    with tempfile.TemporaryDirectory() as folder:
        _plot_curves([(1, {"train_loss": 1.0, "val_loss": 1.0, "lr": 1e-3})], Path(folder) / "w.png",
                     title="warm-up")
    ready = time.process_time()
    for line in sys.stdin:
        job = json.loads(line)
        answer: dict[str, Any] = {"job": job["job"], "path": job["path"]}
        try:
            _plot_curves([(int(e), v) for e, v in job["rows"]], Path(job["path"]), title=job["title"])
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which drops the PNG
            answer["error"] = _short_error(exc)
        answer["cpu"] = time.process_time() - ready
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


def _fits_one_call(ops: Sequence[_Op]) -> bool:
    """True if these batches together stay within one ``log_batch`` call's limits."""
    metrics = sum(op.n_metrics for op in ops)
    params = sum(len(op.params) for op in ops)
    tags = sum(len(op.tags) for op in ops)
    return (metrics <= _MAX_METRICS_PER_CALL and params <= _MAX_PARAMS_TAGS_PER_CALL
            and tags <= _MAX_PARAMS_TAGS_PER_CALL and metrics + params + tags <= _MAX_METRICS_PER_CALL)


class _Dropped(Exception):
    """A write that cannot succeed (its run does not exist, its content could not be made)."""


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _now_ms() -> int:
    return int(time.time() * 1000)


def _history_rows(history: Sequence[Any] | None) -> list[tuple[int, dict[str, float]]]:
    """``[(epoch, metrics)]`` from EpochMetrics or ``{"epoch": n, **metrics}`` mappings."""
    rows = []
    for item in history or ():
        if isinstance(item, Mapping):
            epoch = int(item["epoch"])
            values = {k: float(v) for k, v in item.items() if k != "epoch" and v is not None}
        else:
            epoch = int(item.epoch)
            values = item.as_dict()
        rows.append((epoch, values))
    return rows


def _as_epoch_metrics(history: Sequence[Any]) -> list[EpochMetrics]:
    from mixer.train import EpochMetrics

    names = {f.name for f in dataclasses.fields(EpochMetrics)}
    out = []
    for item in history:
        if isinstance(item, EpochMetrics):
            out.append(item)
        else:
            out.append(EpochMetrics(**{k: v for k, v in dict(item).items() if k in names}))
    return out


def _tag_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_TAG_CHARS else text[:_MAX_TAG_CHARS - 3] + "..."


class TrialRun:
    """The child run of one trial. Made by :meth:`Tracker.start_trial`."""

    def __init__(self, tracker: Tracker, handle: _RunHandle, *, trial_number: int,
                 config: TrainConfig, data_config: DataConfig, seed: int):
        self._tracker = tracker
        self._handle = handle
        self.trial_number = trial_number
        self.config = config
        self.data_config = data_config
        self.seed = seed
        self._logged: dict[int, dict[str, float]] = {}
        self._ended = False
        self._started = time.monotonic()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, waiting (one round trip) for the run's creation; None while the
        server is down and the run not yet created."""
        deadline = time.monotonic() + self._tracker.end_timeout
        while (self._handle.run_id is None and not self._handle.created.is_set()
               and not self._tracker._sender.failing and time.monotonic() < deadline):
            self._handle.created.wait(0.05)
        return self._handle.run_id

    def log_epoch(self, metrics: EpochMetrics | Mapping[str, Any]) -> None:
        """Queue one epoch's metrics (one ``log_batch``, step = epoch). Never blocks on the server."""
        if self._ended:
            raise RuntimeError(f"trial-{self.trial_number}: log_epoch after end")
        ((epoch, values),) = _history_rows([metrics])
        self._logged[epoch] = values
        self._tracker._queue_metrics(self._handle, epoch, values)

    def end(self, state: str, *, history: Sequence[Any] | None = None, reason: str | None = None,
            pruned_epoch: int | None = None, wait: bool = False) -> None:
        """Close the run: its status tells the outcome.

        Args:
            state: "completed" (-> FINISHED), "pruned" (-> KILLED), "failed" or "diverged" (-> FAILED).
            history: the trial's full history (EpochMetrics or ``{"epoch": n, ...}``); epochs not
                sent through ``log_epoch`` are sent now, and it feeds the curves PNG and the
                diagnosis. Defaults to what ``log_epoch`` received.
            reason: why the trial failed or diverged (tag ``failure_reason``).
            pruned_epoch: the epoch at which a pruned trial stopped (tag ``pruned_epoch``).
            wait: also wait (at most ``Tracker(end_timeout=...)`` seconds, and not while the
                server is down) until every epoch's metrics of this run are stored. Off by
                default: it costs the training path one round trip per trial (~1 % of a 10-epoch
                trial with 1 s epochs on a loaded 2-core machine), and nothing needs it. Whether
                or not end waits, the run's remaining epochs are sent at once, then its tags and
                curves PNG, and its status last, so a run marked FINISHED/KILLED/FAILED has all
                its metrics; ``Tracker.flush`` and ``close`` wait (bounded) for all of it.
        """
        if state not in _OUTCOMES:
            raise ValueError(f"state must be one of {STATES}, got state={state!r}")
        if self._ended:
            raise RuntimeError(f"trial-{self.trial_number}: end called twice")
        if pruned_epoch is not None and pruned_epoch < 0:
            raise ValueError(f"pruned_epoch must be >= 0, got pruned_epoch={pruned_epoch}")
        self._ended = True
        from mlflow.entities import Metric, RunTag

        rows = _history_rows(history) if history is not None else sorted(self._logged.items())
        for epoch, values in rows:
            if epoch not in self._logged:
                self._logged[epoch] = values
                self._tracker._queue_metrics(self._handle, epoch, values)

        status, optuna_state = _OUTCOMES[state]
        tags = {"optuna_state": optuna_state, "trial_state": state}
        if pruned_epoch is not None:
            tags["pruned_epoch"] = str(int(pruned_epoch))
        if state in ("failed", "diverged"):
            tags["failure_reason"] = _tag_value(reason or state)
        metrics: list[Metric] = []
        # sweep.objective reports a diverged fit as "failed" with fit's reason: recognise it.
        diverged = state == "diverged" or (state == "failed" and (
            _ends_non_finite(rows) or _DIVERGED_REASON.search(reason or "") is not None))
        diagnosis = _diagnose(history if history is not None else
                              [{"epoch": e, **v} for e, v in sorted(self._logged.items())],
                              diverged=diverged)
        if diagnosis is not None:
            label, diag_metrics, diag_tags = diagnosis
            tags.update({k: _tag_value(v) for k, v in diag_tags.items()})
            tags["diagnosis"] = label
            taken = {name for _, values in rows for name in values}
            now = _now_ms()
            for name, value in diag_metrics.items():
                key = f"diagnosis_{name}" if name in taken else name
                metrics.append(Metric(key, float(value), now, 0))
        sender = self._tracker._sender
        sender.put(_Op("batch", self._handle, metrics=metrics,
                       tags=[RunTag(k, v) for k, v in tags.items()]))
        deferred = None
        if self._tracker.curves_png:
            curves = [(e, {k: v[k] for k in _CURVES if k in v}) for e, v in sorted(self._logged.items())]
            title = f"{self._tracker._study_name} trial-{self.trial_number} ({state})"
            if time.monotonic() - self._started < self._tracker.defer_png_below:
                deferred = (self._handle, curves, title)
            else:
                sender.put(_Op("artifacts", self._handle, draw=(curves, title)))
        sender.put(_Op("terminate", self._handle, status=status, end_time=_now_ms()))
        if deferred is not None:
            with self._tracker._deferred_lock:
                self._tracker._deferred_pngs.append(deferred)
        if wait and self._handle.last_metrics is not None:
            # One round trip (the run's last epochs), not the PNG and status behind it.
            sender.wait(self._handle.last_metrics, self._tracker.end_timeout)


def _ends_non_finite(rows: Sequence[tuple[int, Mapping[str, float]]]) -> bool:
    """True if the last epoch's train or val loss is NaN or infinite (a diverged run)."""
    if not rows:
        return False
    last = rows[-1][1]
    return any(not math.isfinite(last.get(k, 0.0)) for k in ("train_loss", "val_loss"))


def _diagnose(history: Sequence[Any], *, diverged: bool
              ) -> tuple[str, dict[str, float], dict[str, str]] | None:
    """(label, metrics, tags) from ``mixer.diagnosis.diagnose``, or None if it is not there."""
    if not history and not diverged:
        return None
    try:
        from mixer.diagnosis import diagnose
    except ImportError:
        return None
    try:
        result = diagnose(_as_epoch_metrics(history), diverged=diverged)
        return (str(result.label), {k: float(v) for k, v in dict(result.metrics).items()},
                {k: str(v) for k, v in dict(result.tags).items()})
    except Exception as exc:  # noqa: BLE001 - a diagnosis bug must not end the study
        log.warning("diagnosis failed, trial logged without it: %s", _short_error(exc))
        return None


class _CurvesFigure:
    """The trial PNG's figure, built once per drawing thread and redrawn with each trial's data.

    Reusing the figure, its axes and their tick artists costs ~25 % less CPU per PNG than building
    them anew (~75 ms instead of ~100 ms here); that CPU is taken from training.
    """

    def __init__(self) -> None:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.fig = Figure(figsize=(10, 3.8))
        self.loss_ax, self.lr_ax = self.fig.subplots(1, 2)
        self.lines = {}
        for name, style in (("train_loss", "-o"), ("val_loss", "-s")):
            (self.lines[name],) = self.loss_ax.plot([], [], style, markersize=3, label=name)
        (self.lines["lr"],) = self.lr_ax.plot([], [], "-o", markersize=3, color="tab:green")
        self.loss_ax.set_xlabel("epoch")
        self.loss_ax.set_ylabel("loss")
        self.loss_ax.set_title("loss")
        self.loss_ax.legend()
        # Linear with an offset exponent: a log axis's mathtext tick labels cost ~20 % more to draw.
        self.lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        self.lr_ax.set_xlabel("epoch")
        self.lr_ax.set_ylabel("learning rate")
        self.lr_ax.set_title("learning rate")
        for ax in (self.loss_ax, self.lr_ax):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.title = self.fig.suptitle("")
        # A fixed layout: "constrained" costs ~40 % more CPU.
        self.fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.25)

    def draw(self, rows: Sequence[tuple[int, Mapping[str, float]]], path: Path, title: str) -> Path:
        epochs = [e for e, _ in rows]
        for name, line in self.lines.items():
            values = [v.get(name, math.nan) for _, v in rows]
            line.set_data(epochs, [x if math.isfinite(x) else math.nan for x in values])
        for ax in (self.loss_ax, self.lr_ax):
            ax.relim()
            ax.autoscale_view()
        self.title.set_text(title)
        # zlib level 3 instead of Pillow's 6: ~10 ms less CPU per PNG, for ~9 % more bytes.
        self.fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 3})
        return path


_figures = threading.local()


def _plot_curves(rows: Sequence[tuple[int, Mapping[str, float]]], path: Path, *, title: str) -> Path:
    """Train/val loss and learning rate per epoch, as a PNG. Thread-safe: no pyplot, a figure per thread."""
    figure = getattr(_figures, "figure", None)
    if figure is None:
        figure = _figures.figure = _CurvesFigure()
    return figure.draw(rows, path, title)


def _importances_unsupported(study: optuna.Study) -> str | None:
    """Why parameter importances mean nothing yet (Optuna would draw equal bars), or None."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return f"needs >= 2 completed trials, the study has {len(complete)}"
    names = {name for t in complete for name in t.params}
    if not any(len({repr(t.params.get(name)) for t in complete}) > 1 for name in names):
        return "no parameter varies across the completed trials"
    return None


class Tracker:
    """Logs a study to MLflow: one parent run, one child run per trial.

    Args:
        tracking_uri: where runs go; None -> ``MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`.
        experiment_name: the MLflow experiment; None -> the study's name.
        batch_seconds: a run's epochs are sent together at most this often (and at once when the
            trial ends, on ``flush`` and on ``close``): one ``log_batch`` per run per interval, as
            each call costs a local server ~12 ms of CPU taken from training. 0 sends each epoch
            as it comes.
        curves_png: draw each trial's loss and learning-rate curves as ``curves.png`` (~0.1 s of
            CPU per trial, in a child process under ``SCHED_IDLE``).
        defer_png_below: a trial shorter than this many seconds gets its ``curves.png`` when the
            tracker closes (or on :meth:`draw_deferred`), not when it ends: drawing it in the middle
            of the next trial would delay that trial by ~60 ms, over 0.5 % of a trial under 12 s
            (``benchmarks/bench_tracking.py``). Its metrics, tags and status go at once as usual.
            0 draws every PNG when its trial ends.
        end_timeout: longest wait, in seconds, in ``TrialRun.end`` / ``finish_study`` for the run
            to be fully stored (skipped while the server is down).
        close_timeout: default longest wait in ``close`` for the queue to drain.
        max_backoff: longest pause, in seconds, between retries while the server is down.
        warn_every: at most one "N metric points waiting" warning per this many seconds.
        connect_timeout: seconds ``check_reachable`` waits for an HTTP server to answer.
    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None, *,
                 batch_seconds: float = 10.0, curves_png: bool = True, end_timeout: float = 10.0,
                 close_timeout: float = 30.0, max_backoff: float = 15.0, warn_every: float = 10.0,
                 connect_timeout: float = 3.0, defer_png_below: float = 30.0):
        for name, value in (("batch_seconds", batch_seconds), ("end_timeout", end_timeout),
                            ("close_timeout", close_timeout), ("defer_png_below", defer_png_below),
                            ("max_backoff", max_backoff), ("warn_every", warn_every),
                            ("connect_timeout", connect_timeout)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {name}={value}")
        if experiment_name is not None and not experiment_name.strip():
            raise ValueError(f"experiment_name must not be blank, got experiment_name={experiment_name!r}")
        self.uri = _resolve_uri(tracking_uri)
        self.experiment_name = experiment_name
        self.curves_png = curves_png
        self.defer_png_below = defer_png_below
        # (run, curves rows, title) of short trials whose PNG waits for close() / draw_deferred()
        self._deferred_pngs: list[tuple[_RunHandle, list[Any], str]] = []
        self._deferred_lock = threading.Lock()
        self.end_timeout = end_timeout
        self.close_timeout = close_timeout
        self.connect_timeout = connect_timeout
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._study_name: str | None = None
        self._parent: _RunHandle | None = None
        self._closed = False
        self._undelivered: int | None = None
        _acquire_process_env()
        # A store that cannot even be opened (bad database URL, unwritable folder) is reported by
        # check_reachable / ensure_parent_run as TrackingUnavailable, like an unreachable server.
        self._open_error: TrackingUnavailable | None = None
        try:
            self._client = self._make_client()
        except Exception as exc:  # noqa: BLE001 - anything here means "cannot track there"
            self._open_error = TrackingUnavailable(
                f"cannot open MLflow tracking store {_redact(self.uri)}: {_short_error(exc)}")
            self._client = None  # never used: ensure_parent_run, needed before any run, raises
        # The drawing process starts with the first PNG (~1 s of CPU importing matplotlib): with
        # short trials, when the tracker closes, where it delays no training.
        # The sending process starts with check_reachable or ensure_parent_run, before any trial.
        self._sender = _Sender(_SendingProcess(self.uri, self._client), self.uri, max_backoff=max_backoff,
                               warn_every=warn_every, batch_seconds=batch_seconds)
        _open_trackers.add(self)

    def _make_client(self) -> MlflowClient:
        from mlflow import MlflowClient

        db = _sqlite_path(self.uri)
        if db is None:
            return MlflowClient(tracking_uri=self.uri)
        # Two processes opening a new SQLite store at once both run its schema migrations and one
        # fails: create (or migrate) it under a file lock. Writes afterwards are fine with SQLite's
        # own locking, and "database is locked" is retried by the sender.
        db.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(db.with_name(db.name + ".lock"), timeout=120):
            client = MlflowClient(tracking_uri=self.uri)
            client._tracking_client.store  # noqa: B018 - forces store creation under the lock
        return client

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending_metrics(self) -> int:
        """Metric points queued and not yet on the server."""
        return self._sender.pending_metrics

    @property
    def background_cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far off the training thread, by the sending thread and by the
        drawing (process, or thread if the process failed): what tracking costs besides the calls
        on the training thread and the server's own work."""
        return {"sending": self._sender.send_cpu_seconds + self._sender.client.cpu_seconds,
                "drawing": self._sender._drawer.cpu_seconds}

    # -- start ---------------------------------------------------------------------------
    def check_reachable(self) -> None:
        """Raise TrackingUnavailable (naming the URI) within seconds if the store cannot be used."""
        if self._open_error is not None:
            raise self._open_error
        self._sender.client.start()  # imports MLflow (~1.5 s) in the child while the study opens
        uri = _redact(self.uri)
        if _is_http(self.uri):
            url = self.uri.rstrip("/") + "/health"
            try:
                with urllib.request.urlopen(url, timeout=self.connect_timeout) as resp:
                    if resp.status != 200:
                        raise TrackingUnavailable(f"MLflow tracking server at {uri} answered "
                                                  f"/health with HTTP {resp.status}")
            except TrackingUnavailable:
                raise
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise TrackingUnavailable(
                    f"MLflow tracking server at {uri} is not reachable: {reason}") from None
            return
        try:
            self._client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot track there"
            raise TrackingUnavailable(f"MLflow tracking store {uri} is not usable: "
                                      f"{_short_error(exc)}") from exc

    def _call(self, what: str, fn: Callable[[], Any], *, attempts: int = 4) -> Any:
        """A synchronous MLflow call, retried briefly; TrackingUnavailable naming the URI if it fails."""
        delay = 0.5
        for attempt in range(attempts):
            try:
                return fn()
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                if attempt == attempts - 1:
                    raise TrackingUnavailable(f"MLflow tracking at {_redact(self.uri)}: cannot {what}: "
                                              f"{_short_error(exc)}") from exc
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _experiment_for(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        def get_or_create() -> str:
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    return self._client.create_experiment(name)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment = self._client.get_experiment_by_name(name)  # another worker won
            if experiment.lifecycle_stage == "deleted":
                self._client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id

        return self._call(f"get or create experiment {name!r}", get_or_create)

    def _existing_parent(self, run_id: str | None) -> Any:
        """The parent run if ``run_id`` names a live run in this store, else None."""
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._call("read the parent run", lambda: self._client.get_run(run_id))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return None if run.info.lifecycle_stage == "deleted" else run

    def ensure_parent_run(self, study: optuna.Study) -> str:
        """Get or create the study's parent run; its id ends up in ``study.user_attrs``.

        Race-free across processes and machines: see the module docstring.

        Raises:
            TrackingUnavailable: the store cannot be reached.
        """
        if self._open_error is not None:
            raise self._open_error
        self._sender.client.start()  # imports MLflow in the child while this one talks to the store
        self._study_name = study.study_name
        run = self._existing_parent(study.user_attrs.get(PARENT_RUN_ATTR))
        if run is None:
            with _study_lock(study) as locked:
                run = self._existing_parent(study.user_attrs.get(PARENT_RUN_ATTR))
                if run is None:
                    run = self._create_parent(study, locked=locked)
        if run.info.status != "RUNNING":
            # A resumed study: its parent is running again.
            self._call("mark the parent run running",
                       lambda: self._client.update_run(run.info.run_id, status="RUNNING"))
        self.parent_run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self._parent = _RunHandle(f"{study.study_name} (parent)", self.parent_run_id)
        return self.parent_run_id

    def _create_parent(self, study: optuna.Study, *, locked: bool) -> Any:
        experiment_id = self._experiment_for(self.experiment_name or study.study_name)
        tags = {
            "study_name": study.study_name,
            "mlflow.note.content": f"Optuna study `{study.study_name}`: one child run per trial.",
        }
        run = self._call("create the parent run", lambda: self._client.create_run(
            experiment_id, tags=tags, run_name=study.study_name))
        study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
        if locked:
            return run
        # No lock in this storage: let simultaneous writers settle, then all adopt what stands.
        time.sleep(2.0)
        winner = study.user_attrs.get(PARENT_RUN_ATTR)
        if winner != run.info.run_id:
            with contextlib.suppress(Exception):
                self._client.delete_run(run.info.run_id)
            adopted = self._existing_parent(winner)
            if adopted is not None:
                return adopted
        return run

    # -- trials --------------------------------------------------------------------------
    def start_trial(self, trial: optuna.trial.BaseTrial, config: TrainConfig, data_config: DataConfig,
                    *, seed: int, on_created: Callable[[str], None] | None = None) -> TrialRun:
        """Start the child run ``trial-<n>`` under the study's parent run (never blocks on the server).

        Logs every knob of the full config (``dataclasses.asdict(data_config)`` and
        ``config.to_flat()``) as params, the tags ``trial_number``, ``study_name``, ``seed``,
        ``optuna_state`` and the resolved config as ``config.yaml``.

        Args:
            on_created: called with the run id as soon as the server has created the run, on the
                tracker's sending thread (so the caller need not wait for it; see ``TrialRun.run_id``).
        """
        from mlflow.entities import Param

        if self._closed:
            raise RuntimeError("the tracker is closed")
        if self.parent_run_id is None:
            study = getattr(trial, "study", None)
            if study is None:
                raise RuntimeError("call ensure_parent_run(study) before start_trial")
            self.ensure_parent_run(study)
        number = int(trial.number)
        params = {**dataclasses.asdict(data_config), **config.to_flat()}
        handle = _RunHandle(f"trial-{number}")
        handle.on_created = on_created
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "trial_number": str(number),
            "study_name": str(self._study_name),
            "seed": str(int(seed)),
            "optuna_state": "RUNNING",
            "tracking_key": uuid.uuid4().hex,
        }
        self._sender.put(_Op("create", handle, experiment_id=self.experiment_id, run_name=f"trial-{number}",
                             start_time=_now_ms(), create_tags=tags))

        # Written here (a millisecond), not on the drawing thread, where it could wait behind the
        # previous trial's PNG and hold up this run's epochs.
        import yaml

        from mixer.config import dump_run_config

        path = Path(tempfile.mkdtemp(dir=self._sender.tmp)) / "config.yaml"
        path.write_text(yaml.safe_dump(dump_run_config(data_config, config, seed), sort_keys=False))
        self._sender.put(_Op("artifacts", handle, files=[(path, None)]))
        # The params ride with the first epochs' call (batches are held up to batch_seconds).
        self._sender.put(_Op("batch", handle, params=[Param(k, str(v)) for k, v in params.items()]))
        return TrialRun(self, handle, trial_number=number, config=config, data_config=data_config, seed=seed)

    def _queue_metrics(self, handle: _RunHandle, epoch: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        handle.last_metrics = self._sender.put(
            _Op("batch", handle, metrics=[Metric(k, float(v), now, int(epoch)) for k, v in values.items()]))

    @property
    def deferred_pngs(self) -> int:
        """Short trials whose ``curves.png`` waits for :meth:`draw_deferred` (``close`` calls it)."""
        return len(self._deferred_pngs)

    def draw_deferred(self) -> int:
        """Queue the deferred curves PNGs for drawing and upload now; returns how many."""
        with self._deferred_lock:
            deferred, self._deferred_pngs = self._deferred_pngs, []
        for handle, rows, title in deferred:
            self._sender.put(_Op("artifacts", handle, draw=(rows, title)))
        return len(deferred)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is stored (at most ``timeout`` s, default
        ``close_timeout``; at once False while the server is down). True if it all arrived."""
        timeout = self.close_timeout if timeout is None else timeout
        barrier = self._sender.put(_Op("barrier", _RunHandle("flush", "")))
        return self._sender.wait(barrier, timeout)

    # -- end of study --------------------------------------------------------------------
    def finish_study(self, study: optuna.Study, out_dir: str | Path) -> dict[str, Any]:
        """Summarise the study on its parent run and mark it FINISHED.

        Writes ``trials.csv`` and the Optuna plots (``optimization_history``, ``intermediate_values``,
        ``param_importances``, ``parallel_coordinate``; each PNG, skipped with a tag
        ``plot_skipped.<name>`` when the study cannot support it, e.g. importances need two
        completed trials with varying params) into ``out_dir`` and logs them on the parent run with
        the metrics ``best_value``, ``n_complete``, ``n_pruned``, ``n_failed``, ``n_trials`` and the
        tags ``best_trial_number`` and ``best_param.<name>``.

        Returns:
            A summary: the counts, ``best_value`` (or None) and ``files`` written.
        """
        from mlflow.entities import Metric, RunTag
        from optuna.trial import TrialState

        if self.parent_run_id is None or self._study_name != study.study_name:
            self.ensure_parent_run(study)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        trials = study.get_trials(deepcopy=False)
        counts = {
            "n_trials": len(trials),
            "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        }
        now = _now_ms()
        step = counts["n_trials"]
        metrics = [Metric(k, float(v), now, step) for k, v in counts.items()]
        tags: dict[str, str] = {"study_name": study.study_name}
        best_value = None
        if len(study.directions) == 1 and counts["n_complete"]:
            best = study.best_trial
            best_value = best.value
            metrics.append(Metric("best_value", float(best.value), now, step))
            tags["best_trial_number"] = str(best.number)
            tags.update({f"best_param.{k}": _tag_value(v) for k, v in best.params.items()})
        tags["optuna_direction"] = ",".join(d.name.lower() for d in study.directions)

        files: list[tuple[Path, str | None]] = []
        table = out / "trials.csv"
        frame = study.trials_dataframe()
        # As sweep.run's table: the per-epoch history and full config are too wide for a table (the
        # history is in the trial runs' metrics, the config in their params).
        frame = frame.drop(columns=[c for c in ("user_attrs_history", "user_attrs_config") if c in frame])
        frame.to_csv(table, index=False)
        files.append((table, None))
        skipped = {}
        for _name, path in self._study_plots(study, out / "plots", skipped):
            files.append((path, "plots"))
        tags.update({f"plot_skipped.{k}": _tag_value(v) for k, v in skipped.items()})

        assert self._parent is not None
        self._sender.put(_Op("batch", self._parent, metrics=metrics,
                             tags=[RunTag(k, v) for k, v in tags.items()]))
        self._sender.put(_Op("artifacts", self._parent, files=files))
        last = self._sender.put(_Op("terminate", self._parent, status="FINISHED", end_time=_now_ms()))
        self._sender.wait(last, max(self.end_timeout, 30.0))
        return {**counts, "best_value": best_value, "files": [p for p, _ in files], "plots_skipped": skipped}

    @staticmethod
    def _study_plots(study: optuna.Study, folder: Path, skipped: dict[str, str]
                     ) -> list[tuple[str, Path]]:
        import matplotlib

        matplotlib.use("Agg")  # headless: the sweep runs on servers and in CI
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm

        folder.mkdir(parents=True, exist_ok=True)
        done = []
        for name, plot in (("optimization_history", ovm.plot_optimization_history),
                           ("intermediate_values", ovm.plot_intermediate_values),
                           ("param_importances", ovm.plot_param_importances),
                           ("parallel_coordinate", ovm.plot_parallel_coordinate)):
            if name == "param_importances" and (why := _importances_unsupported(study)):
                skipped[name] = why
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ExperimentalWarning, empty-plot warnings
                    axes = plot(study)
                fig = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                if not any(ax.has_data() for ax in fig.axes):
                    skipped[name] = "nothing to plot yet"
                    plt.close(fig)
                    continue
                path = folder / f"{name}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
                plt.close(fig)
                done.append((name, path))
            except Exception as exc:  # noqa: BLE001 - e.g. importances of a single trial
                skipped[name] = _short_error(exc)
                log.info("study plot %s skipped: %s", name, skipped[name])
            finally:
                plt.close("all")
        return done

    def close(self, *, timeout: float | None = None) -> int:
        """Deliver what is queued (waiting at most ``timeout`` s, default ``close_timeout``).

        Returns:
            The number of metric points that could not be delivered (0 when all arrived).
        """
        if self._closed:
            return self._undelivered or 0
        timeout = self.close_timeout if timeout is None else timeout
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0, got timeout={timeout}")
        drawing = self.draw_deferred()
        self._closed = True
        if drawing:
            log.info("drawing %d deferred curves PNGs", drawing)
        try:
            # Each deferred PNG is ~0.1 s of drawing: allow for them on top of the timeout.
            self._undelivered = self._sender.stop(timeout + 0.5 * drawing)
        finally:
            _release_process_env()
            _open_trackers.discard(self)
        if self._undelivered:
            log.warning("MLflow tracking at %s: %d metric points could not be delivered",
                        _redact(self.uri), self._undelivered)
        return self._undelivered


_open_trackers: weakref.WeakSet[Tracker] = weakref.WeakSet()


@atexit.register
def _close_open_trackers() -> None:
    # A script that forgot close() still gets its last epochs delivered (briefly).
    for tracker in list(_open_trackers):
        with contextlib.suppress(Exception):
            tracker.close(timeout=min(tracker.close_timeout, 10.0))


if __name__ == "__main__":
    if sys.argv[1:] == ["--draw-worker"]:
        sys.exit(_draw_worker())
    if sys.argv[1:] == ["--send-worker"]:
        sys.exit(_send_worker())
    sys.exit(f"usage: python -m sweep.tracking --draw-worker | --send-worker (internal helpers of "
             f"{__name__})")
