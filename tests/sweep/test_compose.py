"""docker-compose.yml stays honest without a Docker engine.

The file is read as Compose reads it (``${VAR:-default}`` interpolation), every command line is
checked by the parser of the program it runs (``sweep.run``'s argparse, ``mlflow server``'s click
command), and the topology itself — PostgreSQL with the init script's second database, ``mlflow
server`` with the compose file's own flags, two workers with the compose file's own command line —
runs natively on loopback to a finished study.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    PG_ADMIN_URL,
    ROOT,
    free_port,
    psycopg2_url,
    stop_process_group,
    wait_http,
    which_or_skip,
)

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "docker" / "mlflow.Dockerfile"
INIT_SCRIPT = ROOT / "docker" / "postgres-init" / "10-create-mlflow-db.sh"

# A study small enough for a test: synthetic rows, a one-block Mixer, two epochs per trial.
TINY_SPACE = """\
study: compose-native
seed: 0
data: {source: synthetic, n_rows: 400}
train: {epochs: 2, dim: 8, depth: 1, batch_size: 64}
sampler: {name: random}
pruner: {name: none}
budget: {n_trials: 6}
params:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  patch_size: {type: categorical, choices: [3, 7]}
"""


# --------------------------------------------------------------------------------------------------
# Reading the file as Compose does

_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$$``."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group("braced") if match.group("braced") is not None else match.group("bare")
        for sep, use_default_if_empty in ((":-", True), ("-", False)):
            name, found, default = expr.partition(sep)
            if found:
                value = env.get(name)
                if value is None or (use_default_if_empty and value == ""):
                    return default
                return value
        if expr not in env:
            raise KeyError(f"docker-compose.yml uses ${{{expr}}} without a default")
        return env[expr]

    return _VAR.sub(one, text)


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file with every variable resolved from ``env`` (default: the defaults alone)."""
    return _walk(yaml.safe_load(COMPOSE.read_text()), env or {})


