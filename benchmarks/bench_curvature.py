"""What a curvature probe costs against an epoch, and how well its float32 extremes agree with float64.

Run by hand, never in CI::

    python benchmarks/bench_curvature.py                          # both models, ~3 min on 2 cores
    python benchmarks/bench_curvature.py --models default --epochs 1 --rows 1000 --ref-iters 8  # smoke

For each model it trains ``--epochs`` epochs with ``mixer.train.fit`` (probes off), timing the CPU
seconds of the process (all threads: less sensitive than wall time to other load on a shared
machine); then, at the trained weights and on a probe batch drawn as ``fit`` draws it, it takes
one probe the way ``fit`` does (training dtype, early stop at ``curvature_tol``, the escape test
at clear negative curvature), timed the same way, and a float64 reference of ``--ref-iters``
Lanczos steps without early stop. Reported: CPU-s per epoch and per probe, the probe as a
fraction of an epoch, the same fraction counted in rows through a forward+backward pass (a
product is two of them on the probe batch, a forward pass a third of one), and the relative
difference of the probe's λ_min and λ_max from the reference's.

Models: the headline (``configs/notebook_headline.yaml``, the real sample if present, else
synthetic rows of the same shape) and the default study's typical trial (``search_spaces/
default.yaml``'s fixed settings with patch 3, depth 2, lr 1e-3).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = ROOT.parent / "shared" / "data" / "unsw-nb15" / "UNSWNB15_training_coursework.csv"


def models(rows: int | None) -> dict:
    """name -> (DataConfig, TrainConfig) of the two models."""
    from mixer.config import DataConfig, MixerConfig, TrainConfig
    from mixer.yaml_io import load_yaml

    doc = load_yaml(ROOT / "configs" / "notebook_headline.yaml")
    train = TrainConfig.from_flat(doc["train"])
    data = (DataConfig(source="csv", train_csv=str(REAL_CSV), scaling=doc["data"]["scaling"])
            if REAL_CSV.is_file() else DataConfig(n_rows=25_000, scaling=doc["data"]["scaling"]))
    default = (DataConfig(n_rows=4000, seed=0, scaling="log_standard"),
               TrainConfig(model=MixerConfig(patch_size=3, dim=32, depth=2, token_expansion=2.0,
                                             channel_expansion=2.0),
                           epochs=10, batch_size=64, lr=1e-3))
    out = {"headline": (data, train), "default": default}
    if rows:  # a smaller synthetic stand-in, for smoke runs
        out = {k: (DataConfig(n_rows=rows, scaling=d.scaling), t) for k, (d, t) in out.items()}
    return out


def measure(name: str, data_config, config, args: argparse.Namespace) -> None:
    from mixer.curvature import escape_test, extreme_eigenvalues
    from mixer.data import load
    from mixer.model import param_count
    from mixer.train import fit, probe_size

    data = load(data_config)
    config = dataclasses.replace(config.for_features(data.n_features), epochs=args.epochs)
    cpu = time.process_time()
    params = fit(config, data, seed=args.seed).params
    epoch_cpu = (time.process_time() - cpu) / args.epochs

    n = len(data.x_train)
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(n, size=min(args.batch, n) if args.batch else probe_size(config, n), replace=False)
    x, y = data.x_train[rows].astype(config.dtype), data.y_train[rows]
    tol = getattr(config, "curvature_tol", 1e-2)
    cpu = time.process_time()
    c = extreme_eigenvalues(params, x, y, config.model, iters=config.curvature_iters, seed=args.seed,
                            dtype=config.dtype, tol=tol)
    escaped = c.lambda_min < 0 and c.neg_ratio >= getattr(config, "curvature_escape_ratio", 0.05)
    if escaped:
        escape = escape_test(params, x, y, config.model, c.ritz.vector_min, c.lambda_min)
    probe_cpu = time.process_time() - cpu
    ref = extreme_eigenvalues(params, x, y, config.model, iters=args.ref_iters, seed=args.seed,
                              dtype=np.float64)

    # Rows through a forward+backward pass: an epoch's training steps plus its validation forward pass.
    epoch_rows = n + len(data.x_val) / 3
    probe_rows = len(rows) * (2 * c.iters + (1 if escaped else 0))
    print(f"{name}: {param_count(config.model):,} parameters, {n:,} training rows, probe batch {len(rows)}")
    print(f"  epoch {epoch_cpu:.2f} CPU-s; probe {probe_cpu:.2f} CPU-s ({c.iters} Lanczos steps, "
          f"{2 * c.iters} gradients, escape test {'run' if escaped else 'not needed'}, tol {tol:g})")
    print(f"  probe / epoch: measured {probe_cpu / epoch_cpu:.3f}, "
          f"counted in rows {probe_rows / epoch_rows:.3f}")
    off_min, off_max = abs(c.lambda_min / ref.lambda_min - 1), abs(c.lambda_max / ref.lambda_max - 1)
    line = (f"  {config.dtype} probe vs float64 ({args.ref_iters} steps): "
            f"λ_min {c.lambda_min:.5g} vs {ref.lambda_min:.5g} ({off_min:.1e}), "
            f"λ_max {c.lambda_max:.5g} vs {ref.lambda_max:.5g} ({off_max:.1e}); "
            f"neg share {c.neg_share:.3f} vs {ref.neg_share:.3f}")
    print(line + (f"; escape gain {escape.gain:.3f}" if escaped else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["headline", "default"],
                        default=["headline", "default"])
    parser.add_argument("--epochs", type=int, default=1, help="epochs to train before probing (and to time)")
    parser.add_argument("--rows", type=int, help="use this many synthetic rows instead (smoke runs)")
    parser.add_argument("--batch", type=int, help="probe batch (default: fit's, mixer.train.probe_size)")
    parser.add_argument("--ref-iters", type=int, default=20, help="Lanczos steps of the float64 reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, (data_config, config) in models(args.rows).items():
        if name in args.models:
            measure(name, data_config, config, args)


if __name__ == "__main__":
    main()
