"""Study report: figure, ranked table, usage errors and logging to the parent MLflow run."""

from __future__ import annotations

import errno
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


DISTRIBUTIONS = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                 "scheduler": optuna.distributions.CategoricalDistribution(SCHEDULERS),
                 "patch_size": optuna.distributions.CategoricalDistribution([1, 3, 6]),
                 "t_0": optuna.distributions.IntDistribution(2, 5)}


def add_trials(study: optuna.Study, n_epochs: int = 12) -> dict[int, float]:
    """Nine completed trials over three schedulers, three pruned, one failed; returns values.

    ``t_0`` is conditional, as in the default space: sampled for warm restarts only, while every
    trial's full config carries the scheduler's unused default ``t_0: 10``."""
    values = {}
    number = len(study.get_trials(deepcopy=False))
    for k in range(12):
        scheduler = SCHEDULERS[k % 3]
        lr = float(10 ** (-4 + 2.5 * ((k * 7) % 12) / 11))
        params = {"lr": lr, "scheduler": scheduler, "patch_size": [1, 3, 6][k % 3]}
        if scheduler == "cosine_warm_restarts":
            params["t_0"] = 2 + k % 4
        pruned = k in (2, 7, 10)
        n = 4 if pruned else n_epochs
        hist = make_history(n, k, scheduler=scheduler, lr=lr, probes=k in (0, 4),
                            wiggle=0.08 if k == 5 else 0.0, plateau=(2, 8) if k == 3 else None)
        best = min(h["val_loss"] for h in hist)
        attrs = {"history": hist, "config": {"t_0": 10, **params, "epochs": n_epochs, "depth": 2},
                 "diagnosis": "plateau" if k == 3 else ("oscillating" if k == 5 else "healthy"),
                 "status": "stopped" if pruned else "completed", "seed": k}
        if pruned:
            attrs["pruned_epoch"] = n
        trial = create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else best, params=params,
            distributions={name: DISTRIBUTIONS[name] for name in params},
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


def test_a_searched_epochs_knob_gets_its_own_column_beside_the_epochs_run(in_tmp, capsys):
    # The real space searches `epochs`; the table's own `epochs` counts the epochs a trial ran.
    path = Path("runs/ep/optuna.journal")
    path.parent.mkdir(parents=True)
    study = optuna.create_study(study_name="ep", storage=JournalStorage(JournalFileBackend(str(path))))
    for k, (scheduled, ran, state) in enumerate([(10, 10, TrialState.COMPLETE), (30, 4, TrialState.PRUNED)]):
        hist = make_history(ran, k, scheduler="cosine", lr=1e-3)
        study.add_trial(create_trial(
            state=state, value=min(h["val_loss"] for h in hist) if state == TrialState.COMPLETE else None,
            params={"lr": 1e-3, "epochs": scheduled},
            distributions={"lr": DISTRIBUTIONS["lr"], "epochs": optuna.distributions.IntDistribution(5, 30)},
            user_attrs={"history": hist, "config": {"lr": 1e-3, "epochs": scheduled}},
            intermediate_values={h["epoch"]: h["val_loss"] for h in hist}))
    assert main(["ep", "--group-by", "epochs"]) == 0
    table = pd.read_csv("runs/ep/report/trials.csv")
    assert table["epochs"].tolist() == [10, 4] and table["param_epochs"].tolist() == [10, 30]


def test_study_files_are_the_table_and_the_plots_with_importances_from_ten_completed_trials(in_tmp):
    assert report.IMPORTANCE_MIN_COMPLETE == 10  # the number the README states
    study = optuna.create_study(direction="minimize")
    add_trials(study)  # 9 completed: one short of the threshold
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={},
                                 user_attrs={"history": [{"epoch": 1}], "config": {"a": 1}}))
    files = report.write_study_files(study, Path("files-a"))
    assert files[0] == (Path("files-a/trials.csv"), None)
    assert {p.name for p, folder in files[1:] if folder == "plots"} == {
        "optimization_history.png", "intermediate_values.png", "parallel_coordinate.png",
        "param_importances.txt", "landscape_spectrum.txt", "spectral_density.txt", "loss_slices.txt"}
    note = Path("files-a/plots/param_importances.txt").read_text()
    assert "need >= 10 completed trials, the study has 9" in note
    assert not Path("files-a/plots/param_importances.png").exists()
    table = pd.read_csv("files-a/trials.csv")
    assert "params_lr" in table.columns
    assert not {"user_attrs_history", "user_attrs_config"} & set(table.columns)
    restarts = (table["params_scheduler"] == "cosine_warm_restarts").tolist()
    assert table["params_t_0"].notna().tolist() == restarts

    add_trials(study)  # 18 completed: the importances are drawn and the note goes
    names = {p.name for p, _ in report.write_study_files(study, Path("files-a"))}
    assert "param_importances.png" in names and "param_importances.txt" not in names
    assert Path("files-a/plots/param_importances.png").stat().st_size > 0
    assert not Path("files-a/plots/param_importances.txt").exists()


def _study_with_names(metric: str = "val_loss") -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    study.set_metric_names([metric])
    add_trials(study)
    add_trials(study)
    return study


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_intermediate_values_name_the_metric_and_the_epoch_and_emphasise_the_best():
    study = _study_with_names()
    fig = report.study_figures(study, top=3)["intermediate_values"]
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "val_loss")
    legend = _legend_texts(ax)
    # 24 trials with curves: the 3 best by value, then one entry for every other trial, not 24 entries.
    assert len(legend) == 4 and legend[-1] == "other trials (21), × pruned (6)"
    best = study.best_trial
    assert legend[0] == f"#{best.number}  {best.value:.6g}  (best)"
    curves = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    thickest = max(curves, key=lambda line: line.get_linewidth())
    assert thickest is curves[-1]  # drawn last, so on top
    assert list(thickest.get_ydata()) == [v for _, v in sorted(best.intermediate_values.items())]
    assert thickest.get_linewidth() > 1.5 * max(line.get_linewidth() for line in curves[:-1])


