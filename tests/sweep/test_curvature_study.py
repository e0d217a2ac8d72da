"""The saddle analysis in front of the user: the default study's probes reach the trials, MLflow and
the report's landscape figures (issue 16)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from matplotlib.figure import Figure

from sweep import plots, report
from sweep.report import TrialRecord
from sweep.report import main as report_main
from sweep.run import main, open_storage

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("landscape_spectrum.png", "spectral_density.png", "loss_slices.png")


def small_default(folder: Path) -> Path:
    """search_spaces/default.yaml with a small budget, few epochs and rows (the rest as shipped)."""
    doc = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    doc["data"]["n_rows"] = 600
    doc["train"].update(epochs=5, dim=8)
    doc["budget"]["n_trials"] = 3
    doc["params"]["depth"]["high"] = 2
    path = folder / "default.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_the_default_study_logs_curvature_to_trials_and_mlflow_and_draws_the_landscape(in_tmp):
    from mlflow import MlflowClient

    shipped = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    assert shipped["train"]["curvature_on_plateau"] is shipped["train"]["curvature_at_end"] is True
    assert shipped["params"]["scaling"]["choices"] == ["global", "log_standard"]

    assert main([str(small_default(in_tmp)), "--out", "out"]) == 0  # tracked: ./mlflow.db
    storage = open_storage(str(in_tmp / "out" / "default" / "optuna.journal"), rdb=False)
    study = optuna.load_study(study_name="default", storage=storage)
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    for t in study.trials:  # no pruning in the first 4 trials: each has its end-of-run probe
        last = t.user_attrs["history"][-1]
        assert last["epoch"] == 5 and last["hessian_min_eig"] <= last["hessian_max_eig"]
        assert t.user_attrs["probes"][-1]["epoch"] == 5
        assert math.isclose(sum(t.user_attrs["probes"][-1]["weights"]), 1.0, rel_tol=1e-3)
        assert len(t.user_attrs["slices"]["alpha"]) == len(t.user_attrs["slices"]["v_min"]) == 15
        run_id = t.user_attrs["mlflow_run_id"]
        for key in ("hessian_min_eig", "hessian_max_eig"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [5]
    plots = in_tmp / "out" / "default" / "plots"
    for name in FIGURES:
        assert (plots / name).stat().st_size > 0
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = {f.path for f in client.list_artifacts(parent, "plots")}
    assert {f"plots/{name}" for name in FIGURES} <= logged

    journal = str(in_tmp / "out" / "default" / "optuna.journal")
    assert report_main(["default", "--storage", journal, "--out", "rep"]) == 0
    for name in FIGURES:
        assert (in_tmp / "rep" / name).stat().st_size > 0


def record(number: int, value: float | None, *, probes: bool = True, plateau=None,
           scheduler: str = "constant") -> TrialRecord:
    """A completed trial with five epochs, a probe at epochs 3 and 5 and slices at epoch 5."""
    history = [{"epoch": e, "train_loss": 0.7 - 0.05 * e, "val_loss": 0.72 - 0.05 * e, "lr": 1e-3,
                "grad_norm_mean": 0.3} for e in range(1, 6)]
    stored, cut = [], None
    if probes:
        for h, lam in ((history[2], 4.0), (history[4], 8.0 + number)):
            h.update(hessian_max_eig=lam, hessian_min_eig=-0.2 * lam, neg_curvature_share=0.01 * number)
            stored.append({"epoch": h["epoch"], "values": [-0.2 * lam, 0.0, 0.1, lam],
                           "weights": [0.01, 0.9, 0.08, 0.01]})
        alpha = [a / 7 for a in range(-7, 8)]
        cut = {"epoch": 5, "alpha": alpha, "v_min": [0.45 - 0.5 * a * a for a in alpha],
               "gradient": [0.45 - 0.3 * a for a in alpha], "lambda_min": -1.0}
    return TrialRecord(number=number, state="COMPLETE" if value is not None else "PRUNED", value=value,
                       params={"scheduler": scheduler}, config={}, history=history, diagnosis="healthy",
                       plateau=plateau, probes=stored, slices=cut)


def test_a_long_list_of_trials_without_a_probe_is_cut_short_in_the_title():
    records = [record(0, 0.3)] + [record(n, None, probes=False) for n in range(1, 46)]
    title = plots.plot_landscape(records).axes[0].get_title()
    assert "not shown, no curvature probe: #1, #2, #3, #4, #5, #6, #7, #8, #9, …, #45 (45 trials)" in title


def test_the_landscape_places_each_probed_trial_and_names_those_without_a_probe():
    records = [record(0, 0.3), record(1, 0.4, scheduler="cosine"), record(2, 0.5, probes=False),
               record(3, None, probes=False)]
    fig = plots.plot_landscape(records)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "sharpness: Hessian λ_max at the last probe"
    assert ax.get_ylabel().startswith("negative-curvature share")
    assert "not shown, no curvature probe: #2, #3" in ax.get_title()
    points = sorted(tuple(c.get_offsets()[0]) for c in ax.collections if len(c.get_offsets()))
    assert points == [(8.0, 0.0), (9.0, 0.01)]  # λ_max and share at each trial's last probe
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["constant", "cosine"]


def test_a_study_without_probes_gets_notes_for_the_landscape_figures():
    figures = report.curvature_figures([record(0, 0.3, probes=False)])
    assert set(figures) == set(report.CURVATURE_PLOTS)
    assert all(isinstance(why, str) for why in figures.values())
    assert "no trial has a curvature probe" in figures["landscape_spectrum"]


def test_the_density_shows_the_first_and_last_probe_of_each_top_trial():
    records = [record(n, 0.3 + 0.01 * n) for n in range(3)] + [record(3, 0.2, probes=False)]
    fig = plots.plot_spectral_density(records, top=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["#0  0.3  healthy", "#1  0.31  healthy"]  # #3 is best but has no probe
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Hessian eigenvalue" and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["epoch 3: share 0", "epoch 5: share 0"]


def test_the_slices_are_drawn_for_the_best_and_the_most_plateau_like_trial():
    records = [record(0, 0.3), record(1, 0.4, plateau=[2, 5]), record(2, 0.5, plateau=[3, 4])]
    fig = plots.plot_loss_slices(records)
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == ["best: #0  healthy",
                                                                 "most plateau-like: #1  healthy"]
    ax = fig.axes[1]
    assert ax.get_xlabel().startswith("step α") and ax.get_ylabel() == ""
    assert fig.axes[0].get_ylabel() == "training loss on the probe batch"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["along v_min (λ_min -1)", "downhill along the gradient", "second order along v_min"]
    # One trial both best and most plateau-like: one panel saying so.
    (only,) = plots.plot_loss_slices([record(0, 0.3, plateau=[2, 5])]).axes
    assert only.get_title().startswith("best and most plateau-like: #0")


def test_curves_shade_a_top_trials_plateau_and_mark_its_probes():
    records = [record(0, 0.3, plateau=[2, 5]), record(1, 0.4, plateau=[4, 4])]
    fig = report.plot_curves(records, top=2)
    loss = fig.axes[0]
    spans = list(loss.patches)
    assert len(spans) == 1  # #1's one-epoch flat stretch is not a plateau the diagnosis counts
    assert spans[0].get_x() == 1 and spans[0].get_width() == 4  # from epoch 1 (before 2) to 5
    probes = [line for line in loss.get_lines() if line.get_marker() == "D" and len(line.get_xdata())]
    assert sorted(list(line.get_xdata()) for line in probes) == [[3, 5], [3, 5]]
    assert "plateau (diagnosis)" in [t.get_text() for t in loss.get_legend().get_texts()]
    curvature = fig.axes[-1]
    negative = [line for line in curvature.get_lines() if line.get_marker() == "v"]
    assert all(max(line.get_ydata()) < 0 for line in negative) and len(negative) == 2
