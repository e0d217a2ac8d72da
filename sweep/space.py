"""Search spaces: one YAML file says everything about a study, checked before anything runs.

The keys are in README.md ("Search spaces"), what they do in docs/architecture.md. Every error is a
``SpaceError`` starting with the file and the key path, e.g. ``x.yaml: params.dim.low: ...``."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import re
from pathlib import Path
from typing import Any

from mixer.config import DataConfig, bad_field, check_memory, divisors, resolve_csv
from mixer.yaml_io import YamlError, shorten
from mixer.yaml_io import load_yaml as _load_yaml
from sweep.messages import one_line
from sweep.sampling import (
    ETA_MIN_RATIO,
    KNOBS,
    Param,
    PrunerSpec,
    SamplerSpec,
    Space,
    _build_configs,
    _num,
    _pruner_class,
    _sampler_class,
    flat_config,
    split_flat,
)

__all__ = ["METRICS", "N_FEATURES", "PRUNERS", "SAMPLERS", "Param", "PrunerSpec", "SamplerSpec", "Space",
           "SpaceError", "flat_config", "load_space", "load_yaml", "parse_space", "split_flat"]

# Both UNSW-NB15 layouts and the synthetic generator give 42 feature columns (mixer.data).
N_FEATURES = 42
_PATCH_SIZES = ", ".join(map(str, divisors(N_FEATURES)))  # the valid ones, for errors

METRICS = ("val_loss", "train_loss", "val_accuracy", "val_precision", "val_recall", "val_f1")
DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc", "gp")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "patient", "none")
PARAM_TYPES = ("float", "int", "categorical")

TOP_KEYS = ("study", "description", "seed", "data", "train", "metric", "direction", "sampler",
            "pruner", "budget", "experiment", "register_model", "publish", "params", "enqueue")

# Knobs a space may not set: n_features comes from the data; CSV paths and the source are data
# settings that make no sense to search (they may still be fixed under ``data``); a searched test
# split would let the sampler choose the rows the winner is scored on.
_NOT_A_KNOB = {"n_features": "n_features is set by the data (42 columns), not by the space"}
_NOT_SEARCHABLE = ("source", "train_csv", "test_csv", "test_fraction")

# Sampler/pruner constructor arguments a YAML file cannot express (callables, objects) or that the
# space sets itself (seed, the grid, the wrapped pruner).
_HIDDEN_OPTIONS = {"seed", "search_space", "wrapped_pruner", "gamma", "weights", "constraints_func",
                   "independent_sampler", "source_trials"}
# Integer options of samplers and pruners that must be >= 1 (the others must be >= 0: a count of
# trials, steps or epochs); Optuna itself accepts e.g. n_startup_trials=-5 or n_ei_candidates=0.
_AT_LEAST_ONE = {"n_ei_candidates", "popsize", "interval_steps", "n_min_trials", "min_resource",
                 "max_resource", "reduction_factor"}
# Past these, a study would not end in any useful time (a trial takes seconds to minutes), or a
# sampler's candidates or a pruner's steps would outnumber any study's trials and epochs.
MAX_TRIALS = 100_000
MAX_TIMEOUT = 30 * 24 * 3600  # seconds: a month
MAX_OPTION = 100_000
MAX_ENSEMBLE = 50  # members, each retrained once at the end of the study
# Optional packages some samplers need (pyproject extra "samplers").
_SAMPLER_NEEDS = {"cmaes": ("cmaes",), "gp": ("scipy", "torch")}


class SpaceError(ValueError):
    """A search-space file is wrong; the message names the file and the key path."""


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file with ``mixer.yaml_io`` ("1e-4" is a float, duplicate keys fail), as SpaceError."""
    try:
        return _load_yaml(path)
    except YamlError as exc:
        raise SpaceError(str(exc)) from None


