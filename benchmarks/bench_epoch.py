"""Seconds per epoch of the NumPy Mixer under ``mixer.train.fit``, against PyTorch on the same shapes.

Run by hand, never in CI::

    python benchmarks/bench_epoch.py                    # headline model, 2 threads, 1 epoch
    python benchmarks/bench_epoch.py --threads 1 --epochs 2 --rows 5000
    python benchmarks/bench_epoch.py --profile 25       # + the NumPy run's top functions

Each implementation runs in its own subprocess (so that peak RSS is its own and neither
warms the other's caches), one after the other in the same invocation, on the same arrays:
the real UNSW-NB15 sample if present (train on ``--rows`` rows, validate on ``--val-rows``
rows drawn from it), else synthetic arrays of the same shape. Features: the numeric columns
plus integer codes of proto/service/state, log-scaled and standardised (42 features), which
is all a timing needs. Reported: train and validation seconds per epoch (wall clock), CPU
seconds per epoch (all threads; less sensitive than wall time to other load on a shared
machine), matmul GFLOP/s (``mixer.model.flops_per_example``), peak RSS, and numpy/torch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = ROOT.parent / "shared" / "data" / "unsw-nb15" / "UNSWNB15_training_coursework.csv"
# The headline model of the original notebook.
HEADLINE = dict(n_features=42, patch_size=3, dim=198, depth=10, token_expansion=4.0,
                channel_expansion=0.5, dropout=0.3, stochastic_depth=0.3)


def _headline(args: argparse.Namespace) -> dict:
    """The headline model, with ``--dropout`` (for both dropout and stochastic depth) if given."""
    if args.dropout is None:
        return dict(HEADLINE)
    return {**HEADLINE, "dropout": args.dropout, "stochastic_depth": args.dropout}


def make_arrays(rows: int, val_rows: int, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Train/validation arrays (float32 x, 0/1 y) and a description of where they came from."""
    rng = np.random.default_rng(seed)
    if REAL_CSV.is_file():
        import pandas as pd

        frame = pd.read_csv(REAL_CSV)
        y = frame["label"].to_numpy(dtype=np.int64)
        frame = frame.drop(columns=[c for c in ("id", "label", "attack_cat") if c in frame.columns])
        cols = []
        for name in frame.columns:
            col = frame[name]
            cols.append(col.to_numpy(np.float64) if pd.api.types.is_numeric_dtype(col)
                        else col.astype("category").cat.codes.to_numpy(np.float64))
        x = np.stack(cols, axis=1)
        x = np.sign(x) * np.log1p(np.abs(x))
        x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
        source = f"{REAL_CSV.name} ({len(x)} rows)"
    else:
        x = rng.standard_normal((rows, HEADLINE["n_features"]))
        y = (x[:, :5].sum(1) + rng.standard_normal(rows) > 0).astype(np.int64)
        source = "synthetic"
    train = rng.permutation(len(x))[:rows] if rows <= len(x) else rng.integers(0, len(x), rows)
    val = rng.choice(len(x), size=val_rows, replace=val_rows > len(x))
    arrays = {"x_train": x[train].astype(np.float32), "y_train": y[train],
              "x_val": x[val].astype(np.float32), "y_val": y[val]}
    return arrays, source


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_numpy(arrays: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    """One fit() of ``--epochs`` epochs; the validation part is timed again on its own."""
    from mixer.config import MixerConfig, TrainConfig
    from mixer.data import Dataset
    from mixer.metrics import bce_with_logits
    from mixer.model import flops_per_example, get_num_threads, predict_logits, set_num_threads
    from mixer.train import fit

    set_num_threads(args.threads, adaptive=False)  # exactly as many threads as torch gets

    model = MixerConfig(**_headline(args))
    config = TrainConfig(model=model, epochs=args.epochs, batch_size=args.batch_size, lr=1e-3,
                         scheduler="constant")
    data = Dataset(arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"],
                   feature_names=[f"f{i}" for i in range(model.n_features)], pipeline=None)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started, cpu_started = time.perf_counter(), time.process_time()
    result = fit(config, data, seed=0)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    # fit's epoch_seconds covers training and validation; time the validation alone (the same
    # predict_logits + loss fit runs) to split the two.
    val_times = []
    for _ in range(3):
        t = time.perf_counter()
        bce_with_logits(predict_logits(result.params, data.x_val, model), data.y_val.astype(np.float64),
                        pos_weight=model.pos_weight)
        val_times.append(time.perf_counter() - t)
    epoch = float(np.mean([m.epoch_seconds for m in result.history]))
    val = float(np.median(val_times))
    return {"epoch_seconds": epoch, "train_seconds": epoch - val, "val_seconds": val, "fit_wall": wall,
            "cpu_seconds": cpu / args.epochs,
            "threads": get_num_threads(), "status": result.status,
            "train_loss": result.history[-1].train_loss, "val_loss": result.history[-1].val_loss,
            "flops_train": flops_per_example(model) * len(data.x_train),
            "flops_val": flops_per_example(model, backward=False) * len(data.x_val),
            "peak_rss_mb": peak_rss_mb()}


def run_torch(arrays: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from torch_mixer import time_epoch

    from mixer.config import MixerConfig

    model = MixerConfig(**_headline(args))
    cpu_started = time.process_time()
    runs = [time_epoch(model, arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"],
                       batch_size=args.batch_size, threads=args.threads, seed=epoch)
            for epoch in range(args.epochs)]
    train = float(np.mean([r["train_seconds"] for r in runs]))
    val = float(np.mean([r["val_seconds"] for r in runs]))
    return {"epoch_seconds": train + val, "train_seconds": train, "val_seconds": val,
            "cpu_seconds": (time.process_time() - cpu_started) / args.epochs,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "train_loss": runs[-1]["train_loss"], "val_loss": runs[-1]["val_loss"],
            "peak_rss_mb": peak_rss_mb()}


def child(args: argparse.Namespace) -> int:
    arrays = dict(np.load(args.arrays))
    out = run_numpy(arrays, args) if args.child == "numpy" else run_torch(arrays, args)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def spawn(kind: str, arrays_path: str, args: argparse.Namespace) -> dict | None:
    env = dict(os.environ, MIXER_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    if kind == "numpy":
        # BLAS stays single-threaded (the model threads over shards); set before NumPy loads.
        env.update(OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    elif args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "--child", kind, "--arrays", arrays_path, "--threads", str(args.threads),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    if args.dropout is not None:
        cmd += ["--dropout", str(args.dropout)]
    if args.profile and kind == "numpy":
        cmd += ["--profile", str(args.profile)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"{kind} run failed (exit {proc.returncode}):\n{proc.stdout}", file=sys.stderr)
    return None


def row(name: str, r: dict, flops: float) -> str:
    return (f"{name:8s} {r['epoch_seconds']:8.2f} {r['train_seconds']:8.2f} {r['val_seconds']:7.2f} "
            f"{r['cpu_seconds']:7.2f} {flops / r['epoch_seconds'] / 1e9:8.1f} {r['peak_rss_mb']:8.0f}  "
            f"train {r['train_loss']:.4f} val {r['val_loss']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for both implementations (2)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs to time, averaged (1)")
    parser.add_argument("--rows", type=int, default=20_000, help="training rows (20000)")
    parser.add_argument("--val-rows", type=int, default=4_000, help="validation rows (4000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--dropout", type=float, metavar="P",
                        help="dropout and stochastic depth for both implementations (headline: 0.3). "
                             "0 takes the mask draws out of the comparison: torch's bernoulli_ is ~40 %% "
                             "of its epoch here")
    parser.add_argument("--omp-passive", action="store_true",
                        help="run torch with OMP_WAIT_POLICY=PASSIVE: on a machine busy with other work its "
                             "OpenMP threads otherwise spin-wait for each other and it slows down many-fold")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the NumPy run's top N functions by own time (cProfile; slows it)")
    parser.add_argument("--child", choices=("numpy", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--arrays", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("threads", "epochs", "rows", "val_rows", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.child:
        return child(args)

    import importlib.util

    arrays, source = make_arrays(args.rows, args.val_rows)
    have_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    print(f"data: {source}; train {len(arrays['x_train'])} rows, val {len(arrays['x_val'])} rows; "
          f"batch {args.batch_size}; threads {args.threads}; epochs {args.epochs}; "
          f"dropout {_headline(args)['dropout']}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'':8s} {'epoch s':>8s} {'train s':>8s} {'val s':>7s} {'cpu s':>7s} {'GFLOP/s':>8s} "
          f"{'peak MB':>8s}  mean train loss, val loss", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "arrays.npz")
        np.savez(path, **arrays)
        r = spawn("numpy", path, args)
        if r is None:
            return 1
        flops = r["flops_train"] + r["flops_val"]
        print(row("numpy", r, flops), flush=True)
        if not have_torch:
            if not args.no_torch:
                print("torch not installed: `pip install torch==2.13.0` for the reference")
            return 0
        t = spawn("torch", path, args)
    if t is None:
        return 1
    print(row("torch", t, flops) + f"  (torch {t['torch']}{', OMP passive' if args.omp_passive else ''})")
    print(f"numpy/torch: epoch {r['epoch_seconds'] / t['epoch_seconds']:.2f}, "
          f"train {r['train_seconds'] / t['train_seconds']:.2f}, "
          f"val {r['val_seconds'] / t['val_seconds']:.2f}, cpu {r['cpu_seconds'] / t['cpu_seconds']:.2f}; "
          f"load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
