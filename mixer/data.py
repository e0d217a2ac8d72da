"""UNSW-NB15 data: the CSV schema, loading and validation, categorical encoding, scaling (the data
path: docs/architecture.md). Bad input raises ``DataError`` naming the source, the column and the
row: "data row N" is 1-based and counts data rows only, so in a CSV it sits on line N + 1 (both are
given); in a frame it is the position."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixer.config import SCALINGS, DataConfig
from mixer.metrics import normal_quantiles
from mixer.synthetic import synthetic_frame

__all__ = ["CATEGORICAL", "FEATURE_NAMES", "FLOAT_FEATURES", "DataError", "Dataset", "Pipeline", "labels",
           "load", "read_csv", "stratified_split", "synthetic_frame"]

# The 42 flow features of the public UNSW-NB15 release, in its column order.
FEATURE_NAMES: tuple[str, ...] = (
    "dur", "proto", "service", "state", "spkts", "dpkts", "sbytes", "dbytes", "rate", "sttl", "dttl",
    "sload", "dload", "sloss", "dloss", "sinpkt", "dinpkt", "sjit", "djit", "swin", "stcpb", "dtcpb",
    "dwin", "tcprtt", "synack", "ackdat", "smean", "dmean", "trans_depth", "response_body_len",
    "ct_srv_src", "ct_state_ttl", "ct_dst_ltm", "ct_src_dport_ltm", "ct_dst_sport_ltm",
    "ct_dst_src_ltm", "is_ftp_login", "ct_ftp_cmd", "ct_flw_http_mthd", "ct_src_ltm", "ct_srv_dst",
    "is_sm_ips_ports",
)
CATEGORICAL: tuple[str, ...] = ("proto", "service", "state")
LABEL = "label"
# Columns a raw frame may carry besides the features; never fed to the model.
IGNORED = ("id", "attack_cat")
# Columns stored as floats in the public CSV (the other numeric ones are integers).
FLOAT_FEATURES = frozenset({"dur", "rate", "sload", "dload", "sinpkt", "dinpkt", "sjit", "djit",
                             "tcprtt", "synack", "ackdat"})
# Key "quantiles" is present exactly when scaling is "quantile", so older pipelines load unchanged.
_PIPELINE_FORMAT = "mixer.data.Pipeline/1"
# Quantile scaling: at most this many CDF levels per feature (fewer for a smaller training split).
_MAX_LEVELS = 1000
# Levels are kept this far inside (0, 1) so the normal scores stay finite (scikit-learn's bound).
_LEVEL_EPS = 1e-7


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the column and row."""


def _where(row: int, *, csv: bool) -> str:
    """Name a 0-based row position for a message (see the module docstring)."""
    return f"data row {row + 1} (line {row + 2})" if csv else f"data row {row + 1}"


def _plain(value: Any) -> Any:
    """A NumPy scalar as a Python one, so messages read ``2``, not ``np.int64(2)``."""
    return value.item() if isinstance(value, np.generic) else value


def _first(mask: np.ndarray) -> int | None:
    """The position of the first True in ``mask``, or None if there is none."""
    return int(np.argmax(mask)) if mask.any() else None


def _check_columns(frame: pd.DataFrame, source: str, *, strict: bool) -> list[str]:
    """The feature columns of ``frame`` in its own order; DataError on a duplicate or missing one, and
    with ``strict`` on an unknown one (a CSV's is the wrong file; a frame's may be the caller's own)."""
    columns = [str(c) for c in frame.columns]
    if dup := sorted({c for c in columns if columns.count(c) > 1}):
        raise DataError(f"{source}: duplicate column {dup[0]!r}")
    if missing := [c for c in FEATURE_NAMES if c not in columns]:
        raise DataError(f"{source}: missing feature column(s) {', '.join(map(repr, missing))}")
    if strict:
        if unknown := [c for c in columns if c not in FEATURE_NAMES and c != LABEL and c not in IGNORED]:
            raise DataError(f"{source}: unexpected column {unknown[0]!r} (not a UNSW-NB15 column)")
    return [c for c in columns if c in FEATURE_NAMES]


