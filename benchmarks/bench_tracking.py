"""What MLflow tracking adds to a trial's wall time: the same fits with and without ``sweep.tracking``.

Run by hand, never in CI::

    python benchmarks/bench_tracking.py                    # real mixer.train.fit, ~1 s epochs
    python benchmarks/bench_tracking.py --fake             # sleep-based 1 s epochs, no training
    python benchmarks/bench_tracking.py --tracking-uri http://127.0.0.1:5000   # an existing server

Without ``--tracking-uri`` a real ``mlflow server`` (SQLite backend, ``--serve-artifacts``) is
started on a free loopback port in a temporary folder, timing starts once its start-up work is
over, and it is stopped at the end; its CPU use during the trials is measured too.

The same sequence of trials (same configs, same seeds, so bit-identical training work) runs with
tracking off and on, alternating which goes first in each repeat so that drift in machine load
hits both alike. A tracked trial does what ``sweep.objective`` does: ``start_trial`` (whose
``on_created`` stores the run id from the sending thread), ``log_epoch`` every epoch from the
``on_epoch`` callback, ``end``; the study's parent run is created before and finished after the
timed trials. Reported:

- wall seconds of the trials, off and on, and the overhead ``(on - off) / off``, per repeat and
  over all repeats (on a busy machine this carries the machine's noise).
- per trial: the time the training thread spent inside tracking calls, the CPU of the tracker's
  sending thread and drawing process, and the server's CPU beyond its idle rate; their sum over the
  untracked trial time is a load-insensitive, conservative estimate of the overhead (conservative:
  it counts each CPU second as a second of training lost, while training has two cores, and the
  drawing process runs at nice 19).
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--serve-artifacts", "--workers", "1"],
        stdout=open(root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
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


def group_cpu_seconds(pgid: int | None) -> float:
    """CPU seconds used so far by the live processes of process group ``pgid`` (the server's)."""
    if pgid is None:
        return math.nan
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def wait_settled(pgid: int, *, timeout: float = 180.0) -> float:
    """Wait until the server's processes are idle; returns the seconds waited.

    ``mlflow server`` (3.x) starts a job runner and seven huey consumers that keep about half a
    core busy for ~40 s after /health first answers: timing during that would charge their
    start-up to tracking.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = group_cpu_seconds(pgid)
        time.sleep(2.0)
        if group_cpu_seconds(pgid) - before < 0.1:
            break
    return time.monotonic() - start


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


# ------------------------------------------------------------------------------------------------
# The work: real fits, or sleeps that produce EpochMetrics


@dataclass
class Work:
    fake: bool
    epochs: int
    epoch_seconds: float
    data: Any = None
    data_config: Any = None
    base: Any = None  # TrainConfig

    def configs(self, n: int) -> list[Any]:
        import dataclasses

        return [dataclasses.replace(self.base, lr=1e-3 * (1.5 ** k)) for k in range(n)]

    def fit(self, config: Any, seed: int, on_epoch: Any) -> list[Any]:
        if not self.fake:
            from mixer.train import fit

            return fit(config, self.data, seed=seed, on_epoch=on_epoch).history
        from mixer.train import EpochMetrics

        history = []
        for epoch in range(1, config.epochs + 1):
            time.sleep(self.epoch_seconds)
            m = EpochMetrics(epoch=epoch, train_loss=1 / epoch, val_loss=1.1 / epoch, val_accuracy=0.9,
                             val_precision=0.9, val_recall=0.9, val_f1=0.9, lr=config.lr,
                             grad_norm_mean=1.0, grad_norm_max=2.0, update_ratio=1e-3,
                             epoch_seconds=self.epoch_seconds)
            history.append(m)
            if on_epoch(m):
                break
        return history


def make_work(args: argparse.Namespace) -> Work:
    from mixer.config import DataConfig, MixerConfig, TrainConfig

    model = MixerConfig(patch_size=3, dim=args.dim, depth=args.depth, token_expansion=2.0,
                        channel_expansion=2.0)
    base = TrainConfig(model=model, epochs=args.epochs, batch_size=64, scheduler="cosine",
                       eta_min=1e-5)
    work = Work(fake=args.fake, epochs=args.epochs, epoch_seconds=args.epoch_seconds, base=base)
    if args.fake:
        work.data_config = DataConfig(n_rows=1000)
        return work
    from mixer.data import load
    from mixer.train import fit

    rows = args.rows
    if rows is None:
        # Calibrate: time one epoch on 2,000 rows, scale the rows to the target epoch time.
        probe = DataConfig(n_rows=2000, seed=0)
        import dataclasses

        history = fit(dataclasses.replace(base, epochs=1), load(probe), seed=0).history
        per_row = history[0].epoch_seconds / 2000
        rows = int(min(200_000, max(500, args.epoch_seconds / per_row)))
    work.data_config = DataConfig(n_rows=rows, seed=0)
    work.data = load(work.data_config)
    return work


# ------------------------------------------------------------------------------------------------
# One sequence of trials, tracked or not


@dataclass
class Sequence:
    tracked: bool
    trial_seconds: list[float] = field(default_factory=list)
    tracking_seconds: float = 0.0   # spent by the training thread inside tracking calls
    call_seconds: dict[str, float] = field(default_factory=lambda: {"start": 0.0, "log_epoch": 0.0,
                                                                     "end": 0.0})
    cpu_seconds: float = 0.0
    epochs: int = 0
    study_seconds: dict[str, float] = field(default_factory=dict)
    undelivered: int = 0
    sending_cpu_seconds: float = 0.0     # the tracker's sending thread
    drawing_cpu_seconds: float = 0.0     # the tracker's drawing process (nice 19)
    server_cpu_seconds: float = math.nan   # the mlflow server's processes (if we started it)


def run_sequence(work: Work, configs: list[Any], *, uri: str | None, out: Path,
                 tracker_options: dict[str, Any], end_wait: bool, run_id_at_start: bool,
                 server_pgid: int | None) -> Sequence:
    import optuna

    seq = Sequence(tracked=uri is not None)
    study = optuna.create_study(study_name=f"bench-{'on' if uri else 'off'}-{time.time_ns()}")
    tracker = None
    if uri is not None:
        from sweep.objective import store_run_id
        from sweep.tracking import Tracker

        t = time.perf_counter()
        tracker = Tracker(uri, **tracker_options)
        tracker.check_reachable()
        tracker.ensure_parent_run(study)
        seq.study_seconds["start (tracker, parent run)"] = time.perf_counter() - t
    cpu0 = time.process_time()
    server0 = group_cpu_seconds(server_pgid)
    for k, config in enumerate(configs):
        trial = study.ask()
        trial.suggest_float("lr", config.lr, config.lr)
        start = time.perf_counter()
        run = None
        if tracker is not None:
            t = time.perf_counter()
            if run_id_at_start:
                run = tracker.start_trial(trial, config, work.data_config, seed=k)
                _ = run.run_id  # the old way: wait one round trip for the id before training
            else:  # as sweep.objective does: the sending thread stores the id when the run exists
                run = tracker.start_trial(trial, config, work.data_config, seed=k,
                                          on_created=functools.partial(store_run_id, trial))
            seq.call_seconds["start"] += time.perf_counter() - t

        def on_epoch(m: Any, trial: Any = trial, run: Any = run) -> bool:
            trial.report(m.val_loss, m.epoch)
            if run is not None:
                t = time.perf_counter()
                run.log_epoch(m)
                seq.call_seconds["log_epoch"] += time.perf_counter() - t
            return False

        history = work.fit(config, k, on_epoch)
        if run is not None:
            t = time.perf_counter()
            _ = run.run_id  # as sweep.objective's _finish: known by now, so no wait
            run.end("completed", history=history, wait=end_wait)
            seq.call_seconds["end"] += time.perf_counter() - t
        seq.trial_seconds.append(time.perf_counter() - start)
        seq.epochs += len(history)
        study.tell(trial, history[-1].val_loss)
    seq.cpu_seconds = time.process_time() - cpu0
    seq.tracking_seconds = sum(seq.call_seconds.values())
    if tracker is not None:
        tracker.flush()  # the last trial's PNG and status: part of what the trials cost
    seq.server_cpu_seconds = group_cpu_seconds(server_pgid) - server0
    if tracker is not None:
        cpu = tracker.background_cpu_seconds
        seq.sending_cpu_seconds, seq.drawing_cpu_seconds = cpu["sending"], cpu["drawing"]
        t = time.perf_counter()
        tracker.finish_study(study, out / study.study_name)
        seq.undelivered = tracker.close()
        seq.study_seconds["finish_study + close"] = time.perf_counter() - t
        # What reached the server: every epoch of every trial.
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        runs = client.search_runs([tracker.experiment_id], filter_string="tags.trial_number != ''")
        points = sum(len(client.get_metric_history(r.info.run_id, "val_loss")) for r in runs)
        assert points == seq.epochs, f"{points} val_loss points on the server for {seq.epochs} epochs"
    return seq


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
    p.add_argument("--batch-seconds", type=float, default=10.0, help="Tracker(batch_seconds=...)")
    p.add_argument("--no-png", action="store_true", help="Tracker(curves_png=False): where the cost goes")
    p.add_argument("--end-wait", action="store_true", help="run.end(wait=True): what that wait costs")
    p.add_argument("--run-id-at-start", action="store_true",
                   help="wait for run.run_id right after start_trial (the old way), instead of letting the "
                        "sending thread store it as sweep.objective does")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    for name in ("trials", "epochs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.epoch_seconds > 0:
        p.error(f"--epoch-seconds must be > 0, got {args.epoch_seconds}")

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    server = None
    try:
        uri = args.tracking_uri
        if uri is None:
            server, uri = start_server(tmp / "server")
            print(f"mlflow server at {uri} idle after {wait_settled(server.pid):.0f} s", flush=True)
        work = make_work(args)
        configs = work.configs(args.trials)
        print(f"tracking to {uri}; {'fake' if args.fake else 'real'} epochs, "
              f"{args.trials} trials x {args.epochs} epochs, {args.repeats} repeats"
              + ("" if args.fake else f", {work.data_config.n_rows} synthetic rows"), flush=True)
        pairs = []
        for r in range(args.repeats):
            order = (None, uri) if r % 2 == 0 else (uri, None)
            results = {}
            for mode in order:
                seq = run_sequence(work, configs, uri=mode, out=tmp / "out", end_wait=args.end_wait,
                                   run_id_at_start=args.run_id_at_start,
                                   server_pgid=server.pid if server is not None else None,
                                   tracker_options={"curves_png": not args.no_png,
                                                    "batch_seconds": args.batch_seconds})
                results["on" if mode else "off"] = seq
                label = "on " if mode else "off"
                print(f"  repeat {r + 1} tracking {label}: {sum(seq.trial_seconds):8.2f} s for "
                      f"{seq.epochs} epochs ({sum(seq.trial_seconds) / seq.epochs:.3f} s/epoch), "
                      f"cpu {seq.cpu_seconds:.2f} s"
                      + (f", in tracking calls {seq.tracking_seconds * 1000:.1f} ms" if mode else ""),
                      flush=True)
            pairs.append(results)
        off = sum(sum(r["off"].trial_seconds) for r in pairs)
        on = sum(sum(r["on"].trial_seconds) for r in pairs)
        per_pair = [(sum(r["on"].trial_seconds) - sum(r["off"].trial_seconds)) / sum(r["off"].trial_seconds)
                    for r in pairs]
        on_seqs = [r["on"] for r in pairs]
        n_trials = sum(len(s.trial_seconds) for s in on_seqs)
        n_epochs = sum(s.epochs for s in on_seqs)
        off_trial = off / n_trials
        calls = {k: sum(s.call_seconds[k] for s in on_seqs) for k in ("start", "log_epoch", "end")}
        on_path = sum(calls.values()) / n_trials
        sending = sum(s.sending_cpu_seconds for s in on_seqs) / n_trials
        drawing = sum(s.drawing_cpu_seconds for s in on_seqs) / n_trials
        background = sending + drawing
        # The server's own idle work (its job consumers wake up now and then) runs with tracking
        # off too: subtract it at the rate measured during the untracked trials.
        idle_rate = sum(r["off"].server_cpu_seconds for r in pairs) / off
        server_cpu = (sum(s.server_cpu_seconds for s in on_seqs) - idle_rate * on) / n_trials
        # Conservative: as if every CPU second spent on tracking (here or in the server) delayed
        # training by a second. With training on both cores it delays it by less.
        cost = on_path + background + (0.0 if math.isnan(server_cpu) else server_cpu)
        summary = {
            "uri": uri, "fake": args.fake, "batch_seconds": args.batch_seconds,
            "curves_png": not args.no_png, "end_wait": args.end_wait, "run_id_at_start": args.run_id_at_start,
            "trials": args.trials, "epochs": args.epochs, "repeats": args.repeats,
            "rows": None if args.fake else work.data_config.n_rows,
            "trial_seconds_off_mean": off_trial,
            "per_trial_ms": {
                "on_training_thread": 1000 * on_path,
                "start_trial": 1000 * calls["start"] / n_trials,
                "log_epoch_per_epoch": 1000 * calls["log_epoch"] / n_epochs,
                "end": 1000 * calls["end"] / n_trials,
                "sending_thread_cpu": 1000 * sending,
                "drawing_process_cpu_nice19": 1000 * drawing,
                "server_cpu": 1000 * server_cpu,
            },
            "server_idle_cpu_pct": 100 * idle_rate,
            "estimated_overhead_pct": 100 * cost / off_trial,
            "wall_off_s": off, "wall_on_s": on, "wall_overhead_pct": 100 * (on - off) / off,
            "wall_overhead_pct_per_repeat": [100 * x for x in per_pair],
            "study_seconds": {k: statistics.mean(s.study_seconds[k] for s in on_seqs)
                              for k in on_seqs[0].study_seconds},
            "undelivered": sum(s.undelivered for s in on_seqs),
        }
        ms = summary["per_trial_ms"]
        print(f"per trial ({off_trial:.2f} s untracked): on the training thread "
              f"{ms['on_training_thread']:.1f} ms (start_trial {ms['start_trial']:.1f}, "
              f"end {ms['end']:.1f}, log_epoch "
              f"{ms['log_epoch_per_epoch']:.2f} per epoch); CPU of the sending thread "
              f"{ms['sending_thread_cpu']:.1f} ms, of the drawing process (nice 19) "
              f"{ms['drawing_process_cpu_nice19']:.1f} ms; server CPU {ms['server_cpu']:.1f} ms "
              f"(beyond its idle {summary['server_idle_cpu_pct']:.1f} % of a core)")
        print(f"estimated overhead (sum of the above / untracked trial time): "
              f"{summary['estimated_overhead_pct']:.2f} %")
        print(f"measured wall: off {off:.2f} s, on {on:.2f} s -> {summary['wall_overhead_pct']:+.2f} % "
              f"(per repeat: {', '.join(f'{x:+.2f} %' for x in summary['wall_overhead_pct_per_repeat'])};"
              f" on a busy machine this is mostly the other load's noise)")
        print("per study, outside the trials: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in summary["study_seconds"].items()))
        print(f"metric points undelivered: {summary['undelivered']}")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0 if summary["undelivered"] == 0 else 1
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
