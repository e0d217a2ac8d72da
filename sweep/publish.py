"""Ship the winner of a study: retrain its best trial, save the bundle, log it as an MLflow model.

``publish_best`` (``sweep.run`` calls it at the end of a study) retrains the best trial to its best
epoch with the same seed and config (checking the history is bit-identical), saves
``best_model.npz``, scores it, and the mean of the ``ensemble_top_k`` best, on the labelled test rows
if any (reported only, never used to select), and logs a ``pyfunc`` model (raw UNSW-NB15 rows in,
``probability`` and ``prediction`` out), the ``test_*`` metrics and the ``best_*`` tags on the
study's parent MLflow run."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from sweep.messages import one_line

# MLflow's artifact progress bar would garble the sweep's own progress line on stderr.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

BUNDLE_NAME = "best_model.npz"
PREDICTIONS_NAME = "test_predictions.csv"
MODEL_NAME = "model"
EXAMPLE_ROWS = 5
TEST_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "tn", "fp", "fn", "tp")


class PublishError(RuntimeError):
    """The best trial cannot be rebuilt or published; the message names the study, trial and cause."""


class MixerPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc around a Mixer model bundle: raw rows in, a DataFrame of ``probability`` (float64)
    and ``prediction`` (int64, 1 iff probability >= the ``threshold`` param, default 0.5) out."""

    def load_context(self, context):
        from mixer.bundle import ModelBundle

        self.bundle = ModelBundle.load(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        from mixer.predict import predict_frame

        threshold = float((params or {}).get("threshold", 0.5))
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            out = predict_frame(self.bundle, frame, source="model input", threshold=threshold)
        except ValueError as exc:  # DataError (naming the column and row) or a bad threshold
            # An MlflowException is the client's error (400, its message); anything else is answered
            # with the server's stack trace.
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return out[["probability", "prediction"]]


# MLflow 3 refuses to unpickle a cloudpickled PythonModel by default, so the model is logged as
# "models from code": this file is written next to the bundle and executed by MLflow on load.
# It needs only mlflow, pandas and `mixer` (which travels in the model's code_paths).
_MODEL_CODE = '''"""MLflow models-from-code entry point (written by sweep.publish): a Mixer bundle."""

import mlflow
import pandas as pd


{source}

mlflow.models.set_model(MixerPyfunc())
'''


@dataclass
class PublishResult:
    """What ``publish_best`` produced: the trial, seed, epoch and metric shipped, whether the retrained
    history matched the recorded one bit for bit, the bundle and, when logged, the MLflow run and model."""

    study_name: str
    trial_number: int
    seed: int
    epoch: int
    metric: str
    value: float
    reproduced: bool
    bundle_path: Path
    run_id: str | None = None
    model_uri: str | None = None
    registered_version: str | None = None
    test_metrics: dict[str, float] | None = None
    ensemble_trials: list[int] = dataclasses.field(default_factory=list)
    predictions_path: Path | None = None

    def summary(self) -> str:
        """Lines to print at the end of a study."""
        lines = [f"best trial {self.trial_number} (seed {self.seed}) retrained to epoch {self.epoch}: "
                 f"{self.metric} {self.value:.6g}"
                 + ("" if self.reproduced else " (differs from the trial's recorded history!)"),
                 f"model bundle: {self.bundle_path}"]
        if self.model_uri:
            lines.append(f"MLflow model: {self.model_uri}")
        if self.registered_version:
            lines.append(f"registered model version: {self.registered_version}")
        if self.test_metrics:
            rows = int(self.test_metrics["test_rows"])
            lines.append(f"test set, {rows:,} rows (reported only, never used for selection or pruning):")
            members = ", ".join(map(str, self.ensemble_trials))
            for prefix, who in (("test_", f"best trial {self.trial_number}"),
                                ("ensemble_test_", f"mean of trials {members}")):
                shown = "  ".join(f"{k} {self.test_metrics[prefix + k]:.4f}"
                                  for k in ("accuracy", "precision", "recall", "f1", "roc_auc")
                                  if prefix + k in self.test_metrics)
                if shown:
                    lines.append(f"  {who}: {shown}")
            if self.predictions_path:
                lines.append(f"test predictions: {self.predictions_path}")
        return "\n".join(lines)


def trial_configs(trial: Any) -> tuple[Any, Any, int]:
    """Rebuild ``(DataConfig, TrainConfig, seed)`` from a trial's user attrs ``config`` and ``seed``."""
    from sweep.sampling import split_flat

    attrs = trial.user_attrs
    for key in ("config", "seed"):
        if key not in attrs:
            raise PublishError(f"trial {trial.number} has no user attr {key!r}; cannot retrain it")
    try:
        data, train = split_flat(attrs["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PublishError(f"trial {trial.number}: its config attr does not rebuild: {exc}") from None
    return data, train, int(attrs["seed"])


def best_epoch_of(history: list[dict[str, Any]], metric: str, *, maximize: bool) -> int:
    """The 1-based epoch of the best finite ``metric`` in a recorded history (first on ties; 0: none)."""
    finite = [row for row in history if math.isfinite(float(row.get(metric, math.nan)))]
    if not finite:
        return 0
    return int((max if maximize else min)(finite, key=lambda row: float(row[metric]))["epoch"])


@dataclass
class Retrained:
    """A trial trained again: its bundle, the new history, the epoch shipped and the data it used."""

    trial: Any
    bundle: Any
    history: list[Any]
    epoch: int
    metric: str
    data_config: Any
    data: Any


def retrain_trial(study: Any, trial: Any, *, on_epoch: Callable[[Any, int], None] | None = None) -> Retrained:
    """Retrain a finished ``trial`` (same seed and config) up to the best epoch of its recorded ``history``
    by the study's ``metric`` user attr (default ``val_loss``) and direction, and bundle that epoch; without
    a history, the whole run, shipping ``fit``'s lowest-val_loss epoch. ``on_epoch(metrics, epochs)`` is
    told of each retrained epoch (progress)."""
    from mixer.bundle import ModelBundle
    from mixer.data import DataError, load
    from mixer.train import fit

    data_config, config, seed = trial_configs(trial)
    try:
        data = load(data_config)
    except DataError as exc:
        raise PublishError(f"trial {trial.number}: cannot load its data: {exc}") from None
    config = config.for_features(data.n_features)  # as the sweep's objective did
    metric = str(study.user_attrs.get("metric", "val_loss"))
    maximize = study.direction.name == "MAXIMIZE"
    target = best_epoch_of(trial.user_attrs.get("history") or [], metric, maximize=maximize)
    epochs = target or config.epochs

    def told(m: Any) -> bool:
        if on_epoch is not None:
            on_epoch(m, epochs)
        return bool(target) and m.epoch >= target

    result = fit(config, data, seed=seed, on_epoch=told)
    if target:
        if result.status == "diverged" or len(result.history) < target:
            raise PublishError(f"trial {trial.number}: retraining stopped before epoch {target}: "
                               f"{result.reason}")
        params = result.params
    else:
        if result.best_epoch == 0:
            raise PublishError(f"trial {trial.number}: retraining did not produce a model: {result.reason}")
        target, metric, params = result.best_epoch, "val_loss", result.best_params
    shipped = result.history[target - 1]
    info = {"study_name": study.study_name, "trial_number": trial.number, "seed": seed, "epoch": target,
            "metric": metric, "value": float(getattr(shipped, metric)), "val_loss": shipped.val_loss,
            "train_config": config.to_flat(), "data_config": dataclasses.asdict(data_config)}
    bundle = ModelBundle(params, config.model, data.pipeline, info=info)
    return Retrained(trial=trial, bundle=bundle, history=result.history[:target], epoch=target,
                     metric=metric, data_config=data_config, data=data)


def top_trials(study: Any, k: int) -> list[Any]:
    """The ``k`` best completed trials by the study's value, best first (``study.best_trial`` first)."""
    from optuna.trial import TrialState

    best = study.best_trial
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number != best.number and t.value is not None and math.isfinite(t.value)]
    done.sort(key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    return [best] + done[:max(0, k - 1)]


def score_on_test(members: list[Retrained]) -> tuple[dict[str, float], pd.DataFrame]:
    """The ``test_*`` metrics of the first member (``ensemble_test_*``: of the mean probability of two or
    more, each through its own pipeline, since a study may search the scaling) and a frame of ``row``,
    ``label``, each member's probability (``trial_<n>``) and the ``ensemble`` mean."""
    from mixer.metrics import binary_metrics

    first = members[0].data
    y = first.y_test
    frame = pd.DataFrame({"row": first.rows.get("test", np.arange(len(y))), "label": y.astype(np.int64)})
    for m in members:
        if not np.array_equal(m.data.y_test, y):
            raise PublishError(f"trial {m.trial.number}: its test rows differ from trial "
                               f"{members[0].trial.number}'s; cannot average them")
        frame[f"trial_{m.trial.number}"] = m.bundle.proba(m.data.x_test)
    scores = {"test_": frame[f"trial_{members[0].trial.number}"]}
    if len(members) > 1:
        frame["ensemble"] = frame[[f"trial_{m.trial.number}" for m in members]].mean(axis=1)
        scores["ensemble_test_"] = frame["ensemble"]
    metrics = {"test_rows": float(len(y))}
    for prefix, proba in scores.items():
        values = binary_metrics(y, proba.to_numpy()).as_dict()
        metrics.update({prefix + k: float(values[k]) for k in TEST_METRICS if values[k] is not None})
    return metrics, frame


def _history_matches(recorded: list[dict[str, Any]], history: list[Any]) -> bool:
    """True if every retrained epoch's val_loss equals the trial's recorded one, bit for bit."""
    if not history or len(recorded) < len(history):
        return False
    return all(float(r.get("val_loss", math.nan)) == m.val_loss and int(r.get("epoch", -1)) == m.epoch
               for r, m in zip(recorded, history, strict=False))


def publish_best(study: Any, *, tracking_uri: str | None = None, out_dir: str | Path,
                 register_name: str | None = None, log_model: bool = True, ensemble_top_k: int = 1,
                 on_epoch: Callable[[Any, int], None] | None = None) -> PublishResult:
    """Retrain the study's best trial, save it as a bundle and log it as an MLflow pyfunc model.

    ``tracking_uri`` None is resolved as ``sweep.tracking.Tracker`` does; ``out_dir`` is created if
    missing; ``register_name`` also registers the model; ``log_model=False`` skips MLflow. With a
    labelled test set, ``ensemble_top_k`` k > 1 also scores the mean probability of the k best. Raises
    PublishError for no completed trial, a trial without ``config``/``seed`` (user attrs, see
    ``sweep.objective``), data that will not load, a retraining that diverges, or MLflow refusing the
    model (the bundle is saved)."""
    from mixer.bundle import atomic_write

    try:
        trial = study.best_trial
    except (ValueError, RuntimeError) as exc:
        raise PublishError(f"study {study.study_name!r} has no best trial: {exc}") from None
    retrained = retrain_trial(study, trial, on_epoch=on_epoch)
    bundle = retrained.bundle
    reproduced = _history_matches(trial.user_attrs.get("history") or [], retrained.history)
    if trial.user_attrs.get("history") and not reproduced:
        warnings.warn(f"study {study.study_name!r}: retraining trial {trial.number} did not reproduce "
                      "its recorded val_loss history; publishing the retrained model anyway",
                      RuntimeWarning, stacklevel=2)
    bundle_path = bundle.save(Path(out_dir) / BUNDLE_NAME)
    publish = PublishResult(study_name=study.study_name, trial_number=trial.number, seed=bundle.info["seed"],
                            epoch=retrained.epoch, metric=retrained.metric, value=bundle.info["value"],
                            reproduced=reproduced, bundle_path=bundle_path)
    if retrained.data.y_test is not None:
        members = [retrained]
        for t in top_trials(study, ensemble_top_k)[1:]:
            try:
                members.append(retrain_trial(study, t, on_epoch=on_epoch))
            except PublishError as exc:  # the best model is still shipped, with a smaller ensemble
                warnings.warn(f"ensemble: trial {t.number} left out: {exc}", RuntimeWarning, stacklevel=2)
        publish.test_metrics, predictions = score_on_test(members)
        publish.ensemble_trials = [m.trial.number for m in members] if len(members) > 1 else []
        publish.predictions_path = atomic_write(
            Path(out_dir) / PREDICTIONS_NAME,
            lambda f: predictions.to_csv(f, index=False, float_format="%.17g"), mode="w")
    if log_model:
        try:
            _log_to_mlflow(study, publish, retrained.data_config, tracking_uri=tracking_uri,
                           register_name=register_name)
        except mlflow.exceptions.MlflowException as exc:  # the bundle is saved; the store is down or full
            raise PublishError(f"the model is saved as {bundle_path}, but logging it to MLflow failed: "
                               f"{one_line(exc)}") from None
    return publish


@contextlib.contextmanager
def _tracking_uri(uri: str | None) -> Iterator[None]:
    """Use ``uri`` (None: as ``sweep.tracking.Tracker`` resolves it, to find the study's parent run) for
    MLflow's fluent API inside the block, then restore the URI and ``MLFLOW_TRACKING_URI`` by hand
    (``mlflow.set_tracking_uri(None)`` would unset the variable)."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from sweep.tracking import resolve_uri

    saved_uri, saved_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(resolve_uri(uri))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def _on_run(run_id: str | None, *, study_name: str) -> Iterator[str]:
    """Make ``run_id`` the active run and afterwards give it back the status it had: ending a resumed
    run would mark a FAILED or RUNNING parent FINISHED, and the parent's status belongs to the tracker."""
    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield run_id
    elif run_id is None:
        warnings.warn(f"study {study_name!r} has no user attr 'mlflow_parent_run_id'; logging the best "
                      f"model on a new run in experiment {study_name!r}", RuntimeWarning, stacklevel=3)
        experiment = client.get_experiment_by_name(study_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(study_name)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"{study_name}-best-model",
                              nested=active is not None) as run:
            yield run.info.run_id
    else:
        status = client.get_run(run_id).info.status
        try:
            with mlflow.start_run(run_id=run_id, nested=active is not None):
                yield run_id
        finally:
            if status != "FINISHED":
                client.update_run(run_id, status=status)


def _example_frame(data_config: Any) -> pd.DataFrame:
    """A few raw rows (the feature columns, with the training frame's dtypes) for the input example."""
    from mixer.data import IGNORED, LABEL, read_csv, synthetic_frame

    frame = (read_csv(data_config.train_csv).head(EXAMPLE_ROWS) if data_config.source == "csv"
             else synthetic_frame(EXAMPLE_ROWS, data_config.seed))
    return frame.drop(columns=[LABEL, *IGNORED], errors="ignore").reset_index(drop=True)


def model_signature(example: pd.DataFrame, output: pd.DataFrame) -> Any:
    """``infer_signature`` of the example rows: each feature typed as the training frame holds it
    (``double``, ``long``; categoricals ``string``), so that MLflow's schema enforcement refuses a bad
    value naming the column and ``text/csv`` requests parse; columns outside it are dropped."""
    from mlflow.types.schema import ColSpec, DataType, Schema

    from mixer.data import CATEGORICAL

    with warnings.catch_warnings():
        # Its hint is about missing values in integer columns; the data refuse missing values.
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        inferred = mlflow.models.infer_signature(example, output, params={"threshold": 0.5})
    inputs = Schema([ColSpec(DataType.string, spec.name) if spec.name in CATEGORICAL else spec
                     for spec in inferred.inputs.inputs])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=inferred.outputs, params=inferred.params)


def log_bundle_model(bundle_path: Path, example: pd.DataFrame, *, name: str = MODEL_NAME) -> Any:
    """Log the bundle at ``bundle_path`` as a pyfunc model on the active run; returns MLflow's ModelInfo."""
    import mixer
    from mixer.bundle import ModelBundle

    bundle = ModelBundle.load(bundle_path)
    proba = bundle.predict_proba(example, source="input example")
    output = pd.DataFrame({"probability": proba, "prediction": (proba >= 0.5).astype(np.int64)})
    with tempfile.TemporaryDirectory(prefix="mixer-pyfunc-") as tmp:
        code = Path(tmp) / "mixer_pyfunc.py"
        code.write_text(_MODEL_CODE.format(source=inspect.getsource(MixerPyfunc)))
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(code), artifacts={"bundle": str(bundle_path)},
            code_paths=[str(Path(mixer.__file__).parent)], signature=model_signature(example, output),
            input_example=example,
            # Pinned, explicit: MLflow's inference would load the model in a subprocess (slow).
            # mixer travels in code_paths and needs only numpy and pandas at predict time.
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
                              f"pandas=={pd.__version__}"],
        )


def _log_to_mlflow(study: Any, publish: PublishResult, data_config: Any, *,
                   tracking_uri: str | None, register_name: str | None) -> None:
    example = _example_frame(data_config)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    with _tracking_uri(tracking_uri), _on_run(parent, study_name=study.study_name) as run_id:
        log_bundle_model(publish.bundle_path, example)
        publish.run_id = run_id
        publish.model_uri = f"runs:/{run_id}/{MODEL_NAME}"
        if publish.test_metrics:
            mlflow.log_metrics(publish.test_metrics)
            mlflow.log_artifact(str(publish.predictions_path))
        if publish.ensemble_trials:
            mlflow.set_tag("ensemble_trials", " ".join(map(str, publish.ensemble_trials)))
        mlflow.set_tags({"best_trial_number": publish.trial_number, "best_model_uri": publish.model_uri,
                         "best_model_seed": publish.seed, "best_model_epoch": publish.epoch})
        if register_name:
            version = mlflow.register_model(publish.model_uri, register_name)
            publish.registered_version = str(version.version)
