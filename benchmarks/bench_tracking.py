"""What MLflow tracking adds to a trial's wall time: the same fits with and without ``sweep.tracking``.

Run by hand, never in CI::

    python benchmarks/bench_tracking.py                    # real mixer.train.fit, ~1 s epochs
    python benchmarks/bench_tracking.py --trials 1 --repeats 80   # the wall comparison, to ~±0.6 %
    python benchmarks/bench_tracking.py --fake             # sleep-based 1 s epochs, no training
    python benchmarks/bench_tracking.py --tracking-uri http://127.0.0.1:5000   # an existing server

Without ``--tracking-uri`` a real ``mlflow server`` (SQLite backend, ``--serve-artifacts``) is
started on a free loopback port in a temporary folder, timing starts once its start-up work is
over, and it is stopped at the end; its CPU use during the trials is measured too.

The same sequence of trials (same configs, same seeds, so bit-identical training work) runs with
tracking off and on, alternating which goes first in each repeat so that drift in machine load
hits both alike. One ``Tracker`` serves every tracked sequence, as one serves a worker's whole
study; it is made before timing starts. Its drawing process starts with the first PNG (with short
trials, after the first tracked sequence; its start-up, ~1 s of CPU once per worker process, is
reported on its own). A tracked trial does what
``sweep.objective`` does: ``start_trial`` (whose ``on_created`` stores the run id from the sending
thread), ``log_epoch`` every epoch from the ``on_epoch`` callback, ``end``; each sequence's parent
run is created before and finished after its timed trials. Reported:

- wall seconds of the trials, off and on, and the overhead ``(on - off) / off``, per repeat and
  over all repeats, with the standard error of the per-repeat differences (and, from 30 repeats
  on, a 95 % interval). On this machine (a virtual machine whose speed drifts by 10-15 % from one
  trial to the next) one repeat's difference is mostly noise, -10 % to +9 %: it takes tens of
  repeats to bound the overhead within 1 % (short sequences, ``--trials 1``, pair the two arms
  closest in time).
- per trial, from ``/proc/<pid>/task/*/schedstat``: how long the training threads waited for a
  CPU (run-queue wait, tracked minus untracked), plus the time spent inside tracking calls, plus
  the CPU of the process's other threads (bounding how long they held the GIL). It is not
  blurred by the hypervisor's noise, and it overstates the waits it sees (with two training
  threads one's wait counts in full while the other goes on taking shards), but it cannot see
  training running slower, nor the latency of each GIL hand-off.
- per trial, CPU accounting: the tracker's sending thread and process (whose start-up, ~1.5 s of
  CPU once, falls in the first tracked sequence), its drawing process and the server's
  CPU beyond its idle rate. Their sum over the untracked trial time is a cruder, conservative
  estimate: it counts each CPU second as a second of training lost.
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
        stdout=open(root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        # As docker-compose.yml runs it: the job runner's idle polling would cost both arms ~11 ms/s.
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


def proc_stat(stat: Path) -> tuple[int, float]:
    """(process group, CPU seconds used so far) from a ``/proc/<pid>/stat`` file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int | None) -> float:
    """CPU seconds used so far by the live processes of process group ``pgid`` (the server's)."""
    if pgid is None:
        return math.nan
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            group, cpu = proc_stat(stat)
        except OSError:
            continue
        if group == pgid:
            total += cpu
    return total


