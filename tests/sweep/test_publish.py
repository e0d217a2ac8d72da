"""publish_best: the study's winner retrained, saved as a bundle and logged as an MLflow pyfunc model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest

from mixer.bundle import ModelBundle
from mixer.config import DataConfig, MixerConfig, TrainConfig
from mixer.data import CATEGORICAL, FEATURE_NAMES, load, read_csv
from mixer.evaluate import evaluate_frame
from mixer.predict import predict_frame
from mixer.train import fit
from sweep.publish import BUNDLE_NAME, PublishError, publish_best
from tests.conftest import free_port, stop_process_group, wait_http

TRAIN = TrainConfig(model=MixerConfig(patch_size=6, dim=16, depth=2), epochs=3, batch_size=64, lr=3e-3)
SEED = 11


def _trial(value: float, user_attrs: dict) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        value=value, params={"lr": 3e-3},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
        user_attrs=user_attrs,
    )


@pytest.fixture(scope="module")
def published(real_csv, tmp_path_factory, mlflow_server) -> SimpleNamespace:
    """A study whose best trial is a real (small) training run, published once to the test server."""
    root = tmp_path_factory.mktemp("publish")
    raw = pd.read_csv(real_csv)
    raw.head(2000).to_csv(root / "train.csv", index=False)
    test = raw.iloc[2000:2500].reset_index(drop=True)
    test.to_csv(root / "test.csv", index=False)
    data_config = DataConfig(source="csv", train_csv=str(root / "train.csv"),
                             test_csv=str(root / "test.csv"), seed=0)
    # What sweep.objective records for a trial: the flat config, the seed and the history.
    original = fit(TRAIN, load(data_config), seed=SEED)
    attrs = {"config": {**TRAIN.to_flat(), **dataclasses.asdict(data_config)}, "seed": SEED,
             "history": [{"epoch": m.epoch, **m.as_dict()} for m in original.history]}
    study = optuna.create_study(study_name=f"publish-{uuid.uuid4().hex[:8]}", direction="minimize")
    study.add_trial(_trial(original.history[original.best_epoch - 1].val_loss, attrs))
    study.add_trial(_trial(10.0, {}))  # worse, and not retrainable: must not be picked

    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(study.study_name)
    parent = client.create_run(experiment, run_name=study.study_name).info.run_id
    client.set_terminated(parent, status="FINISHED")
    study.set_user_attr("mlflow_parent_run_id", parent)

    name = f"mixer-test-{uuid.uuid4().hex[:8]}"
    result = publish_best(study, tracking_uri=mlflow_server.uri, out_dir=root / "out", register_name=name)
    return SimpleNamespace(result=result, original=original, data_config=data_config,
                           parent=parent, client=client, register_name=name, test=test,
                           test_csv=root / "test.csv", root=root, uri=mlflow_server.uri)


def test_best_trial_is_retrained_bit_identically_into_a_bundle(published):
    r, original = published.result, published.original
    assert r.trial_number == 0 and r.seed == SEED
    assert r.reproduced
    assert (r.metric, r.epoch) == ("val_loss", original.best_epoch)
    assert r.value == original.history[original.best_epoch - 1].val_loss
    assert r.bundle_path == published.root / "out" / BUNDLE_NAME
    bundle = ModelBundle.load(r.bundle_path)
    assert bundle.params.keys() == original.best_params.keys()
    assert all(np.array_equal(bundle.params[k], original.best_params[k]) for k in bundle.params)
    assert bundle.info["trial_number"] == 0 and bundle.info["seed"] == SEED


def test_a_maximised_metric_ships_the_epoch_it_was_best_at(published, tmp_path):
    original = published.original
    history = [{"epoch": m.epoch, **m.as_dict()} for m in original.history]
    # Make the last-but-one epoch the best by val_f1, whatever the run measured.
    history[-2]["val_f1"] = 2.0
    study = optuna.create_study(study_name="f1", direction="maximize")
    config = {**TRAIN.to_flat(), **dataclasses.asdict(published.data_config)}
    study.add_trial(_trial(2.0, {"config": config, "seed": SEED, "history": history}))
    study.set_user_attr("metric", "val_f1")
    r = publish_best(study, out_dir=tmp_path, log_model=False)
    epoch = len(history) - 1
    assert (r.metric, r.epoch, r.value) == ("val_f1", epoch, original.history[epoch - 1].val_f1)
    assert r.reproduced
    stopped = fit(TRAIN, load(published.data_config), seed=SEED, on_epoch=lambda m: m.epoch >= epoch)
    bundle = ModelBundle.load(r.bundle_path)
    assert all(np.array_equal(bundle.params[k], stopped.params[k]) for k in bundle.params)


def test_best_epoch_of_follows_the_direction_and_skips_nan():
    from sweep.publish import best_epoch_of

    rows = [{"epoch": 1, "m": 0.5}, {"epoch": 2, "m": float("nan")}, {"epoch": 3, "m": 0.2},
            {"epoch": 4, "m": 0.9}, {"epoch": 5, "m": 0.2}]
    assert best_epoch_of(rows, "m", maximize=False) == 3
    assert best_epoch_of(rows, "m", maximize=True) == 4
    assert best_epoch_of(rows, "other", maximize=True) == 0


def test_test_metrics_are_logged_on_the_parent_run_which_stays_finished(published):
    r = published.result
    expected = evaluate_frame(ModelBundle.load(r.bundle_path), read_csv(published.test_csv),
                              source=str(published.test_csv))
    assert r.test_metrics["test_accuracy"] == pytest.approx(expected.accuracy)
    assert r.test_metrics["test_roc_auc"] == pytest.approx(expected.roc_auc)
    run = published.client.get_run(published.parent)
    for key in ("test_accuracy", "test_precision", "test_recall", "test_f1", "test_roc_auc", "test_tp"):
        assert run.data.metrics[key] == pytest.approx(r.test_metrics[key])
    assert run.data.tags["best_trial_number"] == "0"
    assert run.data.tags["best_model_uri"] == r.model_uri == f"runs:/{published.parent}/model"
    assert run.info.status == "FINISHED"
    assert f"roc_auc {r.test_metrics['test_roc_auc']:.4f}" in r.summary()
    assert str(r.bundle_path) in r.summary()
    assert "test_predictions.csv" in {a.path for a in published.client.list_artifacts(published.parent)}


def test_logged_pyfunc_model_predicts_what_mixer_predict_does(published, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", published.uri)
    model = mlflow.pyfunc.load_model(published.result.model_uri)
    rows = published.test.head(50)  # id and label present: the signature drops them
    got = model.predict(rows)
    expected = predict_frame(ModelBundle.load(published.result.bundle_path), rows, source="rows")
    assert list(got.columns) == ["probability", "prediction"]
    np.testing.assert_allclose(got["probability"], expected["probability"], rtol=1e-12)
    assert got["prediction"].tolist() == expected["prediction"].tolist()
    strict = model.predict(rows, params={"threshold": 0.99})["prediction"]
    assert strict.sum() < got["prediction"].sum()


def test_signature_types_each_feature_as_the_training_data_holds_it(published, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", published.uri)
    signature = mlflow.models.get_model_info(published.result.model_uri).signature
    train = pd.read_csv(published.data_config.train_csv)
    expected = {c: "string" if c in CATEGORICAL else "double" if train[c].dtype.kind == "f" else "long"
                for c in FEATURE_NAMES}
    assert (expected["dur"], expected["spkts"]) == ("double", "long")  # both kinds are there
    assert {spec.name: spec.type.name for spec in signature.inputs.inputs} == expected
    assert {spec.name: spec.type.name for spec in signature.outputs.inputs} == {
        "probability": "double", "prediction": "long"}


@pytest.mark.parametrize(("column", "value", "match"), [
    ("dur", "soon", "column dur"),                       # refused by MLflow's schema enforcement
    ("rate", np.inf, "column 'rate', data row 2"),       # passes the schema, refused by the model
])
def test_logged_model_refuses_a_bad_value_naming_the_column(published, monkeypatch, column, value, match):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", published.uri)
    model = mlflow.pyfunc.load_model(published.result.model_uri)
    rows = published.test.head(3).astype({column: object if isinstance(value, str) else "float64"})
    rows.loc[1, column] = value
    with pytest.raises(mlflow.exceptions.MlflowException, match=match):
        model.predict(rows)


def test_model_is_registered_under_the_given_name(published):
    r = published.result
    assert r.registered_version == "1"
    version = published.client.get_model_version(published.register_name, "1")
    assert version.run_id == published.parent


def test_model_loads_where_the_project_is_not_installed(published, tmp_path, monkeypatch):
    """The model carries `mixer` in its code_paths: load it with the editable install hidden."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", published.uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=published.result.model_uri,
                                                dst_path=str(tmp_path / "model"))
    script = textwrap.dedent(f"""
        import sys
        # Hide the editable install of this project (its finder) and the checkout itself.
        sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                         and "__editable__" not in getattr(type(f), "__module__", "")]
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        try:
            import mixer
            raise SystemExit("mixer is importable before loading: the test proves nothing")
        except ImportError:
            pass
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({local!r})
        import mixer
        assert mixer.__file__.startswith({local!r}), mixer.__file__
        print(model.predict(pd.read_csv({str(published.test_csv)!r}).head(20))["probability"].to_json())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.array(list(json.loads(proc.stdout.strip().splitlines()[-1]).values()))
    expected = ModelBundle.load(published.result.bundle_path).predict_proba(
        published.test.head(20), source="rows")
    # Another process: the float32 logits may differ in the last bit.
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.fixture(scope="module")
def served(published, tmp_path_factory) -> str:
    """``mlflow models serve`` of the published model on a free loopback port; yields its URL."""
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", published.result.model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env={**os.environ, "MLFLOW_TRACKING_URI": published.uri}, cwd=root, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            try:
                wait_http(f"{url}/ping", timeout=90, proc=proc)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{(root / 'serve.log').read_text()[-3000:]}") from None
            yield url
        finally:
            stop_process_group(proc)


def _invoke(url: str, body: str, content_type: str) -> tuple[int, str]:
    """POST ``body`` to the server's ``/invocations``; (HTTP status, response text), errors included."""
    request = urllib.request.Request(f"{url}/invocations", data=body.encode(),
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _split_json(rows: pd.DataFrame) -> str:
    return json.dumps({"dataframe_split": json.loads(rows.to_json(orient="split", index=False))})


@pytest.mark.slow  # downloads the model and starts a uvicorn server
@pytest.mark.mlflow_server
@pytest.mark.parametrize("content_type", ["application/json", "text/csv"])
def test_mlflow_models_serve_scores_raw_rows_as_json_and_csv(published, served, content_type):
    rows = published.test.head(25)  # id and label included: the signature drops them
    body = _split_json(rows) if content_type == "application/json" else rows.to_csv(index=False)
    status, text = _invoke(served, body, content_type)
    assert status == 200, text[-2000:]
    got = pd.DataFrame(json.loads(text)["predictions"])
    expected = predict_frame(ModelBundle.load(published.result.bundle_path), rows, source="rows")
    np.testing.assert_allclose(got["probability"], expected["probability"], rtol=1e-6)
    assert got["prediction"].tolist() == expected["prediction"].tolist()


@pytest.mark.slow
@pytest.mark.mlflow_server
@pytest.mark.parametrize(("content_type", "column", "value"), [
    ("application/json", "sbytes", "lots"),  # a string in a long column: refused by MLflow's schema
    ("application/json", "dur", "soon"),     # ... in a double column
    ("text/csv", "rate", "inf"),             # parses as a double, so it reaches the model's predict
])
def test_served_model_refuses_a_bad_value_naming_the_column_without_a_traceback(
        published, served, content_type, column, value):
    rows = published.test.head(3).astype({column: object})
    rows.loc[1, column] = value
    body = _split_json(rows) if content_type == "application/json" else rows.to_csv(index=False)
    status, text = _invoke(served, body, content_type)
    assert 400 <= status < 500, (status, text[-2000:])
    assert re.search(rf"column '?{column}\b", json.loads(text)["message"]), text[-2000:]
    assert "Traceback" not in text, text[-2000:]


def test_study_without_a_completed_trial_cannot_be_published(tmp_path):
    study = optuna.create_study(study_name="empty")
    with pytest.raises(PublishError, match="'empty' has no best trial"):
        publish_best(study, out_dir=tmp_path, log_model=False)
    assert list(tmp_path.iterdir()) == []


def test_best_trial_without_config_attr_is_named(tmp_path):
    study = optuna.create_study(study_name="bare")
    study.add_trial(_trial(0.1, {"seed": 1}))
    with pytest.raises(PublishError, match="trial 0 has no user attr 'config'"):
        publish_best(study, out_dir=tmp_path, log_model=False)


def _small_study(name: str) -> optuna.Study:
    """A study whose best trial is a short run on synthetic data (quick to retrain and publish)."""
    data_config = DataConfig(source="synthetic", n_rows=400, seed=0)
    original = fit(TRAIN, load(data_config), seed=SEED)
    attrs = {"config": {**TRAIN.to_flat(), **dataclasses.asdict(data_config)}, "seed": SEED,
             "history": [{"epoch": m.epoch, **m.as_dict()} for m in original.history]}
    study = optuna.create_study(study_name=name, direction="minimize")
    study.add_trial(_trial(original.history[original.best_epoch - 1].val_loss, attrs))
    return study


@pytest.mark.parametrize("status", ["RUNNING", "FAILED"])  # FINISHED: the `published` fixture
def test_publishing_on_the_parent_run_keeps_its_status_and_the_tracking_settings(mlflow_server, tmp_path,
                                                                               status):
    study = _small_study(f"status-{uuid.uuid4().hex[:8]}")
    client = mlflow.MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(study.study_name)).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    study.set_user_attr("mlflow_parent_run_id", run_id)
    uri_before, env_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    result = publish_best(study, tracking_uri=mlflow_server.uri, out_dir=tmp_path)
    assert (result.run_id, result.model_uri) == (run_id, f"runs:/{run_id}/model")
    run = client.get_run(run_id)
    assert run.data.tags["best_model_uri"] == result.model_uri
    assert run.info.status == status
    assert mlflow.active_run() is None
    # The process's own tracking settings are left as they were.
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == (uri_before, env_before)


def test_without_a_parent_run_the_model_goes_to_a_new_run_named_after_the_study(mlflow_server, tmp_path):
    name = f"orphan-{uuid.uuid4().hex[:8]}"
    with pytest.warns(RuntimeWarning, match="mlflow_parent_run_id"):
        result = publish_best(_small_study(name), tracking_uri=mlflow_server.uri, out_dir=tmp_path)
    client = mlflow.MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.info.run_name == f"{name}-best-model"
    assert client.get_experiment(run.info.experiment_id).name == name
    assert run.data.tags["best_model_uri"] == result.model_uri == f"runs:/{result.run_id}/model"
