"""Optuna RDB storage that rides out a database restart: an operation that lost its connection is
retried, other errors at once (why, and the limit: docs/architecture.md, "Why the RDB storage is wrapped")."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage

from sweep.messages import one_line

__all__ = ["ResilientRDBStorage", "call_retrying", "is_disconnect"]

log = logging.getLogger("sweep")

F = TypeVar("F", bound=Callable[..., Any])

RETRY_SECONDS = 180.0  # how long one operation keeps retrying before the error is raised
_FIRST_DELAY = 0.25
_MAX_DELAY = 5.0


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the database connection was lost or refused."""
    import sqlalchemy.exc

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True  # connection refused, server closed the connection, admin shutdown
        if type(e).__name__ in ("OperationalError", "InterfaceError") and \
                type(e).__module__.split(".")[0] in ("psycopg2", "psycopg"):
            return True
        e = e.__cause__ or e.__context__
    return False


def call_retrying(fn: Callable[[], Any], *, what: str, retry_seconds: float = RETRY_SECONDS,
                  on_retry: Callable[[], None] | None = None) -> Any:
    """``fn()``, called again with backoff while it fails because the database connection was lost
    (for up to ``retry_seconds``; other errors are raised). ``on_retry`` runs before each new attempt
    (to drop the dead connection); ``what`` names the operation in the warnings."""
    deadline: float | None = None
    delay = _FIRST_DELAY
    while True:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a lost connection
            if not is_disconnect(exc):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + retry_seconds
                log.warning("storage: lost the database connection in %s (%s); retrying for up to "
                            "%.0f s", what, _cause(exc), retry_seconds)
            if now + delay > deadline:
                raise
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY)
            continue
        if deadline is not None:
            log.warning("storage: reconnected (%s)", what)
        return result


def _retrying(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return call_retrying(lambda: method(self, *args, **kwargs), what=method.__name__,
                             retry_seconds=self.retry_seconds, on_retry=self._reset_connections)

    return wrapper  # type: ignore[return-value]


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return one_line(exc)


class ResilientRDBStorage(RDBStorage):
    """``RDBStorage`` whose operations retry a lost connection for up to ``retry_seconds``, then raise."""

    def __init__(self, *args: Any, retry_seconds: float = RETRY_SECONDS, **kwargs: Any):
        if retry_seconds < 0:
            raise ValueError(f"retry_seconds must be >= 0, got {retry_seconds=}")
        self.retry_seconds = retry_seconds
        super().__init__(*args, **kwargs)

    def _reset_connections(self) -> None:
        # Drop this thread's session, whose connection may be the dead one. (SQLAlchemy invalidates
        # the pool's other connections when it sees a disconnect, and pre-ping tests each checkout.)
        with contextlib.suppress(Exception):  # best effort
            self.scoped_session.remove()

    def record_heartbeat(self, trial_id: int) -> None:
        # Runs in Optuna's heartbeat thread, where an exception ends the heartbeats for good.
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001
            if not is_disconnect(exc):
                raise
            log.warning("storage: heartbeat of trial id %d skipped, the database is unreachable (%s)",
                        trial_id, _cause(exc))
            self._reset_connections()

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        try:
            return self._set_trial_state_values(trial_id, state, values)
        except UpdateFinishedTrialError:
            # The first attempt was stored but its answer was lost, so the retry finds the trial
            # finished: in the same state, that is success.
            if self.get_trial(trial_id).state == state:
                return True
            raise

    @_retrying
    def _set_trial_state_values(self, trial_id: int, state: Any, values: Any) -> bool:
        return super().set_trial_state_values(trial_id, state, values)


# Every other operation a sweep makes while trials run, at the level where each opens its session:
# Optuna's cache (``_CachedStorage``, around every RDB storage) calls the private ones, which
# create_new_trial, set_trial_param, get_all_trials and get_best_trial only delegate to. (The tables
# and the study are created once, at start, under sweep.study.open_storage / open_study.)
for _name in (
    "create_new_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies", "_create_new_trial",
    "_set_trial_param", "get_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial", "_get_trials",
    "_get_best_trial_id", "_get_stale_trial_ids",
):
    setattr(ResilientRDBStorage, _name, _retrying(getattr(RDBStorage, _name)))
del _name
