"""`python -m mixer.evaluate` and `python -m mixer.predict` on rows of the real UNSW-NB15 sample."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mixer import evaluate, predict, train
from mixer.bundle import ModelBundle
from mixer.config import DataConfig, MixerConfig, TrainConfig
from mixer.data import load
from mixer.metrics import roc_auc

TRAIN = TrainConfig(model=MixerConfig(patch_size=6, dim=16, depth=2), epochs=3, batch_size=64, lr=3e-3)


@pytest.fixture(scope="module")
def trained(real_csv, tmp_path_factory) -> SimpleNamespace:
    """A small model trained on 2,000 real rows, and 500 other real rows to score (built once)."""
    root = tmp_path_factory.mktemp("evaluate-predict")
    raw = pd.read_csv(real_csv)
    raw.head(2000).to_csv(root / "train.csv", index=False)
    test = raw.iloc[2000:2500].reset_index(drop=True)
    test.to_csv(root / "test.csv", index=False)
    data = load(DataConfig(source="csv", train_csv=str(root / "train.csv"), seed=0))
    result = train.fit(TRAIN, data, seed=0)
    bundle = ModelBundle(result.best_params, TRAIN.model, data.pipeline)
    return SimpleNamespace(root=root, model=bundle.save(root / "model.npz"), bundle=bundle,
                           test=test, test_csv=root / "test.csv")


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- evaluate


def test_evaluate_prints_metrics_and_confusion_matrix(trained, capsys):
    assert evaluate.main([str(trained.model), str(trained.test_csv)]) == 0
    out = capsys.readouterr().out
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc", "confusion matrix", "true 0", "pred 1"):
        assert name in out
    assert "500 rows" in out


def test_evaluate_json_agrees_with_the_model_and_beats_chance(trained, capsys):
    assert evaluate.main([str(trained.model), str(trained.test_csv), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    y = trained.test["label"].to_numpy()
    proba = trained.bundle.predict_proba(trained.test, source="test")
    assert got["rows"] == 500 and got["tn"] + got["fp"] + got["fn"] + got["tp"] == 500
    assert got["tp"] == int(np.sum((proba >= 0.5) & (y == 1)))
    assert got["accuracy"] == pytest.approx(np.mean((proba >= 0.5) == y))
    assert got["roc_auc"] == pytest.approx(roc_auc(y, proba))
    assert got["roc_auc"] > 0.85  # three epochs on 2,000 real rows already separate the classes


def test_evaluate_threshold_moves_the_confusion_matrix(trained, capsys):
    evaluate.main([str(trained.model), str(trained.test_csv), "--json", "--threshold", "0.05"])
    low = json.loads(capsys.readouterr().out)
    evaluate.main([str(trained.model), str(trained.test_csv), "--json", "--threshold", "0.95"])
    high = json.loads(capsys.readouterr().out)
    assert low["tp"] + low["fp"] > high["tp"] + high["fp"]
    assert low["roc_auc"] == high["roc_auc"]


def test_evaluate_without_label_column_exits_2_naming_the_column(trained, tmp_path, capsys):
    path = _write(trained.test.drop(columns=["label"]), tmp_path / "unlabelled.csv")
    assert evaluate.main([str(trained.model), str(path)]) == 2
    err = capsys.readouterr().err
    assert "unlabelled.csv" in err and "'label'" in err


@pytest.mark.parametrize("which", ["model", "data"])
def test_evaluate_missing_file_exits_2_naming_it(trained, tmp_path, capsys, which):
    args = [str(trained.model), str(trained.test_csv)]
    args[0 if which == "model" else 1] = str(tmp_path / "missing.file")
    assert evaluate.main(args) == 2
    assert "missing.file" in capsys.readouterr().err


def test_evaluate_rejects_a_threshold_outside_0_1(trained):
    with pytest.raises(SystemExit) as exc:
        evaluate.main([str(trained.model), str(trained.test_csv), "--threshold", "1.5"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------- predict


def test_predict_writes_id_probability_prediction_for_every_row(trained, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert predict.main([str(trained.model), str(trained.test_csv), "--out", str(out)]) == 0
    got = pd.read_csv(out)
    assert list(got.columns) == ["id", "probability", "prediction"]
    assert got["id"].tolist() == trained.test["id"].tolist()
    expected = trained.bundle.predict_proba(trained.test, source="test")
    np.testing.assert_allclose(got["probability"], expected, rtol=1e-6)
    assert got["prediction"].tolist() == (expected >= 0.5).astype(int).tolist()
    err = capsys.readouterr().err
    assert "scored 500 rows" in err and f"{int((expected >= 0.5).sum())} predicted 1" in err


def test_predict_without_label_or_id_numbers_rows_from_one_and_prints_csv(trained, tmp_path, capsys):
    bare = trained.test.drop(columns=["id", "label"]).head(20)
    path = _write(bare, tmp_path / "bare.csv")
    assert predict.main([str(trained.model), str(path)]) == 0  # default: CSV on stdout
    got = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert got["id"].tolist() == list(range(1, 21))
    np.testing.assert_allclose(got["probability"], trained.bundle.predict_proba(bare, source="b"),
                               rtol=1e-6)


def test_predict_scores_a_row_with_an_unseen_category(trained, tmp_path, capsys):
    assert "RST" not in trained.bundle.pipeline.categories["state"]
    rows = trained.test.head(10).copy()
    rows.loc[3, "state"] = "RST"
    path = _write(rows, tmp_path / "rst.csv")
    assert predict.main([str(trained.model), str(path)]) == 0
    got = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert got["id"].tolist() == rows["id"].tolist()
    assert 0.0 <= got.loc[3, "probability"] <= 1.0
    # Every other row scores exactly as without the unseen category.
    clean = trained.bundle.predict_proba(trained.test.head(10), source="clean")
    others = [i for i in range(10) if i != 3]
    np.testing.assert_allclose(got["probability"].to_numpy()[others], clean[others], rtol=1e-6)


def test_predict_bad_row_exits_2_naming_row_and_column_and_writes_nothing(trained, tmp_path, capsys):
    rows = trained.test.head(10).copy()
    rows["sbytes"] = rows["sbytes"].astype(object)
    rows.loc[6, "sbytes"] = "lots"  # data row 7, line 8 of the file
    path = _write(rows, tmp_path / "bad.csv")
    out = tmp_path / "predictions.csv"
    assert predict.main([str(trained.model), str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "'sbytes'" in err and "data row 7" in err and "'lots'" in err
    assert list(tmp_path.iterdir()) == [path]  # no output, no temporary file


def test_predict_failure_keeps_an_existing_output_file(trained, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    out.write_text("previous\n")
    assert predict.main([str(trained.model), str(tmp_path / "absent.csv"), "--out", str(out)]) == 2
    assert "absent.csv" in capsys.readouterr().err
    assert out.read_text() == "previous\n"


def test_predict_threshold_sets_the_predicted_label(trained, tmp_path):
    out = tmp_path / "p.csv"
    assert predict.main([str(trained.model), str(trained.test_csv), "--out", str(out),
                         "--threshold", "0.9"]) == 0
    got = pd.read_csv(out)
    proba = trained.bundle.predict_proba(trained.test, source="test")
    assert got["prediction"].tolist() == (proba >= 0.9).astype(int).tolist()
    assert 0 < got["prediction"].sum() < (proba >= 0.5).sum()


# --------------------------------------------------------------------------- faults and papercuts


@pytest.mark.parametrize("cli", [evaluate, predict])
@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_truncated_or_corrupt_model_exits_2_with_one_line_naming_it(trained, tmp_path, capsys, cli, damage):
    blob = bytearray(Path(trained.model).read_bytes())
    if damage == "truncated":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "damaged.npz"
    bad.write_bytes(bytes(blob))
    assert cli.main([str(bad), str(trained.test_csv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1


@pytest.mark.parametrize("cli", [evaluate, predict])
@pytest.mark.parametrize("which", ["model", "data"])
def test_a_directory_is_reported_as_a_directory(trained, tmp_path, capsys, cli, which):
    args = [str(trained.model), str(trained.test_csv)]
    args[0 if which == "model" else 1] = str(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: is a directory" in err and "not found" not in err


def test_predict_piped_into_head_ends_quietly(trained, tmp_path):
    # Far more than a pipe holds (64 KiB), so predict is still writing when the reader goes.
    big = _write(pd.concat([trained.test] * 40, ignore_index=True), tmp_path / "big.csv")
    proc = subprocess.Popen([sys.executable, "-m", "mixer.predict", str(trained.model), str(big)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"id,probability,prediction\n"
    proc.stdout.close()  # what `| head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == evaluate.EXIT_BROKEN_PIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err and err == ""


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_predict_out_file_mode_follows_the_umask(trained, tmp_path, umask, mode):
    out = tmp_path / "predictions.csv"
    old = os.umask(umask)
    try:
        assert predict.main([str(trained.model), str(trained.test_csv), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == mode


@pytest.mark.parametrize(("cli", "script", "module"), [(evaluate, "mixer-evaluate", "mixer.evaluate"),
                                                       (predict, "mixer-predict", "mixer.predict"),
                                                       (train, "mixer-train", "mixer.train")])
def test_usage_names_the_command_as_it_was_typed(monkeypatch, capsys, cli, script, module):
    for argv0, prog in ((f"/venv/bin/{script}", script), (f"/src/{module.replace('.', '/')}.py",
                                                          f"python -m {module}")):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit) as exc:
            cli.main(["--help"])
        out = capsys.readouterr().out
        assert exc.value.code == 0 and out.startswith(f"usage: {prog} ")
        assert "Exit status: 0 done" in out and str(evaluate.EXIT_BROKEN_PIPE) in out


def test_console_script_usage_names_the_script():
    script = Path(sys.executable).with_name("mixer-predict")
    assert script.exists(), "the project is installed (pip install -e .), so its console script is"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: mixer-predict ")


def _synthetic_model(tmp_path: Path) -> Path:
    """A model trained by ``mixer.train --save`` on synthetic rows (one short epoch)."""
    config = tmp_path / "synthetic.yaml"
    config.write_text("data: {source: synthetic, n_rows: 300}\n"
                      "train: {patch_size: 6, dim: 8, depth: 1, epochs: 1, batch_size: 64}\nseed: 0\n")
    model = tmp_path / "synthetic.npz"
    assert train.main([str(config), "--save", str(model)]) == 0
    return model


@pytest.mark.parametrize("cli", [evaluate, predict])
def test_a_synthetic_model_on_a_csv_warns_and_still_scores(trained, tmp_path, capsys, cli):
    model = _synthetic_model(tmp_path)
    capsys.readouterr()
    assert cli.main([str(model), str(trained.test_csv), *(["--out", str(tmp_path / "p.csv")]
                                                         if cli is predict else [])]) == 0
    err = capsys.readouterr().err
    assert f"warning: {model} was trained on synthetic rows, and {trained.test_csv} is a CSV" in err


def test_a_model_on_rows_of_its_own_kind_gives_no_warning(trained, tmp_path, capsys):
    info = {"data_config": {"source": "csv", "train_csv": str(trained.root / "train.csv")}}
    model = ModelBundle(trained.bundle.params, trained.bundle.config, trained.bundle.pipeline,
                        info=info).save(tmp_path / "csv.npz")
    assert evaluate.main([str(model), str(trained.test_csv)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_columns_in_another_order_than_training_warn(trained, tmp_path, capsys):
    columns = list(trained.test.columns)
    columns[1], columns[2] = columns[2], columns[1]  # dur and proto swapped
    path = _write(trained.test[columns], tmp_path / "swapped.csv")
    assert evaluate.main([str(trained.model), str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path}: feature columns in another order" in err and "'proto'" in err


def test_train_save_to_a_directory_exits_2_naming_it(tmp_path, capsys):
    config = tmp_path / "synthetic.yaml"
    config.write_text("data: {source: synthetic, n_rows: 100}\n"
                      "train: {patch_size: 6, dim: 8, depth: 1, epochs: 1, batch_size: 64}\nseed: 0\n")
    (tmp_path / "models" / "inside").mkdir(parents=True)
    assert train.main([str(config), "--save", str(tmp_path / "models")]) == 2
    assert f"error: {tmp_path / 'models'}: cannot write" in capsys.readouterr().err
