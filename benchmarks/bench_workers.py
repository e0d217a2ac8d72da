"""Trials per hour of ``python -m sweep.run`` with K local worker processes against one.

Run by hand, never in CI::

    python benchmarks/bench_workers.py                       # --workers 1 vs 2, 8 trials, 2 rounds
    python benchmarks/bench_workers.py --workers 1 2 4 --trials 12 --rounds 3

Every trial has the same length (a fixed model, only the learning rate searched, no pruner), so
throughput is the only thing that differs. Each run is the real command in a fresh process
(``--no-tracking``, its own output folder); the rounds alternate the worker counts so that load
from other processes on a shared machine hits both alike. Reported per run: trials per hour over
the trials' own span (first start to last finish, from the study's storage: interpreter start-up
excluded) and over the command's wall time, plus CPU load (1-min load average) before the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = """\
study: bench_workers
seed: 0
data: {{source: synthetic, n_rows: {rows}}}
train: {{epochs: {epochs}, dim: {dim}, depth: {depth}, patch_size: 3, batch_size: 64}}
sampler: {{name: random}}
pruner: {{name: none}}
params:
  lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
"""


def run(space: Path, out: Path, workers: int, trials: int) -> dict[str, float]:
    import optuna

    from sweep.study import open_storage

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sweep.run", str(space), "--no-tracking", "--out", str(out),
                           "--workers", str(workers), "--n-trials", str(trials)],
                          capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"sweep.run failed ({proc.returncode}):\n{proc.stderr}")
    storage = open_storage(str(out / "bench_workers" / "optuna.journal"), rdb=False)
    study = optuna.load_study(study_name="bench_workers", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == trials, f"expected {trials} completed trials, got {len(done)}"
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"span": span, "wall": wall, "per_hour": trials * 3600 / span,
            "per_hour_wall": trials * 3600 / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args(argv)

    results: dict[int, list[dict[str, float]]] = {k: [] for k in args.workers}
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(SPACE.format(rows=args.rows, epochs=args.epochs, dim=args.dim, depth=args.depth))
        print(f"{os.cpu_count()} CPUs; trials of {args.epochs} epochs on {args.rows} synthetic rows, "
              f"dim {args.dim}, depth {args.depth}, patch 3; {args.trials} trials per run")
        for r in range(args.rounds):
            order = args.workers if r % 2 == 0 else list(reversed(args.workers))
            for k in order:
                load = os.getloadavg()[0]
                res = run(space, Path(tmp) / f"r{r}-w{k}", k, args.trials)
                results[k].append(res)
                print(f"round {r}  workers {k}: {res['per_hour']:7.0f} trials/h over the trials' span "
                      f"({res['span']:.1f} s), {res['per_hour_wall']:7.0f} trials/h over the command "
                      f"({res['wall']:.1f} s); load before {load:.1f}", flush=True)
    base = statistics.median(x["per_hour"] for x in results[args.workers[0]])
    print("\nmedian trials per hour (trials' span) and speed-up against "
          f"--workers {args.workers[0]}:")
    for k in args.workers:
        med = statistics.median(x["per_hour"] for x in results[k])
        med_wall = statistics.median(x["per_hour_wall"] for x in results[k])
        print(f"  --workers {k}: {med:7.0f} trials/h  x{med / base:.2f}   "
              f"(command wall: {med_wall:7.0f} trials/h)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
