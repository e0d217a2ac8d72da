"""docker-compose.yml stays honest without a Docker engine.

The file is read as Compose reads it (``${VAR:-default}`` and ``${VAR:?error}`` interpolation),
every command line is checked by the parser of the program it runs (``sweep.run``'s argparse,
``mlflow server``'s click command, with the service's environment), and the topology itself —
PostgreSQL with the init script's second database, ``mlflow server`` with the compose file's own
flags and environment, two workers with the compose file's own command line and environment sharing
one output folder — runs natively on loopback to a finished study, and so does optuna-dashboard's
command where the pinned optuna-dashboard is installed.
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
DASHBOARD_DOCKERFILE = ROOT / "docker" / "dashboard.Dockerfile"
# Compose refuses to start without a password (`${POSTGRES_PASSWORD:?...}`): the tests give one.
PASSWORD = "pw-Only4Tests"
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


class MissingVariable(KeyError):
    """Compose's refusal of ``${VAR:?message}`` with VAR unset or empty."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}``, ``$$``."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group("braced") if match.group("braced") is not None else match.group("bare")
        for sep, if_empty in ((":-", True), ("-", False), (":?", True), ("?", False)):
            name, found, rest = expr.partition(sep)
            if found:
                value = env.get(name)
                if value is None or (if_empty and value == ""):
                    if "?" in sep:
                        raise MissingVariable(f"required variable {name} is missing a value: {rest}")
                    return rest
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
    """The compose file with every variable resolved from ``env`` (default: the password alone)."""
    return _walk(yaml.safe_load(COMPOSE.read_text()), {"POSTGRES_PASSWORD": PASSWORD} if env is None else env)


def _variables() -> list[str]:
    """Every ``${...}`` expression in the file's values (comments aside), uninterpolated."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            found.extend(re.findall(r"\$\{([^}]*)\}", node))
        elif isinstance(node, (list, dict)):
            for x in node.values() if isinstance(node, dict) else node:
                walk(x)

    walk(yaml.safe_load(COMPOSE.read_text()))
    return found


def _commands(service: dict[str, Any]) -> list[str]:
    """Every argument a service's container runs with: command, entrypoint, healthcheck, build args."""
    args = []
    for key in ("command", "entrypoint"):
        value = service.get(key) or []
        args += [value] if isinstance(value, str) else value
    args += (service.get("healthcheck") or {}).get("test", [])
    args += [str(v) for v in ((service.get("build") or {}).get("args") or {}).values()]
    return args


def _dockerfile_arg(dockerfile: Path, name: str) -> str:
    """The default of ``ARG name=...`` in a Dockerfile."""
    found = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    assert found, f"{dockerfile.name} has no ARG {name}=default"
    return found.group(1).strip('"')


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


def _mlflow_server_context(args: list[str], env: dict[str, str], monkeypatch):
    """Parse ``mlflow server`` arguments with MLflow's own click command (types and choices checked),
    its options' environment variables (MLFLOW_BACKEND_STORE_URI, ...) read from ``env``."""
    from mlflow.cli import server

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return server.make_context("server", list(args))


# --------------------------------------------------------------------------------------------------
# The file itself


