"""Plain, frozen configuration records shared by the model, training and the sweep.

Every knob a sweep may search or fix is a field of one of them, addressed by its bare name (``lr``),
so field names are unique across the three records."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixer.yaml_io import YamlError, load_yaml, shorten

GELU_FORMS = ("tanh", "erf")
SCHEDULERS = ("constant", "cosine", "cosine_warm_restarts", "sharp_cosine")
OPTIMIZERS = ("adam", "adamw")
SCALINGS = ("global", "standard", "log_standard", "quantile")
DATA_SOURCES = ("synthetic", "csv")
DTYPES = ("float32", "float64")

# Upper bounds far past any useful run, so that a typo (`epochs: 100000000000`) fails before a study
# starts instead of running forever or dying of MemoryError in every trial.
MAX_FEATURES = 100_000  # columns of a row (UNSW-NB15 has 42): the patch_size message lists their divisors
MAX_DIM = 4096  # channels per token (the notebook's model has 198)
MAX_DEPTH = 256  # blocks (the shipped spaces search up to 12)
MAX_EXPANSION = 16.0  # an MLP's hidden width over its input width (defaults 4 and 0.5)
MAX_BINS = 256  # piecewise-linear bins per feature
MAX_EPOCHS = 100_000  # also bounds the other counts of epochs: warmup_epochs, t_max, t_0, curvature_every
MAX_BATCH_SIZE = 65_536  # rows per step, also for curvature_batch (the real sample has 20,000 rows)
MAX_ROWS = 1_000_000  # synthetic rows, 50 times the real sample

# A relative CSV path in a space or run config is looked up by its file name in this folder when set.
DATA_DIR_ENV = "MIXER_DATA_DIR"


def divisors(n: int) -> list[int]:
    """The patch sizes that cut ``n`` features into whole tokens."""
    return [d for d in range(1, n + 1) if n % d == 0]


# A field's annotation -> what it must hold: YAML reads `1e11` and `.inf` as floats, `yes` as a bool
# (a bool passes for an integer in Python: only a bool field takes one).
_KINDS = {"bool": ("true or false", lambda v: isinstance(v, bool)),
          "int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
          "float": ("a finite number",
                    lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)),
          "str": ("text", lambda v: isinstance(v, str)),
          "str | None": ("text or null", lambda v: v is None or isinstance(v, str))}


def _check_types(record: Any) -> None:
    for f in dataclasses.fields(record):
        if f.type in _KINDS:
            _check_range(record, *_KINDS[f.type], f.name, show=shorten)


def _check_range(record: Any, rule: str, ok: Callable[[Any], bool], *names: str,
                 show: Callable[[Any], str] = str) -> None:
    for name in names:
        if not ok(getattr(record, name)):
            raise ValueError(f"{name} must be {rule}, got {name}={show(getattr(record, name))}")


def _check_choice(record: Any, name: str, allowed: tuple[str, ...]) -> None:
    _check_range(record, f"one of {allowed}", lambda v: v in allowed, name, show=shorten)


def _check_max(record: Any, limit: float, *names: str) -> None:
    _check_range(record, f"<= {limit:,}", lambda v: v <= limit, *names, show=shorten)


@dataclass(frozen=True)
class MixerConfig:
    """The architecture of one Mixer for rows of ``n_features`` tabular values."""

    n_features: int = 42
    patch_size: int = 3
    dim: int = 198
    depth: int = 10
    token_expansion: float = 4.0
    channel_expansion: float = 0.5
    dropout: float = 0.0
    stochastic_depth: float = 0.0
    gelu: str = "tanh"
    pos_weight: float = 1.0
    # Piecewise-linear encoding of each value before the patch embedding (0 = the value as it is):
    # ``bins`` pieces between the normal quantiles (see mixer.model.piecewise_linear).
    bins: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _check_max(self, MAX_FEATURES, "n_features")
        _check_max(self, MAX_DIM, "dim")
        _check_max(self, MAX_DEPTH, "depth")
        _check_max(self, MAX_EXPANSION, "token_expansion", "channel_expansion")
        _check_max(self, MAX_BINS, "bins")
        _check_range(self, "0 (off) or >= 2", lambda v: v == 0 or v >= 2, "bins")
        _check_range(self, ">= 1", lambda v: v >= 1, "n_features")
        if self.patch_size < 1 or self.n_features % self.patch_size:
            raise ValueError(f"patch_size must divide n_features={self.n_features} "
                             f"(valid: {', '.join(map(str, divisors(self.n_features)))}), "
                             f"got patch_size={self.patch_size}")
        _check_range(self, ">= 1", lambda v: v >= 1, "dim", "depth")
        _check_range(self, "in [0, 1)", lambda v: 0 <= v < 1, "dropout", "stochastic_depth")
        _check_choice(self, "gelu", GELU_FORMS)
        _check_range(self, "> 0", lambda v: v > 0, "pos_weight")
        if self.token_hidden < 1 or self.channel_hidden < 1:
            raise ValueError("token_expansion and channel_expansion must leave hidden sizes >= 1, got "
                             f"token_hidden={self.token_hidden}, channel_hidden={self.channel_hidden}")

    @property
    def n_tokens(self) -> int:
        return self.n_features // self.patch_size

    @property
    def patch_width(self) -> int:
        """Values per token entering the patch embedding: ``patch_size``, times ``bins`` if on."""
        return self.patch_size * (self.bins or 1)

    @property
    def token_hidden(self) -> int:
        return max(1, int(round(self.n_tokens * self.token_expansion)))

    @property
    def channel_hidden(self) -> int:
        return max(1, int(round(self.dim * self.channel_expansion)))


@dataclass(frozen=True)
class DataConfig:
    """Where the rows come from and how they are prepared (see ``mixer.data.load``).

    ``source="synthetic"`` generates ``n_rows`` rows from ``seed``; ``source="csv"`` reads ``train_csv``.
    ``test_fraction`` (0 = none) is held out first, then ``val_fraction`` of the rest; ``test_csv``
    names a separate test file instead."""

    source: str = "synthetic"
    n_rows: int = 6000
    seed: int = 0
    train_csv: str | None = None
    test_csv: str | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    scaling: str = "log_standard"

    def __post_init__(self) -> None:
        _check_types(self)
        _check_max(self, MAX_ROWS, "n_rows")
        _check_choice(self, "source", DATA_SOURCES)
        if self.source == "csv" and not self.train_csv:
            raise ValueError("source='csv' needs train_csv")
        _check_range(self, "in (0, 1)", lambda v: 0 < v < 1, "val_fraction")
        if not 0.0 <= self.test_fraction < 1.0 or self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError(f"test_fraction must be in [0, 1 - val_fraction), "
                             f"got test_fraction={self.test_fraction}, val_fraction={self.val_fraction}")
        if self.test_fraction and self.test_csv:
            raise ValueError("test_fraction and test_csv both name a test set; give one of them")
        _check_choice(self, "scaling", SCALINGS)
        _check_range(self, ">= 10", lambda v: v >= 10, "n_rows")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``mixer.train.fit`` needs besides the data and the seed."""

    model: MixerConfig = field(default_factory=MixerConfig)
    epochs: int = 20
    batch_size: int = 32
    dtype: str = "float32"
    # Optimiser: Adam, or AdamW (decoupled weight decay); clip_norm 0 = off.
    optimizer: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    # Training targets y * (1 - label_smoothing) + label_smoothing / 2; validation scores plain labels.
    label_smoothing: float = 0.0
    # Sharpness-aware minimisation (Foret et al., 2021), 0 = off: each step takes its gradient at
    # w + sam_rho * g / ||g||, which costs a second forward and backward pass per step.
    sam_rho: float = 0.0
    # Weights scored, kept and returned: an exponential moving average of the training weights
    # with this decay per step (mixer.optim.ema_update), 0 = the training weights themselves.
    ema_decay: float = 0.0
    # Gaussian noise added to each update, std = grad_noise / (1 + step) ** grad_noise_decay.
    grad_noise: float = 0.0
    grad_noise_decay: float = 0.55
    # Learning-rate schedule, stepped per epoch (see mixer.schedules).
    scheduler: str = "constant"
    eta_min: float = 0.0
    warmup_epochs: int = 0
    t_max: int = 0  # 0 = the epochs left after warmup
    t_0: int = 10
    t_mult: int = 1
    sharp_fraction: float = 0.15
    # Curvature probes on a fixed training batch (mixer.curvature): every k epochs (0 = never), when
    # the plateau rule sees the training loss stall, and at the last scheduled epoch.
    curvature_every: int = 0
    curvature_on_plateau: bool = False
    curvature_at_end: bool = False
    curvature_batch: int = 256            # at most; mixer.train caps it at 2 % of the training rows
    curvature_iters: int = 12             # Lanczos steps at most ...
    curvature_tol: float = 1e-2           # ... stopping once the extremes' residuals are this small
    curvature_share_eps: float = 0.01     # negative share: spectral density below -eps * radius
    curvature_escape_ratio: float = 0.05  # the escape test runs when |lambda_min| / lambda_max >= this

    def __post_init__(self) -> None:
        _check_types(self)
        _check_max(self, MAX_EPOCHS, "epochs", "warmup_epochs", "t_max", "t_0", "curvature_every")
        _check_max(self, MAX_BATCH_SIZE, "batch_size", "curvature_batch")
        _check_range(self, ">= 1", lambda v: v >= 1, "epochs", "batch_size")
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_choice(self, "scheduler", SCHEDULERS)
        _check_range(self, "> 0", lambda v: v > 0, "lr")
        if not 0 <= self.eta_min <= self.lr:
            raise ValueError(f"eta_min must be in [0, lr={self.lr}], got eta_min={self.eta_min}")
        _check_range(self, ">= 0", lambda v: v >= 0, "weight_decay", "clip_norm", "grad_noise",
                     "warmup_epochs", "t_max", "curvature_every", "sam_rho")
        if self.curvature_tol < 0 or not 0 < self.curvature_share_eps < 1 or self.curvature_escape_ratio <= 0:
            raise ValueError(f"need curvature_tol >= 0, 0 < curvature_share_eps < 1 and "
                             f"curvature_escape_ratio > 0, got {self.curvature_tol}, "
                             f"{self.curvature_share_eps}, {self.curvature_escape_ratio}")
        _check_range(self, "in [0, 1)", lambda v: 0 <= v < 1, "ema_decay", "label_smoothing")
        if self.t_0 < 1 or self.t_mult < 1:
            raise ValueError(f"t_0 and t_mult must be >= 1, got t_0={self.t_0}, t_mult={self.t_mult}")
        _check_range(self, "in (0, 1]", lambda v: 0 < v <= 1, "sharp_fraction")

    def to_flat(self) -> dict[str, Any]:
        """Model and training fields in one flat dict (for YAML, MLflow params)."""
        return {name: getattr(self, name) for name in TRAIN_FIELDS} | dataclasses.asdict(self.model)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict of model and training fields; unknown keys raise KeyError."""
        unknown = sorted(set(values) - set(MODEL_FIELDS) - set(TRAIN_FIELDS))
        if unknown:
            raise KeyError(f"unknown setting(s): {', '.join(unknown)}")
        model = MixerConfig(**{k: v for k, v in values.items() if k in MODEL_FIELDS})
        return cls(model=model, **{k: v for k, v in values.items() if k in TRAIN_FIELDS})

    def for_features(self, n_features: int) -> TrainConfig:
        """This config with its model sized for ``n_features`` columns: the data decides the count."""
        if n_features == self.model.n_features:
            return self
        return dataclasses.replace(self, model=dataclasses.replace(self.model, n_features=n_features))


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(MixerConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "model")
DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig))
_KNOBS = MODEL_FIELDS + TRAIN_FIELDS + DATA_FIELDS
assert len(set(_KNOBS)) == len(_KNOBS), "knob names must be unique across the config records"


def resolve_csv(value: str, *, base: Path) -> str:
    """The absolute path of a CSV named in a YAML file in the folder ``base``.

    A relative path is relative to ``base``, or with ``$MIXER_DATA_DIR`` set, its file name is looked
    up in that folder. ValueError if it is not a file; the message says where to put it."""
    p = Path(value)
    if not p.is_absolute():
        folder = os.environ.get(DATA_DIR_ENV)
        p = Path(folder) / p.name if folder else base / p
    p = p.resolve()
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not a CSV file")
    if not p.is_file():
        raise ValueError(f"file not found: {p} (put the CSV there, set {DATA_DIR_ENV} to the folder that "
                         f"holds it, or give its path with --train-csv; see data/README.md)")
    return str(p)


def check_memory(train: TrainConfig) -> None:
    """Raise ValueError if training ``train`` cannot fit in this machine's physical memory."""
    from mixer.model import param_count  # here: mixer.model imports this module

    m = train.model
    # A rough estimate: parameters, gradients and Adam's two moments, plus the activations each block
    # keeps for the backward pass: per MLP, about three arrays of (tokens x batch x dim) (input,
    # normalised input, dropout mask) and two of its hidden width (before and after the GELU).
    per_block = train.batch_size * (6 * m.n_tokens * m.dim + 2 * m.token_hidden * m.dim
                                    + 2 * m.n_tokens * m.channel_hidden)
    need = (8 if train.dtype == "float64" else 4) * (4 * param_count(m) + m.depth * per_block)
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise ValueError(f"training needs about {need / 2**30:,.1f} GiB (dim={m.dim}, depth={m.depth}, "
                         f"patch_size={m.patch_size}, batch_size={train.batch_size}, "
                         f"dtype={train.dtype}), more than this machine's {have / 2**30:,.1f} GiB")


