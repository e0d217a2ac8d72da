"""Shared fixtures: a real `mlflow server`, the machine's PostgreSQL, the real data sample.

In CI (``REQUIRE_SERVICES=1``, set by ``.ci/run``) a missing PostgreSQL or real-data
file fails the tests that need them; elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = ROOT.parent / "shared" / "data" / "unsw-nb15" / "UNSWNB15_training_coursework.csv"
# psycopg2 spelled out: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which we do not ship.
PG_ADMIN_URL = os.environ.get("MIXER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"


def _missing(reason: str) -> None:
    """Skip on a user's machine, fail in CI where every service must be there."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (REQUIRE_SERVICES=1: CI must run this test)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, *, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 200, or raise naming the URL (and the process's exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_process_group(proc: subprocess.Popen, *, timeout: float = 20) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``), SIGKILL after
    ``timeout`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def psycopg2_url(url: str) -> str:
    """``url`` with the psycopg2 driver named (SQLAlchemy >= 2.1 maps postgresql:// to psycopg 3)."""
    return re.sub(r"^postgresql://", "postgresql+psycopg2://", url)


class MlflowServer:
    """A real ``mlflow server`` on a loopback port, with a SQLite backend in ``root``."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # The server's background job runner costs ~30 CPU-seconds at start and we use no jobs.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        wait_http(f"{self.uri}/health", timeout=timeout, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            # gunicorn/uvicorn workers can linger after SIGTERM; nothing here needs a graceful exit.
            stop_process_group(self.proc, timeout=3)
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """One real MLflow tracking server for the whole test session (starting one is slow)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


def _pg_connect(url: str):
    try:
        import psycopg2
    except ImportError:
        _missing("psycopg2 is not installed")
    try:
        conn = psycopg2.connect(url, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001 - any connection failure means "no server"
        _missing(f"PostgreSQL is not reachable at {url}: {exc}".strip())
    conn.autocommit = True
    return conn


@pytest.fixture
def postgres_url() -> str:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"mixer_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_connect(PG_ADMIN_URL)
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
    yield f"{base}/{name}"
    # A fresh connection: a test may have restarted the server in between.
    admin = _pg_connect(PG_ADMIN_URL)
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture(scope="session")
def real_csv() -> Path:
    """The 20,000-row UNSW-NB15 sample that lives beside the project, never inside it."""
    if not REAL_CSV.is_file():
        _missing(f"real data sample not found at {REAL_CSV}")
    return REAL_CSV


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test inside an empty folder (the local MLflow store and outputs land there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def which_or_skip(cmd: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        _missing(f"{cmd} not on PATH")
    return path
