"""The model's process runtime: shards of a batch on a small thread pool, and process tuning. For
each kind of work (a ``key``) the first calls time one thread against the ceiling and keep the
faster (docs/architecture.md, "Threads")."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["CGROUP_ROOT", "PROBES", "available_cpus", "bounds", "fastest", "get_num_threads", "parallel_map",
           "set_num_threads", "threads_chosen", "tune_process"]

_T = TypeVar("_T")
_R = TypeVar("_R")
_lock = threading.Lock()
_num_threads: int | None = None
_pool: ThreadPoolExecutor | None = None  # get_num_threads() - 1 workers: the caller is one more
_adaptive = True
# Where the kernel shows this process's CPU quota (in a container, its own cgroup: `cpus:` in compose).
CGROUP_ROOT = "/sys/fs/cgroup"
# Timed calls of each thread count before one is chosen (after one untimed warm-up call).
PROBES = 3
_chosen: dict[tuple, int] = {}                   # (*key, items, ceiling) -> threads
_timings: dict[tuple, dict[int, list[float]]] = {}  # the same keys while still probing


def bounds(n: int, rows: int) -> list[tuple[int, int]]:
    """Cut n rows into ceil(n / rows) contiguous, near-equal shards ``(start, stop)``."""
    k = -(-n // rows)
    cuts = [i * n // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _default_threads() -> int:
    env = os.environ.get("MIXER_NUM_THREADS")
    if not env:
        return available_cpus()
    with contextlib.suppress(ValueError):
        if (n := int(env)) >= 1:
            return n
    raise ValueError(f"MIXER_NUM_THREADS must be a positive integer, got {env!r}")


def available_cpus() -> int:
    """The CPUs this process may run on, capped by the cgroup (v2 or v1) CPU quota, rounded up, >= 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    root = CGROUP_ROOT
    with contextlib.suppress(OSError, ValueError, ZeroDivisionError):  # no CPU controller to read: no quota
        if os.path.isfile(f"{root}/cpu.max"):  # v2: "max 100000" (no quota) or "200000 100000"
            with open(f"{root}/cpu.max") as fh:
                quota, period = fh.read().split()
        else:
            with open(f"{root}/cpu/cpu.cfs_quota_us") as q, open(f"{root}/cpu/cpu.cfs_period_us") as p:
                quota, period = q.read().strip(), p.read().strip()  # quota -1: none
        if quota not in ("max", "-1"):
            n = min(n, math.ceil(int(quota) / int(period)))
    return max(1, n)


def get_num_threads() -> int:
    """The ceiling of threads the model runs shards on: ``MIXER_NUM_THREADS``, else ``available_cpus()``."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n: int | None, *, adaptive: bool = True) -> None:
    """Run shards on up to ``n`` threads (None: back to the default). Results do not depend on it.

    ``adaptive=False``: always ``n``, never fewer for work timed faster on one (for benchmarks)."""
    global _num_threads, _pool, _adaptive
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got n={n!r}")
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n
        _adaptive = adaptive
        _chosen.clear()
        _timings.clear()


def threads_chosen() -> dict[tuple, int]:
    """The thread count chosen so far per ``(*key, items, ceiling)``, ``key`` as given to ``parallel_map``."""
    with _lock:
        return dict(_chosen)


def fastest(timings: dict[int, list[float]]) -> int:
    """The thread count with the lowest median time; the fewer threads on a tie."""
    return min(timings, key=lambda t: (statistics.median(timings[t]), t))


def _threads_for(key: tuple | None, ceiling: int) -> tuple[int, bool]:
    """(threads to use for this call, whether to time it): the chosen count, or the next probe."""
    if key is None or not _adaptive or ceiling <= 1:
        return ceiling, False
    chosen = _chosen.get(key)  # once chosen, no lock on this per-batch path (a dict read is atomic)
    if chosen is not None:
        return chosen, False
    with _lock:
        timings = _timings.get(key)
        if timings is None:  # the first call warms caches and the pool: not timed
            _timings[key] = {1: [], ceiling: []}
            return ceiling, False
    return (1 if len(timings[1]) <= len(timings[ceiling]) else ceiling), True


def _record(key: tuple, threads: int, seconds: float) -> None:
    with _lock:
        timings = _timings.get(key)
        if timings is None:  # set_num_threads cleared it meanwhile
            return
        timings[threads].append(seconds)
        if all(len(t) >= PROBES for t in timings.values()):
            _chosen[key] = fastest(_timings.pop(key))


def _after_fork_in_child() -> None:
    # A forked child has no pool threads; an inherited executor would wait for them forever.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def tune_process() -> None:
    """Once per process: single-threaded BLAS (via threadpoolctl if installed), and glibc thresholds
    that keep freed activation buffers in the heap instead of fresh, page-faulting mmap()s."""
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD, at glibc's maximum on 64-bit
    mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T], key: tuple | None = None) -> list[_R]:
    """``[fn(i) for i in items]`` on up to ``get_num_threads()`` threads, the calling one included.

    Items are handed out one at a time, so a thread slowed by other load simply takes fewer."""
    tune_process()
    n = len(items)
    ceiling = min(get_num_threads(), n)
    key = None if key is None else (*key, n, ceiling)
    threads, timed = _threads_for(key, ceiling)
    started = time.perf_counter()
    results = _run(fn, items, threads)
    if timed:
        _record(key, threads, time.perf_counter() - started)
    return results


def _run(fn: Callable[[_T], _R], items: Sequence[_T], threads: int) -> list[_R]:
    global _pool
    n = len(items)
    if threads <= 1:
        return [fn(item) for item in items]
    with _lock:  # set_num_threads drops the pool, so it always has get_num_threads() - 1 workers
        if _pool is None:
            _pool = ThreadPoolExecutor(get_num_threads() - 1, thread_name_prefix="mixer")
        pool = _pool
    results: list = [None] * n
    counter = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        for k in itertools.takewhile(lambda i: i < n, counter):
            results[k] = fn(items[k])

    helpers = [pool.submit(work) for _ in range(threads - 1)]
    try:
        work()
    finally:
        for future in helpers:
            future.result()
    return results
