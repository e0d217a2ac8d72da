"""``python -m sweep.run SPACE.yaml``: run (or resume) a whole study from one search-space file.

What it does, in order (nothing is created until the file is valid and tracking is reachable):

1. validate the space (``sweep.space``); a bad file exits 2 naming the file and the key path;
2. with tracking on, check that the MLflow tracking URI answers (exit 2 naming it if not);
3. open the study in its storage — by default an Optuna journal file
   ``<out>/<study>/optuna.journal``; ``--storage postgresql://...`` uses Optuna's RDB storage with
   heartbeats, so a trial whose worker died is failed and retried elsewhere with the same
   parameters. The first process creates the study, the others join it. Re-running the same command
   resumes the study;
4. run trials in this process (``--workers 1``) or in K fresh worker processes sharing the storage,
   each with its share of the cores as BLAS threads, until the study's budget is spent;
5. print the best trial and write ``<out>/<study>/best_config.yaml`` (a ``python -m mixer.train``
   config) and ``<out>/<study>/trials.csv``.

The budget is the study's, not the process's: ``n_trials`` counts every trial of the study with a
result — completed, pruned, or failed because it diverged or raised — and the trials now running.
Trials cut short by Ctrl-C or by a dead worker do not count; their parameters are queued again and
re-run (with the same seed) by the next worker, or when the command is run again. A lock around
"count, then start a trial" (a lock file next to the journal, a PostgreSQL advisory lock) makes the
count exact with several workers; other RDB URLs (SQLite) get no such lock.

Exit codes: 0 done, 1 a failed run (no trial completed, a worker crashed, tracking lost metrics),
2 bad usage, a bad space file, an unreachable tracking server or storage, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

# NumPy (and so Optuna, MLflow, mixer) is imported inside functions only: a worker process must set
# its BLAS thread count in the environment before NumPy is first imported.
import argparse
import contextlib
import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main", "budget_used", "open_storage", "open_study", "run_trials"]

log = logging.getLogger("sweep")

HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats (RDB storage)
GRACE_PERIOD = 60        # a trial silent this long is failed and retried with the same parameters
MAX_RETRY = 3            # how many times one trial's parameters are retried after worker deaths
BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS", "MIXER_NUM_THREADS")  # the last: mixer.model's own thread pool


class UsageError(Exception):
    """Bad usage or an unusable environment: printed on stderr, exit 2."""


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sweep.run`` (docker-compose.yml's worker command is checked by it)."""
    return _parser()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweep.run",
        description="Run an Optuna study of the NumPy Mixer described by one search-space YAML file, "
                    "tracked in MLflow. Running the same command again resumes the study. Values given "
                    "here override the file's.",
        epilog="Exit status: 0 done; 1 a failed run (no trial completed, a worker crashed, metrics not "
               "delivered to MLflow); 2 bad usage, a bad space file, an unreachable tracking server or "
               "storage; 130 interrupted (the running trials are re-run when the command is run again).",
    )
    p.add_argument("space", help="search-space YAML file (e.g. search_spaces/default.yaml)")
    p.add_argument("--n-trials", type=_positive_int, metavar="N",
                   help="the study's total number of trials (overrides budget.n_trials); trials "
                        "already in the study count, so a resumed study only runs the missing ones")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="start no new trial after S seconds of this command (overrides budget.timeout)")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="K",
                   help="worker processes on this machine sharing the study, each with cores/K BLAS "
                        "threads (default 1: train in this process)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: a journal file path, or an RDB URL such as "
                        "postgresql://user@host/db to share the study across machines "
                        "(default: <out>/<study>/optuna.journal)")
    p.add_argument("--study-name", metavar="NAME", help="study name (overrides the file's `study`)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (default: $MLFLOW_TRACKING_URI, "
                        "else the local store that `mlflow ui` opens)")
    p.add_argument("--out", default="runs", metavar="DIR",
                   help="output folder; the study's files go to DIR/<study>/ (default: runs)")
    p.add_argument("--seed", type=_nonnegative_int, metavar="S",
                   help="study seed (overrides the file's `seed`): trial seeds and the sampler's seed "
                        "derive from it")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow at all")
    # Internal: set by the parent process on the workers it starts ("<parent pid>:<index>").
    p.add_argument("--worker-of", help=argparse.SUPPRESS)
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 failed run, 2 bad usage/config, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        if args.worker_of:
            return _worker_main(args)
        return _main(args, argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any trial started: nothing to clean up
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        # main() may be called in-process (tests, notebooks): leave logging as it was.
        for h in list(root.handlers):
            root.removeHandler(h)
            if h not in saved[0]:
                h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        logging.captureWarnings(False)


# --------------------------------------------------------------------------------------------------
# Settings shared by the parent and its workers


class _Settings:
    """The space with the command line's overrides applied."""

    def __init__(self, args: argparse.Namespace):
        from sweep.space import SpaceError, load_space

        try:
            self.space = load_space(args.space)
        except SpaceError as exc:
            raise UsageError(str(exc)) from None
        s = self.space
        self.space_path = Path(args.space).resolve()
        self.study_name = args.study_name or s.study_name
        self.seed = s.seed if args.seed is None else args.seed
        # The sampler's base seed: the file's sampler.seed, else the study seed; --seed overrides both.
        self.sampler_seed = (s.sampler.seed if s.sampler.seed is not None and args.seed is None
                             else self.seed)
        self.n_trials = args.n_trials if args.n_trials is not None else s.n_trials
        self.timeout = args.timeout if args.timeout is not None else s.timeout
        if self.n_trials is None and self.timeout is None:
            raise UsageError(f"{args.space}: budget: set budget.n_trials or budget.timeout "
                             f"(or --n-trials / --timeout)")
        self.out_dir = Path(args.out).resolve() / self.study_name
        self.tracking = not args.no_tracking
        self.tracking_uri = args.tracking_uri
        self.experiment = s.experiment or self.study_name
        if args.storage:
            self.storage = args.storage
            self.rdb = "://" in args.storage
            if not self.rdb:
                self.storage = str(Path(args.storage).resolve())
        else:
            self.storage, self.rdb = str(self.out_dir / "optuna.journal"), False
        if self.storage.startswith("sqlite") and args.workers > 1:
            raise UsageError("SQLite does not take concurrent writers well: use the default journal "
                             "file or PostgreSQL with --workers > 1")


# --------------------------------------------------------------------------------------------------
# Storage, study, budget


def _quiet_optuna() -> None:
    import optuna

    # Optuna's own log lines ("Trial 3 finished ...") would garble the progress display: they go to
    # the study's log file through the root logger instead.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def open_storage(location: str, *, rdb: bool, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD, attempts: int = 6) -> Any:
    """An Optuna storage: a journal file at ``location``, or an RDB URL with heartbeats and retries.

    Raises:
        UsageError: the storage cannot be opened (naming it).
    """
    import optuna

    if not rdb:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        Path(location).parent.mkdir(parents=True, exist_ok=True)
        # The open(O_EXCL) lock is what local processes on one file system need.
        return JournalStorage(JournalFileBackend(location, lock_obj=JournalFileOpenLock(location)))

    import sqlalchemy.exc
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from sweep.storage import ResilientRDBStorage

    url = sqlalchemy_url(location)
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                return ResilientRDBStorage(
                    url, engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Two workers creating the tables at once: one wins, the other retries and finds them.
            last = exc
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError,
                ValueError) as exc:
            raise UsageError(f"cannot open storage {_redact(location)}: {_first_line(exc)}") from None
    raise UsageError(f"cannot open storage {_redact(location)}: {_first_line(last)}")


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; this project ships psycopg2.
    """
    import importlib.util

    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme) and importlib.util.find_spec("psycopg") is None \
                and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


def _redact(url: str) -> str:
    import re

    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else repr(exc)


def open_study(storage: Any, name: str, *, direction: str, sampler: Any, pruner: Any,
               attempts: int = 8) -> tuple[Any, bool]:
    """Create the study or join it; returns (study, created_here). Safe when workers race."""
    import optuna
    import sqlalchemy.exc

    last: Exception | None = None
    for attempt in range(attempts):
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction=direction,
                                        sampler=sampler, pruner=pruner)
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            pass
        except sqlalchemy.exc.IntegrityError as exc:
            last = exc
        try:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), False
        except KeyError as exc:  # created by someone else, not yet visible: try again
            last = exc
        time.sleep(0.1 * (attempt + 1))
    raise UsageError(f"could not create or load study {name!r}: {last}")


def budget_used(trials: list[Any]) -> int:
    """Trials that count against n_trials: with a result, or running now (see the module doc)."""
    from optuna.trial import TrialState

    from sweep.objective import STATUS_COUNTS

    n = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            n += 1
        elif t.state == TrialState.FAIL and STATUS_COUNTS.get(t.user_attrs.get("status"), False):
            n += 1
    return n


class _NoLock:
    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class _FileLock(_NoLock):
    """An exclusive flock on a file beside the journal (local processes)."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.held = False

    def acquire(self) -> None:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        import fcntl

        if self.held:
            self.held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        os.close(self._fd)


class _PgLock(_NoLock):
    """A PostgreSQL session advisory lock keyed by the study name (workers on many machines).

    The lock lives as long as its connection: if the database restarts, the server has already let
    go of it, so ``release`` has nothing to do and ``acquire`` reconnects (retrying, with backoff, for
    as long as ``sweep.storage`` retries any storage operation).
    """

    def __init__(self, engine: Any, name: str):
        self._key = int.from_bytes(hashlib.sha1(f"mixer-sweep:{name}".encode()).digest()[:8], "big",
                                   signed=True)
        self._engine = engine
        self._conn: Any = None
        self.held = False

    def acquire(self) -> None:
        from sweep.storage import call_retrying

        def lock() -> None:
            if self._conn is None:
                self._conn = self._engine.connect()
            self._conn.exec_driver_sql(f"SELECT pg_advisory_lock({self._key})")

        call_retrying(lock, what="the budget lock", on_retry=self._drop)
        self.held = True

    def release(self) -> None:
        from sweep.storage import is_disconnect

        if self.held:
            self.held = False
            try:
                self._conn.exec_driver_sql(f"SELECT pg_advisory_unlock({self._key})")
            except Exception as exc:
                if not is_disconnect(exc):
                    raise
                self._drop()  # the lock went with the connection

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()


def _budget_lock(storage: Any, settings: _Settings) -> _NoLock:
    if not settings.rdb:
        return _FileLock(settings.storage + ".budget.lock")
    engine = getattr(storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        return _PgLock(engine, settings.study_name)
    return _NoLock()


def _enqueue_retry(study: Any, trial: Any) -> None:
    """Queue ``trial``'s parameters and seed again (as Optuna's RetryHeartbeatStaleTrialCallback)."""
    import optuna

    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"seed": trial.user_attrs["seed"]} if "seed" in trial.user_attrs else {},
        system_attrs={"failed_trial": history[0], "retry_history": history},
    ))