def _numeric(series: pd.Series, column: str, source: str, *, csv: bool) -> np.ndarray:
    """One numeric column as float64; DataError at the first non-numeric, missing or infinite value."""
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if (row := _first(np.isnan(values) & series.notna().to_numpy())) is not None:
        raise DataError(f"{source}: column {column!r}, {_where(row, csv=csv)}: "
                        f"non-numeric value {_plain(series.iloc[row])!r}")
    if (row := _first(~np.isfinite(values))) is not None:
        what = "missing value" if np.isnan(values[row]) else f"non-finite value {values[row]!r}"
        raise DataError(f"{source}: column {column!r}, {_where(row, csv=csv)}: {what}")
    return values


def _categorical(series: pd.Series, column: str, source: str, *, csv: bool) -> pd.Series:
    """One categorical column as strings; DataError at the first missing value."""
    if (row := _first(series.isna().to_numpy())) is not None:
        raise DataError(f"{source}: column {column!r}, {_where(row, csv=csv)}: missing value")
    return series.astype(str)


def labels(frame: pd.DataFrame, *, source: str, csv: bool = False) -> np.ndarray:
    """The 0/1 target of a raw frame as int64 (rows,); DataError if there is none or a value is not 0/1
    (with ``csv``, the frame was read from the file ``source`` and messages give the line too)."""
    if LABEL not in frame.columns:
        raise DataError(f"{source}: no {LABEL!r} column (the 0/1 target)")
    values = _numeric(frame[LABEL], LABEL, source, csv=csv)
    if (row := _first((values != 0) & (values != 1))) is not None:
        raise DataError(f"{source}: column {LABEL!r}, {_where(row, csv=csv)}: "
                        f"label must be 0 or 1, got {_plain(frame[LABEL].iloc[row])!r}")
    return values.astype(np.int64)


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read and validate a UNSW-NB15 CSV of either layout (with or without ``attack_cat``).

    The frame is returned as read (all columns, the file's order); ``label`` is optional here (a file
    of rows to predict has none). DataError names the file and, where it applies, column and row."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise DataError(f"{source}: is a directory, not a CSV file")
    if not path.is_file():
        raise DataError(f"{source}: no such file" if not path.exists() else f"{source}: not a file")
    try:
        frame = pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{source}: empty file (no header line)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: not a readable CSV: {str(exc).strip()}") from None
    except OSError as exc:
        raise DataError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(frame) == 0:
        raise DataError(f"{source}: no data rows")
    _check_columns(frame, source, strict=True)
    for name in FEATURE_NAMES:
        check = _categorical if name in CATEGORICAL else _numeric
        check(frame[name], name, source, csv=True)
    if LABEL in frame.columns:
        labels(frame, source=source, csv=True)
    return frame


def _log_signed(x: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|), in place: compresses 1e9-sized counters without losing the sign."""
    sign = np.sign(x)
    np.abs(x, out=x)
    np.log1p(x, out=x)
    x *= sign
    return x


def _quantile_normal(x: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Encoded rows (rows, n_features) -> float64 normal scores through the fitted quantiles.

    Value -> CDF level -> normal score, both linear between fitted points; a value tied with a run of
    quantiles gets the run's middle level (forward and backward interpolation averaged, as
    scikit-learn does). Values are clamped to the training range first."""
    n = len(quantiles)
    levels = np.linspace(0.0, 1.0, n)
    scores = normal_quantiles(n, tail=_LEVEL_EPS)
    out = np.empty_like(x)
    for j in range(x.shape[1]):
        q = quantiles[:, j]
        v = np.clip(x[:, j], q[0], q[-1])
        level = 0.5 * (np.interp(v, q, levels) - np.interp(-v, -q[::-1], -levels[::-1]))
        out[:, j] = np.interp(level, levels, scores)
    return out


