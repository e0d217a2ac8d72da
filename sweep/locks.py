"""The one lock that every process working on a study shares, through the study's own storage (which
kind for which storage: docs/architecture.md, "The study budget"). ``study_lock``: purposes never block
each other. ``file_lock(path)``: the ``flock`` a journal gets, on any other file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from typing import Any

__all__ = ["file_lock", "study_lock"]

PURPOSES = ("budget", "parent", "publish")

_process_locks: dict[tuple[str, str], threading.Lock] = {}
_process_locks_guard = threading.Lock()


class _Lock:
    """``acquire``/``release`` (each subclass's), ``close`` and ``with`` support."""

    def close(self) -> None:
        self.release()

    def __enter__(self) -> _Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _ProcessLock(_Lock):
    def __init__(self, key: tuple[str, str]):
        with _process_locks_guard:
            self._lock = _process_locks.setdefault(key, threading.Lock())
        self._held = False

    def acquire(self) -> None:
        self._lock.acquire()
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


class _FileLock(_Lock):
    """An exclusive ``flock`` on a file beside the journal; a thread lock serialises this process."""

    def __init__(self, path: str):
        self._path = path
        self._threads = _ProcessLock(("file", path))
        self._fd: int | None = None

    def acquire(self) -> None:
        self._threads.acquire()
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        self._threads.release()  # a no-op unless this lock holds it


class _PgLock(_Lock):
    """A PostgreSQL session advisory lock on its own connection."""

    def __init__(self, engine: Any, key: int):
        self._engine = engine
        self._key = key
        self._conn: Any = None
        self._held = False

    def acquire(self) -> None:
        from sweep.storage import call_retrying

        def lock() -> None:
            if self._conn is None:
                self._conn = self._engine.connect()
            self._conn.exec_driver_sql(f"SELECT pg_advisory_lock({self._key})")
            self._conn.commit()

        call_retrying(lock, what="the study lock", on_retry=self._drop)
        self._held = True

    def release(self) -> None:
        from sweep.storage import is_disconnect

        if not self._held:
            return
        self._held = False
        try:
            self._conn.exec_driver_sql(f"SELECT pg_advisory_unlock({self._key})")
            self._conn.commit()
        except Exception as exc:
            if not is_disconnect(exc):
                raise
            self._drop()  # the lock went with the connection

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None


def file_lock(path: str) -> _Lock:
    """An exclusive ``flock`` on ``path`` (created if missing), for local processes sharing a file."""
    return _FileLock(path)


def study_lock(storage: Any, study_name: str, purpose: str) -> _Lock:
    """The lock for ``purpose`` (one of ``PURPOSES``) on ``study_name`` in an Optuna storage or study."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose=}")
    storage = getattr(storage, "_storage", storage)       # an optuna.Study
    storage = getattr(storage, "_backend", storage)       # RDB storage behind Optuna's cache
    file_path = getattr(storage, "_file_path", None)      # JournalStorage -> JournalFileBackend
    if file_path is not None:
        return _FileLock(f"{file_path}.{purpose}.lock")
    engine = getattr(storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        digest = hashlib.sha256(f"mixer-sweep:{purpose}:{study_name}".encode()).digest()
        return _PgLock(engine, int.from_bytes(digest[:8], "big", signed=True))
    return _ProcessLock((purpose, f"{id(storage)}:{study_name}"))