def _option(argv: list[str], flag: str) -> str:
    """The value after ``flag`` in a command line (fails the test if absent)."""
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def _replace_option(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def _sweep_parser():
    """sweep.run's argparse parser, without running anything."""
    from sweep.run import build_parser

    return build_parser()


def _mlflow_server_context(args: list[str]):
    """Parse ``mlflow server`` arguments with MLflow's own click command (types and choices checked)."""
    from mlflow.cli import server

    return server.make_context("server", list(args))


# --------------------------------------------------------------------------------------------------
# The file itself


def test_compose_declares_postgres_mlflow_worker_and_named_volumes():
    c = load_compose()
    assert {"postgres", "mlflow", "worker"} <= set(c["services"])
    assert {"postgres-data", "mlflow-artifacts"} <= set(c["volumes"])
    # Every named volume a service mounts is declared at the top level (or Compose refuses to start).
    for name, svc in c["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in c["volumes"], f"service {name} mounts undeclared volume {source}"


def test_postgres_keeps_its_data_in_a_named_volume_and_checks_health_over_tcp():
    pg = load_compose()["services"]["postgres"]
    assert pg["image"].startswith("postgres:")
    assert "postgres-data:/var/lib/postgresql/data" in pg["volumes"]
    assert any(v.endswith(":/docker-entrypoint-initdb.d:ro") for v in pg["volumes"])
    test = pg["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready"
    # TCP, not the socket: the socket answers during init, before the second database exists.
    assert _option(test, "-h") == "127.0.0.1"


def test_mlflow_waits_for_healthy_postgres_serves_artifacts_and_publishes_port_5000():
    ml = load_compose()["services"]["mlflow"]
    assert ml["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert ml["build"]["dockerfile"] == "docker/mlflow.Dockerfile"
    argv = ml["command"]
    assert argv[:2] == ["mlflow", "server"]
    assert _option(argv, "--backend-store-uri").startswith("postgresql+psycopg2://")
    assert "--serve-artifacts" in argv
    dest = _option(argv, "--artifacts-destination")
    assert f"mlflow-artifacts:{dest}" in ml["volumes"]
    assert any(p.endswith(":5000:5000") or p == "5000:5000" for p in ml["ports"])
    assert "/health" in " ".join(ml["healthcheck"]["test"])


def test_mlflow_command_is_accepted_by_mlflow_server():
    argv = load_compose()["services"]["mlflow"]["command"]
    params = _mlflow_server_context(argv[2:]).params
    assert params["serve_artifacts"] is True
    assert params["port"] == 5000
    assert params["host"] == "0.0.0.0"
    # The workers reach the server as http://mlflow:5000: that Host header must be allowed.
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = [h.strip() for h in params["allowed_hosts"].split(",")]
    assert is_allowed_host_header(allowed, "mlflow:5000")
    assert is_allowed_host_header(allowed, "localhost:5000")
    assert is_allowed_host_header(allowed, "192.168.1.20:5000")  # a laptop on the LAN, by address
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_worker_waits_for_healthy_postgres_and_mlflow_and_is_built_from_the_project():
    w = load_compose()["services"]["worker"]
    assert w["depends_on"] == {"postgres": {"condition": "service_healthy"},
                               "mlflow": {"condition": "service_healthy"}}
    assert w["build"]["dockerfile"] == "docker/Dockerfile"
    # Scaling (`--scale worker=4`) needs generated names and no fixed host port.
    assert "container_name" not in w and "ports" not in w


def test_worker_command_is_accepted_by_the_sweep_cli():
    c = load_compose()
    argv = c["services"]["worker"]["command"]
    assert argv[:3] == ["python", "-m", "sweep.run"]
    args = _sweep_parser().parse_args(argv[3:])
    assert args.tracking_uri == "http://mlflow:5000"
    # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3; the images ship psycopg2.
    assert args.storage.startswith("postgresql+psycopg2://") and "@postgres:5432/" in args.storage
    # Optuna and MLflow both keep an alembic_version table: they need two databases.
    optuna_db = args.storage.rsplit("/", 1)[1]
    mlflow_db = _option(c["services"]["mlflow"]["command"], "--backend-store-uri").rsplit("/", 1)[1]
    assert optuna_db != mlflow_db
    assert c["services"]["postgres"]["environment"]["POSTGRES_DB"] == optuna_db
    assert c["services"]["postgres"]["environment"]["MLFLOW_DB"] == mlflow_db
    # The space the image runs by default is shipped and valid.
    from sweep.space import load_space

    load_space(ROOT / args.space)


def test_shipped_spaces_find_their_data_inside_the_worker_container():
    import posixpath

    w = load_compose()["services"]["worker"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in w["volumes"]}
    spaces_dir = "/app/search_spaces"
    assert mounts.get(spaces_dir) == "./search_spaces", "the worker mounts ./search_spaces"
    checked = 0
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        for key in ("train_csv", "test_csv"):
            if isinstance(data.get(key), str) and not data[key].startswith("/"):
                inside = posixpath.normpath(posixpath.join(spaces_dir, data[key]))
                assert any(inside.startswith(target.rstrip("/") + "/") for target in mounts), (
                    f"{path.name}: {key} is {inside} in the container, under no mounted folder")
                checked += 1
    assert checked, "at least one shipped space reads a CSV"


def test_credentials_come_from_the_environment_and_are_not_baked_into_images():
    text = COMPOSE.read_text()
    for var, default in (("POSTGRES_USER", "mixer"), ("POSTGRES_PASSWORD", "mixer")):
        assert f"${{{var}:-{default}}}" in text
    c = load_compose({"POSTGRES_USER": "alice", "POSTGRES_PASSWORD": "s3cret", "POSTGRES_DB": "opt"})
    assert c["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    storage = _option(c["services"]["worker"]["command"], "--storage")
    assert storage == "postgresql+psycopg2://alice:s3cret@postgres:5432/opt"
    backend = _option(c["services"]["mlflow"]["command"], "--backend-store-uri")
    assert backend.startswith("postgresql+psycopg2://alice:s3cret@postgres:5432/")
    for dockerfile in (DOCKERFILE, MLFLOW_DOCKERFILE):
        assert "POSTGRES_PASSWORD" not in dockerfile.read_text()
        assert "postgresql://" not in dockerfile.read_text()


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.rstrip("/")
        parts = Path(path).parts
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat.removeprefix("**/"))
                  or fnmatch.fnmatch(parts[i], pat.removeprefix("**/"))
                  for i in range(len(parts)))
        if hit:
            ignored = not negate
    return ignored


def test_worker_image_is_python_311_slim_non_root_and_copies_only_files_in_the_build_context():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert any(ln.startswith("FROM python:3.11-slim") for ln in lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"pip install [^\n]*\"\.", text), "the project itself is pip-installed"
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for ln in lines:
        if ln.startswith("COPY "):
            for src in [s for s in ln.split()[1:-1] if not s.startswith("--")]:
                assert (ROOT / src).exists(), f"docker/Dockerfile copies {src}, which does not exist"
                assert not _dockerignored(src.rstrip("/"), patterns), f".dockerignore excludes {src}"
    # Data and local state never enter the build context.
    for path in ("data/x.csv", "mlruns/0", ".git/HEAD", "runs/s/optuna.journal", "venv/bin/python"):
        assert _dockerignored(path, patterns), f"{path} would be sent to the Docker build"


def test_dashboard_is_optional_behind_a_profile():
    c = load_compose()
    dash = c["services"].get("optuna-dashboard")
    assert dash is not None and dash["profiles"] == ["dashboard"]
    assert dash["command"][0] == _option(c["services"]["worker"]["command"], "--storage")


# --------------------------------------------------------------------------------------------------
# The same topology, natively on loopback


@pytest.fixture
def mlflow_db_url(postgres_url):
    """The MLflow database, created beside ``postgres_url``'s by docker/postgres-init's script."""
    psql = which_or_skip("psql")
    base, optuna_db = postgres_url.rsplit("/", 1)
    name = f"{optuna_db}_mlflow"
    host = re.match(r"postgresql(?:\+\w+)?://(?:([^@:/]+)@)?([^:/]+)(?::(\d+))?", postgres_url)
    assert host is not None
    env = dict(os.environ, PGHOST=host.group(2), PGPORT=host.group(3) or "5432",
               POSTGRES_USER=host.group(1) or "postgres", POSTGRES_DB=optuna_db, MLFLOW_DB=name,
               PATH=f"{Path(psql).parent}:{os.environ['PATH']}")
    done = subprocess.run(["sh", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    yield psycopg2_url(f"{base}/{name}")
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL)  # libpq takes postgresql://, not the SQLAlchemy +psycopg2 form
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    conn.close()


def _http_status(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _job_runners(pgid: int) -> list[str]:
    """Command lines of the MLflow job runner's huey consumers in process group ``pgid``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # the process is gone
            continue
        if "huey" in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow  # most of it MLflow migrating its empty database
@pytest.mark.postgres
@pytest.mark.mlflow_server
def test_compose_topology_runs_natively_to_a_finished_study(postgres_url, mlflow_db_url, tmp_path,
                                                            monkeypatch):
    import optuna
    from mlflow import MlflowClient

    c = load_compose()
    svc = c["services"]
    # PostgreSQL's healthcheck, as the container runs it, against the local server.
    pg_check = svc["postgres"]["healthcheck"]["test"][1:]
    pg_check = _replace_option(pg_check, "-U", "postgres")
    pg_check = _replace_option(pg_check, "-d", postgres_url.rsplit("/", 1)[1])
    pg_check[0] = which_or_skip("pg_isready")
    assert subprocess.run(pg_check, capture_output=True, timeout=10).returncode == 0

    # The MLflow server with the compose file's flags; only where things live is substituted.
    port = free_port()
    server_argv = svc["mlflow"]["command"][2:]
    server_argv = _replace_option(server_argv, "--backend-store-uri", mlflow_db_url)
    server_argv = _replace_option(server_argv, "--artifacts-destination", str(tmp_path / "mlartifacts"))
    server_argv = _replace_option(server_argv, "--host", "127.0.0.1")
    server_argv = _replace_option(server_argv, "--port", str(port))
    server_argv = _replace_option(server_argv, "--workers", "1")  # two cores shared by the test suite
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow.log", "wb")
    server_env = {**os.environ, **svc["mlflow"]["environment"]}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *server_argv], env=server_env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        wait_http(f"{uri}/health", timeout=120, proc=server)
        server_seconds = time.monotonic() - t0
        # The compose file's environment turns the job runner off: no huey consumer processes.
        assert not _job_runners(server.pid), _job_runners(server.pid)
        # The container's healthcheck command, pointed at this port, passes.
        health = svc["mlflow"]["healthcheck"]["test"][1:]
        health = [a.replace("127.0.0.1:5000", f"127.0.0.1:{port}") for a in health]
        health[0] = sys.executable
        assert subprocess.run(health, capture_output=True, timeout=30).returncode == 0
        # --allowed-hosts: the workers' Host header passes, a foreign one is refused.
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _http_status(search, "mlflow:5000") == 200
        assert _http_status(search, "attacker.example") == 403

        space = tmp_path / "space.yaml"
        space.write_text(TINY_SPACE)
        budget = 6
        worker_argv = svc["worker"]["command"]
        worker_argv = [sys.executable, *worker_argv[1:3], str(space), *worker_argv[4:]]
        storage = psycopg2_url(postgres_url)
        worker_argv = _replace_option(worker_argv, "--storage", storage)
        worker_argv = _replace_option(worker_argv, "--tracking-uri", uri)
        worker_argv += ["--n-trials", str(budget), "--out", str(tmp_path / "runs")]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        started = time.monotonic()
        for i in range(2):
            out = open(tmp_path / f"worker-{i}.log", "wb")
            workers.append(subprocess.Popen(worker_argv, env=env, cwd=tmp_path, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True))
        for i, w in enumerate(workers):
            code = w.wait(timeout=240)
            assert code == 0, (f"worker {i} exited {code}: {shlex.join(worker_argv)}\n"
                               + (tmp_path / f"worker-{i}.log").read_text()[-3000:])
        elapsed = time.monotonic() - started

        study = optuna.load_study(study_name="compose-native", storage=storage)
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                     optuna.trial.TrialState.PRUNED)]
        assert len(finished) == budget, [(t.number, t.state) for t in trials]
        assert len({t.number for t in trials}) == len(trials)

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow-artifacts:/ URIs resolve through it
        client = MlflowClient(uri)
        parent_id = study.user_attrs["mlflow_parent_run_id"]
        exp_id = study.user_attrs["mlflow_experiment_id"]
        runs = client.search_runs([exp_id], max_results=1000)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert [r.info.run_id for r in parents] == [parent_id]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
        assert len(children) == len(runs) - 1, "every other run hangs under the one parent"
        assert sorted(r.info.run_name for r in children) == sorted(f"trial-{t.number}" for t in finished)
        assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
        # Artifacts went through the server (--serve-artifacts) into its artifacts destination.
        one = children[0]
        assert one.info.artifact_uri.startswith("mlflow-artifacts:")
        assert "config.yaml" in {f.path for f in client.list_artifacts(one.info.run_id)}
        assert list((tmp_path / "mlartifacts").rglob("config.yaml"))
        print(f"compose topology: mlflow server (empty PostgreSQL backend) healthy after "
              f"{server_seconds:.1f} s; {budget} trials on 2 workers in {elapsed:.1f} s")
    finally:
        for w in workers:
            stop_process_group(w)
        stop_process_group(server)
        log.close()
        shutil.rmtree(tmp_path / "mlartifacts", ignore_errors=True)
