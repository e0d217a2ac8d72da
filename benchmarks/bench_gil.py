"""What a little Python work beside training costs it: in a thread of the training process, or in
a child process.

Run by hand, never in CI::

    python benchmarks/bench_gil.py                 # 8 rounds
    python benchmarks/bench_gil.py --rounds 12 --work-ms 16

Why: tracking's sender spends ~16 ms of CPU per trial in Python (building MLflow requests, JSON,
HTTP). Run from a thread of the training process, that work holds the GIL; every hand-off of the
GIL between it and the training thread stalls training, so training can lose more than the work
itself. This measures that without a server: a small model (dim 32, depth 2, one training
thread: the Python-heavy case) trains five fits per arm, and at the start of each fit the
helper does ``--work-ms`` of pure-Python CPU in four bursts with 15 ms pauses between them (as
four requests with their round trips would). Arms: no helper work, the helper a thread, the
helper a child process. The arms alternate within each round, in reverse order every other
round, and each round's thread and process arms are compared with its "none" arm (paired, so
that the machine's drift cancels).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BURSTS = 4
PAUSE = 0.015


def bursts(work_seconds: float) -> None:
    """``work_seconds`` of pure-Python CPU in BURSTS bursts, with a pause (a round trip) after each."""
    for _ in range(BURSTS):
        start = time.thread_time()
        while time.thread_time() - start < work_seconds / BURSTS:
            sum(i * i for i in range(200))
        time.sleep(PAUSE)


def thread_helper(go: threading.Event, stop: threading.Event, work_seconds: float) -> None:
    while not stop.is_set():
        if go.wait(0.1):
            go.clear()
            bursts(work_seconds)


def process_helper(conn: Any, work_seconds: float) -> None:
    while conn.recv() is not None:
        bursts(work_seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8, help="rounds of the three arms (default 8)")
    p.add_argument("--work-ms", type=float, default=16.0, help="helper CPU per fit, ms (default 16)")
    p.add_argument("--rows", type=int, default=1700, help="synthetic rows (default 1700: ~0.8 s fits)")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error(f"--rounds must be >= 2, got {args.rounds}")
    if not args.work_ms > 0:
        p.error(f"--work-ms must be > 0, got {args.work_ms}")

    from mixer import model
    from mixer.config import DataConfig, MixerConfig, TrainConfig
    from mixer.data import load
    from mixer.train import fit

    model.set_num_threads(1, adaptive=False)
    config = TrainConfig(model=MixerConfig(patch_size=3, dim=32, depth=2, token_expansion=2.0,
                                           channel_expansion=2.0),
                         epochs=10, batch_size=64, scheduler="cosine", eta_min=1e-5, lr=1e-3)
    data = load(DataConfig(n_rows=args.rows, seed=0))
    fit(dataclasses.replace(config, epochs=1), data, seed=0)  # warm-up

    work = args.work_ms / 1000
    go, stop = threading.Event(), threading.Event()
    threading.Thread(target=thread_helper, args=(go, stop, work), daemon=True).start()
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(target=process_helper, args=(theirs, work))
    child.start()
    arms = ("none", "thread", "process")
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    try:
        for r in range(args.rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                cpu0, wall0 = time.thread_time(), time.perf_counter()
                for seed in range(5):
                    if arm == "thread":
                        go.set()
                    elif arm == "process":
                        ours.send(1)
                    fit(config, data, seed=seed)
                wall[arm].append(time.perf_counter() - wall0)
                cpu[arm].append(time.thread_time() - cpu0)
            print(f"  round {r + 1}: " + ", ".join(f"{arm} {wall[arm][-1]:.2f} s" for arm in arms),
                  flush=True)
    finally:
        ours.send(None)
        stop.set()
        child.join(10)
    fit_seconds = statistics.mean(wall["none"]) / 5
    print(f"one fit: {fit_seconds:.3f} s; helper work per fit: {args.work_ms:.0f} ms of CPU "
          f"({100 * work / fit_seconds:.1f} % of a fit)")
    for arm in ("thread", "process"):
        diffs = [100 * (w / n - 1) for w, n in zip(wall[arm], wall["none"], strict=True)]
        cpu_diff = 100 * (statistics.mean(cpu[arm]) / statistics.mean(cpu["none"]) - 1)
        print(f"helper in a {arm:7s}: training wall {statistics.mean(diffs):+.2f} % "
              f"± {statistics.stdev(diffs) / len(diffs) ** 0.5:.2f} % (standard error over "
              f"{len(diffs)} rounds), training thread CPU {cpu_diff:+.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
