"""One training step on one thread and on two, for model shapes from tiny to the headline one.

Run by hand, never in CI::

    python benchmarks/bench_threads.py               # batch 64, dropout 0.1
    python benchmarks/bench_threads.py --batch 32

Each shape's step (``mixer.model.loss_and_grads`` with ``train=True``) is repeated for ~0.6 s on
one thread, then on two (``set_num_threads(n, adaptive=False)``), three times over; the best
time per step of each is printed with their ratio. A ratio above 1 means two threads lose: their
shards are so small that the threads mostly pass the GIL back and forth. This is what
``mixer._parallel`` decides per shape at run time (see its docstring).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [
    {"dim": 32, "depth": 1, "patch_size": 14, "token_expansion": 2.0, "channel_expansion": 2.0},
    {"dim": 32, "depth": 2, "patch_size": 3, "token_expansion": 2.0, "channel_expansion": 2.0},
    {"dim": 32, "depth": 4, "patch_size": 2, "token_expansion": 2.0, "channel_expansion": 2.0},
    {"dim": 64, "depth": 2, "patch_size": 3, "token_expansion": 2.0, "channel_expansion": 2.0},
    {"dim": 128, "depth": 4, "patch_size": 3, "token_expansion": 2.0, "channel_expansion": 2.0},
    {"dim": 198, "depth": 10, "patch_size": 3, "token_expansion": 4.0, "channel_expansion": 0.5},
]


def seconds_per_step(params: dict, x: np.ndarray, y: np.ndarray, config, threads: int,
                     budget: float = 0.6) -> float:
    from mixer import model as M

    M.set_num_threads(threads, adaptive=False)
    rng = np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        M.loss_and_grads(params, x, y, config, train=True, rng=rng)
        steps += 1
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="rows per step (default 64)")
    p.add_argument("--dropout", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")

    from mixer import model as M
    from mixer.config import MixerConfig

    data = np.random.default_rng(0)
    try:
        for shape in SHAPES:
            config = MixerConfig(**shape, dropout=args.dropout)
            params = M.init_params(config, 0)
            x = data.random((args.batch, config.n_features), dtype=np.float32)
            y = (data.random(args.batch) > 0.5).astype(np.float32)
            best = {1: np.inf, 2: np.inf}
            for _ in range(3):
                for threads in best:
                    best[threads] = min(best[threads], seconds_per_step(params, x, y, config, threads))
            print(f"dim {config.dim:3d} depth {config.depth:2d} patch {config.patch_size:2d}: "
                  f"1 thread {best[1] * 1e3:7.2f} ms, 2 threads {best[2] * 1e3:7.2f} ms per step, "
                  f"2/1 = {best[2] / best[1]:.2f}", flush=True)
    finally:
        M.set_num_threads(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