def thread_schedstat() -> dict[int, tuple[float, float]]:
    """Per thread of this process: (CPU seconds, seconds runnable but waiting for a CPU).

    The second number (``run_delay`` in ``/proc/<pid>/task/<tid>/schedstat``) is what other
    runnable tasks on this machine, the tracker's drawing process and the MLflow server among
    them, cost a thread. Unlike wall time it does not include what the hypervisor takes from the
    whole virtual machine, so it is not drowned in this machine's noise.
    """
    out = {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            cpu_ns, delay_ns, _ = (int(x) for x in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        out[int(task.name)] = (cpu_ns / 1e9, delay_ns / 1e9)
    return out


def training_thread_ids() -> set[int]:
    """The threads that train: the main thread and the model's shard pool (``mixer_*``)."""
    import threading

    return {t.native_id for t in threading.enumerate()
            if t is threading.main_thread() or t.name.startswith("mixer")}


def sched_delta(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]],
                training: set[int]) -> dict[str, float]:
    """CPU and run-queue wait of the training threads, and CPU of every other thread, between two reads."""
    out = {"training_cpu": 0.0, "training_wait": 0.0, "other_cpu": 0.0}
    for tid, (cpu, wait) in after.items():
        cpu0, wait0 = before.get(tid, (0.0, 0.0))
        if tid in training:
            out["training_cpu"] += cpu - cpu0
            out["training_wait"] += wait - wait0
        else:
            out["other_cpu"] += cpu - cpu0
    return out


def thread_counters(tids: set[int]) -> dict[str, float]:
    """Summed over threads ``tids`` of this process: user and system CPU seconds, minor page
    faults, migrations between CPUs and involuntary switches; and the machine's steal seconds.

    What could make training run *slower* with tracking on, where the schedstat wait cannot see
    it: page faults (system time), being moved between CPUs, being preempted, or the hypervisor
    taking the virtual CPU away (steal).
    """
    tick = os.sysconf("SC_CLK_TCK")
    out = {"user": 0.0, "system": 0.0, "minflt": 0.0, "migrations": 0.0, "involuntary": 0.0}
    for tid in tids:
        task = Path(f"/proc/{os.getpid()}/task/{tid}")
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            sched = {key.strip(): value for key, _, value in
                     (line.partition(":") for line in (task / "sched").read_text().splitlines())}
        except OSError:
            continue
        out["minflt"] += int(fields[7])
        out["user"] += int(fields[11]) / tick
        out["system"] += int(fields[12]) / tick
        out["migrations"] += float(sched.get("se.nr_migrations") or 0)  # needs CONFIG_SCHED_DEBUG
        out["involuntary"] += float(sched.get("nr_involuntary_switches") or 0)
    steal = Path("/proc/stat").read_text().splitlines()[0].split()[8]
    out["steal"] = int(steal) / tick
    return out


