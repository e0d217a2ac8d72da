"""What MLflow tracking adds to a trial: the same fits with and without ``sweep.tracking``.

Run by hand on a quiet machine, never in CI::

    python benchmarks/bench_tracking.py                          # real fits, ~1 s epochs
    python benchmarks/bench_tracking.py --trials 3 --repeats 40  # more pairs, for a tighter interval
    python benchmarks/bench_tracking.py --aa                     # both arms untracked: the noise
    python benchmarks/bench_tracking.py --tracking-uri http://127.0.0.1:5000   # an existing server

Without ``--tracking-uri`` a real ``mlflow server`` is started on a loopback port as
docker-compose.yml starts it (``--serve-artifacts``, job runner off), with a SQLite backend in a
temporary folder, and stopped at the end.

The same sequence of trials (same configs and seeds, so the same training work) runs untracked and
tracked in ABBA order (off-on, on-off, ...), so that drift in the machine's speed hits both arms
alike. One ``Tracker`` serves every tracked sequence, as one serves a worker's study; a tracked
trial does what ``sweep.objective`` does (``start_trial`` with ``on_created``, ``log_epoch`` per
epoch, ``end``), and each tracked sequence is flushed before its clock stops. Reported, measured
from outside the tracking code:

- wall: the per-pair difference ``(on - off) / off`` of the trials' wall time, from the first trial's
  start to the last trial's ``end`` (the flush after it is the study's, below), its mean ± standard
  error and a 95 % interval (normal approximation: trust it from ~30 pairs on). A trial does not wait
  for its run's last writes: they overlap the next trial, as in a study, so use ``--trials`` of 3 or
  more for the trials after the first to carry them;
- CPU per trial on each side: the training thread's (``time.thread_time``), the whole process's
  (utime + stime from ``/proc/self/stat``, which includes the sender thread) and, for the server
  this benchmark starts, the server's (its process group, from ``/proc/<pid>/stat``; the untracked
  arm's figure is what an idle server uses);
- the delay tracking causes the training thread, per trial: the CPU it spends inside tracking
  calls, plus how much longer it is kept off the CPU (wall minus its own CPU: waits for the GIL or
  a core) than untracked. Unlike wall time this is not moved by the machine's speed drifting
  between sequences, which on this 2-core VM shifts whole arms by +-10 %; it cannot see training
  itself computing slower (caches shared with the sender and the server);
- the end-of-study flush, timed apart: a study waits for it once, not per trial.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """An ``mlflow server`` as docker-compose.yml runs it (SQLite instead of PostgreSQL)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "2"],
        stdout=open(root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {root / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{uri}/health did not answer within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds() -> float:
    """utime + stime of this whole process (every thread), from ``/proc/self/stat``."""
    return _cpu_seconds(Path("/proc/self/stat"))


def group_cpu_seconds(pgid: int | None) -> float:
    """utime + stime of the live processes of process group ``pgid`` (the server and its workers);
    NaN without a server of ours."""
    if pgid is None:
        return math.nan
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                total += _cpu_seconds(stat)
        except (OSError, IndexError, ValueError):  # the process has just exited
            continue
    return total


@dataclasses.dataclass
class Work:
    """The trials' training: real ``mixer.train.fit`` calls, or sleeps that produce EpochMetrics."""

    fake: bool
    epoch_seconds: float
    base: Any  # TrainConfig
    data_config: Any = None
    data: Any = None

    def configs(self, n: int) -> list[Any]:
        return [dataclasses.replace(self.base, lr=1e-3 * (1.5 ** k)) for k in range(n)]

    def fit(self, config: Any, seed: int, on_epoch: Any) -> list[Any]:
        from mixer.train import EpochMetrics, fit

        if not self.fake:
            return fit(config, self.data, seed=seed, on_epoch=on_epoch).history
        history = []
        for epoch in range(1, config.epochs + 1):
            time.sleep(self.epoch_seconds)
            m = EpochMetrics(epoch=epoch, train_loss=1 / epoch, val_loss=1.1 / epoch, val_accuracy=0.9,
                             val_precision=0.9, val_recall=0.9, val_f1=0.9, lr=config.lr,
                             grad_norm_mean=1.0, grad_norm_max=2.0, update_ratio=1e-3,
                             epoch_seconds=self.epoch_seconds)
            history.append(m)
            on_epoch(m)
        return history


def make_work(args: argparse.Namespace) -> Work:
    from mixer.config import DataConfig, MixerConfig, TrainConfig

    model = MixerConfig(patch_size=3, dim=args.dim, depth=args.depth, token_expansion=2.0,
                        channel_expansion=2.0)
    base = TrainConfig(model=model, epochs=args.epochs, batch_size=64, scheduler="cosine", eta_min=1e-5)
    work = Work(fake=args.fake, epoch_seconds=args.epoch_seconds, base=base)
    if args.fake:
        work.data_config = DataConfig(n_rows=1000)
        return work
    from mixer.data import load
    from mixer.train import fit

    rows = args.rows
    if rows is None:  # calibrate: one epoch on 2,000 rows, rows scaled to the target epoch time
        probe = fit(dataclasses.replace(base, epochs=1), load(DataConfig(n_rows=2000, seed=0)), seed=0)
        rows = int(min(200_000, max(500, args.epoch_seconds * 2000 / probe.history[0].epoch_seconds)))
    work.data_config = DataConfig(n_rows=rows, seed=0)
    work.data = load(work.data_config)
    return work


def run_sequence(work: Work, configs: list[Any], tracker: Any,
                 server_pgid: int | None = None) -> dict[str, Any]:
    """The trials of one study, tracked by ``tracker`` or untracked if it is None; ``server_pgid``:
    the process group of the MLflow server we started, whose CPU is counted too."""
    import optuna
    from mlflow import MlflowClient

    from sweep.objective import store_run_id

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"bench-{'on' if tracker else 'off'}-{time.time_ns()}")
    if tracker is not None:
        tracker.ensure_parent_run(study)
    epochs, calls = 0, [0.0]  # calls: training-thread CPU inside tracking calls

    def timed(fn: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            calls[0] += time.thread_time() - t

    wall0, thread0, process0 = time.perf_counter(), time.thread_time(), process_cpu_seconds()
    server0 = group_cpu_seconds(server_pgid)
    for k, config in enumerate(configs):
        trial = study.ask()
        trial.suggest_float("lr", config.lr, config.lr)
        run = None
        if tracker is not None:
            run = timed(tracker.start_trial, trial, config, work.data_config, seed=k,
                        on_created=functools.partial(store_run_id, trial))

        def on_epoch(m: Any, trial: Any = trial, run: Any = run) -> bool:
            trial.report(m.val_loss, m.epoch)
            if run is not None:
                timed(run.log_epoch, m)
            return False

        history = work.fit(config, k, on_epoch)
        if run is not None:
            timed(run.end, "completed", history=history)
        epochs += len(history)
        study.tell(trial, history[-1].val_loss)
    wall, thread_cpu = time.perf_counter() - wall0, time.thread_time() - thread0
    flush0 = time.perf_counter()
    if tracker is not None:
        assert tracker.flush(120), "the tracked trials did not reach the server"
    seq = {"trials_wall": wall, "thread_cpu": thread_cpu,
           "off_cpu": wall - thread_cpu, "calls_cpu": calls[0], "flush": time.perf_counter() - flush0,
           "process_cpu": process_cpu_seconds() - process0,
           "server_cpu": group_cpu_seconds(server_pgid) - server0, "trials": len(configs), "epochs": epochs}
    if tracker is not None:  # what reached the server: every epoch of every trial
        client = MlflowClient(tracker.uri)
        runs = client.search_runs([tracker.experiment_id], filter_string=(
            f"tags.study_name = '{study.study_name}' and tags.trial_number != ''"))
        points = sum(len(client.get_metric_history(r.info.run_id, "val_loss")) for r in runs)
        assert points == epochs, f"{points} val_loss points on the server for {epochs} epochs"
    return seq


def summarise(pairs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    diffs = [(p["on"]["trials_wall"] - p["off"]["trials_wall"]) / p["off"]["trials_wall"] for p in pairs]
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    per_trial = {arm: {key: sum(p[arm][key] for p in pairs) / sum(p[arm]["trials"] for p in pairs)
                       for key in ("trials_wall", "thread_cpu", "process_cpu", "server_cpu", "off_cpu",
                                   "calls_cpu", "flush")}
                 for arm in ("off", "on")}
    # Per pair: (extra off-CPU time + CPU in tracking calls) / untracked trial wall, excluding the flush.
    delays = [(p["on"]["off_cpu"] - p["off"]["off_cpu"] + p["on"]["calls_cpu"]) / p["off"]["trials_wall"]
              for p in pairs]
    delay_se = statistics.stdev(delays) / math.sqrt(len(delays)) if len(delays) > 1 else math.nan
    return {"pairs": len(pairs), "wall_overhead_pct_per_pair": [100 * d for d in diffs],
            "wall_overhead_pct_mean": 100 * mean, "wall_overhead_pct_se": 100 * se,
            "wall_overhead_pct_ci95": [100 * (mean - 1.96 * se), 100 * (mean + 1.96 * se)],
            "delay_pct_mean": 100 * statistics.mean(delays), "delay_pct_se": 100 * delay_se,
            "per_trial_seconds": per_trial}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", help="an MLflow server to log to (default: start one on loopback)")
    p.add_argument("--fake", action="store_true", help="sleep-based epochs instead of real training")
    p.add_argument("--trials", type=int, default=4, help="trials per sequence (default 4)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="off/on pairs (default 3)")
    p.add_argument("--epoch-seconds", type=float, default=1.0, help="target seconds per epoch")
    p.add_argument("--rows", type=int, help="synthetic rows (default: calibrated to --epoch-seconds)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--aa", action="store_true",
                   help="an A/A run: the 'on' sequences are untracked too (the comparison's noise)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    for name in ("trials", "epochs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.epoch_seconds > 0:
        p.error(f"--epoch-seconds must be > 0, got {args.epoch_seconds}")

    from sweep.tracking import Tracker

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    server = tracker = None
    try:
        uri = args.tracking_uri
        if uri is None:
            server, uri = start_server(tmp / "server")
        work = make_work(args)
        configs = work.configs(args.trials)
        tracker = Tracker(uri)
        tracker.check_reachable()
        print(f"tracking to {uri}; {'fake' if args.fake else 'real'} epochs, {args.trials} trials x "
              f"{args.epochs} epochs, {args.repeats} ABBA pairs"
              + ("" if args.fake else f", {work.data_config.n_rows} synthetic rows")
              + ("; A/A: both arms untracked" if args.aa else ""), flush=True)
        pairs = []
        for r in range(args.repeats):
            pair = {}
            for arm in (("off", "on") if r % 2 == 0 else ("on", "off")):
                seq = run_sequence(work, configs, tracker if arm == "on" and not args.aa else None,
                                   server.pid if server is not None else None)
                pair[arm] = seq
                print(f"  pair {r + 1} {arm:3}: {seq['trials_wall']:8.2f} s wall, training thread CPU "
                      f"{seq['thread_cpu']:.2f} s, process CPU {seq['process_cpu']:.2f} s, server CPU "
                  f"{seq['server_cpu']:.2f} s", flush=True)
            pairs.append(pair)
        summary = {"uri": uri, "aa": args.aa, "fake": args.fake, "trials": args.trials,
                   "epochs": args.epochs, **summarise(pairs), "undelivered": tracker.close()}
        pt = summary["per_trial_seconds"]
        for arm in ("off", "on"):
            print(f"per trial, tracking {arm:3}: wall {pt[arm]['trials_wall']:.3f} s, training thread CPU "
                  f"{pt[arm]['thread_cpu']:.3f} s, process CPU {pt[arm]['process_cpu']:.3f} s, server "
                  f"CPU {pt[arm]['server_cpu']:.3f} s; training "
                  f"thread off the CPU {pt[arm]['off_cpu']:.3f} s, in tracking calls "
                  f"{pt[arm]['calls_cpu']:.3f} s; end flush {pt[arm]['flush']:.3f} s")
        print(f"delay to the training thread (more time off the CPU + CPU in tracking calls, flush "
              f"excluded): {summary['delay_pct_mean']:+.3f} % ± {summary['delay_pct_se']:.3f} % of a trial")
        low, high = summary["wall_overhead_pct_ci95"]
        print(f"wall overhead over {len(pairs)} pairs: {summary['wall_overhead_pct_mean']:+.2f} % ± "
              f"{summary['wall_overhead_pct_se']:.2f} % (standard error); 95 % interval {low:+.2f} % to "
              f"{high:+.2f} %{' (normal approximation: few pairs)' if len(pairs) < 30 else ''}")
        print(f"metric points undelivered: {summary['undelivered']}")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0 if summary["undelivered"] == 0 else 1
    finally:
        if tracker is not None:
            tracker.close(timeout=5)  # a second close() returns at once
        if server is not None:
            stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