def test_compose_declares_postgres_mlflow_worker_and_named_volumes():
    c = load_compose()
    assert {"postgres", "mlflow", "worker"} <= set(c["services"])
    assert {"postgres-data", "mlflow-artifacts", "runs"} <= set(c["volumes"])
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
    assert ml["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "--serve-artifacts" in argv
    dest = _option(argv, "--artifacts-destination")
    assert f"mlflow-artifacts:{dest}" in ml["volumes"]
    assert ml["ports"] == ["127.0.0.1:5000:5000"]
    assert "/health" in " ".join(ml["healthcheck"]["test"])


def test_mlflow_command_is_accepted_by_mlflow_server(monkeypatch):
    ml = load_compose()["services"]["mlflow"]
    params = _mlflow_server_context(ml["command"][2:], ml["environment"], monkeypatch).params
    # The backend store, password included, comes from the environment, not the command line.
    assert params["backend_store_uri"] == ml["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert PASSWORD in params["backend_store_uri"]
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
    w = c["services"]["worker"]
    argv = w["command"]
    assert argv[:3] == ["python", "-m", "sweep.run"]
    args = _sweep_parser().parse_args(argv[3:])
    assert args.tracking_uri == "http://mlflow:5000"
    # The storage comes from MIXER_STORAGE (sweep.run's default for --storage), not the command line.
    assert args.storage is None
    storage = w["environment"]["MIXER_STORAGE"]
    # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3; the images ship psycopg2.
    assert storage.startswith("postgresql+psycopg2://") and "@postgres:5432/" in storage
    # Optuna and MLflow both keep an alembic_version table: they need two databases.
    optuna_db = storage.rsplit("/", 1)[1]
    mlflow_db = c["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].rsplit("/", 1)[1]
    assert optuna_db != mlflow_db
    assert c["services"]["postgres"]["environment"]["POSTGRES_DB"] == optuna_db
    assert c["services"]["postgres"]["environment"]["MLFLOW_DB"] == mlflow_db
    # The space the image runs by default is shipped and valid.
    from sweep.space import load_space

    load_space(ROOT / args.space)


def test_worker_keeps_one_shared_study_folder_on_a_named_volume():
    c = load_compose()
    w = c["services"]["worker"]
    args = _sweep_parser().parse_args(w["command"][3:])
    # --out on the `runs` volume: every scaled worker writes the same <study>/ folder, and it
    # outlives `docker compose down`.
    assert f"runs:{args.out}" in w["volumes"] and "runs" in c["volumes"]
    # The volume starts as a copy of the image's folder, which the non-root worker must own.
    text = DOCKERFILE.read_text()
    assert re.search(rf"mkdir {re.escape(args.out)} && chown mixer:mixer [^\n]*{re.escape(args.out)}", text)


def test_worker_sizes_the_mixers_threads_to_its_cpu_limit():
    for given, cpus in (({}, 1), ({"WORKER_CPUS": "3"}, 3)):
        w = load_compose({"POSTGRES_PASSWORD": PASSWORD, **given})["services"]["worker"]
        # Compose casts `cpus` to a number; the Mixer runs as many threads as the CPUs it may use.
        assert float(w["cpus"]) == cpus
        assert w["environment"]["MIXER_NUM_THREADS"] == str(cpus)


def test_worker_reads_the_real_data_from_a_read_only_mount_named_by_mixer_data_dir():
    from mixer.config import DATA_DIR_ENV

    w = load_compose()["services"]["worker"]
    data_dir = w["environment"][DATA_DIR_ENV]
    assert f"./data:{data_dir}:ro" in w["volumes"], "the worker mounts ${DATA_DIR:-./data} read-only"
    assert "./search_spaces:/app/search_spaces:ro" in w["volumes"]
    elsewhere = load_compose({"POSTGRES_PASSWORD": PASSWORD, "DATA_DIR": "/srv/unsw"})["services"]["worker"]
    assert f"/srv/unsw:{data_dir}:ro" in elsewhere["volumes"]
    # The shipped spaces name their CSV in the project's data/ folder, the mount's default source, so
    # "put the CSV in ./data" serves a local run and the containers alike (MIXER_DATA_DIR looks the file
    # name up in the mount).
    checked = 0
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        for key in ("train_csv", "test_csv"):
            if isinstance(data.get(key), str) and not data[key].startswith("/"):
                on_host = (path.parent / data[key]).resolve()
                assert on_host.parent == ROOT / "data", f"{path.name}: {key} {data[key]} is not in data/"
                checked += 1
    assert checked, "at least one shipped space reads a CSV"


def test_the_password_has_no_default_and_compose_refuses_to_start_without_it():
    uses = [v.removeprefix("POSTGRES_PASSWORD") for v in _variables() if v.startswith("POSTGRES_PASSWORD")]
    assert uses and all(u.startswith(":?") and ".env" in u for u in uses), uses
    for env in ({}, {"POSTGRES_PASSWORD": ""}):
        with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD is missing a value: put it in .env"):
            load_compose(env)


def test_every_variable_has_a_default_or_a_refusal():
    for expr in _variables():
        assert re.match(r"[A-Za-z_]\w*(:?-|:?\?)", expr), f"${{{expr}}} has neither a default nor a :? error"


def test_no_secret_in_any_command_line_and_none_baked_into_images():
    c = load_compose({"POSTGRES_USER": "alice", "POSTGRES_PASSWORD": "s3cret", "POSTGRES_DB": "opt"})
    svc = c["services"]
    for name, service in svc.items():
        assert not [a for a in _commands(service) if "s3cret" in a], f"{name}: a password on a command line"
    # ... it travels in the environment instead.
    assert svc["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    storage = svc["worker"]["environment"]["MIXER_STORAGE"]
    assert storage == "postgresql+psycopg2://alice:s3cret@postgres:5432/opt"
    assert svc["optuna-dashboard"]["environment"]["MIXER_STORAGE"] == storage
    backend = svc["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql+psycopg2://alice:s3cret@postgres:5432/")
    for dockerfile in (DOCKERFILE, MLFLOW_DOCKERFILE, DASHBOARD_DOCKERFILE):
        assert "POSTGRES_PASSWORD" not in dockerfile.read_text()
        assert "postgresql://" not in dockerfile.read_text()


def test_published_ports_are_on_loopback_unless_the_user_opts_in():
    services = load_compose()["services"]
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert {"postgres", "mlflow", "optuna-dashboard"} <= set(published)
    for name, ports in published.items():
        assert all(p.startswith("127.0.0.1:") for p in ports), f"{name} publishes {ports}"
    opened = load_compose({"POSTGRES_PASSWORD": PASSWORD, "MLFLOW_BIND": "0.0.0.0"})["services"]["mlflow"]
    assert opened["ports"] == ["0.0.0.0:5000:5000"]


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


def test_every_image_is_pinned():
    for name, svc in load_compose()["services"].items():
        if "build" not in svc:  # pulled: a tag that names a release
            repo, _, tag = svc["image"].rpartition(":")
            assert repo and tag and tag != "latest", f"{name}: image {svc['image']} is not pinned"


def test_dashboard_is_optional_pinned_to_the_workers_optuna_and_starts_after_a_worker():
    import optuna

    c = load_compose()
    dash = c["services"]["optuna-dashboard"]
    assert dash["profiles"] == ["dashboard"]
    assert dash["build"]["dockerfile"] == "docker/dashboard.Dockerfile"
    version = _dockerfile_arg(DASHBOARD_DOCKERFILE, "OPTUNA_DASHBOARD_VERSION")
    assert re.fullmatch(r"\d+\.\d+\.\d+", version) and dash["image"].endswith(f":{version}")
    assert '"optuna-dashboard==${OPTUNA_DASHBOARD_VERSION}"' in DASHBOARD_DOCKERFILE.read_text()
    # The Optuna that reads the study is the one that writes it, the one these tests run.
    assert (_dockerfile_arg(DASHBOARD_DOCKERFILE, "OPTUNA_VERSION")
            == _dockerfile_arg(DOCKERFILE, "OPTUNA_VERSION") == optuna.__version__)
    assert dash["depends_on"]["worker"] == {"condition": "service_started"}
    assert dash["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert dash["restart"] == "unless-stopped"  # should it lose the race to create the tables
    assert dash["environment"]["MIXER_STORAGE"] == c["services"]["worker"]["environment"]["MIXER_STORAGE"]
    assert dash["command"][:2] == ["python", "-c"]
    compile(dash["command"][2], "dashboard command", "exec")


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


def _cmdlines(pgid: int) -> list[str]:
    """Command lines of the processes in process group ``pgid``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # the process is gone
            continue
    return found


def _job_runners(pgid: int) -> list[str]:
    """Command lines of the MLflow job runner's huey consumers in process group ``pgid``."""
    return [c for c in _cmdlines(pgid) if "huey" in c]


def _with_password(url: str) -> str:
    """``url`` with the tests' password: PostgreSQL's trust authentication here ignores it, so it only
    shows where it would leak."""
    return re.sub(r"://([^@:/]+)@", rf"://\1:{PASSWORD}@", url, count=1)


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

    # The MLflow server with the compose file's flags and environment; only where things live is
    # substituted.
    port = free_port()
    server_argv = svc["mlflow"]["command"][2:]
    server_argv = _replace_option(server_argv, "--artifacts-destination", str(tmp_path / "mlartifacts"))
    server_argv = _replace_option(server_argv, "--host", "127.0.0.1")
    server_argv = _replace_option(server_argv, "--port", str(port))
    server_argv = _replace_option(server_argv, "--workers", "1")  # two cores shared by the test suite
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow.log", "wb")
    server_env = {**os.environ, **svc["mlflow"]["environment"],
                  "MLFLOW_BACKEND_STORE_URI": _with_password(mlflow_db_url)}
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
        worker_argv = _replace_option(worker_argv, "--tracking-uri", uri)
        runs = tmp_path / "runs"  # the `runs` volume, shared by both workers
        worker_argv = _replace_option(worker_argv, "--out", str(runs))
        worker_argv += ["--n-trials", str(budget)]
        # The compose file's environment: the storage (no --storage on the command line), the Mixer's
        # threads, the data folder; the image's BLAS settings.
        storage = _with_password(psycopg2_url(postgres_url))
        assert PASSWORD in storage
        env = {**os.environ, **svc["worker"]["environment"], "MIXER_STORAGE": storage,
               "MIXER_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        started = time.monotonic()
        for i in range(2):
            out = open(tmp_path / f"worker-{i}.log", "wb")
            workers.append(subprocess.Popen(worker_argv, env=env, cwd=tmp_path, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True))
        # The password is on no command line (`ps`), the server's and its workers' included.
        assert not [c for p in (server, *workers) for c in _cmdlines(p.pid) if PASSWORD in c]
        for i, w in enumerate(workers):
            code = w.wait(timeout=240)
            assert code == 0, (f"worker {i} exited {code}: {shlex.join(worker_argv)}\n"
                               + (tmp_path / f"worker-{i}.log").read_text()[-3000:])
        # ... and nowhere in what they print or log.
        for printed in [tmp_path / "mlflow.log", *tmp_path.glob("worker-*.log"), *runs.rglob("sweep.log")]:
            assert PASSWORD not in printed.read_text(errors="replace"), printed
        elapsed = time.monotonic() - started

        study = optuna.load_study(study_name="compose-native", storage=storage)
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                     optuna.trial.TrialState.PRUNED)]
        assert len(finished) == budget, [(t.number, t.state) for t in trials]
        assert len({t.number for t in trials}) == len(trials)
        # One study folder holds what both workers wrote: the last one's summary and model, and one
        # log that both appended to.
        study_dir = runs / "compose-native"
        assert sorted(p.name for p in study_dir.iterdir() if p.is_file()) == [
            "best_config.yaml", "best_model.npz", "sweep.log", "trials.csv"]
        import pandas as pd

        assert len(pd.read_csv(study_dir / "trials.csv")) == budget
        log_text = (study_dir / "sweep.log").read_text()
        assert all(f" {w.pid} sweep " in log_text for w in workers), log_text[-2000:]

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


@pytest.mark.postgres
def test_dashboard_command_serves_a_study_this_optuna_wrote(postgres_url, tmp_path):
    """The dashboard's command, storage from the environment, on a study written by the workers' Optuna.

    Runs where optuna-dashboard is installed at the pinned version (docker/dashboard.Dockerfile).
    """
    dashboard = pytest.importorskip("optuna_dashboard")
    import json

    import optuna

    version = _dockerfile_arg(DASHBOARD_DOCKERFILE, "OPTUNA_DASHBOARD_VERSION")
    if dashboard.__version__ != version:
        pytest.skip(f"optuna-dashboard {dashboard.__version__} installed, the image pins {version}")
    storage = psycopg2_url(postgres_url)
    study = optuna.create_study(study_name="dash", storage=storage)
    study.set_metric_names(["val_loss"])
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=3)

    dash = load_compose()["services"]["optuna-dashboard"]
    port = free_port()
    code = dash["command"][2].replace("host='0.0.0.0', port=8080", f"host='127.0.0.1', port={port}")
    assert code != dash["command"][2]
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "MIXER_STORAGE": storage},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/studies", timeout=60, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as resp:
            (summary,) = json.load(resp)["study_summaries"]
        assert summary["study_name"] == "dash"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}",
                                    timeout=10) as resp:
            detail = json.load(resp)
        assert detail["objective_names"] == ["val_loss"]
        assert len(detail["trials"]) == 3
    finally:
        stop_process_group(proc)
        log.close()