@dataclass(frozen=True, eq=False)  # array fields: compare pipelines by to_dict(), not ==
class Pipeline:
    """Everything fitted on the training split that turns raw rows into model inputs.

    ``feature_names`` is the model's column order (the training file's). ``categories`` lists each
    categorical column's training categories in code order (most frequent first, ties alphabetical);
    an unseen category gets the code ``len(categories[column])``. ``mean``/``std`` are float64
    (n_features,), applied after encoding (and the signed log for ``log_standard``); for ``global``
    every entry is the table-wide value, for ``quantile`` they are 0 and 1, unused. ``quantiles``
    (``quantile`` only, else None) is float64 (n_levels, n_features): row ``i`` holds each feature's
    encoded training quantile at level ``i / (n_levels - 1)``, non-decreasing down each column."""

    feature_names: list[str]
    categories: dict[str, list[str]]
    scaling: str
    mean: np.ndarray
    std: np.ndarray
    quantiles: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @classmethod
    def fit(cls, frame: pd.DataFrame, *, scaling: str, source: str) -> Pipeline:
        """Fit category codes and ``scaling`` statistics on the (training) rows of ``frame``.

        ``quantile`` uses ``min(1000, len(frame))`` levels, at least 2. ``source`` names the data in
        errors; ``feature_names`` follows the frame's own order of the 42 features."""
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got scaling={scaling!r}")
        if len(frame) == 0:
            raise DataError(f"{source}: no data rows to fit the preprocessing on")
        names = _check_columns(frame, source, strict=False)
        categories: dict[str, list[str]] = {}
        for name in [n for n in names if n in CATEGORICAL]:
            counts = _categorical(frame[name], name, source, csv=False).value_counts(sort=False)
            # Frequency order is deterministic once ties are broken by name.
            categories[name] = sorted(counts.index, key=lambda c: (-counts[c], c))
        # Encode with identity scaling, then measure the statistics on the encoded table.
        ones = np.ones(len(names))
        raw = cls(names, categories, "standard", np.zeros(len(names)), ones)._encode(frame, source)
        if scaling == "quantile":
            # Two levels at least, so that a one-row fit still puts its value at the middle level.
            levels = np.linspace(0.0, 1.0, max(2, min(_MAX_LEVELS, len(raw))))
            # Linear interpolation between order statistics can come out one ulp out of order, and
            # transform's binary search needs non-decreasing quantiles (scikit-learn does the same).
            quantiles = np.maximum.accumulate(np.quantile(raw, levels, axis=0), axis=0)
            return cls(names, categories, scaling, np.zeros(len(names)), ones, quantiles)
        if scaling == "log_standard":
            _log_signed(raw)
        axis = None if scaling == "global" else 0  # global: every entry is the table-wide value
        mean = np.full(len(names), raw.mean(axis=axis))
        std = np.full(len(names), raw.std(axis=axis))
        # A constant column would divide by zero (or by rounding noise): leave it centred, unscaled.
        std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        return cls(names, categories, scaling, mean, std)

    def _encode(self, frame: pd.DataFrame, source: str) -> np.ndarray:
        """Raw rows -> float64 (rows, n_features) before scaling; categories as codes."""
        present = {str(c) for c in frame.columns}
        if missing := [c for c in self.feature_names if c not in present]:
            raise DataError(f"{source}: missing feature column(s) {', '.join(map(repr, missing))}")
        out = np.empty((len(frame), len(self.feature_names)), dtype=np.float64)
        for j, name in enumerate(self.feature_names):
            if name in self.categories:
                cats = self.categories[name]
                codes = pd.Index(cats).get_indexer(_categorical(frame[name], name, source, csv=False))
                # A category unseen in training (code -1) gets the unknown code rather than failing the row.
                out[:, j] = np.where(codes < 0, len(cats), codes)
            else:
                out[:, j] = _numeric(frame[name], name, source, csv=False)
        return out

    def transform(self, frame: pd.DataFrame, *, source: str) -> np.ndarray:
        """Raw rows of either layout -> float32 (rows, n_features) in ``feature_names`` order.

        Extra columns (``id``, ``label``, ...) are ignored; DataError names ``source``, column and row."""
        x = self._encode(frame, source)
        if self.scaling == "quantile":
            return _quantile_normal(x, self.quantiles).astype(np.float32)
        if self.scaling == "log_standard":
            _log_signed(x)
        x -= self.mean
        x /= self.std
        return x.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description that ``from_dict`` turns back into the same pipeline.

        Arrays become lists of Python floats, which survive JSON exactly, so transform is bit-identical."""
        d = {"format": _PIPELINE_FORMAT, "feature_names": list(self.feature_names),
             "categories": {k: list(v) for k, v in self.categories.items()}, "scaling": self.scaling,
             "mean": self.mean.tolist(), "std": self.std.tolist()}
        if self.quantiles is not None:  # the key exists exactly for scaling "quantile"
            d["quantiles"] = self.quantiles.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pipeline:
        """Rebuild a pipeline from ``to_dict()``; DataError naming the first thing that is wrong."""
        where = "pipeline"
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a mapping, got {type(d).__name__}")
        expected = {"format", "feature_names", "categories", "scaling", "mean", "std"}
        for problem, keys in (("missing", expected - set(d)), ("unknown", set(d) - expected - {"quantiles"})):
            if keys:
                raise DataError(f"{where}: {problem} key {min(keys)!r}")
        if d["format"] != _PIPELINE_FORMAT:
            raise DataError(f"{where}: format must be {_PIPELINE_FORMAT!r}, got {d['format']!r}")
        names = d["feature_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DataError(f"{where}: feature_names must be a non-empty list of strings")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DataError(f"{where}: feature_names: duplicate {dup!r}")
        if d["scaling"] not in SCALINGS:
            raise DataError(f"{where}: scaling must be one of {SCALINGS}, got {d['scaling']!r}")
        cats = d["categories"]
        if not isinstance(cats, dict):
            raise DataError(f"{where}: categories must be a mapping of column -> list of categories")
        for col, values in cats.items():
            if col not in names:
                raise DataError(f"{where}: categories.{col}: not one of feature_names")
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise DataError(f"{where}: categories.{col} must be a list of strings")
            if len(set(values)) != len(values):
                raise DataError(f"{where}: categories.{col}: duplicate category")
        stats = {}
        for key in ("mean", "std"):
            try:
                arr = np.asarray(d[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise DataError(f"{where}: {key} must be a list of numbers") from None
            if arr.shape != (len(names),):
                raise DataError(f"{where}: {key} has shape {arr.shape}, expected ({len(names)},) "
                                f"(one value per feature name)")
            if not np.isfinite(arr).all():
                raise DataError(f"{where}: {key}[{int(np.argmax(~np.isfinite(arr)))}] is not finite")
            stats[key] = arr
        if (i := _first(stats["std"] <= 0)) is not None:
            raise DataError(f"{where}: std[{i}] ({names[i]}) must be > 0, got {stats['std'][i]}")
        quantiles = _check_quantiles(d, names, where)
        return cls(list(names), {k: list(v) for k, v in cats.items()}, d["scaling"],
                   stats["mean"], stats["std"], quantiles)


def _check_quantiles(d: dict[str, Any], names: list[str], where: str) -> np.ndarray | None:
    """The ``quantiles`` entry of a pipeline dict as float64 (n_levels, n_features), or None."""
    if d["scaling"] != "quantile":
        if "quantiles" in d:
            raise DataError(f"{where}: key 'quantiles' belongs to scaling 'quantile' only, "
                            f"got scaling {d['scaling']!r}")
        return None
    if "quantiles" not in d:
        raise DataError(f"{where}: missing key 'quantiles' (scaling 'quantile' needs it)")
    try:
        arr = np.asarray(d["quantiles"], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: quantiles must be a list of n_levels lists of "
                        f"{len(names)} numbers (one per feature name)") from None
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] != len(names):
        raise DataError(f"{where}: quantiles has shape {arr.shape}, expected (n_levels >= 2, "
                        f"{len(names)}) (one column per feature name)")
    if not np.isfinite(arr).all():
        i, j = np.argwhere(~np.isfinite(arr))[0]
        raise DataError(f"{where}: quantiles[{i}][{j}] ({names[j]}) is not finite")
    falls = np.diff(arr, axis=0) < 0
    if falls.any():
        i, j = np.argwhere(falls)[0]
        raise DataError(f"{where}: quantiles[:, {j}] ({names[j]}) must be non-decreasing, but "
                        f"level {i + 1} holds {float(arr[i + 1, j])!r} after {float(arr[i, j])!r}")
    return arr


@dataclass
class Dataset:
    """Arrays ready for the Mixer: x of shape (rows, n_features) float32, y of shape (rows,) in {0,1}.

    ``pipeline`` was fitted on the training split; ``x_test``/``y_test`` are None without a test CSV
    or ``test_fraction``. ``rows`` maps "train", "val" (and "test" for a held-out split) to sorted
    0-based positions in the source table."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    feature_names: list[str]
    pipeline: Pipeline
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    rows: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def stratified_split(y: np.ndarray, *, val_fraction: float, seed: int,
                     stream: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) row indices, each class split in the proportion ``val_fraction``.

    Each class of at least two rows puts at least one row on each side. The shuffle draws from
    ``np.random.default_rng([seed, stream])``: ``load`` takes the validation split from stream 1
    and the test split from stream 2, so the two are independent for one ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction}")
    # The split's stream is separate from the synthetic generator's, which also uses ``seed``.
    rng = np.random.default_rng([seed, stream])
    train, val = [], []
    for cls in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == cls))
        n_val = math.floor(len(rows) * val_fraction + 0.5)
        n_val = min(max(n_val, 1), len(rows) - 1) if len(rows) >= 2 else 0
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _split(y: np.ndarray, config: DataConfig, source: str) -> dict[str, np.ndarray]:
    """Sorted source positions of the train, validation and (test_fraction > 0) test rows."""
    if not config.test_fraction:
        train, val = stratified_split(y, val_fraction=config.val_fraction, seed=config.seed)
        if len(val) == 0:
            raise DataError(f"{source}: {len(y)} rows leave no validation rows "
                            f"at val_fraction={config.val_fraction}")
        return {"train": train, "val": val}
    rest, test = stratified_split(y, val_fraction=config.test_fraction, seed=config.seed, stream=2)
    train, val = stratified_split(y[rest], val_fraction=config.val_fraction, seed=config.seed)
    rows = {"train": rest[train], "val": rest[val], "test": test}
    # Every label on every side, or a split's metrics are undefined (or a label never learned).
    # Without a test split only an empty validation split is refused, as before test_fraction.
    for label, n in zip(*np.unique(y, return_counts=True), strict=True):
        for side, name in (("train", "training"), ("val", "validation"), ("test", "test")):
            if not (y[rows[side]] == label).any():
                raise DataError(f"{source}: the {n} row(s) of label {int(label)} leave no {name} row "
                                f"of that label at test_fraction={config.test_fraction}, "
                                f"val_fraction={config.val_fraction} (each label needs 3 rows at least)")
    return rows