def wait_settled(pgid: int, *, timeout: float = 180.0) -> float:
    """Wait until the server's processes are idle; returns the seconds waited.

    A server started with its job runner (``mlflow server`` 3.x's default, not ours) keeps about
    half a core busy for ~40 s after /health first answers: timing during that would charge its
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
    deferred_pngs: int = 0               # short trials' PNGs, drawn after the trials (as at close)
    deferred_drawing_cpu: float = 0.0
    sending_cpu_seconds: float = 0.0     # the tracker's sending thread and process
    drawing_cpu_seconds: float = 0.0     # the tracker's drawing process (SCHED_IDLE)
    server_cpu_seconds: float = math.nan   # the mlflow server's processes (if we started it)
    # From the threads' schedstat: CPU and run-queue wait of the training threads, CPU of the others
    sched: dict[str, float] = field(default_factory=dict)
    # From /proc: the training threads' user/system CPU, page faults, migrations, preemptions; steal
    counters: dict[str, float] = field(default_factory=dict)


def run_sequence(work: Work, configs: list[Any], *, tracker: Any, out: Path, end_wait: bool,
                 run_id_at_start: bool, server_pgid: int | None) -> Sequence:
    """The trials of one study, tracked by ``tracker`` (one for the whole benchmark, as a worker
    process has one for its whole study) or untracked if it is None."""
    import optuna

    seq = Sequence(tracked=tracker is not None)
    study = optuna.create_study(study_name=f"bench-{'on' if tracker else 'off'}-{time.time_ns()}")
    background0 = {"sending": 0.0, "drawing": 0.0}
    if tracker is not None:
        from sweep.objective import store_run_id

        t = time.perf_counter()
        tracker.ensure_parent_run(study)
        seq.study_seconds["parent run"] = time.perf_counter() - t
        background0 = tracker.background_cpu_seconds
    cpu0 = time.process_time()
    server0 = group_cpu_seconds(server_pgid)
    sched0 = thread_schedstat()
    counters0 = thread_counters(training_thread_ids())
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
    training = training_thread_ids()
    if tracker is not None:
        tracker.flush()  # the last trial's PNG and status: part of what the trials cost
    seq.server_cpu_seconds = group_cpu_seconds(server_pgid) - server0
    seq.sched = sched_delta(sched0, thread_schedstat(), training)
    counters1 = thread_counters(training)
    seq.counters = {k: counters1[k] - counters0.get(k, 0.0) for k in counters1}
    if tracker is not None:
        cpu = tracker.background_cpu_seconds
        seq.sending_cpu_seconds = cpu["sending"] - background0["sending"]
        seq.drawing_cpu_seconds = cpu["drawing"] - background0["drawing"]
        t = time.perf_counter()
        tracker.finish_study(study, out / study.study_name)
        assert tracker.flush(120), "the study's summary did not reach the server"
        seq.study_seconds["finish_study"] = time.perf_counter() - t
        # What close() does at the end of a study: draw and upload the short trials' PNGs.
        t = time.perf_counter()
        drawer_cpu0 = tracker.background_cpu_seconds["drawing"]
        seq.deferred_pngs = tracker.draw_deferred()
        assert tracker.flush(120), "the deferred PNGs did not reach the server"
        seq.study_seconds["deferred PNGs"] = time.perf_counter() - t
        seq.deferred_drawing_cpu = tracker.background_cpu_seconds["drawing"] - drawer_cpu0
        # What reached the server: every epoch of every trial.
        from mlflow import MlflowClient

        client = MlflowClient(tracker.uri)
        runs = client.search_runs([tracker.experiment_id], filter_string="tags.trial_number != ''")
        points = sum(len(client.get_metric_history(r.info.run_id, "val_loss")) for r in runs)
        assert points == seq.epochs, f"{points} val_loss points on the server for {seq.epochs} epochs"
    return seq


def drawing_process_cpu(tracker: Any) -> float:
    """CPU seconds used so far by the tracker's drawing process, start-up included (0 if none)."""
    proc = tracker._sender._drawer._proc
    if proc is None:
        return 0.0
    return proc_stat(Path(f"/proc/{proc.pid}/stat"))[1]


