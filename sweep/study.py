"""A study in its storage: open the storage, create or join the study, spend its budget, retry lost trials
(docs/architecture.md: "Journal file storage by default", "PostgreSQL for teams", "The study budget")."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweep.messages import UsageError, one_line, redact

__all__ = ["budget_used", "enqueue_retry", "fail_lost_runs", "open_storage", "open_study",
           "reap_dead_local_trials", "run_trials", "sampler_seed", "sqlalchemy_url"]

log = logging.getLogger("sweep")

HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats (RDB storage)
GRACE_PERIOD = 60        # a trial silent this long is failed and retried with the same parameters
MAX_RETRY = 3            # how many times one trial's parameters are retried after worker deaths
UNSTARTED_GRACE = 600    # seconds before a RUNNING trial that never recorded its worker counts as lost


def quiet_optuna() -> None:
    """Send Optuna's log lines ("Trial 3 finished ...") to the root logger, not to stderr."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` with the installed driver: SQLAlchemy 2.1 maps it to psycopg 3, we ship psycopg2."""
    if url.startswith(("postgresql://", "postgres://")) and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.partition("://")[2]
    return url


def open_storage(location: str, *, rdb: bool | None = None, heartbeat_interval: int | None = None,
                 grace_period: int | None = None) -> Any:
    """A journal file at ``location`` (its folder created), or if ``rdb`` (default: ``location`` has
    ``://``) an RDB URL, with heartbeats (defaults: ``HEARTBEAT_INTERVAL``, ``GRACE_PERIOD``, read when
    called) and retries. A UsageError names a storage that cannot be opened, password hidden."""
    import optuna

    if not (("://" in location) if rdb is None else rdb):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        Path(location).parent.mkdir(parents=True, exist_ok=True)
        # The open(O_EXCL) lock is what local processes on one file system need.
        lock = JournalFileOpenLock(location)
        lock.acquire()  # a worker appending now is not a torn record
        try:
            _repair_torn_journal(Path(location))
        finally:
            lock.release()
        return JournalStorage(JournalFileBackend(location, lock_obj=lock))

    import sqlalchemy.exc
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from sweep.storage import ResilientRDBStorage

    last: Exception | None = None
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                return ResilientRDBStorage(
                    sqlalchemy_url(location), engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_interval or HEARTBEAT_INTERVAL,
                    grace_period=grace_period or GRACE_PERIOD,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Two workers creating the tables at once: one wins, the other retries and finds them.
            last = exc
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError,
                ValueError) as exc:
            last = exc
            break
    raise UsageError(f"cannot open storage {redact(location)}: {one_line(last)}")


def _repair_torn_journal(path: Path) -> None:
    """Cut a journal back to its last complete record, keeping the torn one's file as a backup
    (a failed append leaves half a line, after which Optuna would never read the journal again)."""
    if not path.is_file() or not (size := path.stat().st_size):
        return
    start = max(0, size - (1 << 20))  # a record is far shorter than 1 MiB
    with open(path, "rb") as fh:
        fh.seek(start)
        tail = fh.read()
    last = tail.rfind(b"\n", 0, len(tail) - 1) + 1  # where the last line starts
    if tail.endswith(b"\n"):
        with contextlib.suppress(ValueError):  # a whole line that is not a record is torn as well
            json.loads(tail[last:])
            return
    keep = start + last
    backup = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copyfile(path, backup)
    os.truncate(path, keep)
    message = (f"{path} ended in a torn record ({size - keep} bytes, from a write that failed, e.g. "
               f"a full disk): cut back to the last complete record; the old file is kept as {backup}")
    log.warning("%s", message)
    print(f"warning: {message}", file=sys.stderr)


def open_study(storage: Any, name: str, *, direction: str, sampler: Any, pruner: Any) -> tuple[Any, bool]:
    """Create the study or join it; returns (study, created_here). Safe when workers race."""
    import optuna
    import sqlalchemy.exc

    last: KeyError | None = None
    for attempt in range(8):
        with contextlib.suppress(optuna.exceptions.DuplicatedStudyError, sqlalchemy.exc.IntegrityError):
            return optuna.create_study(storage=storage, study_name=name, direction=direction,
                                       sampler=sampler, pruner=pruner), True
        try:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), False
        except KeyError as exc:  # created by someone else, not yet visible: try again
            last = exc
        time.sleep(0.1 * (attempt + 1))
    raise UsageError(f"could not create or load study {name!r}: {one_line(last)}")


def sampler_seed(base: int, n_existing: int, worker_index: int, *, shared: bool = False) -> int:
    """Different per worker and per resumption. On ``shared`` (RDB) storage, workers on other machines
    may start with the same ``n_existing`` and index: a random salt makes sampling not replayable, but
    every trial's seed still derives from the study seed and its number, so its curve is."""
    import numpy as np

    salt = [int.from_bytes(os.urandom(4), "little")] if shared else []
    return int(np.random.SeedSequence([base, n_existing, worker_index, *salt]).generate_state(1)[0])


