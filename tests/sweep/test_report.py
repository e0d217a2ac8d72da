"""Study report: figure, ranked table, usage errors and logging to the parent MLflow run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from sweep import report
from sweep.report import main

SCHEDULERS = ("constant", "cosine", "cosine_warm_restarts")


def curve(n: int, *, start: float, end: float, rng: np.random.Generator, wiggle: float = 0.0,
          plateau: tuple[int, int] | None = None) -> list[float]:
    """A decaying loss from ``start`` to ``end`` with optional noise and a flat stretch."""
    t = np.arange(n)
    values = end + (start - end) * np.exp(-t / max(n / 4, 1))
    if plateau:
        a, b = plateau
        values[a:b] = values[a]
        values[b:] = end + (values[a] - end) * np.exp(-(t[b:] - b) / 2)
    values = values * (1 + wiggle * rng.standard_normal(n))
    return [float(v) for v in values]


def make_history(n: int, seed: int, *, scheduler: str, lr: float, probes: bool = False,
                 wiggle: float = 0.0, plateau=None) -> list[dict]:
    rng = np.random.default_rng(seed)
    train = curve(n, start=0.7, end=0.05 + 0.1 * rng.random(), rng=rng, plateau=plateau)
    val = curve(n, start=0.68, end=0.1 + 0.1 * rng.random(), rng=rng, wiggle=wiggle, plateau=plateau)
    out = []
    for i in range(n):
        if scheduler == "constant":
            lr_i = lr
        elif scheduler == "cosine":
            lr_i = 1e-6 + 0.5 * (lr - 1e-6) * (1 + math.cos(math.pi * i / n))
        else:
            lr_i = 1e-6 + 0.5 * (lr - 1e-6) * (1 + math.cos(math.pi * (i % 5) / 5))
        entry = {"epoch": i + 1, "train_loss": train[i], "val_loss": val[i], "val_accuracy": 0.9,
                 "val_f1": 0.9, "lr": lr_i, "grad_norm_mean": 0.5 * math.exp(-i / 10) + 0.05,
                 "grad_norm_max": 1.0, "update_ratio": 1e-3, "epoch_seconds": 1.0}
        if probes and (i + 1) % 3 == 0:
            entry.update(hessian_max_eig=5.0 / (1 + i), hessian_min_eig=-0.3 / (1 + i),
                         neg_curvature_ratio=0.06, curvature_seconds=1.0)
        out.append(entry)
    return out


def add_trials(study: optuna.Study, n_epochs: int = 12) -> dict[int, float]:
    """Nine completed trials over three schedulers, three pruned, one failed; returns values."""
    values = {}
    number = 0
    for k in range(12):
        scheduler = SCHEDULERS[k % 3]
        lr = float(10 ** (-4 + 2.5 * ((k * 7) % 12) / 11))
        params = {"lr": lr, "scheduler": scheduler, "patch_size": [1, 3, 6][k % 3]}
        pruned = k in (2, 7, 10)
        n = 4 if pruned else n_epochs
        hist = make_history(n, k, scheduler=scheduler, lr=lr, probes=k in (0, 4),
                            wiggle=0.08 if k == 5 else 0.0, plateau=(2, 8) if k == 3 else None)
        best = min(h["val_loss"] for h in hist)
        attrs = {"history": hist, "config": {**params, "epochs": n_epochs, "depth": 2},
                 "diagnosis": "plateau" if k == 3 else ("oscillating" if k == 5 else "healthy"),
                 "status": "stopped" if pruned else "completed", "seed": k}
        if pruned:
            attrs["pruned_epoch"] = n
        distributions = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                         "scheduler": optuna.distributions.CategoricalDistribution(SCHEDULERS),
                         "patch_size": optuna.distributions.CategoricalDistribution([1, 3, 6])}
        trial = create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else best, params=params, distributions=distributions,
            user_attrs=attrs, intermediate_values={h["epoch"]: h["val_loss"] for h in hist},
        )
        study.add_trial(trial)
        if not pruned:
            values[number] = best
        number += 1
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={},
                                 user_attrs={"config": {"scheduler": "cosine"}, "status": "failed"}))
    return values


@pytest.fixture
def journal_study(in_tmp) -> tuple[str, dict[int, float]]:
    """A study ``demo`` in the sweep's default place, runs/demo/optuna.journal."""
    path = Path("runs/demo/optuna.journal")
    path.parent.mkdir(parents=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="demo", storage=storage, direction="minimize")
    return "demo", add_trials(study)


