"""One trial: sample a config, train it, report every epoch, prune, record what happened.

``Objective`` returns the best epoch's metric, raises ``optuna.TrialPruned`` when the pruner stops the
trial (never in the warmup nor at the last epoch) and ``TrialFailed`` when training diverged or
errored (``catch=(TrialFailed,)`` records a FAIL and the study goes on). Whatever the outcome, the
trial ends with the user attributes of docs/architecture.md's "A trial's record"."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mixer.config import DataConfig, TrainConfig
from sweep.messages import one_line
from sweep.space import Space, flat_config

__all__ = ["RUN_ID_ATTR", "Interrupts", "Objective", "TrialFailed", "load_data", "trial_run_id", "trial_seed"]

log = logging.getLogger("sweep")

# status user attribute -> does the trial count against the study's n_trials?
# Trials cut short by Ctrl-C or a dead worker do not: their parameters are re-run.
STATUS_COUNTS = {"completed": True, "pruned": True, "diverged": True, "error": True,
                 "interrupted": False, "running": False, "lost": False}


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The seed of trial ``trial_number`` in a study seeded ``study_seed`` (a 32-bit integer)."""
    if study_seed < 0 or trial_number < 0:
        raise ValueError(f"seeds and trial numbers must be >= 0, got {study_seed=}, {trial_number=}")
    return int(np.random.SeedSequence([study_seed, trial_number]).generate_state(1)[0])


RUN_ID_ATTR = "mlflow_run_id"


