"""K worker processes on this machine sharing one study, each with its share of the cores.

The parent (``sweep.run --workers K``) starts K ``python -m sweep.run ... --worker-of PID:I`` with
``cores / K`` BLAS threads each, shows the study's progress until they end and forwards Ctrl-C once.
A worker runs trials until the budget is spent or its parent is gone, and leaves
``workers/<host>/worker-I.json`` (its tracking errors) and ``workers/<host>/worker-I.log``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from sweep.progress import Progress, log_to, strip_foreign_handlers
from sweep.study import fail_lost_runs, open_storage, open_study, quiet_optuna, run_trials, sampler_seed

__all__ = ["BLAS_VARS", "run_workers", "worker_main"]

log = logging.getLogger("sweep")

BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS", "MIXER_NUM_THREADS")  # the last: mixer._parallel's thread pool
STOP_SECONDS = 60  # how long stopped workers get to mark their trials failed before they are killed


def run_workers(settings: Any, study: Any, progress: Progress) -> tuple[bool, list[str], int]:
    """Start ``settings.workers`` workers, show progress until they end. Returns whether Ctrl-C stopped
    them, a line per worker that crashed, and the MLflow calls and metric points they failed to deliver."""
    from mixer._parallel import available_cpus  # the cores this process may use, a CPU quota included

    k = settings.workers
    threads = max(1, available_cpus() // k)
    # Secrets travel in the environment, not on command lines that `ps` shows to every user.
    env = dict(os.environ, MIXER_STORAGE=settings.storage, **{var: str(threads) for var in BLAS_VARS})
    if settings.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    # Per host: containers that share the study folder on a volume each start their own workers.
    workdir = settings.out_dir / "workers" / socket.gethostname()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base = [sys.executable, "-m", "sweep.run", str(settings.space_path), "--workers", "1",
            "--study-name", settings.study_name, "--out", str(settings.out_dir.parent)]
    # Without --seed the workers read the file's seeds, as this process did.
    for flag, value in (("--seed", settings.seed_given), ("--n-trials", settings.n_trials),
                        ("--timeout", settings.timeout), ("--train-csv", settings.train_csv)):
        if value is not None:
            base += [flag, str(value)]
    if not settings.tracking:
        base.append("--no-tracking")
    procs: list[subprocess.Popen] = []
    interrupted = False
    with contextlib.ExitStack() as logs:
        for i in range(k):
            (workdir / f"worker-{i}.json").unlink(missing_ok=True)
            logf = logs.enter_context(open(workdir / f"worker-{i}.log", "ab"))
            # Own session: a terminal's Ctrl-C reaches only the parent, which forwards it exactly once.
            procs.append(subprocess.Popen([*base, "--worker-of", f"{os.getpid()}:{i}"], env=env,
                                          stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                          start_new_session=True))
        log.info("started %d workers with %d BLAS threads each: %s", k, threads, [p.pid for p in procs])
        progress.message(f"{k} workers × {threads} BLAS thread(s); their logs: {workdir}/worker-*.log")
        try:
            while any(p.poll() is None for p in procs):
                progress.update(study.get_trials(deepcopy=False))
                time.sleep(1.0)
        except KeyboardInterrupt:
            interrupted = True
            progress.message("interrupt: stopping the workers (their running trials are marked failed)...")
            _stop_workers(procs)
    failures: list[str] = []
    tracking_errors = 0
    for i, p in enumerate(procs):
        summary_path = workdir / f"worker-{i}.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        tracking_errors += int(summary.get("tracking_errors", 0)) + int(summary.get("undelivered", 0))
        if p.returncode == 130:
            interrupted = True
        elif p.returncode not in (0, None) and not interrupted:
            failures.append(f"worker {i} exited with code {p.returncode} (see {workdir}/worker-{i}.log)")
    log.info("workers done after %.1f s: exit codes %s", time.monotonic() - started,
             [p.returncode for p in procs])
    return interrupted, failures, tracking_errors


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)  # Popen skips a process that has exited
    deadline = time.monotonic() + STOP_SECONDS
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting politely
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        p.kill()
        p.wait()


def worker_main(settings: Any, worker_of: str) -> int:
    """One worker started by ``run_workers`` (``worker_of`` = "<parent pid>:<index>"): trials until
    the study's budget is spent. Returns its exit code."""
    from sweep.objective import Interrupts, Objective

    interrupts = Interrupts()
    interrupts.install()
    parent_text, _, index_text = worker_of.partition(":")
    parent, index = int(parent_text), int(index_text or 0)
    log_to(sys.stderr)
    log.info("worker %d of parent %d: %s", index, parent,
             " ".join(f"{v}={os.environ.get(v, '')}" for v in BLAS_VARS))
    quiet_optuna()
    tracker = None
    if settings.tracking:
        from sweep.tracking import Tracker

        tracker = Tracker(settings.tracking_uri, settings.experiment)
        strip_foreign_handlers()  # importing MLflow installed its own handlers
    storage = open_storage(settings.storage, rdb=settings.rdb)
    study, _ = open_study(storage, settings.study_name, direction=settings.space.direction,
                          sampler=None, pruner=settings.space.build_pruner())
    study.sampler = settings.space.build_sampler(
        seed=sampler_seed(settings.sampler_seed, len(study.get_trials(deepcopy=False)), index + 1,
                          shared=settings.rdb))
    if tracker is not None:
        tracker.ensure_parent_run(study)
    objective = Objective(settings.space, study_seed=settings.seed, tracker=tracker, interrupts=interrupts)
    code = 0
    try:
        run_trials(study, objective, n_trials=settings.n_trials, timeout=settings.timeout,
                   interrupts=interrupts, keep_going=lambda: os.getppid() == parent,
                   on_stale=fail_lost_runs(tracker.uri) if tracker is not None else None)
    except KeyboardInterrupt:
        log.info("interrupted")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the bookkeeping below undisturbed
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        undelivered = tracker.close() if tracker is not None else 0
        (settings.out_dir / "workers" / socket.gethostname() / f"worker-{index}.json").write_text(
            json.dumps({"undelivered": undelivered, "tracking_errors": objective.tracking_errors}))
    return 1 if code == 0 and (undelivered or objective.tracking_errors) else code