def test_report_writes_a_png_that_opens_and_a_ranked_table(journal_study, capsys):
    name, values = journal_study
    assert main([name, "--top", "3"]) == 0
    out = Path("runs/demo/report")
    from PIL import Image

    with Image.open(out / "curves.png") as img:
        width, height = img.size
        assert width > 1000 and height > 800
        # Not a blank canvas: many distinct colours were drawn.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 13
    completed = sorted(values, key=values.get)
    assert table["trial"].tolist()[:9] == completed  # best value first
    assert table["state"].tolist() == ["complete"] * 9 + ["pruned"] * 3 + ["fail"]
    assert table["rank"].tolist() == list(range(1, 14))
    assert table.loc[0, "value"] == pytest.approx(values[completed[0]])
    pruned_rows = table[table["state"] == "pruned"]
    assert pruned_rows["epochs"].tolist() == [4, 4, 4] and pruned_rows["pruned_epoch"].tolist() == [4, 4, 4]
    # Pruned trials are ranked by their best reported validation loss.
    assert pruned_rows["best_val_loss"].is_monotonic_increasing
    assert {"lr", "scheduler", "patch_size", "diagnosis"} <= set(table.columns)
    assert table.set_index("trial").loc[3, "diagnosis"] == "plateau"
    md = (out / "trials.md").read_text()
    assert md.count("\n| ") == 14  # header + 13 trials
    assert "| rank | trial | state |" in md
    said = capsys.readouterr().out
    assert "not logged to MLflow: the study has no mlflow_parent_run_id" in said


def test_unknown_study_exits_2_and_lists_the_studies(journal_study, capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "demo" in err
    # With an explicit storage, the studies in it are listed.
    assert main(["nope", "--storage", "runs/demo/optuna.journal"]) == 2
    err = capsys.readouterr().err
    assert "studies there: demo" in err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--group-by", "colour"], "--group-by 'colour' is not a parameter"),
    (["demo", "--top", "-1"], "--top must be >= 0"),
    (["demo", "--storage", "missing.journal"], "missing.journal does not exist"),
    (["demo", "--bogus"], "unrecognized arguments"),
])
def test_bad_usage_exits_2_with_a_message(journal_study, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.postgres
def test_report_reads_a_study_from_a_bare_postgresql_url(in_tmp, postgres_url, capsys):
    # What users type: no driver in the URL. SQLAlchemy 2.1 would pick psycopg 3, not installed here.
    bare = postgres_url.replace("postgresql+psycopg2://", "postgresql://", 1)
    add_trials(optuna.create_study(study_name="pg", storage=postgres_url, direction="minimize"))
    assert main(["pg", "--storage", bare, "--out", "pg-report"]) == 0, capsys.readouterr().err
    assert len(pd.read_csv("pg-report/trials.csv")) == 13
    assert Path("pg-report/curves.png").stat().st_size > 0 and Path("pg-report/trials.md").is_file()
    assert main(["other", "--storage", bare]) == 2
    assert "studies there: pg" in capsys.readouterr().err


def test_unopenable_storage_exits_2_without_its_password(in_tmp, capsys):
    from tests.conftest import free_port

    url = f"postgresql://me:s3cret@127.0.0.1:{free_port()}/db"
    assert main(["demo", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "cannot open storage postgresql://me:***@127.0.0.1" in err and "s3cret" not in err


def test_study_files_are_the_table_and_the_optuna_plots(in_tmp):
    study = optuna.create_study(direction="minimize")
    add_trials(study)
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={},
                                 user_attrs={"history": [{"epoch": 1}], "config": {"a": 1}}))
    with_plots = report.write_study_files(study, Path("files-a"))
    assert with_plots[0] == (Path("files-a/trials.csv"), None)
    assert {p.name for p, folder in with_plots[1:] if folder == "plots"} == {
        f"{name}.png" for name in ("optimization_history", "intermediate_values", "param_importances",
                                   "parallel_coordinate")}
    columns = pd.read_csv("files-a/trials.csv").columns
    assert "params_lr" in columns and not {"user_attrs_history", "user_attrs_config"} & set(columns)
    # One completed trial: parameter importances mean nothing yet, so that plot is left out.
    single = optuna.create_study()
    single.add_trial(create_trial(value=0.5, params={"lr": 0.1},
                                  distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1)}))
    names = {p.name for p, _ in report.write_study_files(single, Path("files-b"))}
    assert "param_importances.png" not in names and "trials.csv" in names


def test_group_by_a_fixed_knob_reads_it_from_the_config(journal_study):
    # depth is fixed by the space: not a sampled param, but every trial's config has it.
    assert main(["demo", "--group-by", "depth", "--out", "by-depth"]) == 0
    table = pd.read_csv("by-depth/trials.csv")
    assert "depth" in table.columns and set(table["depth"].dropna()) == {2}


def test_figure_has_one_column_per_group_and_a_curvature_row(journal_study):
    storage = report.find_study(None, "demo")
    study = optuna.load_study(study_name="demo", storage=storage)
    records = report.collect(study)
    fig = report.plot_curves(records, group_by="scheduler", top=3)
    grid = fig.axes[0].get_gridspec()
    assert (grid.nrows, grid.ncols) == (4, 3)  # loss, lr, grad, curvature × 3 schedulers
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert [t.splitlines()[0] for t in titles] == [f"scheduler = {s}" for s in SCHEDULERS]
    legend_text = [t.get_text() for ax in fig.axes[:3] for t in ax.get_legend().get_texts()]
    top3 = report.ranked(records)[:3]
    for r in top3:
        assert any(text.startswith(f"#{r.number} ") for text in legend_text)
    assert fig.axes[0].get_yscale() == "log"