def load_space(path: str | Path, *, train_csv: str | Path | None = None) -> Space:
    """Read and validate a search-space file (``train_csv`` as in ``parse_space``); SpaceError if bad."""
    return parse_space(load_yaml(path), path=path, train_csv=train_csv)


# A knob's kind (``sweep.sampling.KNOBS``) -> the YAML values it takes, and their name in errors.
_KIND_TYPES = {"int": int, "float": int | float, "str": str, "optional_str": str | None, "bool": bool}
_KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "optional_str": "a string or null"}


@dataclasses.dataclass
class _Checker:
    path: Path

    def fail(self, key: str, message: str) -> SpaceError:
        where = f"{key}: " if key else ""
        return SpaceError(f"{self.path}: {where}{message}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__} {shorten(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(key, f"keys must be strings, got {shorten(k)}")
            if allowed is not None and k not in allowed:
                raise self.fail(_join(key, k), f"unknown key {shorten(k)} (allowed: {', '.join(allowed)})")
        return value

    def integer(self, value: Any, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"expected an integer, got {shorten(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {shorten(value)}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be <= {maximum:,}, got {shorten(value)}")
        return value

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(key, f"expected one of {', '.join(allowed)}, got {shorten(value)}")
        return value

    def kind(self, value: Any, key: str, kind: str, of: str = "") -> None:
        """``value`` must fit a knob of ``kind``, booleans only for bool; ``of`` names the knob."""
        if not isinstance(value, _KIND_TYPES[kind]) or isinstance(value, bool) != (kind == "bool"):
            raise self.fail(key, f"expected {_KIND_NAMES[kind]}{of}, got {shorten(value)}")

    def build(self, key: str, flat: dict[str, Any]) -> None:
        """The knobs ``flat`` must build valid configs (``sweep.sampling``), else fail at ``key``."""
        try:
            _build_configs(flat)
        except (TypeError, ValueError, KeyError) as exc:
            raise self.fail(key, one_line(exc)) from None


def _join(key: str, sub: str | int) -> str:
    if isinstance(sub, int):
        return f"{key}[{sub}]"
    sub = sub if len(sub) <= 80 else sub[:77] + "..."  # a hostile key cannot flood the message either
    return f"{key}.{sub}" if key else sub


def parse_space(doc: Any, *, path: str | Path = "<space>", train_csv: str | Path | None = None) -> Space:
    """Validate an already-parsed space document; ``path`` names it in errors. ``train_csv`` (from
    ``--train-csv``, relative to the working directory) replaces ``data.train_csv``, with source csv."""
    path = Path(path)
    c = _Checker(path)
    if doc is None:
        raise c.fail("", "the file is empty")
    doc = c.mapping(doc, "", TOP_KEYS)

    name = doc.get("study", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise c.fail("study", f"expected a name of letters, digits, '_', '-', '.', got {shorten(name)}")
    seed = c.integer(doc.get("seed", 0), "seed", minimum=0)
    if "description" in doc and not isinstance(doc["description"], str):
        raise c.fail("description", "expected text")

    data = c.mapping(doc.get("data"), "data")
    if train_csv is not None:
        data = {**data, "source": "csv", "train_csv": str(Path(train_csv).absolute())}
    data = _check_fixed(c, data, "data")
    train = _check_fixed(c, c.mapping(doc.get("train"), "train"), "train")
    params = _check_params(c, c.mapping(doc.get("params"), "params"), data, train)

    # eta_min: either directly (clipped to lr) or as a ratio of lr, not both.
    if all(k in train or k in params for k in ("eta_min", ETA_MIN_RATIO)):
        key = "params.eta_min_ratio" if ETA_MIN_RATIO in params else "train.eta_min_ratio"
        raise c.fail(key, "give eta_min or eta_min_ratio, not both")

    _check_ranges(c, data, train, params)
    _check_memory(c, data, train, params)
    params = _order_conditions(c, params, {**data, **train})

    metric = c.choice(doc.get("metric", "val_loss"), "metric", METRICS)
    default_direction = "minimize" if metric.endswith("_loss") else "maximize"
    direction = c.choice(doc.get("direction", default_direction), "direction", DIRECTIONS)

    sampler = _check_sampler(c, doc.get("sampler", "tpe"), params)
    pruner = _check_pruner(c, doc.get("pruner", "median"), "pruner")

    budget = c.mapping(doc.get("budget"), "budget", ("n_trials", "timeout"))
    n_trials = budget.get("n_trials")
    if n_trials is not None:
        c.integer(n_trials, "budget.n_trials", minimum=1, maximum=MAX_TRIALS)
    timeout = budget.get("timeout")
    if timeout is not None and (not _num(timeout) or not 0 < timeout <= MAX_TIMEOUT):
        raise c.fail("budget.timeout", f"expected seconds in (0, {MAX_TIMEOUT:,}], got {shorten(timeout)}")

    for key, what in (("experiment", "name"), ("register_model", "model name")):
        if doc.get(key) is not None and (not isinstance(doc[key], str) or not doc[key].strip()):
            raise c.fail(key, f"expected a non-empty {what}, got {shorten(doc[key])}")

    publish = c.mapping(doc.get("publish"), "publish", ("ensemble_top_k",))
    top_k = c.integer(publish.get("ensemble_top_k", 1), "publish.ensemble_top_k", minimum=1,
                      maximum=MAX_ENSEMBLE)

    space = Space(path=path, study_name=name, seed=seed, data=data, train=train, params=params,
                  metric=metric, direction=direction, sampler=sampler, pruner=pruner,
                  n_trials=n_trials, timeout=None if timeout is None else float(timeout),
                  experiment=doc.get("experiment"), register_model=doc.get("register_model"),
                  ensemble_top_k=top_k)
    space = dataclasses.replace(space, enqueue=_check_enqueue(c, doc.get("enqueue"), space))
    # Build the sampler and pruner once now, so that a bad option value fails before the study.
    for key, spec, build in (("sampler", sampler, lambda: space.build_sampler(seed=seed)),
                             ("pruner", pruner, space.build_pruner)):
        try:
            build()
        except (TypeError, ValueError) as exc:
            raise c.fail(f"{key}.options", f"{spec.name}: {exc}") from None
    return space


def _check_fixed(c: _Checker, section: dict[str, Any], key: str) -> dict[str, Any]:
    """Fixed knobs: known names, in the right section, of the right type."""
    out: dict[str, Any] = {}
    for name, value in section.items():
        k = _join(key, name)
        if name in _NOT_A_KNOB or name not in KNOBS:
            raise c.fail(k, _NOT_A_KNOB.get(name, f"unknown setting {shorten(name)}"))
        home = "data" if KNOBS[name][0] == "data" else "train"
        if home != key:
            raise c.fail(k, f"{name} is a {home} setting: put it under {home}:")
        c.kind(value, k, KNOBS[name][1])
        if name in ("train_csv", "test_csv") and value:
            try:
                value = resolve_csv(value, base=c.path.parent)
            except ValueError as exc:
                raise c.fail(k, str(exc)) from None
        out[name] = value
    if key == "data":
        if out.get("source", "synthetic") != "csv" and ("train_csv" in out or "test_csv" in out):
            raise c.fail("data.source", "train_csv/test_csv need source: csv")
        try:
            DataConfig(**out)
        except (TypeError, ValueError) as exc:
            bad = bad_field(exc, out)
            raise c.fail(_join("data", bad) if bad else "data", str(exc)) from None
    else:
        for name, value in out.items():
            c.build(_join(key, name), {name: value})
    return out


def _check_params(c: _Checker, section: dict[str, Any], data: dict[str, Any],
                  train: dict[str, Any]) -> dict[str, Param]:
    raw: dict[str, Param] = {}
    for name, spec in section.items():
        k = _join("params", name)
        if name in _NOT_A_KNOB or name not in KNOBS:
            raise c.fail(k, _NOT_A_KNOB.get(name, f"unknown setting {shorten(name)} (a TrainConfig.to_flat() "
                                                  f"key, a DataConfig field or eta_min_ratio)"))
        if name in _NOT_SEARCHABLE:
            raise c.fail(k, f"{name} cannot be searched (fix it under data:)")
        if name in data or name in train:
            where = "data" if name in data else "train"
            raise c.fail(k, f"{name} is also fixed under {where}: fix it or search it, not both")
        raw[name] = _check_param(c, name, spec, k)
    return raw


def _order_conditions(c: _Checker, raw: dict[str, Param], fixed: dict[str, Any]) -> dict[str, Param]:
    """Conditions name known knobs and possible values, without cycles; returns suggestion order."""
    for name, p in raw.items():
        for knob, allowed in p.when.items():
            k = _join(_join(_join("params", name), "when"), knob)
            if knob == name:
                raise c.fail(k, "a parameter cannot depend on itself")
            if knob not in raw and knob not in fixed:
                raise c.fail(k, f"unknown parameter {shorten(knob)}: a condition must name a searched "
                                f"parameter or a fixed setting")
            for i, v in enumerate(allowed):
                kk = _join(k, i) if len(allowed) > 1 else k
                if knob in raw and not raw[knob].contains(v):
                    raise c.fail(kk, f"{shorten(v)} is not a value params.{knob} can take "
                                     f"({_describe(raw[knob])})")
                if knob in fixed:
                    c.kind(v, kk, KNOBS[knob][1], f" for {knob}")
    ordered: dict[str, Param] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in trail:
            raise c.fail(_join(_join("params", name), "when"),
                         f"conditions form a cycle: {' -> '.join(trail + (name,))}")
        for knob in raw[name].when:
            if knob in raw:
                visit(knob, trail + (name,))
        ordered[name] = raw[name]

    for name in raw:
        visit(name, ())
    return ordered


def _describe(p: Param) -> str:
    if p.type == "categorical":
        return f"choices {shorten(list(p.choices))}"
    return f"{p.type} in [{p.low}, {p.high}]"


def _check_param(c: _Checker, name: str, spec: Any, k: str) -> Param:
    if not isinstance(spec, dict):
        raise c.fail(k, "expected a mapping like {type: float, low: ..., high: ...} "
                        "or {type: categorical, choices: [...]}")
    ptype = spec.get("type")
    if ptype is None:
        raise c.fail(_join(k, "type"), f"missing (one of {', '.join(PARAM_TYPES)})")
    c.choice(ptype, _join(k, "type"), PARAM_TYPES)
    allowed = (("type", "choices", "when") if ptype == "categorical"
               else ("type", "low", "high", "log", "step", "when"))
    c.mapping(spec, k, allowed)
    kind = KNOBS[name][1]
    when = _check_when(c, spec.get("when"), _join(k, "when"))

    if ptype == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise c.fail(_join(k, "choices"), f"expected a non-empty list, got {shorten(choices)}")
        for i, v in enumerate(choices):
            kk = _join(_join(k, "choices"), i)
            c.kind(v, kk, kind, f" for {name}")
            if name == "patch_size" and N_FEATURES % v:
                raise c.fail(kk, f"{v} does not divide n_features={N_FEATURES} (valid: {_PATCH_SIZES})")
            if v in choices[:i]:
                raise c.fail(kk, f"duplicate choice {shorten(v)}")
        return Param(name=name, type=ptype, choices=tuple(choices), when=when)

    if kind not in ("int", "float"):
        raise c.fail(_join(k, "type"), f"{name} takes {_KIND_NAMES[kind]}: use type: categorical")
    if ptype == "float" and kind == "int":
        raise c.fail(_join(k, "type"), f"{name} is an integer setting: use type: int")
    for bound in ("low", "high"):
        if bound not in spec:
            raise c.fail(_join(k, bound), "missing")
        v = spec[bound]
        if ptype == "int":
            c.integer(v, _join(k, bound))
        if not _num(v) or not math.isfinite(v):
            raise c.fail(_join(k, bound), f"expected a finite number, got {shorten(v)}")
    low, high = spec["low"], spec["high"]
    if low > high:
        raise c.fail(_join(k, "low"), f"low={low} is greater than high={high}")
    log = spec.get("log", False)
    c.kind(log, _join(k, "log"), "bool")
    if log and low <= 0:
        raise c.fail(_join(k, "low"), f"a log scale needs low > 0, got low={low}")
    step = spec.get("step")
    if step is not None:
        if ptype == "int":
            c.integer(step, _join(k, "step"))
        if not _num(step) or step <= 0:
            raise c.fail(_join(k, "step"), f"expected a number > 0, got {shorten(step)}")
        if log and step != 1:
            raise c.fail(_join(k, "step"), "step cannot be combined with log: true")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9:
            raise c.fail(_join(k, "step"), f"high - low = {high - low} is not a multiple of step={step}")
    if name == "patch_size" and (bad := [v for v in range(low, high + 1, step or 1) if N_FEATURES % v]):
        raise c.fail(_join(k, "low"), f"patch sizes {bad} do not divide n_features={N_FEATURES}: "
                                      f"use type: categorical with choices from {_PATCH_SIZES}")
    return Param(name=name, type=ptype, low=low, high=high, log=log, step=step, when=when)


def _check_when(c: _Checker, when: Any, k: str) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    when = c.mapping(when, k)
    if not when:
        raise c.fail(k, "expected at least one condition")
    out = {knob: tuple(values) if isinstance(values, list) else (values,) for knob, values in when.items()}
    for knob, values in out.items():
        if not values:
            raise c.fail(_join(k, knob), "expected a value or a non-empty list of values")
    return out


def _check_ranges(c: _Checker, data: dict[str, Any], train: dict[str, Any], params: dict[str, Param]) -> None:
    try:
        _build_configs({**data, **train})
    except (TypeError, ValueError, KeyError) as exc:
        bad = bad_field(exc, {**data, **train})
        section = "data" if bad in data else "train"
        raise c.fail(_join(section, bad) if bad else "train", one_line(exc)) from None
    for name, p in params.items():
        for suffix, value in p.candidates():
            c.build(f"params.{name}.{suffix}", {**data, **train, name: value})


# The knobs that size a run's memory, and which of a searched knob's values makes the largest run.
_LARGEST = {"dim": max, "depth": max, "batch_size": max, "token_expansion": max, "channel_expansion": max,
            "bins": max, "patch_size": min,
            "dtype": lambda values: "float64" if "float64" in values else values[0]}


def _check_memory(c: _Checker, data: dict[str, Any], train: dict[str, Any], params: dict[str, Param]) -> None:
    """The largest model the space can sample must fit in the machine's memory (mixer.config)."""
    largest, keys = {}, []
    for name, pick in _LARGEST.items():
        if name in params:
            largest[name] = pick([v for _, v in params[name].candidates()])
            keys.append(f"params.{name}")
        elif name in train:
            keys.append(f"train.{name}")
    try:
        check_memory(_build_configs({**data, **train, **largest})[1])
    except ValueError as exc:
        raise c.fail(", ".join(keys) or "train", str(exc)) from None


def _check_sampler(c: _Checker, spec: Any, params: dict[str, Param]) -> SamplerSpec:
    spec = c.mapping({"name": spec} if isinstance(spec, str) else spec, "sampler",
                     ("name", "seed", "options"))
    name = c.choice(spec.get("name", "tpe"), "sampler.name", SAMPLERS)
    seed = spec.get("seed")
    if seed is not None:
        c.integer(seed, "sampler.seed", minimum=0)
    options = c.mapping(spec.get("options"), "sampler.options")
    _check_options(c, _sampler_class(name), options, "sampler.options")
    for module in _SAMPLER_NEEDS.get(name, ()):
        if importlib.util.find_spec(module) is None:
            raise c.fail("sampler.name", f"the {name} sampler needs the {module!r} package "
                                         f"(pip install 'mixer-sweep[samplers]')")
    if name == "grid":
        if not params:
            raise c.fail("sampler.name", "the grid sampler needs at least one searched parameter")
        for pname, p in params.items():
            if p.grid_values() is None:
                raise c.fail(f"params.{pname}", "the grid sampler needs choices or a step for "
                                                 "every float parameter")
    return SamplerSpec(name=name, seed=seed, options=dict(options))


def _check_pruner(c: _Checker, spec: Any, key: str) -> PrunerSpec:
    spec = c.mapping({"name": spec} if isinstance(spec, str) else spec, key, ("name", "options", "wrapped"))
    name = c.choice(spec.get("name", "median"), _join(key, "name"), PRUNERS)
    options = c.mapping(spec.get("options"), _join(key, "options"))
    _check_options(c, _pruner_class(name), options, _join(key, "options"))
    wrapped = None
    if "wrapped" in spec:
        if name != "patient":
            raise c.fail(_join(key, "wrapped"), "only the patient pruner wraps another pruner")
        wrapped = _check_pruner(c, spec["wrapped"], _join(key, "wrapped"))
        if wrapped.name == "none":
            wrapped = None
    return PrunerSpec(name=name, options=dict(options), wrapped=wrapped)


def _check_options(c: _Checker, cls: Any, options: dict[str, Any], key: str) -> None:
    signature = inspect.signature(cls).parameters
    accepted = [n for n, p in signature.items()
                if n not in _HIDDEN_OPTIONS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for opt, value in options.items():
        if opt not in accepted:
            raise c.fail(_join(key, opt), f"{cls.__name__} has no option {shorten(opt)} "
                                          f"(options: {', '.join(accepted) or 'none'})")
        # Optuna annotates its options (`int`, `str | int`, `float | None`) and checks few of them.
        annotation = signature[opt].annotation
        kinds = str(getattr(annotation, "__name__", annotation)).split(" | ")
        if value is None and "None" in kinds or isinstance(value, str) and "str" in kinds:
            continue
        if "int" in kinds:
            c.integer(value, _join(key, opt), minimum=int(opt in _AT_LEAST_ONE), maximum=MAX_OPTION)
        elif "float" in kinds and (not _num(value) or not math.isfinite(value)):
            raise c.fail(_join(key, opt), f"expected a finite number, got {shorten(value)}")


def _check_enqueue(c: _Checker, entries: Any, space: Space) -> tuple[dict[str, Any], ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise c.fail("enqueue", f"expected a list of parameter mappings, got {shorten(entries)}")
    fixed = {**space.data, **space.train}
    for i, entry in enumerate(entries):
        k = _join("enqueue", i)
        entry = c.mapping(entry, k)
        if not entry:
            raise c.fail(k, "expected parameter values")
        for name, value in entry.items():
            kk = _join(k, name)
            if name not in space.params:
                hint = " (it is fixed: search it to vary it per trial)" if name in fixed else ""
                raise c.fail(kk, f"{shorten(name)} is not a searched parameter{hint}")
            if not space.params[name].contains(value):
                raise c.fail(kk, f"{shorten(value)} is outside params.{name} "
                                 f"({_describe(space.params[name])})")
        # A value for a parameter whose condition is known to be false would be silently ignored.
        active = space.active(entry)
        for name in entry:
            p = space.params[name]
            if name not in active and all(kn in entry or kn not in space.params for kn in p.when):
                holds = ", ".join(f"{kn}={shorten(entry.get(kn, fixed.get(kn)))}" for kn in p.when)
                raise c.fail(_join(k, name), f"{name} is not sampled when {holds}")
        c.build(k, fixed | {n: v for n, v in entry.items() if n in active})
    return tuple(dict(entry) for entry in entries)