def _reap_dead_local_trials(study: Any) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker process on this host no longer exists.

    Journal storage has no heartbeat; a worker killed hard (SIGKILL, power loss) leaves its trial
    RUNNING. Every trial records ``worker`` = host:pid when it starts.
    """
    import datetime

    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None:
            # Died between asking for the trial and starting it: only trust this when it is old.
            started = t.datetime_start or datetime.datetime.now()
            if (datetime.datetime.now() - started).total_seconds() < 600:
                continue
        else:
            w_host, _, pid = worker.rpartition(":")
            if w_host != host or _pid_alive(int(pid)):
                continue
        trial = optuna.trial.Trial(study, t._trial_id)
        trial.set_user_attr("status", "lost")
        trial.set_user_attr("reason", f"worker {worker} died while running it")
        study.tell(t.number, state=TrialState.FAIL)
        _enqueue_retry(study, study.get_trials(deepcopy=False)[t.number])
        reaped.append(t.number)
    return reaped


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_trials(study: Any, objective: Any, *, n_trials: int | None, timeout: float | None,
               lock: _NoLock, interrupts: Any, after_trial: Any = None, keep_going: Any = None,
               on_stale: Any = None) -> None:
    """Run trials of ``study`` until its budget is spent, ``timeout`` passes or the grid is done.

    ``on_stale`` is called with the trials this worker found dead (stale heartbeat) and failed.

    Raises:
        KeyboardInterrupt: on Ctrl-C, after the running trial is marked failed and queued again.
    """
    import optuna

    from sweep.objective import TrialFailed

    started = time.monotonic()
    heartbeat_seconds = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
    heartbeat = heartbeat_seconds is not None
    handled: set[int] = set()

    def objective_unlocked(trial: Any) -> float:
        lock.release()  # the trial exists now, so the count is right for the next worker
        return objective(trial)

    while True:
        interrupts.check()
        if timeout is not None and time.monotonic() - started >= timeout:
            break
        if keep_going is not None and not keep_going():
            break
        lock.acquire()
        wait_for_others = False
        try:
            if heartbeat:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            if heartbeat and on_stale is not None:
                # Failed while its status still says running: its worker died.
                stale = [t for t in trials if t.state == optuna.trial.TrialState.FAIL
                         and t.user_attrs.get("status") in (None, "running") and t.number not in handled]
                handled.update(t.number for t in stale)
                if stale:
                    on_stale(stale)
            if n_trials is not None and budget_used(trials) >= n_trials:
                if not (heartbeat and any(t.state == optuna.trial.TrialState.RUNNING for t in trials)):
                    break
                # Trials of other workers still run. If one of those workers has died, its heartbeat
                # goes stale, fail_stale_trials fails the trial and queues a retry, which frees budget
                # for this worker to run it: so stay until every counted trial has a result.
                wait_for_others = True
            else:
                sampler = study.sampler
                if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
                    break
                try:
                    study.optimize(objective_unlocked, n_trials=1, catch=(TrialFailed,))
                except KeyboardInterrupt:
                    number = getattr(objective, "interrupted_trial", None)
                    if number is not None:
                        with contextlib.suppress(Exception):
                            _enqueue_retry(study, study.get_trials(deepcopy=False)[number])
                    raise
        finally:
            lock.release()
        if wait_for_others:
            time.sleep(min(heartbeat_seconds, 2.0))  # poll: a finished study should end promptly
            continue
        if after_trial is not None:
            after_trial()


def _fail_lost_runs(tracker: Any, settings: _Settings) -> Any:
    """A callback marking the MLflow runs of trials whose worker died FAILED, with the reason.

    The dead worker cannot close its own run; the worker that finds the stale heartbeat does.
    """
    if tracker is None:
        return None

    def fail(trials: list[Any]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracker.uri)
        for t in trials:
            run_id = t.user_attrs.get("mlflow_run_id")
            if not run_id:
                continue
            reason = (f"worker {t.user_attrs.get('worker', '?')} stopped sending heartbeats; "
                      f"trial {t.number} was failed and queued again with the same parameters")
            try:
                client.set_tag(run_id, "failure_reason", reason)
                client.set_tag(run_id, "optuna_state", "FAIL")
                client.set_terminated(run_id, status="FAILED")
            except Exception as exc:  # noqa: BLE001 - the study goes on; the run stays as it was
                log.error("trial %d: could not mark its MLflow run failed: %s", t.number, exc)
            else:
                log.warning("trial %d: %s", t.number, reason)

    return fail


def _sampler_seed(base: int, n_existing: int, worker_index: int, *, shared: bool = False) -> int:
    """Different per worker and per resumption, so that no two processes draw the same sequence.

    On shared (RDB) storage, workers on other machines start at the same instant with the same
    ``n_existing`` and index, so each process adds a random salt: sampling is then not replayable,
    but every trial's seed still derives from the study seed and its number, so its curve is.
    """
    import numpy as np

    salt = [int.from_bytes(os.urandom(4), "little")] if shared else []
    return int(np.random.SeedSequence([base, n_existing, worker_index, *salt]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------
# Tracking: every call to sweep.tracking lives here and in sweep.objective (start_trial, log_epoch, end).


def _make_tracker(settings: _Settings) -> Any:
    if not settings.tracking:
        return None
    try:
        from sweep.tracking import Tracker, TrackingUnavailable
    except ImportError as exc:
        raise UsageError(f"MLflow tracking is not available ({exc}); run with --no-tracking") from None
    import mlflow  # noqa: F401 - imported here so that its log handlers can be taken over first

    _strip_foreign_handlers()
    try:
        tracker = Tracker(settings.tracking_uri, settings.experiment)
        tracker.check_reachable()
    except TrackingUnavailable as exc:
        raise UsageError(f"MLflow tracking: {exc} (start the server, pass --tracking-uri, "
                         f"or run with --no-tracking)") from None
    return tracker


def _close_tracker(tracker: Any) -> int:
    """Flush; returns the number of metric points not delivered."""
    if tracker is None:
        return 0
    try:
        if tracker.deferred_pngs:
            print(f"drawing the curves PNGs of {tracker.deferred_pngs} short trial(s) for MLflow ...",
                  file=sys.stderr, flush=True)
        return int(tracker.close() or 0)
    except Exception as exc:  # noqa: BLE001
        log.error("closing the tracker failed: %s", exc)
        return 1


# --------------------------------------------------------------------------------------------------
# Logging and progress


def _log_to(target: TextIO | Path | None) -> None:
    """Send the process's log records (ours, Optuna's, MLflow's, warnings) to one place.

    ``None`` holds them in memory until a later call names the file (the output folder must not be
    created before the space is validated and tracking is reachable).
    """
    import logging.handlers

    root = logging.getLogger()
    held = [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    handler: logging.Handler
    if target is None:
        handler = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    elif isinstance(target, Path):
        handler = logging.FileHandler(target)
    else:
        handler = logging.StreamHandler(target)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in held:
        if target is not None:
            h.setTarget(handler)
            h.flush()
        h.close()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _strip_foreign_handlers()


def _strip_foreign_handlers() -> None:
    # MLflow installs its own stderr handlers when imported: they would write under the progress line.
    for name in ("mlflow", "alembic", "urllib3", "optuna"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_value(v: float | None) -> str:
    return "-" if v is None else f"{v:.5g}"


class Progress:
    """Trials finished / pruned / failed, best value, elapsed time — on stderr.

    On a terminal: one line rewritten in place (failures printed above it). Otherwise: one line per
    finished trial, so logs and CI output stay readable.
    """

    def __init__(self, stream: TextIO, *, study: str, total: int | None, metric: str, direction: str,
                 tty: bool | None = None):
        self.stream = stream
        self.study = study
        self.total = total
        self.metric = metric
        self.direction = direction
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.seen: set[int] = set()
        self.best: tuple[float, int] | None = None
        self.counts = {"completed": 0, "pruned": 0, "failed": 0}
        self.done = 0
        self.running = ""
        self._line_shown = False

    def prime(self, trials: list[Any]) -> None:
        """Count the trials a resumed study already has, without a line for each."""
        self._absorb(trials, announce=False)

    def update(self, trials: list[Any]) -> None:
        self._absorb(trials, announce=True)
        self._draw()

    def epoch(self, number: int, m: Any, epochs: int) -> None:
        value = _fmt_value(getattr(m, self.metric))
        self.running = f"trial {number} epoch {m.epoch}/{epochs} {self.metric} {value}"
        if self.tty:
            self._draw()

    def message(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)
        self._draw()

    def close(self) -> None:
        if self.tty and self._line_shown:
            print(file=self.stream, flush=True)
            self._line_shown = False

    # ---------------------------------------------------------------------------------------------
    def _absorb(self, trials: list[Any], *, announce: bool) -> None:
        from optuna.trial import TrialState

        from sweep.objective import STATUS_COUNTS

        for t in trials:
            if t.number in self.seen or not t.state.is_finished():
                continue
            self.seen.add(t.number)
            key = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned"}.get(t.state, "failed")
            self.counts[key] += 1
            status = t.user_attrs.get("status")
            if t.state != TrialState.FAIL or STATUS_COUNTS.get(status, False):
                self.done += 1
            new_best = False
            if t.state == TrialState.COMPLETE and t.value is not None:
                better = (self.best is None or (t.value < self.best[0] if self.direction == "minimize"
                                                else t.value > self.best[0]))
                if better:
                    self.best, new_best = (t.value, t.number), True
            if announce:
                self.running = ""
                line = self._trial_line(t, key, new_best)
                if not self.tty:
                    print(f"{line} | {self._status()}", file=self.stream, flush=True)
                elif key == "failed" or new_best:
                    self.message(line)

    def _trial_line(self, t: Any, key: str, new_best: bool) -> str:
        if key == "completed":
            return f"trial {t.number} completed: {self.metric} {_fmt_value(t.value)}" + (
                " (new best)" if new_best else "")
        if key == "pruned":
            epoch = t.user_attrs.get("pruned_epoch")
            last = t.value if t.value is not None else None
            return f"trial {t.number} pruned at epoch {epoch} ({self.metric} {_fmt_value(last)})"
        status = t.user_attrs.get("status") or "failed"
        reason = t.user_attrs.get("reason") or "no reason recorded"
        return f"trial {t.number} failed: {status}: {reason}"

    def _status(self) -> str:
        total = "?" if self.total is None else str(self.total)
        best = ("-" if self.best is None
                else f"{_fmt_value(self.best[0])} (trial {self.best[1]})")
        c = self.counts
        return (f"{self.study}: {self.done}/{total} trials · {c['completed']} completed · "
                f"{c['pruned']} pruned · {c['failed']} failed · best {self.metric} {best} · "
                f"{_fmt_time(time.monotonic() - self.started)}")

    def _clear(self) -> None:
        if self.tty and self._line_shown:
            self.stream.write("\r\x1b[K")
            self._line_shown = False

    def _draw(self) -> None:
        if not self.tty:
            return
        import shutil

        text = self._status() + (f" · {self.running}" if self.running else "")
        # A wrapped line cannot be rewritten in place: keep it within the terminal's width.
        text = text[:max(20, shutil.get_terminal_size().columns - 1)]
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._line_shown = True


# --------------------------------------------------------------------------------------------------
# The parent process


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    settings = _Settings(args)
    space = settings.space
    _log_to(None)
    tracker = _make_tracker(settings)  # before anything is created: an unreachable server exits 2

    _quiet_optuna()

    from sweep.objective import Interrupts, Objective

    storage = open_storage(settings.storage, rdb=settings.rdb)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    _log_to(settings.out_dir / "sweep.log")
    study, created = open_study(storage, settings.study_name, direction=space.direction,
                                sampler=space.build_sampler(seed=settings.sampler_seed),
                                pruner=space.build_pruner())
    _check_or_record_study(study, created, settings)
    if created:
        for params in space.enqueue:
            study.enqueue_trial(params)
    reaped = [] if settings.rdb else _reap_dead_local_trials(study)
    existing = study.get_trials(deepcopy=False)
    study.sampler = space.build_sampler(seed=_sampler_seed(settings.sampler_seed, len(existing), 0,
                                                           shared=settings.rdb))
    if tracker is not None:
        tracker.ensure_parent_run(study)

    progress = Progress(sys.stderr, study=settings.study_name, total=settings.n_trials,
                        metric=space.metric, direction=space.direction)
    progress.prime(existing)
    where = settings.storage if not settings.rdb else _redact(settings.storage)
    already = budget_used([t for t in existing if t.state.is_finished()])
    verb = f"resuming ({already} trials done)" if not created else "new study"
    budget = (f"{settings.n_trials} trials" if settings.n_trials else "no trial limit") + (
        f", timeout {settings.timeout:g} s" if settings.timeout else "")
    progress.message(f"study {settings.study_name}: {verb}; {budget}; {args.workers} worker(s); "
                     f"storage {where}; log {settings.out_dir / 'sweep.log'}")
    if reaped:
        progress.message(f"trials {reaped} were left running by a dead worker: "
                         f"marked failed and queued again")

    interrupted = False
    failures: list[str] = []
    tracking_errors = 0
    try:
        if args.workers == 1:
            interrupts = Interrupts()
            interrupts.install()
            objective = Objective(space, study_seed=settings.seed, tracker=tracker, interrupts=interrupts,
                                  on_epoch=progress.epoch)
            lock = _budget_lock(storage, settings)
            try:
                run_trials(study, objective, n_trials=settings.n_trials, timeout=settings.timeout,
                           lock=lock, interrupts=interrupts,
                           after_trial=lambda: progress.update(study.get_trials(deepcopy=False)),
                           on_stale=_fail_lost_runs(tracker, settings))
            finally:
                lock.close()
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            tracking_errors += objective.tracking_errors
        else:
            # The parent only reads the storage: a plain KeyboardInterrupt is safe anywhere. Install it
            # explicitly, since a shell starts background jobs with SIGINT ignored.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            interrupted, failures, errors = _run_workers(args, settings, study, progress)
            tracking_errors += errors
    except KeyboardInterrupt:
        interrupted = True
    progress.update(study.get_trials(deepcopy=False))
    progress.close()

    if interrupted:
        _close_tracker(tracker)
        cmd = shlex.join(["python", "-m", "sweep.run", *argv])
        print(f"interrupted: the running trial(s) were marked failed and will be re-run; the study is "
              f"saved in {where}. Resume with:\n  {cmd}", file=sys.stderr)
        return 130

    code = _report(study, settings)
    if _others_still_running(study):
        # Workers on other machines share this study: the last one to finish summarises it, so the
        # parent run is not closed early and the best model is not retrained once per worker.
        print("other workers are still running trials of this study; the last one to finish logs the "
              "study summary and publishes the best model", file=sys.stderr)
    else:
        if tracker is not None:
            print(f"logging the study summary to MLflow ({_redact(tracker.uri)}) ...", file=sys.stderr,
                  flush=True)
            try:
                tracker.finish_study(study, settings.out_dir)
            except Exception as exc:  # noqa: BLE001
                log.error("finishing the study's MLflow run failed: %s", exc)
                print(f"error: could not finish the study's MLflow run: {exc}", file=sys.stderr)
                code = 1
        code = max(code, _publish(study, settings, tracked=tracker is not None))
    undelivered = _close_tracker(tracker)
    if undelivered:
        print(f"error: {undelivered} metric points could not be delivered to MLflow", file=sys.stderr)
        code = 1
    if tracker is not None:
        from sweep.tracking import ui_hint

        if hint := ui_hint(tracker.uri, tracker.experiment_id):
            print(hint)
    if tracking_errors:
        print(f"error: {tracking_errors} MLflow calls failed (see {settings.out_dir / 'sweep.log'})",
              file=sys.stderr)
        code = 1
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
        code = 1
    return code


def _others_still_running(study: Any) -> bool:
    from optuna.trial import TrialState

    return any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in study.get_trials(deepcopy=False))


def _publish(study: Any, settings: _Settings, *, tracked: bool) -> int:
    """Retrain the best trial, save it as a model bundle and (if tracked) log it as an MLflow model."""
    from optuna.trial import TrialState

    from sweep.publish import PublishError, publish_best

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return 0
    print("retraining the best trial to ship it as a model ...", file=sys.stderr, flush=True)
    try:
        result = publish_best(study, tracking_uri=settings.tracking_uri,
                              out_dir=settings.out_dir, register_name=settings.space.register_model,
                              log_model=tracked)
    except PublishError as exc:
        print(f"error: the best model was not published: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def _check_or_record_study(study: Any, created: bool, settings: _Settings) -> None:
    """A resumed study must keep its seed, metric and direction; a new one records them."""
    space = settings.space
    mine = {"study_seed": settings.seed, "metric": space.metric, "direction": space.direction}
    if created:
        for key, value in mine.items():
            study.set_user_attr(key, value)
        study.set_user_attr("space_file", str(settings.space_path))
        return
    attrs = study.user_attrs
    if study.direction.name.lower() != space.direction:
        raise UsageError(f"study {settings.study_name!r} exists with direction "
                         f"{study.direction.name.lower()}, the space says {space.direction}: "
                         f"pass --study-name to start a new study")
    for key, value in mine.items():
        if key in attrs and attrs[key] != value:
            raise UsageError(f"study {settings.study_name!r} was created with {key}={attrs[key]!r}, "
                             f"this run asks for {key}={value!r}: pass --study-name to start a new study")


def _report(study: Any, settings: _Settings) -> int:
    """Print the best trial; write best_config.yaml and trials.csv. Returns the exit code."""
    import yaml
    from optuna.trial import TrialState

    from mixer.config import dump_run_config
    from sweep.space import split_flat

    out = settings.out_dir
    trials = study.get_trials(deepcopy=False)
    frame = study.trials_dataframe()
    # The per-epoch history and the full config stay in the storage: too wide for a table.
    frame = frame.drop(columns=[c for c in frame.columns if c in ("user_attrs_history", "user_attrs_config")])
    frame.to_csv(out / "trials.csv", index=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        print(f"no trial completed ({len(trials)} trials); see {out / 'trials.csv'}", file=sys.stderr)
        return 1
    best = study.best_trial
    data, train = split_flat(best.user_attrs["config"])
    doc = dump_run_config(data, train, int(best.user_attrs["seed"]))
    header = (f"# Best trial {best.number} of study {settings.study_name}: "
              f"{settings.space.metric} {best.value:.6g}\n"
              f"# Train it again: python -m mixer.train {out / 'best_config.yaml'}\n")
    (out / "best_config.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))
    print(f"best trial {best.number}: {settings.space.metric} {best.value:.6g}")
    for name, value in best.params.items():
        print(f"  {name}: {value:.6g}" if isinstance(value, float) else f"  {name}: {value}")
    print(f"wrote {out / 'best_config.yaml'} and {out / 'trials.csv'}")
    return 0


# --------------------------------------------------------------------------------------------------
# Worker processes


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run_workers(args: argparse.Namespace, settings: _Settings, study: Any,
                 progress: Progress) -> tuple[bool, list[str], int]:
    """Start K workers, show progress until they end. Returns (interrupted, failures, tracking errors)."""
    k = args.workers
    threads = max(1, _cores() // k)
    env = dict(os.environ, **{var: str(threads) for var in BLAS_VARS})
    workdir = settings.out_dir / "workers"
    workdir.mkdir(exist_ok=True)
    started = time.monotonic()
    base = [sys.executable, "-m", "sweep.run", str(settings.space_path), "--workers", "1",
            "--storage", settings.storage, "--study-name", settings.study_name,
            "--out", str(settings.out_dir.parent)]
    if args.seed is not None:  # else the workers read the file's seeds, as this process did
        base += ["--seed", str(args.seed)]
    if settings.n_trials is not None:
        base += ["--n-trials", str(settings.n_trials)]
    if settings.timeout is not None:
        base += ["--timeout", str(settings.timeout)]
    base += ["--no-tracking"] if not settings.tracking else (
        ["--tracking-uri", settings.tracking_uri] if settings.tracking_uri else [])
    procs: list[subprocess.Popen] = []
    logs = []
    for i in range(k):
        (workdir / f"worker-{i}.json").unlink(missing_ok=True)
        logf = open(workdir / f"worker-{i}.log", "ab")
        logs.append(logf)
        # Own session: a terminal's Ctrl-C reaches only the parent, which forwards it exactly once.
        procs.append(subprocess.Popen([*base, "--worker-of", f"{os.getpid()}:{i}"], env=env,
                                      stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                      start_new_session=True))
    log.info("started %d workers with %d BLAS threads each: %s", k, threads, [p.pid for p in procs])
    progress.message(f"{k} workers × {threads} BLAS thread(s); their logs: {workdir}/worker-*.log")
    interrupted = False
    try:
        while any(p.poll() is None for p in procs):
            progress.update(study.get_trials(deepcopy=False))
            time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        progress.message("interrupt: stopping the workers (their running trials are marked failed)...")
        _stop_workers(procs)
    finally:
        for f in logs:
            f.close()
    failures: list[str] = []
    tracking_errors = 0
    for i, p in enumerate(procs):
        summary_path = workdir / f"worker-{i}.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        tracking_errors += int(summary.get("tracking_errors", 0)) + int(summary.get("undelivered", 0))
        if p.returncode == 130:
            interrupted = True
        elif p.returncode not in (0, None) and not interrupted:
            failures.append(f"worker {i} exited with code {p.returncode} (see {workdir}/worker-{i}.log)")
    log.info("workers done after %.1f s: exit codes %s", time.monotonic() - started,
             [p.returncode for p in procs])
    return interrupted, failures, tracking_errors


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    try:
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: stop waiting politely
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def _worker_main(args: argparse.Namespace) -> int:
    """One worker started by ``_run_workers``: trials until the study's budget is spent."""
    from sweep.objective import Interrupts

    interrupts = Interrupts()
    interrupts.install()
    parent_text, _, index_text = args.worker_of.partition(":")
    parent, index = int(parent_text), int(index_text or 0)
    settings = _Settings(args)
    _log_to(sys.stderr)
    log.info("worker %d of parent %d: %s", index, parent,
             " ".join(f"{v}={os.environ.get(v, '')}" for v in BLAS_VARS))
    _quiet_optuna()
    from sweep.objective import Objective

    tracker = None
    if settings.tracking:
        from sweep.tracking import Tracker

        tracker = Tracker(settings.tracking_uri, settings.experiment)
        _strip_foreign_handlers()  # importing MLflow installed its own handlers
    storage = open_storage(settings.storage, rdb=settings.rdb)
    study, _ = open_study(storage, settings.study_name, direction=settings.space.direction,
                          sampler=None, pruner=settings.space.build_pruner())
    study.sampler = settings.space.build_sampler(
        seed=_sampler_seed(settings.sampler_seed, len(study.get_trials(deepcopy=False)), index + 1,
                           shared=settings.rdb))
    if tracker is not None:
        tracker.ensure_parent_run(study)
    objective = Objective(settings.space, study_seed=settings.seed, tracker=tracker, interrupts=interrupts)
    lock = _budget_lock(storage, settings)
    code = 0
    try:
        run_trials(study, objective, n_trials=settings.n_trials, timeout=settings.timeout, lock=lock,
                   interrupts=interrupts, keep_going=lambda: os.getppid() == parent,
                   on_stale=_fail_lost_runs(tracker, settings))
    except KeyboardInterrupt:
        log.info("interrupted")
        code = 130
    finally:
        lock.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the bookkeeping below undisturbed
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        undelivered = _close_tracker(tracker)
        summary = {"undelivered": undelivered, "tracking_errors": objective.tracking_errors}
        (settings.out_dir / "workers" / f"worker-{index}.json").write_text(json.dumps(summary))
    if code == 0 and (undelivered or objective.tracking_errors):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