def budget_used(trials: list[Any]) -> int:
    """Trials that count against n_trials: with a result, or running now (docs/architecture.md)."""
    from optuna.trial import TrialState

    from sweep.objective import STATUS_COUNTS

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (t.state == TrialState.FAIL and STATUS_COUNTS.get(t.user_attrs.get("status"), False))
               for t in trials)


def run_trials(study: Any, objective: Any, *, n_trials: int | None, timeout: float | None,
               interrupts: Any, after_trial: Callable[[], None] | None = None,
               keep_going: Callable[[], bool] | None = None,
               on_stale: Callable[[list[Any]], None] | None = None) -> None:
    """Run trials of ``study`` until its budget is spent, ``timeout`` passes or the grid is done. The
    study's budget lock is held around "count, then start a trial"; ``after_trial()`` runs
    after each trial, ``keep_going()`` before each (False stops); ``on_stale`` gets the trials found
    dead (stale heartbeat). Ctrl-C fails and re-queues the running trial, then raises KeyboardInterrupt."""
    import optuna

    from sweep.locks import study_lock
    from sweep.objective import TrialFailed

    started = time.monotonic()
    heartbeat_seconds = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
    heartbeat = heartbeat_seconds is not None
    handled: set[int] = set()

    with contextlib.closing(study_lock(study, study.study_name, "budget")) as lock:
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
            try:
                if heartbeat:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)
                trials = study.get_trials(deepcopy=False)
                if heartbeat and on_stale is not None:
                    # Failed while its status still says running: its worker died.
                    stale = [t for t in trials if t.state == optuna.trial.TrialState.FAIL
                             and t.user_attrs.get("status") in (None, "running")
                             and t.number not in handled]
                    handled.update(t.number for t in stale)
                    if stale:
                        on_stale(stale)
                if n_trials is not None and budget_used(trials) >= n_trials:
                    if not (heartbeat and any(t.state == optuna.trial.TrialState.RUNNING for t in trials)):
                        break
                    # Trials of other workers still run. If one of those workers has died, its heartbeat
                    # goes stale, fail_stale_trials fails the trial and queues a retry, which frees
                    # budget for this worker to run it: so stay until every counted trial has a result.
                    lock.release()  # (the release below is then a no-op)
                    time.sleep(min(heartbeat_seconds, 2.0))  # poll: a finished study should end promptly
                    continue
                sampler = study.sampler
                if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
                    break
                try:
                    study.optimize(objective_unlocked, n_trials=1, catch=(TrialFailed,))
                except KeyboardInterrupt:
                    number = getattr(objective, "interrupted_trial", None)
                    if number is not None:
                        with contextlib.suppress(Exception):
                            enqueue_retry(study, study.get_trials(deepcopy=False)[number])
                    raise
            finally:
                lock.release()
            if after_trial is not None:
                after_trial()


def enqueue_retry(study: Any, trial: Any) -> None:
    """Queue ``trial``'s parameters and seed again (as Optuna's RetryHeartbeatStaleTrialCallback)."""
    import optuna

    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"seed": trial.user_attrs["seed"]} if "seed" in trial.user_attrs else {},
        system_attrs={"failed_trial": history[0], "retry_history": history},
    ))


def reap_dead_local_trials(study: Any) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker (``worker`` = host:pid) on this host is gone:
    a journal has no heartbeat, so a worker killed hard (SIGKILL, power loss) leaves its trial RUNNING."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None:
            # Died between asking for the trial and starting it: only trust this when it is old.
            started = t.datetime_start or datetime.datetime.now()
            if (datetime.datetime.now() - started).total_seconds() < UNSTARTED_GRACE:
                continue
        else:
            w_host, _, pid = worker.rpartition(":")
            if w_host != host or _pid_alive(int(pid)):
                continue
        trial = optuna.trial.Trial(study, t._trial_id)
        trial.set_user_attr("status", "lost")
        trial.set_user_attr("reason", f"worker {worker} died while running it")
        study.tell(t.number, state=TrialState.FAIL)
        enqueue_retry(study, study.get_trials(deepcopy=False)[t.number])
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


def fail_lost_runs(tracking_uri: str) -> Callable[[list[Any]], None]:
    """A ``run_trials(on_stale=...)`` callback: mark the MLflow runs of trials whose worker died FAILED
    (no ``Tracker`` owns them: the worker that finds the stale heartbeat uses a plain ``MlflowClient``)."""
    def fail(trials: list[Any]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
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
                log.error("trial %d: could not mark its MLflow run failed: %s", t.number, one_line(exc))
            else:
                log.warning("trial %d: %s", t.number, reason)

    return fail
