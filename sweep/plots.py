"""The figures of a study: the report's curves (``plot_curves``) and the study's plots
(``study_figures``), drawn here and written by ``sweep.report`` (the one writer of a study's files).

The best trial is the first colour (red) and drawn last in every figure; grey is every trial not
in the legend; metric values are labelled with ``.6g``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sweep.messages import one_line

if TYPE_CHECKING:
    from sweep.report import TrialRecord

__all__ = ["DEFAULT_GROUP_BY", "DEFAULT_TOP", "IMPORTANCE_MIN_COMPLETE", "STUDY_PLOTS", "metric_name",
           "plot_curves", "plot_intermediate_values", "study_figures"]

DEFAULT_GROUP_BY = "scheduler"
DEFAULT_TOP = 5
STUDY_PLOTS = ("optimization_history", "intermediate_values", "parallel_coordinate", "param_importances")
# Fewer completed trials than this make parameter importances noise: the plot is replaced by a note.
IMPORTANCE_MIN_COMPLETE = 10
_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f")
_GREY = "#9a9a9a"


def metric_name(study) -> str:
    """The study's objective as named by ``study.set_metric_names``, else "value"."""
    return (study.metric_names or ["value"])[0]


# ---------------------------------------------------------------------------------------------
# The report's figure of curves


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0, value
    return 1, str(value)


def _minor_log_label(value: float, _pos: int) -> str:
    """Label the 2, 3 and 5 of each decade: enough to read a level without crowding the axis."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 3, 5)) else ""


def _spans_decades(values, *, ratio: float = 8.0) -> bool:
    """True if the positive finite values span at least ``ratio`` (max / min)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return bool(finite) and max(finite) / min(finite) >= ratio