def test_optuna_plots_are_relabelled_and_conditional_parameters_get_no_none_tick():
    study = _study_with_names()
    figures = report.study_figures(study)
    history = figures["optimization_history"].axes[0]
    assert (history.get_xlabel(), history.get_ylabel()) == ("trial", "val_loss")
    assert f"best: #{study.best_trial.number}  {study.best_value:.6g}" in _legend_texts(history)
    parallel = figures["parallel_coordinate"]
    ticks = [t.get_text() for ax in parallel.axes for t in [*ax.get_yticklabels(), *ax.get_xticklabels()]]
    assert "None" not in ticks and "val_loss" in ticks
    assert "conditional parameters not shown: t_0" in parallel.axes[0].get_title()
    assert _legend_texts(parallel.axes[0]) == [f"best: #{study.best_trial.number}  {study.best_value:.6g}"]
    importances = figures["param_importances"].axes[0]
    assert importances.get_xlabel() == "importance for val_loss"
    assert "18 completed trials" in importances.get_title()


def test_a_study_with_no_completed_trial_gets_notes_not_empty_plots(in_tmp):
    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}))
    figures = report.study_figures(study)
    assert all(isinstance(why, str) for why in figures.values()), figures
    assert "the study has 0" in figures["param_importances"]
    report.write_study_files(study, "empty")
    notes = sorted(p.name for p in Path("empty/plots").iterdir())
    assert notes == sorted(f"{name}.txt" for name in report.STUDY_PLOTS)


def test_conditional_parameters_a_trial_did_not_sample_are_empty_and_values_have_six_digits(journal_study):
    name, values = journal_study
    assert main([name]) == 0
    table = pd.read_csv("runs/demo/report/trials.csv")
    restarts = table["scheduler"] == "cosine_warm_restarts"
    # Not the config's unused default t_0 = 10: only warm-restart trials sampled t_0.
    assert table.loc[restarts, "t_0"].between(2, 5).all() and table.loc[~restarts, "t_0"].isna().all()
    md = Path("runs/demo/report/trials.md").read_text().splitlines()
    header = [c.strip() for c in md[2].split("|")]
    column = header.index("t_0")
    rows = [[c.strip() for c in line.split("|")] for line in md[4:]]
    assert {row[column] for row in rows if "cosine_warm_restarts" not in row} == {""}
    best = min(values, key=values.get)
    assert f"| {best} | complete | {values[best]:.6g} |" in md[4]


def test_figure_legends_give_values_with_six_significant_digits(journal_study):
    study = optuna.load_study(study_name="demo", storage=report.find_study(None, "demo"))
    records = report.collect(study)
    fig = report.plot_curves(records, top=3)
    legend = [t for ax in fig.axes if ax.get_legend() for t in _legend_texts(ax)]
    for r in report.ranked(records)[:3]:
        assert any(text.startswith(f"#{r.number}  {r.value:.6g}") for text in legend)


def _disk_full_after(chunk):
    """A writer that writes ``chunk`` (to a path or an open file), then fails as a full disk does."""
    def write(self, target, *args, **kwargs):
        if isinstance(target, (str, Path)):
            with open(target, "w" if isinstance(chunk, str) else "wb") as fh:
                fh.write(chunk)
        else:
            target.write(chunk)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


@pytest.mark.parametrize("patched, chunk, victim", [
    ("pandas.DataFrame.to_csv", "number,value\n0,", "trials.csv"),
    ("matplotlib.figure.Figure.savefig", b"\x89PNG", "plots/optimization_history.png"),
])
def test_a_full_disk_leaves_the_previous_study_files_whole(in_tmp, monkeypatch, patched, chunk, victim):
    study = optuna.create_study(direction="minimize")
    add_trials(study)
    report.write_study_files(study, Path("out"))
    before = Path("out", victim).read_bytes()
    study.add_trial(create_trial(value=0.01, params={}, distributions={}))  # the next version differs
    monkeypatch.setattr(patched, _disk_full_after(chunk))
    with pytest.raises(report.ReportWriteError, match="cannot write the study's files in out: No space left"):
        report.write_study_files(study, Path("out"))
    assert Path("out", victim).read_bytes() == before
    assert not [p for p in Path("out").rglob("*") if p.name.endswith(".tmp")]


def test_report_command_on_a_full_disk_exits_1_naming_the_folder(journal_study, monkeypatch, capsys):
    assert main(["demo"]) == 0
    before = {name: Path("runs/demo/report", name).read_bytes() for name in ("trials.csv", "curves.png")}
    monkeypatch.setattr("pandas.DataFrame.to_csv", _disk_full_after("rank,trial\n1,"))
    assert main(["demo", "--top", "2"]) == 1
    err = capsys.readouterr().err
    assert "cannot write the report in runs/demo/report: No space left on device" in err
    assert "Traceback" not in err
    assert {name: Path("runs/demo/report", name).read_bytes() for name in before} == before
    assert not [p for p in Path("runs/demo/report").iterdir() if p.name.endswith(".tmp")]


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
    assert artifacts == {"report/curves.png", "report/trials.md", "report/trials.csv",
                         *(f"report/{name}.txt" for name in report.CURVATURE_PLOTS)}  # no probes here
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