def bad_field(exc: BaseException, names: Any) -> str | None:
    """Of ``names``, the one that the message of ``exc`` (raised by these records) names first."""
    found = [(m.start(), n) for n in names if (m := re.search(rf"\b{re.escape(str(n))}\b", str(exc)))]
    return min(found)[1] if found else None


class ConfigError(ValueError):
    """A configuration file is wrong; the message names the file and the key."""


def load_run_config(path: str | Path, *, train_csv: str | Path | None = None,
                    ) -> tuple[DataConfig, TrainConfig, int]:
    """Read a single-run YAML (``data:``, ``train:``, ``seed:``), as ``python -m mixer.train`` takes.

    CSV paths are found by ``resolve_csv``. ``train_csv`` (``--train-csv``, relative to the working
    directory) replaces ``data.train_csv`` and sets ``source: csv``. ConfigError names file and key."""
    path = Path(path)
    try:
        doc = load_yaml(path)
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with keys data, train, seed")
    unknown = [k for k in doc if k not in ("data", "train", "seed")]
    if unknown:
        raise ConfigError(f"{path}: unknown key {shorten(unknown[0])} (allowed: data, train, seed)")
    data_doc = doc.get("data") or {}
    train_doc = doc.get("train") or {}
    for key, section, allowed in (("data", data_doc, DATA_FIELDS),
                                  ("train", train_doc, MODEL_FIELDS + TRAIN_FIELDS)):
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
        for name in section:
            if name not in allowed:
                raise ConfigError(f"{path}: unknown key {key}.{str(name)[:80]}")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{path}: seed must be an integer, got {shorten(seed)}")
    if train_csv is not None:
        data_doc = {**data_doc, "source": "csv", "train_csv": str(Path(train_csv).absolute())}
    if data_doc.get("source") == "csv":
        for key in ("train_csv", "test_csv"):
            if isinstance(data_doc.get(key), str) and data_doc[key]:
                try:
                    data_doc = {**data_doc, key: resolve_csv(data_doc[key], base=path.parent)}
                except ValueError as exc:
                    raise ConfigError(f"{path}: data.{key}: {exc}") from None

    records = {}
    for section, build, values in (("data", lambda v: DataConfig(**v), data_doc),
                                   ("train", TrainConfig.from_flat, train_doc)):
        try:
            records[section] = build(values)
        except (TypeError, ValueError, KeyError) as exc:
            name = bad_field(exc, values)
            raise ConfigError(f"{path}: {section}{'.' + name if name else ''}: {exc}") from None
    try:
        check_memory(records["train"])
    except ValueError as exc:
        raise ConfigError(f"{path}: train: {exc}") from None
    return records["data"], records["train"], seed


def dump_run_config(data: DataConfig, train: TrainConfig, seed: int) -> dict[str, Any]:
    """The YAML-ready mapping that ``load_run_config`` reads back to the same records."""
    return {"data": dataclasses.asdict(data), "train": train.to_flat(), "seed": int(seed)}
