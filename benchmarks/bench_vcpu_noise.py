"""How steady this machine's CPUs are: the noise floor under every wall-time comparison here.

Run by hand, never in CI::

    python benchmarks/bench_vcpu_noise.py               # 30 s with one CPU busy, 30 s with two
    python benchmarks/bench_vcpu_noise.py --seconds 60

A fixed piece of work (200 products of two 256 x 256 float32 matrices on one BLAS thread) runs
over and over, pinned to CPU 0, first alone and then with the same loop pinned to CPU 1. Each
piece's thread CPU time is recorded. On bare metal it would barely move. In a virtual machine
whose kernel gets no steal-time accounting, the time the hypervisor takes a virtual CPU away
counts as the thread's own CPU time, so the spread of these times is the hypervisor's noise, and
no per-thread measure inside the machine can get under it.

Reported per phase and CPU: the mean seconds per piece, its coefficient of variation per piece
and over 1 s windows, and (both busy) the correlation of the two CPUs' 1 s windows: near zero
means each virtual CPU is slowed independently, so one cannot serve as the other's control.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time


def loop(cpu: int, seconds: float, start_at: float) -> list[tuple[float, float]]:
    """(wall time, thread CPU seconds) of each piece of fixed work, pinned to ``cpu``."""
    os.sched_setaffinity(0, {cpu})
    import numpy as np
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    while time.time() < start_at:
        time.sleep(0.01)
    out = []
    end = start_at + seconds
    while time.time() < end:
        wall, cpu_start = time.time(), time.thread_time()
        for _ in range(200):
            a @ a
        out.append((wall, time.thread_time() - cpu_start))
    return out


def windows(pieces: list[tuple[float, float]], t0: float) -> dict[int, float]:
    """Mean CPU seconds per piece in each 1 s window after ``t0``."""
    by_window: dict[int, list[float]] = {}
    for wall, cpu in pieces:
        by_window.setdefault(int(wall - t0), []).append(cpu)
    return {k: statistics.mean(v) for k, v in by_window.items()}


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase (default 30)")
    args = p.parse_args(argv)
    if not args.seconds >= 3:
        p.error(f"--seconds must be >= 3, got {args.seconds}")
    if len(os.sched_getaffinity(0)) < 2:
        p.error("needs two CPUs")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        alone = {}
        for phase, cpus in (("CPU 0 busy alone", [0]), ("both CPUs busy", [0, 1])):
            t0 = time.time() + 3.0  # both workers start together, after spawning
            results = pool.starmap(loop, [(cpu, args.seconds, t0) for cpu in cpus])
            per_cpu = {cpu: windows(r, t0) for cpu, r in zip(cpus, results, strict=True)}
            for cpu, r in zip(cpus, results, strict=True):
                times = [c for _, c in r]
                mean = statistics.mean(times)
                if phase.endswith("alone"):
                    alone[cpu] = mean
                slower = (f", {100 * (mean / alone[0] - 1):+.1f} % against CPU 0 alone"
                          if len(cpus) == 2 else "")
                print(f"{phase}: CPU {cpu}: {len(times)} pieces, {1000 * mean:.1f} ms each{slower}; "
                      f"variation {100 * cv(times):.1f} % per piece, "
                      f"{100 * cv(list(per_cpu[cpu].values())):.1f} % over 1 s windows")
            if len(cpus) == 2:
                common = sorted(set(per_cpu[0]) & set(per_cpu[1]))
                r = statistics.correlation([per_cpu[0][k] for k in common], [per_cpu[1][k] for k in common])
                print(f"{phase}: correlation of the two CPUs' 1 s windows: {r:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