def test_in_memory_study_without_curvature_has_three_rows():
    study = optuna.create_study(direction="minimize")
    add_trials(study)
    records = [r for r in report.collect(study) if r.number not in (0, 4)]  # drop probed trials
    fig = report.plot_curves(records, group_by="patch_size", top=2)
    assert (fig.axes[0].get_gridspec().nrows, fig.axes[0].get_gridspec().ncols) == (3, 3)


def test_missing_diagnosis_is_computed_from_the_history():
    study = optuna.create_study()
    flat = [{"epoch": i + 1, "train_loss": 0.51, "val_loss": 0.52, "lr": 1e-3, "grad_norm_mean": 0.1}
            for i in range(8)]
    study.add_trial(create_trial(value=0.52, params={}, distributions={}, user_attrs={"history": flat}))
    (record,) = report.collect(study)
    assert record.diagnosis == "plateau"


@pytest.mark.mlflow_server
def test_report_is_logged_to_the_parent_run_and_reads_curves_from_mlflow(journal_study, mlflow_server,
                                                                          capsys):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.create_experiment(f"report-test-{Path.cwd().name}")
    parent = client.create_run(exp, run_name="study-demo").info.run_id
    child = client.create_run(exp, run_name="trial-13", tags={"mlflow.parentRunId": parent}).info.run_id
    for epoch, (tr, va) in enumerate([(0.6, 0.62), (0.5, 0.55), (0.45, 0.5)], start=1):
        client.log_metric(child, "train_loss", tr, step=epoch)
        client.log_metric(child, "val_loss", va, step=epoch)
        client.log_metric(child, "lr", 1e-3, step=epoch)
    storage = JournalStorage(JournalFileBackend("runs/demo/optuna.journal"))
    study = optuna.load_study(study_name="demo", storage=storage)
    study.set_user_attr("mlflow_parent_run_id", parent)
    # A trial whose history lives only in MLflow.
    study.add_trial(create_trial(value=0.5, params={"scheduler": "constant"},
                                 distributions={"scheduler": optuna.distributions.CategoricalDistribution(
                                     SCHEDULERS)},
                                 user_attrs={"mlflow_run_id": child}))

    assert main(["demo", "--tracking-uri", mlflow_server.uri]) == 0
    said = capsys.readouterr().out
    assert f"logged to MLflow run {parent}" in said
    assert "trial(s) 13 read from MLflow" in said
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert artifacts == {"report/curves.png", "report/trials.md", "report/trials.csv"}
    table = pd.read_csv("runs/demo/report/trials.csv").set_index("trial")
    assert table.loc[13, "epochs"] == 3 and table.loc[13, "best_val_loss"] == pytest.approx(0.5)


def test_unreachable_tracking_server_does_not_fail_the_report(journal_study, capsys):
    storage = JournalStorage(JournalFileBackend("runs/demo/optuna.journal"))
    optuna.load_study(study_name="demo", storage=storage).set_user_attr("mlflow_parent_run_id", "abc")
    from tests.conftest import free_port

    assert main(["demo", "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 0
    assert "not logged to MLflow" in capsys.readouterr().out
    assert Path("runs/demo/report/curves.png").is_file()


def test_multi_objective_study_is_refused_with_exit_2(in_tmp, capsys):
    path = Path("runs/multi/optuna.journal")
    path.parent.mkdir(parents=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    optuna.create_study(study_name="multi", storage=storage, directions=["minimize", "maximize"])
    assert main(["multi"]) == 2
    assert "2 objectives" in capsys.readouterr().err


def test_a_learning_rate_of_zero_stays_visible():
    # sharp_cosine with eta_min 0 freezes a run at lr 0: a log axis would silently drop those epochs.
    study = optuna.create_study()
    hist = [{"epoch": i + 1, "train_loss": 0.6 - 0.01 * min(i, 3), "val_loss": 0.6, "lr": lr,
             "grad_norm_mean": 0.2} for i, lr in enumerate([0.1, 0.05, 0.0, 0.0, 0.0])]
    study.add_trial(create_trial(value=0.6, params={}, distributions={},
                                 user_attrs={"history": hist, "config": {"scheduler": "sharp_cosine"}}))
    fig = report.plot_curves(report.collect(study), top=1)
    lr_ax = fig.axes[1]
    assert lr_ax.get_yscale() == "symlog" and lr_ax.get_ylim()[0] == 0.0
    assert list(lr_ax.get_lines()[0].get_ydata()) == [0.1, 0.05, 0.0, 0.0, 0.0]
