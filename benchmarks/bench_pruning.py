"""What pruning saves on a study: epochs trained and best value, with and without the space's pruner.

Run by hand, never in CI::

    python benchmarks/bench_pruning.py                                   # search_spaces/default.yaml
    python benchmarks/bench_pruning.py search_spaces/default.yaml --seeds 0 1 2

For each seed, the same study (same space, same seed, ``--no-tracking``) runs twice through the real
command: as the file says, and with ``pruner: none``. Reported: epochs trained (sum over trials of
the epochs each ran), wall time, the best value and its relative gap to the unpruned study's best.
Targets: pruning saves at least half the epochs; its best value is within 2 % of the unpruned one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(space: Path, out: Path, seed: int, study_name: str) -> dict[str, float]:
    # The same study name in both runs (separate folders): Hyperband assigns trials to brackets by a
    # hash of the study name and trial number.
    import optuna

    from sweep.study import open_storage

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sweep.run", str(space), "--no-tracking", "--out", str(out),
                           "--seed", str(seed), "--study-name", study_name], capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"sweep.run failed ({proc.returncode}):\n{proc.stderr}")
    study = optuna.load_study(study_name=study_name,
                              storage=open_storage(str(out / study_name / "optuna.journal"), rdb=False))
    states = [t.state for t in study.trials]
    return {"epochs": sum(len(t.user_attrs.get("history", [])) for t in study.trials),
            "best": study.best_value, "wall": wall, "trials": len(states),
            "sign": 1 if study.direction.name == "MINIMIZE" else -1,
            "pruned": sum(s == optuna.trial.TrialState.PRUNED for s in states),
            "failed": sum(s == optuna.trial.TrialState.FAIL for s in states)}


def without_pruner(space: Path, folder: Path) -> Path:
    """A copy of the space with ``pruner: none`` (CSV paths made absolute, so the copy can move)."""
    import yaml

    from sweep.space import load_space, load_yaml

    doc = load_yaml(space)
    resolved = load_space(space).data
    doc.setdefault("data", {}).update({k: v for k, v in resolved.items() if k in ("train_csv", "test_csv")})
    doc["pruner"] = {"name": "none"}
    path = folder / f"{space.stem}_nopruner.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("space", nargs="?", default=str(ROOT / "search_spaces" / "default.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    space = Path(args.space).resolve()
    from sweep.space import load_space

    name = load_space(space).study_name
    with tempfile.TemporaryDirectory(prefix="bench_pruning_") as tmp:
        plain = without_pruner(space, Path(tmp))
        for seed in args.seeds:
            load = os.getloadavg()[0]
            pruned = run(space, Path(tmp) / f"p{seed}", seed, name)
            full = run(plain, Path(tmp) / f"n{seed}", seed, name)
            saved = 1 - pruned["epochs"] / full["epochs"]
            gap = full["sign"] * (pruned["best"] - full["best"]) / abs(full["best"])  # > 0: worse
            print(f"seed {seed} (load before {load:.1f}):")
            for name, r in (("with pruning", pruned), ("no pruning", full)):
                print(f"  {name:13s} {r['trials']} trials ({r['pruned']} pruned, {r['failed']} failed), "
                      f"{r['epochs']} epochs, best {r['best']:.5f}, {r['wall']:.0f} s")
            print(f"  pruning saved {saved:.0%} of the epochs; its best is {gap:+.2%} from the unpruned best "
                  f"({'better' if gap < 0 else 'worse' if gap > 0 else 'same'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