def start_tracker(uri: str, options: dict[str, Any]) -> tuple[Any, float]:
    """A Tracker as a sweep worker makes one; returns it and the seconds that took."""
    from sweep.tracking import Tracker

    t = time.perf_counter()
    tracker = Tracker(uri, **options)
    tracker.check_reachable()
    return tracker, time.perf_counter() - t


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
    p.add_argument("--defer-png-below", type=float, default=30.0,
                   help="Tracker(defer_png_below=...): 0 draws each PNG as its trial ends (default 30)")
    p.add_argument("--end-wait", action="store_true", help="run.end(wait=True): what that wait costs")
    p.add_argument("--run-id-at-start", action="store_true",
                   help="wait for run.run_id right after start_trial (the old way), instead of letting the "
                        "sending thread store it as sweep.objective does")
    p.add_argument("--aa", action="store_true",
                   help="an A/A run: the 'on' sequences are untracked too (the comparison's noise)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    for name in ("trials", "epochs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.epoch_seconds > 0:
        p.error(f"--epoch-seconds must be > 0, got {args.epoch_seconds}")

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    server = tracker = None
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
        tracker, startup = start_tracker(uri, {"curves_png": not args.no_png,
                                               "batch_seconds": args.batch_seconds,
                                               "defer_png_below": args.defer_png_below})
        print(f"tracker ready in {startup:.2f} s"
              + ("; A/A run: the 'on' sequences are untracked too" if args.aa else ""), flush=True)
        pairs = []
        for r in range(args.repeats):
            order = (None, tracker) if r % 2 == 0 else (tracker, None)
            results = {}
            for mode in order:
                seq = run_sequence(work, configs, tracker=None if args.aa else mode, out=tmp / "out",
                                   end_wait=args.end_wait,
                                   run_id_at_start=args.run_id_at_start,
                                   server_pgid=server.pid if server is not None else None)
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
        # Measured instead: what tracking made the training threads wait for a CPU (their run-queue
        # wait, tracked minus untracked), plus the time they spent in tracking calls, plus the CPU
        # of this process's other threads (the sender holds the GIL part of that time: an upper
        # bound on what it made training wait for the GIL).
        off_seqs = [r["off"] for r in pairs]
        n_off = sum(len(s.trial_seconds) for s in off_seqs)

        def per_trial(key: str) -> tuple[float, float]:
            """(tracked, untracked) per-trial mean of one schedstat sum."""
            return (sum(s.sched[key] for s in on_seqs) / n_trials,
                    sum(s.sched[key] for s in off_seqs) / n_off)

        wait_on, wait_off = per_trial("training_wait")
        other_on, other_off = per_trial("other_cpu")
        train_cpu_on, train_cpu_off = per_trial("training_cpu")
        delay = on_path + max(0.0, wait_on - wait_off) + max(0.0, other_on - other_off)
        summary = {
            "uri": uri, "fake": args.fake, "batch_seconds": args.batch_seconds,
            "curves_png": not args.no_png, "defer_png_below": args.defer_png_below,
            "end_wait": args.end_wait, "run_id_at_start": args.run_id_at_start,
            "trials": args.trials, "epochs": args.epochs, "repeats": args.repeats,
            "rows": None if args.fake else work.data_config.n_rows,
            "trial_seconds_off_mean": off_trial,
            "per_trial_ms": {
                "on_training_thread": 1000 * on_path,
                "start_trial": 1000 * calls["start"] / n_trials,
                "log_epoch_per_epoch": 1000 * calls["log_epoch"] / n_epochs,
                "end": 1000 * calls["end"] / n_trials,
                "sending_thread_cpu": 1000 * sending,
                "drawing_process_cpu_idle": 1000 * drawing,
                "server_cpu": 1000 * server_cpu,
            },
            "server_idle_cpu_pct": 100 * idle_rate,
            "estimated_overhead_pct": 100 * cost / off_trial,
            "sched_per_trial_ms": {
                "training_wait_off": 1000 * wait_off, "training_wait_on": 1000 * wait_on,
                "other_threads_cpu_off": 1000 * other_off, "other_threads_cpu_on": 1000 * other_on,
                "training_cpu_off": 1000 * train_cpu_off, "training_cpu_on": 1000 * train_cpu_on,
            },
            "measured_delay_pct": 100 * delay / off_trial,
            "training_counters_per_trial": {
                k: {"off": sum(s.counters[k] for s in off_seqs) / n_off,
                    "on": sum(s.counters[k] for s in on_seqs) / n_trials}
                for k in on_seqs[0].counters},
            "wall_off_s": off, "wall_on_s": on, "wall_overhead_pct": 100 * (on - off) / off,
            "wall_overhead_pct_per_repeat": [100 * x for x in per_pair],
            "wall_overhead_pct_mean": 100 * statistics.mean(per_pair),
            # The per-repeat differences' standard error: how far the wall comparison can be trusted.
            "wall_overhead_pct_se": (100 * statistics.stdev(per_pair) / math.sqrt(len(per_pair))
                                     if len(per_pair) > 1 else math.nan),
            "trial_seconds_per_repeat": [{k: r[k].trial_seconds for k in ("off", "on")} for r in pairs],
            "study_seconds": {k: statistics.mean(s.study_seconds[k] for s in on_seqs)
                              for k in on_seqs[0].study_seconds},
            "tracker_start_seconds": startup,
            "drawing_process_total_cpu_s": drawing_process_cpu(tracker),
            "deferred_pngs_per_study": statistics.mean(s.deferred_pngs for s in on_seqs),
            "deferred_drawing_cpu_per_png_ms": 1000 * sum(s.deferred_drawing_cpu for s in on_seqs)
            / max(1, sum(s.deferred_pngs for s in on_seqs)),
            "undelivered": tracker.close(),
        }
        if not args.fake:
            # mixer.model times one thread against two for each kind of work at the start; on a
            # noisy machine that choice can differ from run to run, and with it the trial's speed.
            from mixer.model import threads_chosen

            chosen = list(threads_chosen().values())
            summary["threads_chosen"] = {str(n): chosen.count(n) for n in sorted(set(chosen))}
            print("thread counts chosen (both arms share them): " + ", ".join(
                f"{n} for {k} kind{'s' if k > 1 else ''} of work"
                for n, k in summary["threads_chosen"].items()))
        ms = summary["per_trial_ms"]
        print(f"per trial ({off_trial:.2f} s untracked): on the training thread "
              f"{ms['on_training_thread']:.1f} ms (start_trial {ms['start_trial']:.1f}, "
              f"end {ms['end']:.1f}, log_epoch "
              f"{ms['log_epoch_per_epoch']:.2f} per epoch); CPU of the sending thread and process "
              f"{ms['sending_thread_cpu']:.1f} ms, of the drawing process (SCHED_IDLE) "
              f"{ms['drawing_process_cpu_idle']:.1f} ms; server CPU {ms['server_cpu']:.1f} ms "
              f"(beyond its idle {summary['server_idle_cpu_pct']:.1f} % of a core)")
        print(f"estimated overhead (sum of the above / untracked trial time): "
              f"{summary['estimated_overhead_pct']:.2f} %")
        sc = summary["sched_per_trial_ms"]
        print(f"training threads per trial, off / on: waiting for a CPU {sc['training_wait_off']:.1f} / "
              f"{sc['training_wait_on']:.1f} ms, CPU {sc['training_cpu_off']:.0f} / "
              f"{sc['training_cpu_on']:.0f} ms;"
              f" CPU of the process's other threads {sc['other_threads_cpu_off']:.1f} / "
              f"{sc['other_threads_cpu_on']:.1f} ms")
        print(f"measured delay to training (in tracking calls + extra run-queue wait + other threads' CPU, "
              f"the GIL bound) / untracked trial time: {summary['measured_delay_pct']:.2f} %")
        print("training threads per trial, off / on: " + ", ".join(
            f"{k} {v['off']:.3g} / {v['on']:.3g}" for k, v in summary["training_counters_per_trial"].items())
            + " (CPU and steal in seconds; steal is the whole machine's)")
        print(f"measured wall: off {off:.2f} s, on {on:.2f} s -> {summary['wall_overhead_pct']:+.2f} % "
              f"(per repeat: {', '.join(f'{x:+.2f} %' for x in summary['wall_overhead_pct_per_repeat'])};"
              f" their mean {summary['wall_overhead_pct_mean']:+.2f} % ± "
              f"{summary['wall_overhead_pct_se']:.2f} % standard error;"
              f" on a busy machine this is mostly the other load's noise)")
        if len(per_pair) >= 30:  # enough repeats for the normal approximation to hold
            mean, se = summary["wall_overhead_pct_mean"], summary["wall_overhead_pct_se"]
            summary["wall_overhead_pct_ci95"] = [mean - 1.96 * se, mean + 1.96 * se]
            print(f"95 % interval of the mean over {len(per_pair)} repeats: "
                  f"{mean - 1.96 * se:+.2f} % to {mean + 1.96 * se:+.2f} %")
        if summary["deferred_pngs_per_study"]:
            print(f"PNGs drawn after the trials (as at close): {summary['deferred_pngs_per_study']:.0f} per "
                  f"study, {summary['deferred_drawing_cpu_per_png_ms']:.0f} ms of CPU each; the drawing "
                  f"process used {summary['drawing_process_total_cpu_s']:.2f} s of CPU in all, its "
                  f"start-up (importing matplotlib) included")
        print("per study, outside the trials: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in summary["study_seconds"].items()))
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
