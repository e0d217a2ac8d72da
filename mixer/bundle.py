"""A trained model that travels with its preprocessing: one ``.npz`` file in, probabilities out.

A bundle holds the Mixer's parameters, its ``MixerConfig`` and the fitted data ``Pipeline`` (category
codes, scaling statistics, column order), so raw UNSW-NB15 rows of either layout can be scored
without the training data. File layout (``np.savez``, never pickled): one array per parameter under
``param/<key>``, and under ``__bundle__`` a JSON string with ``format``, ``config`` (MixerConfig
fields), ``pipeline`` (``Pipeline.to_dict()``), the parameter keys and ``info``."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from mixer.config import MixerConfig
from mixer.data import Pipeline
from mixer.model import param_shapes, predict_logits

FORMAT = "mixer-bundle/1"
_PARAM, _META = "param/", "__bundle__"

# Rows scored per forward pass: bounds the (tokens, batch, dim) activations to a few tens of MB
# for the headline model, whatever the input size.
PREDICT_BATCH = 4096


class BundleError(ValueError):
    """A model bundle is unreadable or its parts disagree; the message names the file and the part."""


def atomic_write(path: str | Path, write: Callable[[IO], Any], *, mode: str = "wb") -> Path:
    """Call ``write`` on a temporary file in ``path``'s folder, then rename it to ``path``: a failed write
    leaves no half-written ``path`` (an existing one is kept). Text modes (``mode="w"``) open with
    ``newline=""``, as csv and pandas expect. The file mode is ``open()``'s (0o666 less the umask), not
    ``mkstemp``'s 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL: never someone else's file
    try:
        with os.fdopen(fd, mode, newline=None if "b" in mode else "") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (no overflow warning for large |logit|)."""
    logits = np.asarray(logits, dtype=np.float64)
    exp = np.exp(-np.abs(logits))  # at most 1, on either side of 0
    return np.where(logits >= 0, 1.0 / (1.0 + exp), exp / (1.0 + exp))


@dataclass
class ModelBundle:
    """Parameters (flat, as ``mixer.model.init_params`` lays them out), architecture and the
    preprocessing fitted on the training split of one trained Mixer, with JSON-serialisable
    provenance in ``info`` (study, trial number, seed, best epoch, ...)."""

    params: dict[str, np.ndarray]
    config: MixerConfig
    pipeline: Pipeline
    info: dict[str, Any] = field(default_factory=dict)

    def check(self, *, source: str = "bundle") -> None:
        """Raise BundleError naming the first mismatch of the config, pipeline and parameters."""
        if self.config.n_features != len(self.pipeline.feature_names):
            raise BundleError(f"{source}: config has n_features={self.config.n_features} but the pipeline "
                              f"produces {len(self.pipeline.feature_names)} features")
        expected = param_shapes(self.config)
        for key, shape in expected.items():
            if key not in self.params:
                raise BundleError(f"{source}: parameter {key!r} is missing")
            if tuple(self.params[key].shape) != tuple(shape):
                raise BundleError(f"{source}: parameter {key!r} has shape {tuple(self.params[key].shape)}, "
                                  f"the config needs {tuple(shape)}")
        if unexpected := [key for key in self.params if key not in expected]:
            raise BundleError(f"{source}: unexpected parameter {unexpected[0]!r} for this config")

    def save(self, path: str | Path) -> Path:
        """Write the bundle to ``path`` atomically (temporary file, then rename)."""
        self.check(source=str(path))
        meta = {"format": FORMAT, "config": dataclasses.asdict(self.config),
                "pipeline": self.pipeline.to_dict(), "params": list(self.params), "info": self.info}
        try:
            blob = json.dumps(meta)
        except TypeError as exc:
            raise BundleError(f"{path}: bundle metadata is not JSON-serialisable: {exc}") from None
        arrays = {_META: np.array(blob), **{_PARAM + k: np.asarray(v) for k, v in self.params.items()}}
        return atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        """Read a bundle written by ``save``, checking config, pipeline and parameters against each other;
        BundleError names the file and the first part that is missing or does not match."""
        path = Path(path)
        if path.is_dir():
            raise BundleError(f"{path}: is a directory, not a model file")
        if not path.is_file():
            raise BundleError(f"{path}: model file not found")
        # A corrupt or truncated archive fails in many ways (zipfile's BadZipFile, NotImplementedError
        # or RuntimeError from a garbled directory, ValueError or TokenError from an .npy header), at
        # opening or only when an entry is read: each one is a bad file, so every Exception is caught.
        try:
            archive = np.load(path, allow_pickle=False)
        except OSError as exc:
            raise BundleError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except Exception as exc:
            raise BundleError(f"{path}: not a model bundle (.npz), or truncated: {exc}") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise BundleError(f"{path}: not a model bundle (.npz archive expected)")
        with archive:
            if _META not in archive.files:
                raise BundleError(f"{path}: not a model bundle (no {_META} entry)")
            try:
                blob = str(archive[_META])
                params = {k[len(_PARAM):]: archive[k] for k in archive.files if k.startswith(_PARAM)}
            except Exception as exc:
                raise BundleError(f"{path}: corrupt or truncated model file: {exc}") from None
        try:
            meta = json.loads(blob)
        except ValueError as exc:
            raise BundleError(f"{path}: {_META} is not valid JSON: {exc}") from None
        found = meta.get("format") if isinstance(meta, dict) else None
        if found != FORMAT:
            raise BundleError(f"{path}: format {found!r}, expected {FORMAT!r}")
        parts = {}
        for part, build in (("config", lambda c: MixerConfig(**c)), ("pipeline", Pipeline.from_dict)):
            try:
                parts[part] = build(meta[part])
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(f"{path}: bad {part}: {exc}") from None
        # Keep the writer's order: iteration then matches a freshly initialised dict.
        params = {k: params[k] for k in [*meta.get("params", []), *params] if k in params}
        bundle = cls(params=params, **parts, info=meta.get("info") or {})
        bundle.check(source=str(path))
        return bundle

    def predict_proba(self, frame: pd.DataFrame, *, source: str) -> np.ndarray:
        """P(label = 1) for each raw row of ``frame`` (either layout; ``id``, ``label`` and ``attack_cat``
        are ignored), float64 of shape (rows,). A bad value raises mixer.data.DataError naming
        ``source`` (what the rows are, e.g. a file name), the column and the row."""
        return self.proba(self.pipeline.transform(frame, source=source))

    def proba(self, x: np.ndarray) -> np.ndarray:
        """P(label = 1) for rows ``x`` already transformed by ``self.pipeline``, float64 (rows,)."""
        x = np.asarray(x, dtype=next(iter(self.params.values())).dtype)
        logits = np.empty(len(x), dtype=np.float64)
        for start in range(0, len(x), PREDICT_BATCH):
            stop = start + PREDICT_BATCH
            logits[start:stop] = predict_logits(self.params, x[start:stop], self.config)
        return sigmoid(logits)
