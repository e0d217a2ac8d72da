"""Checkpoints: ``np.savez`` of the parameter dict (+ optimiser state) and the config as JSON.

Never pickled: the config travels as JSON in a string array, and loading checks every
parameter key and shape against the config's own ``init_params`` layout, naming the
first mismatch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixer.config import TrainConfig

FORMAT = "mixer-checkpoint/1"
_PARAM, _OPTIM, _META = "param/", "optim/", "__meta__"


class CheckpointError(ValueError):
    """A checkpoint file does not match what it claims to hold; the message names the key."""


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    config: TrainConfig
    optimizer_state: dict[str, np.ndarray] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def atomic_savez(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to ``path`` via a temporary file in the same folder, so no half-written file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, params: dict[str, np.ndarray], config: TrainConfig, *,
                    optimizer_state: dict[str, np.ndarray] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``params`` (and optimiser state) with ``config`` and JSON-able ``extra`` to ``path``."""
    meta = {"format": FORMAT, "config": config.to_flat(), "extra": extra or {},
            "params": list(params), "optimizer": list(optimizer_state or {})}
    arrays = {_META: np.array(json.dumps(meta))}
    arrays.update({_PARAM + k: v for k, v in params.items()})
    arrays.update({_OPTIM + k: np.asarray(v) for k, v in (optimizer_state or {}).items()})
    return atomic_savez(path, arrays)


def check_param_shapes(params: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                       *, source: str) -> None:
    """Raise CheckpointError naming the first key missing, unexpected or of the wrong shape."""
    for key, shape in expected.items():
        if key not in params:
            raise CheckpointError(f"{source}: parameter {key!r} is missing")
        if tuple(params[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: parameter {key!r} has shape {tuple(params[key].shape)}, "
                f"the config needs {tuple(shape)}"
            )
    for key in params:
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected parameter {key!r} for this config")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``, checking every key and shape."""
    from mixer.model import init_params

    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a checkpoint file: {exc}") from None
    with archive:
        if _META not in archive.files:
            raise CheckpointError(f"{path}: not a mixer checkpoint (no {_META} entry)")
        meta = json.loads(str(archive[_META]))
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            config = TrainConfig.from_flat(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad config: {exc}") from None
        params = {k[len(_PARAM):]: archive[k] for k in archive.files if k.startswith(_PARAM)}
        optim = {k[len(_OPTIM):]: archive[k] for k in archive.files if k.startswith(_OPTIM)}
    expected = {k: v.shape for k, v in init_params(config.model, 0).items()}
    check_param_shapes(params, expected, source=str(path))
    # Keep the writer's order so that iteration matches a freshly initialised dict.
    params = {k: params[k] for k in expected}
    return Checkpoint(params=params, config=config, optimizer_state=optim or None,
                      extra=meta.get("extra") or {})