def load(config: DataConfig) -> Dataset:
    """Load, split and scale the rows ``config`` names (synthetic rows, or ``train_csv``).

    ``test_fraction`` of the rows is held out first (its own random stream), ``val_fraction`` applies
    to the rest, and the pipeline is fitted on the training split only. A ``test_csv`` goes through
    it too (``y_test`` only if it has a ``label`` column). DataError names the file, column and row,
    or the fractions when a label has too few rows for every split."""
    csv = config.source == "csv"  # read_csv validates the file; synthetic rows are valid as made
    source = str(config.train_csv) if csv else f"synthetic(n_rows={config.n_rows}, seed={config.seed})"
    frame = read_csv(config.train_csv) if csv else synthetic_frame(config.n_rows, config.seed)
    y = labels(frame, source=source, csv=csv)
    if len(np.unique(y)) < 2:
        raise DataError(f"{source}: every label is {int(y[0])}; training needs both classes")
    rows = _split(y, config, source)
    pipeline = Pipeline.fit(frame.iloc[rows["train"]], scaling=config.scaling, source=source)
    xs = {side: pipeline.transform(frame.iloc[r], source=source) for side, r in rows.items()}
    ys = {side: y[r] for side, r in rows.items()}
    if config.test_csv:  # DataConfig refuses it beside test_fraction
        test = read_csv(config.test_csv)
        xs["test"] = pipeline.transform(test, source=str(config.test_csv))
        if LABEL in test.columns:
            ys["test"] = labels(test, source=str(config.test_csv), csv=True)
    return Dataset(xs["train"], ys["train"], xs["val"], ys["val"], list(pipeline.feature_names),
                   pipeline, xs.get("test"), ys.get("test"), rows)
