"""Trials per hour of 1 vs K ``sweep.run`` workers sharing one study on PostgreSQL.

Run by hand, never in CI::

    python benchmarks/bench_postgres_workers.py                         # 1 and 2 workers, 8 trials
    python benchmarks/bench_postgres_workers.py --workers 1 2 4 --n-trials 16 --epochs 6
    python benchmarks/bench_postgres_workers.py --threads 2             # each worker with 2 BLAS threads
    python benchmarks/bench_postgres_workers.py --overhead 200          # + storage cost of an empty trial

Every configuration gets a fresh database (created on the server named by ``--admin-url``,
dropped at the end) and K ``python -m sweep.run`` processes started together, as
``docker compose up --scale worker=K`` starts them: the same command line, one BLAS thread each
(``--threads``), tracking off (``--no-tracking``, so that only the study's storage is shared;
``--tracking-uri`` adds an MLflow server).

The trials have a fixed length: every knob is fixed (the one "searched" parameter has a single
choice), so each trial trains the same model on the same synthetic rows for ``--epochs`` epochs
and any difference in throughput comes from the workers, not from the sampled configurations.

Reported per K: wall seconds of the command (imports and study set-up included), the span from
the first trial's start to the last trial's end as the storage recorded them, trials per hour
over that span, the median seconds per trial, and the speed-up over K=1. ``--overhead N`` also
times N empty trials (objective returns at once) through ``sweep.study.open_storage`` — the same
RDB storage with heartbeats — which is the storage's own cost per trial.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPACE = """\
study: bench-{tag}
seed: 0
data: {{source: synthetic, n_rows: {rows}}}
train: {{epochs: {epochs}, dim: {dim}, depth: {depth}, batch_size: 64, lr: 0.001}}
sampler: {{name: random}}
pruner: {{name: none}}
budget: {{n_trials: {n_trials}}}
params:
  patch_size: {{type: categorical, choices: [3]}}
"""


def _driver_url(url: str) -> str:
    # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3; this project ships psycopg2.
    return re.sub(r"^postgresql://", "postgresql+psycopg2://", url)


class FreshDatabase:
    """A new empty database on the admin URL's server, dropped on exit."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.name = f"mixer_bench_{uuid.uuid4().hex[:10]}"

    def __enter__(self) -> str:
        import psycopg2

        self._conn = psycopg2.connect(self.admin_url.replace("+psycopg2", ""), connect_timeout=5)
        self._conn.autocommit = True
        with self._conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.name}"')
        return _driver_url(self.admin_url.rsplit("/", 1)[0] + "/" + self.name)

    def __exit__(self, *exc: object) -> None:
        with self._conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                        (self.name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{self.name}"')
        self._conn.close()


def run_workers(k: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """K workers on a fresh study; returns the timings."""
    import optuna

    tag = f"k{k}-{uuid.uuid4().hex[:6]}"
    space = tmp / f"space-{tag}.yaml"
    space.write_text(SPACE.format(tag=tag, rows=args.rows, epochs=args.epochs, dim=args.dim,
                                  depth=args.depth, n_trials=args.n_trials))
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               MIXER_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    with FreshDatabase(args.admin_url) as storage:
        cmd = [sys.executable, "-m", "sweep.run", str(space), "--storage", storage, "--out", str(tmp / tag)]
        cmd += ["--tracking-uri", args.tracking_uri] if args.tracking_uri else ["--no-tracking"]
        started = time.monotonic()
        procs = [subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / f"{tag}-{i}.log", "wb")) for i in range(k)]
        codes = [p.wait() for p in procs]
        wall = time.monotonic() - started
        if any(codes):
            raise SystemExit(f"K={k}: workers exited {codes}; logs in {tmp}/{tag}-*.log")
        study = optuna.load_study(study_name=f"bench-{tag}", storage=storage)
        trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        first = min(t.datetime_start for t in trials)
        last = max(t.datetime_complete for t in trials)
        span = (last - first).total_seconds()
        per_trial = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
        workers = {t.user_attrs.get("worker") for t in trials}
    return {"k": k, "trials": len(trials), "wall": wall, "span": span, "per_hour": len(trials) / span * 3600,
            "median_trial": statistics.median(per_trial), "workers_used": len(workers)}


def storage_overhead(n: int, admin_url: str) -> float:
    """Seconds of storage work per empty trial (RDB storage with heartbeats, as sweep.run opens it)."""
    import optuna

    from sweep.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with FreshDatabase(admin_url) as url:
        storage = open_storage(url, rdb=True)
        study = optuna.create_study(storage=storage, study_name="overhead")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)  # warm-up: tables, caches
        started = time.perf_counter()
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)
        elapsed = time.perf_counter() - started
        storage.engine.dispose()
    return elapsed / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--admin-url", default=os.environ.get("MIXER_TEST_PG",
                                                         "postgresql://postgres@127.0.0.1:5432/postgres"),
                   help="a database URL on the server where fresh benchmark databases may be created")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="K")
    p.add_argument("--n-trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rows", type=int, default=4000, help="synthetic rows (80%% train, 20%% validation)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per worker (compose: 1)")
    p.add_argument("--tracking-uri", help="log to this MLflow server (default: --no-tracking)")
    p.add_argument("--overhead", type=int, default=0, metavar="N",
                   help="also time N empty trials for the storage's cost per trial")
    args = p.parse_args(argv)
    for name in ("n_trials", "epochs", "rows", "dim", "depth", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(k < 1 for k in args.workers):
        p.error(f"--workers must all be >= 1, got {args.workers}")

    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start; "
          f"{args.n_trials} fixed trials of {args.epochs} epochs on {args.rows} rows "
          f"(dim {args.dim}, depth {args.depth}), {args.threads} BLAS thread(s) per worker, "
          f"tracking {'to ' + args.tracking_uri if args.tracking_uri else 'off'}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-pg-workers-") as tmp:
        for k in args.workers:
            r = run_workers(k, args, Path(tmp))
            results.append(r)
            first = results[0]
            print(f"K={r['k']}: {r['trials']} trials by {r['workers_used']} worker(s); "
                  f"wall {r['wall']:.1f} s; trials span {r['span']:.1f} s -> {r['per_hour']:.0f} trials/h "
                  f"(x{r['per_hour'] / first['per_hour']:.2f} vs K={first['k']}); "
                  f"median trial {r['median_trial']:.2f} s", flush=True)
    if args.overhead:
        per = storage_overhead(args.overhead, args.admin_url)
        print(f"storage: {per * 1000:.1f} ms per empty trial over {args.overhead} trials "
              f"(ask, suggest, tell, heartbeat thread) -> at most {3600 / per:.0f} trials/h per worker")
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