def plot_curves(records: Sequence[TrialRecord], *, group_by: str = DEFAULT_GROUP_BY, top: int = DEFAULT_TOP,
                minimize: bool = True, title: str = ""):
    """The side-by-side figure (a ``matplotlib.figure.Figure``; no pyplot state is touched)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    from sweep.report import ranked  # sweep.report imports this module

    order = ranked(records, minimize=minimize)
    best = [r for r in order if r.state == "COMPLETE" and r.value is not None][:top]
    colours = {r.number: _PALETTE[i % len(_PALETTE)] for i, r in enumerate(best)}
    best_number = best[0].number if best else None
    searched = any(group_by in r.params for r in records)

    # Trials without curves (failed before an epoch) would only add empty panels.
    drawn = [r for r in records if r.history]
    groups = sorted({r.knob(group_by, searched=searched) for r in drawn}, key=_sort_key) or [None]
    has_curvature = any(r.curve("hessian_max_eig")[0] for r in records)
    rows = ["loss", "lr", "grad", *(["curvature"] if has_curvature else [])]
    ncols = len(groups)
    heights = {"loss": 3.2, "lr": 1.4, "grad": 1.5, "curvature": 1.8}
    fig = Figure(figsize=(max(7.0, 5.0 * ncols), sum(heights[r] for r in rows) + 1.4),
                 layout="constrained")
    axes = fig.subplots(len(rows), ncols, sharex=True, sharey="row", squeeze=False,
                        gridspec_kw={"height_ratios": [heights[r] for r in rows]})
    for col, group in enumerate(groups):
        members = [r for r in order if r.history and r.knob(group_by, searched=searched) == group]
        coloured = [r for r in members if r.number in colours]
        others = [r for r in members if r.number not in colours]
        n_pruned = sum(r.state == "PRUNED" for r in members)
        n_done = sum(r.state == "COMPLETE" for r in members)
        for r in [*others, *reversed(coloured)]:  # grey first, the best last: on top
            c = colours.get(r.number, _GREY)
            top_trial, is_best = r.number in colours, r.number == best_number
            style = {"color": c, "lw": 2.6 if is_best else 1.8 if top_trial else 0.9,
                     "alpha": 1.0 if top_trial else 0.55, "zorder": 4 if is_best else 3 if top_trial else 1}
            # A one-epoch curve (a trial just started) would be an invisible line: mark its point.
            style["marker"], style["ms"] = ("o", 3) if len(r.history) == 1 else (None, None)
            ep, val = r.curve("val_loss")
            axes[0, col].plot(ep, val, "-", **style)
            ep_t, tr = r.curve("train_loss")
            axes[0, col].plot(ep_t, tr, "--", **{**style, "lw": style["lw"] * 0.8})
            if r.state == "PRUNED" and ep:
                axes[0, col].plot(ep[-1], val[-1], "x", color=c, ms=6, mew=1.5, zorder=style["zorder"])
            for row_name, key in (("lr", "lr"), ("grad", "grad_norm_mean")):
                ep_k, vals = r.curve(key)
                axes[rows.index(row_name), col].plot(ep_k, vals, "-", **style)
            if has_curvature:
                ax = axes[rows.index("curvature"), col]
                probe_style = {k: v for k, v in style.items() if k not in ("marker", "ms")}
                ep_k, vals = r.curve("hessian_max_eig")
                ax.plot(ep_k, vals, "-o", ms=3, **probe_style)
                ep_k, vals = r.curve("hessian_min_eig")
                ax.plot(ep_k, vals, ":v", ms=3, **probe_style)
        label = "(unset)" if group is None else group
        counts = f"{n_done} complete, {n_pruned} pruned"
        n_other = len(members) - n_done - n_pruned
        if n_other:
            counts += f", {n_other} running/failed"
        axes[0, col].set_title(f"{group_by} = {label}\n{len(members)} trial{'s' * (len(members) != 1)}: "
                               f"{counts}", fontsize=10)
        handles = [Line2D([], [], color=colours[r.number], lw=2.6 if r.number == best_number else 1.8,
                          label=f"#{r.number}  {r.value:.6g}  {r.diagnosis}".rstrip())
                   for r in coloured]
        if others:
            handles.append(Line2D([], [], color=_GREY, lw=0.9,
                                  label=f"other trials ({len(others)})" + (", × pruned" if n_pruned else "")))
        handles += [Line2D([], [], color="k", ls="-", lw=1.2, label="validation"),
                    Line2D([], [], color="k", ls="--", lw=1.0, label="train")]
        axes[0, col].legend(handles=handles, fontsize=7.5, loc="upper right", framealpha=0.85)
        if has_curvature:
            axes[rows.index("curvature"), col].axhline(0.0, color="k", lw=0.6, zorder=0)

    # Log y where the values span a decade or so (losses falling from 0.7 to 0.05, learning rates);
    # linear where they do not (a loss stuck between 0.47 and 0.55 is unreadable on a log axis).
    log_rows = {"lr": True,
                "loss": _spans_decades(r2 for r in drawn for k in ("train_loss", "val_loss")
                                       for r2 in r.curve(k)[1]),
                "grad": _spans_decades(v for r in drawn for v in r.curve("grad_norm_mean")[1])}
    lrs = [v for r in drawn for v in r.curve("lr")[1] if math.isfinite(v)]
    positive = [v for v in lrs if v > 0]
    lr_floor = (10 ** math.floor(math.log10(min(positive)))
                if positive and any(v == 0 for v in lrs) else None)
    ylabels = {"loss": "loss" + (" (log)" if log_rows["loss"] else ""), "lr": "learning rate",
               "grad": "grad norm\n(epoch mean)", "curvature": "Hessian λ_max (—o)\nλ_min (⋯v)"}
    for i, row_name in enumerate(rows):
        axes[i, 0].set_ylabel(ylabels[row_name], fontsize=9)
        for ax in axes[i]:
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(labelsize=8)
            if row_name == "lr" and lr_floor is not None:
                # A schedule that reaches lr = 0 (eta_min 0) must show it, not drop the points as a
                # log axis would: symmetric log, linear below the smallest non-zero rate.
                ax.set_yscale("symlog", linthresh=lr_floor, linscale=0.4)
                ax.set_ylim(bottom=0.0)
            elif log_rows.get(row_name):
                ax.set_yscale("log", nonpositive="mask")
                if row_name != "lr":
                    # 0.2, 0.3 reads better than 2×10⁻¹ for values within a decade or two.
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    if has_curvature:
        # Symmetric log: λ_max and λ_min differ by orders of magnitude and λ_min changes sign. The
        # linear band around 0 reaches the smallest probed |λ| (a power of 10, at least 1e-3 of
        # the largest), so every probe sits on the logarithmic part and the band stays narrow.
        sizes = [abs(v) for r in records for k in ("hessian_max_eig", "hessian_min_eig")
                 for v in r.curve(k)[1] if math.isfinite(v) and v != 0]
        largest = max(sizes, default=1.0)
        smallest = max(min(sizes, default=1.0), largest * 1e-3, 1e-12)
        for ax in axes[rows.index("curvature")]:
            ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(smallest)))
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------
# The study's plots


def study_figures(study, *, top: int = DEFAULT_TOP) -> dict[str, Any]:
    """Each of ``STUDY_PLOTS`` by name: a matplotlib Figure, or a string saying why it is left out.

    Optuna draws the history, the parallel coordinates and the importances, relabelled here with
    the metric's name; the per-epoch curves are drawn here (Optuna's legend lists every trial).
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # headless: the sweep runs on servers and in CI
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    metric = metric_name(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    draw = {
        "optimization_history": lambda: _relabel_history(
            ovm.plot_optimization_history(study, target_name=metric), study),
        "intermediate_values": lambda: plot_intermediate_values(study, top=top),
        "parallel_coordinate": lambda: _parallel_coordinate(study, ovm, complete),
        "param_importances": lambda: _relabel_importances(
            ovm.plot_param_importances(study, target_name=metric), metric, len(complete)),
    }
    figures: dict[str, Any] = {}
    # Optuna switches pyplot to its ggplot style for good; the context keeps that to these plots.
    with plt.style.context("ggplot"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning, empty-plot warnings
        for name, make in draw.items():
            if name == "param_importances" and len(complete) < IMPORTANCE_MIN_COMPLETE:
                figures[name] = (f"importances need >= {IMPORTANCE_MIN_COMPLETE} completed trials, "
                                 f"the study has {len(complete)}")
                continue
            opened = set(plt.get_fignums())
            try:
                fig = make()
            except Exception as exc:  # noqa: BLE001 - a plot the study cannot support is left out
                for number in set(plt.get_fignums()) - opened:  # its half-drawn figure, not the others
                    plt.close(number)
                figures[name] = one_line(exc)
                continue
            if not any(ax.has_data() for ax in fig.axes):
                plt.close(fig)
                figures[name] = "nothing to plot yet"
            else:
                figures[name] = fig
    return figures


def _best(study):
    """The best completed trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _relabel_history(ax, study):
    metric, best = metric_name(study), _best(study)
    ax.set_title(f"{metric} per completed trial")
    ax.set_xlabel("trial")
    handles, _ = ax.get_legend_handles_labels()
    labels = [f"{metric} of a completed trial", f"best {metric} so far"][: len(handles)]
    if best is not None:
        handles.append(ax.scatter([best.number], [best.value], marker="*", s=260, color=_PALETTE[0],
                                  zorder=5, edgecolors="k", linewidths=0.6))
        labels.append(f"best: #{best.number}  {best.value:.6g}")
    ax.legend(handles, labels, loc="best", fontsize=8)
    return ax.figure


def _parallel_coordinate(study, ovm, complete):
    """Optuna's parallel coordinates over the parameters every completed trial has: a conditional
    parameter would send the trials without it to a "None" tick. The best trial is drawn in red."""
    from matplotlib.ticker import MaxNLocator
    from optuna.distributions import IntDistribution

    common = sorted(set.intersection(*(set(t.params) for t in complete))) if complete else []
    left_out = sorted({n for t in complete for n in t.params} - set(common))
    metric, best = metric_name(study), _best(study)
    ax = ovm.plot_parallel_coordinate(study, params=common, target_name=metric)
    fig = ax.figure
    fig.set_size_inches(max(6.4, 1.6 * (len(common) + 1) + 1.5), 4.8)
    title = f"{metric} and parameters of the {len(complete)} completed trials"
    if left_out:
        title += f"\n(conditional parameters not shown: {', '.join(left_out)})"
    ax.set_title(title, fontsize=10, y=1.04)
    for other in fig.axes:
        other.tick_params(which="both", labelsize=8)
    # Optuna adds one twin axis per parameter, last; none when it had nothing to draw.
    for name, twin in zip(common, fig.axes[2:], strict=False):
        if isinstance(complete[0].distributions[name], IntDistribution):
            twin.yaxis.set_major_locator(MaxNLocator(integer=True))  # depth 1, 2, 3, not 1.0, 1.5, ...
    lines = ax.collections[0] if ax.collections else None
    if best is not None and lines is not None:
        # Optuna colours each line by its trial's objective value: find the best one's line.
        index = min(range(len(lines.get_array())), key=lambda i: abs(lines.get_array()[i] - best.value))
        x, y = lines.get_segments()[index].T
        ax.plot(x, y, color=_PALETTE[0], lw=2.6, zorder=5, label=f"best: #{best.number}  {best.value:.6g}")
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return fig


def _relabel_importances(ax, metric: str, n_complete: int):
    ax.set_title("", loc="left")  # Optuna's title, replaced by the centred one
    ax.set_title(f"parameter importances for {metric} ({n_complete} completed trials)", fontsize=11)
    ax.set_xlabel(f"importance for {metric}")
    ax.set_ylabel("parameter")
    ax.get_legend().remove()  # one objective: the legend would only repeat the metric's name
    return ax.figure


def plot_intermediate_values(study, *, top: int = DEFAULT_TOP):
    """Every trial's reported metric per epoch (a ``matplotlib.figure.Figure``): the ``top`` best
    completed trials in colour, the best one thickest and drawn last; every other trial thin and
    grey, a pruned one ending in an ×. The legend names the coloured trials and counts the rest."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    metric = metric_name(study)
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                       and math.isfinite(t.value)), key=lambda t: t.value,
                      reverse=study.direction == StudyDirection.MAXIMIZE)[:top]
    ranks = {t.number: i for i, t in enumerate(complete)}
    others = [t for t in trials if t.number not in ranks]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for t in [*others, *reversed(complete)]:  # grey first, the best last: on top
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        rank = ranks.get(t.number)
        style = ({"color": _GREY, "lw": 0.9, "alpha": 0.6, "zorder": 1} if rank is None else
                 {"color": _PALETTE[rank % len(_PALETTE)], "lw": 3.0 if rank == 0 else 1.6, "alpha": 1.0,
                  "zorder": 4 if rank == 0 else 3})
        ax.plot(steps, values, "-", marker="o" if len(steps) == 1 else None, ms=3, **style)
        if t.state == TrialState.PRUNED:
            ax.plot(steps[-1], values[-1], "x", ms=6, mew=1.5, color=style["color"], zorder=style["zorder"])
    handles = [Line2D([], [], color=_PALETTE[i % len(_PALETTE)], lw=3.0 if i == 0 else 1.6,
                      label=f"#{t.number}  {t.value:.6g}" + ("  (best)" if i == 0 else ""))
               for i, t in enumerate(complete)]
    n_pruned = sum(t.state == TrialState.PRUNED for t in others)
    if others:
        handles.append(Line2D([], [], color=_GREY, lw=0.9, label=f"other trials ({len(others)})"
                              + (f", × pruned ({n_pruned})" if n_pruned else "")))
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8, title=f"trial  {metric}",
                  title_fontsize=8)
    ax.set_title(f"{metric} per epoch of {len(trials)} trials ({len(complete)} best in colour)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if _spans_decades(v for t in trials for v in t.intermediate_values.values()):
        ax.set_yscale("log", nonpositive="mask")
    return fig