def store_run_id(trial: Any, run_id: str) -> None:
    """Record the trial's MLflow run id from the tracker's sending thread, through the thread-safe
    storage (the ``Trial``'s cache is the training thread's). A finished trial takes no attributes:
    the study keeps the id then, as ``mlflow_run_id.<trial number>``."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        try:
            trial.storage.set_trial_user_attr(trial._trial_id, RUN_ID_ATTR, run_id)
        except UpdateFinishedTrialError:
            trial.study.set_user_attr(f"{RUN_ID_ATTR}.{trial.number}", run_id)
    except Exception as exc:  # noqa: BLE001 - storage trouble: not fatal, the run is fine
        log.warning("trial %s: its MLflow run id %s could not be stored: %s", trial.number, run_id,
                    one_line(exc))


def trial_run_id(study: Any, trial: Any) -> str | None:
    """The MLflow run id of ``trial`` (a ``FrozenTrial`` of ``study``), wherever it was recorded."""
    return trial.user_attrs.get(RUN_ID_ATTR) or study.user_attrs.get(f"{RUN_ID_ATTR}.{trial.number}")


class TrialFailed(Exception):
    """The trial ran but produced no usable value (diverged, or an error); ``reason`` says why."""

    def __init__(self, reason: str, *, status: str = "error"):
        super().__init__(reason)
        self.reason = reason
        self.status = status


# The loss slices: SLICE_POINTS steps in [-a, a], a where the quadratic model along the sharpest
# direction would raise the loss by SLICE_RISE of itself: wide enough for v_min's bend to show,
# narrow enough to stay in the probe's neighbourhood.
SLICE_POINTS = 15
SLICE_RISE = 0.2


def _short(values: Any) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(values, dtype=np.float64)]


def curvature_attrs(result: Any, config: TrainConfig) -> dict[str, Any]:
    """``probes`` and ``slices`` (the trial attributes) from a ``mixer.train.FitResult``. The slices need
    the weights at the probe: only a completed fit whose last probe was at its last epoch has them."""
    from mixer.curvature import loss_slices

    probes = [{"epoch": e, "values": _short(c.ritz.values), "weights": _short(c.ritz.weights)}
              for e, c in sorted(result.probes.items()) if c.ritz is not None]
    out: dict[str, Any] = {"probes": probes, "slices": None}
    last = max(result.probes, default=None)
    if result.status != "completed" or last != len(result.history):
        return out
    probe = result.probes[last]
    radius = max(abs(probe.lambda_min), abs(probe.lambda_max))
    level = result.history[-1].train_loss
    if not (math.isfinite(radius) and radius > 0 and math.isfinite(level) and probe.ritz is not None):
        return out
    reach = math.sqrt(2 * SLICE_RISE * level / radius)
    cut = loss_slices(result.params, *result.probe_batch, config.model, probe.ritz.vector_min,
                      alphas=np.linspace(-reach, reach, SLICE_POINTS))
    out["slices"] = {"epoch": last, "alpha": _short(cut["alpha"]), "v_min": _short(cut["direction"]),
                     "gradient": _short(cut["gradient"]), "lambda_min": float(f"{probe.lambda_min:.6g}")}
    return out


@functools.lru_cache(maxsize=4)
def load_data(config: DataConfig) -> Any:
    """``mixer.data.load``, once per process per DataConfig (the records are frozen and hashable),
    without its test rows: selection and pruning never see them (``sweep.publish`` scores on them)."""
    from mixer.data import load

    return dataclasses.replace(load(config), x_test=None, y_test=None)


class Interrupts:
    """Ctrl-C that never tears a storage write in half. Inside ``compute()`` (training) SIGINT or
    SIGTERM raises KeyboardInterrupt at once; elsewhere (storage, tracking, the epoch callback) it is
    raised at the next ``check()`` or ``compute()``. A second SIGINT raises wherever the process is."""

    def __init__(self) -> None:
        self.pending = False
        self.count = 0
        self._safe = False

    def install(self) -> None:
        """Handle SIGINT (Ctrl-C) and SIGTERM (``docker stop``, a cluster's kill) this way."""
        signal.signal(signal.SIGINT, self._handler)
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.pending = True
        if self._safe or self.count > 1:
            self._safe = False
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        self.check()
        self._safe = True
        try:
            yield
        finally:
            self._safe = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A region inside ``compute()`` where SIGINT is deferred again (the epoch callback)."""
        was, self._safe = self._safe, False
        try:
            yield
        finally:
            self._safe = was


EpochHook = Callable[[int, Any, int], None]  # (trial number, EpochMetrics, epochs)


class Objective:
    """Train one trial of ``space``, seeded from ``study_seed`` and the trial number. ``tracker``: a
    ``sweep.tracking.Tracker`` (None: no tracking); ``interrupts``: the process's Ctrl-C handling (None:
    a plain KeyboardInterrupt); ``on_epoch``: a hook called after every epoch."""

    def __init__(self, space: Space, *, study_seed: int, tracker: Any | None = None,
                 interrupts: Interrupts | None = None, on_epoch: EpochHook | None = None):
        self.space = space
        self.study_seed = study_seed
        self.tracker = tracker
        self.interrupts = interrupts or Interrupts()
        self.on_epoch = on_epoch
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.tracking_errors = 0
        self.interrupted_trial: int | None = None

    def __call__(self, trial: Any) -> float:
        import optuna

        # A retried trial (dead worker, Ctrl-C) inherits the user attrs of the one it repeats.
        seed = int(trial.user_attrs.get("seed", trial_seed(self.study_seed, trial.number)))
        for key, value in {"worker": self.worker, "seed": seed, "status": "running"}.items():
            trial.set_user_attr(key, value)
        history: list[Any] = []
        state = {"status": "error", "reason": None, "pruned_epoch": None, "run": None}
        try:
            try:
                data_config, config = self.space.suggest(trial)
            except (TypeError, ValueError, KeyError) as exc:
                raise TrialFailed(f"invalid configuration: {exc}") from None
            trial.set_user_attr("config", flat_config(data_config, config))
            log.info("trial %d started: seed %d, params %s", trial.number, seed, trial.params)
            try:
                data = load_data(data_config)
            except (OSError, ValueError) as exc:
                raise TrialFailed(f"data: {exc}") from None
            config = config.for_features(data.n_features)
            state["run"] = self._start_run(trial, config, data_config, seed)
            value = self._train(trial, config, data, seed, history, state)
            state["status"] = "completed"
            return value
        except optuna.TrialPruned:
            state["status"] = "pruned"
            raise
        except TrialFailed as exc:
            state["status"], state["reason"] = exc.status, exc.reason
            log.warning("trial %d failed (%s): %s", trial.number, exc.status, exc.reason)
            raise
        except KeyboardInterrupt:
            state["status"], state["reason"] = "interrupted", "interrupted (Ctrl-C)"
            self.interrupted_trial = trial.number
            raise
        except Exception as exc:  # noqa: BLE001 - one broken configuration must not end the study
            state["status"], state["reason"] = "error", f"{type(exc).__name__}: {exc}"
            log.error("trial %d raised:\n%s", trial.number, traceback.format_exc())
            raise TrialFailed(state["reason"]) from exc
        finally:
            self._finish(trial, history, state)

    def _start_run(self, trial: Any, config: TrainConfig, data_config: DataConfig, seed: int) -> Any:
        if self.tracker is None:
            return None
        # The run id reaches the trial as soon as the run exists (a worker that dies mid-trial leaves
        # it for the one that fails its trial), without the training waiting a round trip for it.
        return self._tracked(trial, "could not start its MLflow run", lambda: self.tracker.start_trial(
            trial, config, data_config, seed=seed, on_created=functools.partial(store_run_id, trial)))

    def _tracked(self, trial: Any, failure: str, call: Callable[[], Any]) -> Any:
        """``call()``, an MLflow call: if it raises, log ``failure``, count it for the exit code, train on."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001
            self.tracking_errors += 1
            log.error("trial %d: %s: %s", trial.number, failure, one_line(exc))
            return None

    def _train(self, trial: Any, config: TrainConfig, data: Any, seed: int, history: list[Any],
               state: dict[str, Any]) -> float:
        import optuna

        from mixer.train import fit

        metric = self.space.metric
        epochs = config.epochs
        # No pruning while the learning rate warms up: the pruner would compare a run that has barely
        # started with runs at full speed (measured: it pruned the best trial of the default study).
        # Nor at the last epoch, where pruning saves nothing.
        first, last = (config.warmup_epochs if config.scheduler != "constant" else 0) + 1, epochs - 1

        def on_epoch(m: Any) -> bool:
            with self.interrupts.paused():
                history.append(m)
                value = float(getattr(m, metric))
                if math.isfinite(value):
                    trial.report(value, m.epoch)
                if state["run"] is not None:
                    self._tracked(trial, f"logging epoch {m.epoch} failed", lambda: state["run"].log_epoch(m))
                if self.on_epoch is not None:
                    self.on_epoch(trial.number, m, epochs)
                if self.interrupts.pending:
                    return True
                if first <= m.epoch <= last and trial.should_prune():
                    state["pruned_epoch"] = m.epoch
                    return True
                return False

        with self.interrupts.compute():
            result = fit(config, data, seed=seed, on_epoch=on_epoch)
            try:
                state.update(curvature_attrs(result, config))
            except Exception as exc:  # noqa: BLE001 - the figures' data must not lose the trial
                log.warning("trial %d: loss slices failed: %s", trial.number, one_line(exc))
        self.interrupts.check()
        if result.status == "diverged":
            raise TrialFailed(result.reason or "diverged", status="diverged")
        if result.status == "stopped" and state["pruned_epoch"] is not None:
            raise optuna.TrialPruned(f"pruned at epoch {state['pruned_epoch']}")
        values = list(filter(math.isfinite, (float(getattr(m, metric)) for m in history)))
        if not values:
            raise TrialFailed(f"no finite {metric} in {len(history)} epochs", status="diverged")
        return min(values) if self.space.direction == "minimize" else max(values)

    def _finish(self, trial: Any, history: list[Any], state: dict[str, Any]) -> None:
        status, reason = state["status"], state["reason"]
        diagnosis = None
        if history or status == "diverged":
            try:
                from mixer.diagnosis import diagnose

                diagnosis = diagnose(history, diverged=status == "diverged")
            except Exception as exc:  # noqa: BLE001 - a diagnosis must not lose the trial
                log.warning("trial %d: diagnosis failed: %s", trial.number, one_line(exc))
        plateau = None
        if diagnosis is not None and diagnosis.metrics.get("plateau_length"):
            first = int(diagnosis.metrics["plateau_start_epoch"])
            plateau = [first, first + int(diagnosis.metrics["plateau_length"]) - 1]
        attrs = {"history": [{"epoch": m.epoch, **m.as_dict()} for m in history], "status": status,
                 "reason": reason, "diagnosis": diagnosis.label if diagnosis is not None else None,
                 "pruned_epoch": state["pruned_epoch"], "plateau": plateau,
                 "probes": state.get("probes", []), "slices": state.get("slices")}
        run = state["run"]
        # Known long since, unless the trial was shorter than one server round trip (or the server
        # is down: then None at once, and store_run_id records it on the study once the run exists).
        if (run_id := getattr(run, "run_id", None)) is not None:
            attrs[RUN_ID_ATTR] = run_id
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if run is not None:
            run_state = status if status in ("completed", "pruned", "diverged") else "failed"
            self._tracked(trial, "ending its MLflow run failed", lambda: run.end(
                run_state, history=history, reason=reason, pruned_epoch=state["pruned_epoch"],
                diagnosis=diagnosis))
        log.info("trial %d %s%s after %d epochs", trial.number, status,
                 f" ({reason})" if reason else "", len(history))
