"""A validated search space and how a trial samples it: parameters, conditions, the configs they build,
the study's sampler and pruner. ``sweep.space`` checks a space file, builds a ``Space`` and re-exports it."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixer.config import DATA_FIELDS, MODEL_FIELDS, TRAIN_FIELDS, DataConfig, MixerConfig, TrainConfig

__all__ = ["ETA_MIN_RATIO", "KNOBS", "Param", "PrunerSpec", "SamplerSpec", "Space", "flat_config",
           "split_flat"]

ETA_MIN_RATIO = "eta_min_ratio"  # the virtual knob: eta_min = eta_min_ratio * lr


# Knob name -> (record, kind): every field of the three config records but TrainConfig.model. The kind
# is the field's annotation (a string: mixer.config postpones annotations), optional_str for str | None.
KNOBS: dict[str, tuple[str, str]] = {
    f.name: (record, "optional_str" if f.type == "str | None" else f.type)
    for record, cls in (("model", MixerConfig), ("train", TrainConfig), ("data", DataConfig))
    for f in dataclasses.fields(cls) if f.name != "model"
}
KNOBS[ETA_MIN_RATIO] = ("train", "float")
_DEFAULT_LR = TrainConfig().lr


@dataclass(frozen=True)
class Param:
    """One searched knob: a range (float, int) or choices (categorical), sampled where ``when`` holds."""

    name: str  # a TrainConfig.to_flat() key, a DataConfig field, or eta_min_ratio
    type: str  # float, int or categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # knob -> allowed values, all must hold

    def candidates(self) -> list[tuple[str, Any]]:
        """(key path suffix, value) pairs that span the parameter: its bounds or its choices."""
        if self.type == "categorical":
            return [(f"choices[{i}]", v) for i, v in enumerate(self.choices)]
        return [("low", self.low), ("high", self.high)]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return any(_same(value, c) for c in self.choices)
        fits_type = _num(value) and (self.type == "float" or isinstance(value, int))
        return fits_type and self.low <= value <= self.high

    def grid_values(self) -> list[Any] | None:
        """The values the grid sampler walks through, or None if the range is continuous."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            n = int(round((self.high - self.low) / self.step))
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return None

    def suggest(self, trial: Any) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log,
                                       step=None if self.step is None else float(self.step))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal, without YAML's ``true == 1`` or ``"1" == 1`` confusions."""
    return (type(a) is type(b) or (_num(a) and _num(b))) and a == b


@dataclass(frozen=True)
class SamplerSpec:
    """Which Optuna sampler, its seed (None = derive from the study seed) and its keyword options."""

    name: str = "tpe"
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerSpec:
    """Which Optuna pruner and its keyword options; ``patient`` wraps another one."""

    name: str = "median"
    options: dict[str, Any] = field(default_factory=dict)
    wrapped: PrunerSpec | None = None


@dataclass(frozen=True)
class Space:
    """A validated study description. Build with ``load_space(path)``."""

    path: Path  # the YAML file
    study_name: str
    seed: int  # trial seeds derive from it and the trial number
    data: dict[str, Any]  # fixed DataConfig fields, CSV paths made absolute
    train: dict[str, Any]  # fixed flat training knobs, eta_min_ratio included
    params: dict[str, Param]  # in the order they are suggested (conditions first)
    metric: str = "val_loss"
    direction: str = "minimize"
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    n_trials: int | None = None
    timeout: float | None = None
    experiment: str | None = None  # MLflow's; None: the study name
    register_model: str | None = None  # the registry name of the best trial's model
    ensemble_top_k: int = 1  # also score the mean prediction of the best k trials on the test rows
    enqueue: tuple[dict[str, Any], ...] = ()  # parameter values of trials to run first

    def suggest(self, trial: Any) -> tuple[DataConfig, TrainConfig]:
        """Sample this trial's parameters (where their ``when`` holds) and build its configs; a
        ValueError means a sampled combination is invalid in a way validation cannot see."""
        return self.build(self._sampled(lambda p: p.suggest(trial)))

    def build(self, sampled: Mapping[str, Any]) -> tuple[DataConfig, TrainConfig]:
        """The configs for the fixed knobs plus ``sampled`` (eta_min clipped to lr, or eta_min_ratio * lr)."""
        return _build_configs({**self.data, **self.train, **sampled})

    def _sampled(self, value_of: Callable[[Param], Any]) -> dict[str, Any]:
        """``value_of(p)`` of each parameter, in order, whose conditions hold on the fixed knobs and the
        values before it (a condition on a parameter not sampled does not hold)."""
        values: dict[str, Any] = {}
        for p in self.params.values():
            known = {**self.data, **self.train, **values}
            if all(knob in known and known[knob] in allowed for knob, allowed in p.when.items()):
                values[p.name] = value_of(p)
        return values

    def active(self, values: Mapping[str, Any]) -> list[str]:
        """The parameters sampled in a trial whose known values are ``values``."""
        return list(self._sampled(lambda p: values.get(p.name)))

    def build_sampler(self, *, seed: int | None = None) -> Any:
        """The Optuna sampler, seeded with ``seed`` (default: the spec's seed, else the study seed)."""
        spec = self.sampler
        options = dict(spec.options)
        if spec.name == "grid":
            options["search_space"] = {name: p.grid_values() or [] for name, p in self.params.items()}
        with warnings.catch_warnings(action="ignore"):  # ExperimentalWarning for gp/qmc options
            return _sampler_class(spec.name)(seed=spec.seed if seed is None else seed, **options)

    def build_pruner(self) -> Any:
        return _make_pruner(self.pruner)


def flat_config(data: DataConfig, train: TrainConfig) -> dict[str, Any]:
    """Every knob of a trial in one flat dict (DataConfig fields + TrainConfig.to_flat())."""
    return {**dataclasses.asdict(data), **train.to_flat()}


def split_flat(flat: Mapping[str, Any]) -> tuple[DataConfig, TrainConfig]:
    """Inverse of ``flat_config``: unknown keys are ignored."""
    return (DataConfig(**{k: v for k, v in flat.items() if k in DATA_FIELDS}),
            TrainConfig.from_flat({k: v for k, v in flat.items() if k in MODEL_FIELDS + TRAIN_FIELDS}))


def _build_configs(flat: Mapping[str, Any]) -> tuple[DataConfig, TrainConfig]:
    flat = dict(flat)
    ratio = flat.pop(ETA_MIN_RATIO, None)
    lr = flat.get("lr", _DEFAULT_LR)
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"eta_min_ratio must be in [0, 1], got eta_min_ratio={ratio}")
        flat["eta_min"] = ratio * lr
    elif "eta_min" in flat and _num(flat["eta_min"]) and _num(lr) and flat["eta_min"] > lr:
        flat["eta_min"] = lr
    return split_flat(flat)


def _sampler_class(name: str) -> Any:
    import optuna

    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler, "cmaes": optuna.samplers.CmaEsSampler,
            "qmc": optuna.samplers.QMCSampler, "gp": optuna.samplers.GPSampler}[name]


def _pruner_class(name: str) -> Any:
    import optuna

    return {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "hyperband": optuna.pruners.HyperbandPruner, "patient": optuna.pruners.PatientPruner,
            "none": optuna.pruners.NopPruner}[name]


def _make_pruner(spec: PrunerSpec) -> Any:
    cls = _pruner_class(spec.name)
    with warnings.catch_warnings(action="ignore"):  # ExperimentalWarning for the patient pruner
        if spec.name == "patient":
            return cls(_make_pruner(spec.wrapped) if spec.wrapped is not None else None, **spec.options)
        return cls(**spec.options)
