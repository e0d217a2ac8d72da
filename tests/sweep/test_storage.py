"""sweep.storage: which errors count as a lost connection, and that only those are retried.

The real thing, a PostgreSQL restart under running workers, is
tests/sweep/test_distributed.py::test_workers_reconnect_and_finish_the_study_after_postgresql_restarts.
"""

from __future__ import annotations

import time

import optuna
import pytest
import sqlalchemy.exc

from sweep.storage import ResilientRDBStorage, is_disconnect


def _wrapped(exc: BaseException) -> optuna.exceptions.StorageInternalError:
    """As RDBStorage raises it: StorageInternalError from the SQLAlchemy error."""
    try:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc
    except optuna.exceptions.StorageInternalError as outer:
        return outer


def test_lost_connections_are_recognised_through_optunas_wrapper():
    closed = sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))
    assert is_disconnect(closed)
    assert is_disconnect(_wrapped(closed))
    invalidated = sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert is_disconnect(_wrapped(invalidated))


def test_data_errors_are_not_taken_for_lost_connections():
    duplicate = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    assert not is_disconnect(_wrapped(duplicate))
    assert not is_disconnect(ValueError("bad value"))
    assert not is_disconnect(KeyError("no trial"))


def test_an_error_that_is_not_about_the_connection_is_raised_at_once(tmp_path):
    storage = ResilientRDBStorage(f"sqlite:///{tmp_path / 'o.db'}", retry_seconds=30)
    started = time.monotonic()
    with pytest.raises(KeyError):
        storage.get_trial(12345)  # no such trial: raised at once, not retried
    assert time.monotonic() - started < 5


def test_a_study_on_the_resilient_storage_works_as_on_optunas(tmp_path):
    storage = ResilientRDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(storage=storage, study_name="s", sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=3)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 3
    assert study.best_value == min(t.value for t in study.get_trials())


def test_retry_seconds_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="retry_seconds"):
        ResilientRDBStorage(f"sqlite:///{tmp_path / 'o.db'}", retry_seconds=-1)
