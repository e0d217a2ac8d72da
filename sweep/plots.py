"""The figures of a study, written by ``sweep.report``: the report's curves, the study's plots and among
them the loss landscape from the curvature probes. The best trial is the first colour (red) and drawn
last; grey is every trial not in the legend; metric values are labelled with ``.6g``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sweep.messages import one_line

if TYPE_CHECKING:
    from sweep.report import TrialRecord

__all__ = ["CURVATURE_PLOTS", "DEFAULT_GROUP_BY", "DEFAULT_TOP", "IMPORTANCE_MIN_COMPLETE", "STUDY_PLOTS",
           "curvature_figures", "metric_name", "plot_curves", "plot_intermediate_values", "plot_landscape",
           "plot_loss_slices", "plot_spectral_density", "study_figures"]

DEFAULT_GROUP_BY = "scheduler"
DEFAULT_TOP = 5
# The loss landscape's figures (from the curvature probes' user attributes, see sweep.objective).
CURVATURE_PLOTS = ("landscape_spectrum", "spectral_density", "loss_slices")
STUDY_PLOTS = ("optimization_history", "intermediate_values", "parallel_coordinate", "param_importances",
               *CURVATURE_PLOTS)
# Fewer completed trials than this make parameter importances noise: the plot is replaced by a note.
IMPORTANCE_MIN_COMPLETE = 10
_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f")
_GREY = "#9a9a9a"


def metric_name(study) -> str:
    """The study's objective as named by ``study.set_metric_names``, else "value"."""
    return (study.metric_names or ["value"])[0]


def ranked(records: Sequence[TrialRecord], *, minimize: bool = True) -> list[TrialRecord]:
    """Completed trials by value (best first), then pruned by best validation loss, then the rest."""
    sign = 1.0 if minimize else -1.0

    def key(r: TrialRecord) -> tuple[int, float, int]:
        if r.state == "COMPLETE" and r.value is not None and math.isfinite(r.value):
            return 0, sign * r.value, r.number
        if r.state == "PRUNED":
            best = r.best_val_loss
            return 1, best if best is not None else math.inf, r.number
        return 2, math.inf, r.number

    return sorted(records, key=key)


# --- The report's figure of curves

def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers first, in order, then everything else by its text."""
    return (0, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, str(value))


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
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    from mixer.diagnosis import Thresholds

    order = ranked(records, minimize=minimize)
    best = [r for r in order if r.state == "COMPLETE" and r.value is not None][:top]
    colours = {r.number: _PALETTE[i % len(_PALETTE)] for i, r in enumerate(best)}
    best_number = best[0].number if best else None
    searched = any(group_by in r.params for r in records)
    plateaus = {r.number: r.plateau for r in best
                if r.plateau and r.plateau[1] - r.plateau[0] + 1 >= Thresholds().min_plateau_epochs}
    # Trials without curves (failed before an epoch) would only add empty panels.
    drawn = [r for r in records if r.history]
    groups = sorted({r.knob(group_by, searched=searched) for r in drawn}, key=_sort_key) or [None]
    has_curvature = any(r.curve("hessian_max_eig")[0] for r in records)
    heights = {"loss": 3.2, "lr": 1.4, "grad": 1.5, **({"curvature": 1.8} if has_curvature else {})}
    rows = list(heights)
    fig = Figure(figsize=(max(7.0, 5.0 * len(groups)), sum(heights.values()) + 1.4), layout="constrained")
    axes = fig.subplots(len(rows), len(groups), sharex=True, sharey="row", squeeze=False,
                        gridspec_kw={"height_ratios": list(heights.values())})
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
            point = {"marker": "o", "ms": 3} if len(r.history) == 1 else {"marker": None, "ms": None}
            ep, val = r.curve("val_loss")
            axes[0, col].plot(ep, val, "-", **style, **point)
            ep_t, tr = r.curve("train_loss")
            axes[0, col].plot(ep_t, tr, "--", **{**style, **point, "lw": style["lw"] * 0.8})
            if top_trial:
                # The diagnosis' plateau, shaded from the epoch before its first to its last.
                if r.number in plateaus:
                    first, last = plateaus[r.number]
                    axes[0, col].axvspan(first - 1, last, color=c, alpha=0.13, lw=0, zorder=0)
                probed = np.isin(ep_t, r.curve("hessian_max_eig")[0])
                axes[0, col].plot(np.array(ep_t)[probed], np.array(tr)[probed], "D", color=c, ms=4, mec="k",
                                  mew=0.5, zorder=style["zorder"] + 1)
            if r.state == "PRUNED" and ep:
                axes[0, col].plot(ep[-1], val[-1], "x", color=c, ms=6, mew=1.5, zorder=style["zorder"])
            for row_name, key in (("lr", "lr"), ("grad", "grad_norm_mean")):
                axes[rows.index(row_name), col].plot(*r.curve(key), "-", **style, **point)
            if has_curvature:
                ax = axes[rows.index("curvature"), col]
                ax.plot(*r.curve("hessian_max_eig"), "-o", ms=3, **style)
                ep_k, vals = r.curve("hessian_min_eig")
                ax.plot(ep_k, vals, ":", **style)
                # A negative λ_min is a descent direction of the curvature: drawn filled and larger.
                ax.plot([e for e, v in zip(ep_k, vals, strict=True) if v < 0], [v for v in vals if v < 0],
                        "v", ms=6 if top_trial else 4, mec="k", mew=0.4, **style)
        label = "(unset)" if group is None else group
        n_other = len(members) - n_done - n_pruned
        counts = f"{n_done} complete, {n_pruned} pruned" + (f", {n_other} running/failed" if n_other else "")
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
        if any(r.number in plateaus for r in coloured):
            handles.append(Patch(color="k", alpha=0.13, label="plateau (diagnosis)"))
        if has_curvature:
            handles.append(Line2D([], [], color="k", ls="", marker="D", ms=4, label="curvature probe"))
            axes[rows.index("curvature"), col].axhline(0.0, color="k", lw=0.6, zorder=0)
        axes[0, col].legend(handles=handles, fontsize=7.5, loc="upper right", framealpha=0.85)

    # Log y where the values span a decade or so (losses falling from 0.7 to 0.05, learning rates);
    # linear where they do not (a loss stuck between 0.47 and 0.55 is unreadable on a log axis).
    log_rows = {"lr": True,
                "loss": _spans_decades(r2 for r in drawn for k in ("train_loss", "val_loss")
                                       for r2 in r.curve(k)[1]),
                "grad": _spans_decades(v for r in drawn for v in r.curve("grad_norm_mean")[1])}
    lrs = [v for r in drawn for v in r.curve("lr")[1] if math.isfinite(v)]
    positive = [v for v in lrs if v > 0]
    lr_floor = 10 ** math.floor(math.log10(min(positive))) if positive and 0 in lrs else None
    ylabels = {"loss": "loss" + (" (log)" if log_rows["loss"] else ""), "lr": "learning rate",
               "grad": "grad norm\n(epoch mean)", "curvature": "Hessian λ_max (—o)\nλ_min (⋯, ▼ < 0)"}
    # Symmetric log: λ_max and λ_min differ by orders of magnitude and λ_min changes sign. The
    # linear band around 0 reaches the smallest probed |λ| (a power of 10, at least 1e-3 of
    # the largest), so every probe sits on the logarithmic part and the band stays narrow.
    sizes = [abs(v) for r in records for k in ("hessian_max_eig", "hessian_min_eig")
             for v in r.curve(k)[1] if math.isfinite(v) and v != 0]
    smallest = max(min(sizes, default=1.0), max(sizes, default=1.0) * 1e-3, 1e-12)
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
            elif row_name == "curvature":
                ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(smallest)))
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# --- The study's plots

def study_figures(study, *, top: int = DEFAULT_TOP) -> dict[str, Any]:
    """Each of ``STUDY_PLOTS`` by name: a matplotlib Figure, or a string saying why it is left out. Optuna
    draws the history, parallel coordinates and importances (relabelled with the metric's name); the
    per-epoch curves are drawn here, since Optuna's legend lists every trial."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the sweep runs on servers and in CI
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    from sweep.report import collect

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
                fig = "nothing to plot yet"
            figures[name] = fig
    try:  # in the report's own style, as curves.png
        figures.update(curvature_figures(collect(study), top=top,
                                         minimize=study.direction.name == "MINIMIZE"))
    except Exception as exc:  # noqa: BLE001 - as above: left out, saying why
        figures.update(dict.fromkeys(CURVATURE_PLOTS, one_line(exc)))
    return figures


def _best(study):
    try:
        return study.best_trial
    except ValueError:
        return None


def _relabel_history(ax, study):
    metric, best = metric_name(study), _best(study)
    ax.set(title=f"{metric} per completed trial", xlabel="trial")
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
    ax.set(xlabel=f"importance for {metric}", ylabel="parameter")
    ax.get_legend().remove()  # one objective: the legend would only repeat the metric's name
    return ax.figure


def plot_intermediate_values(study, *, top: int = DEFAULT_TOP):
    """Every trial's reported metric per epoch (a ``matplotlib.figure.Figure``), the ``top`` best completed
    trials in colour, a pruned one ending in an ×; the legend names the coloured trials, counts the rest."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from optuna.trial import TrialState

    metric = metric_name(study)
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                       and math.isfinite(t.value)), key=lambda t: t.value,
                      reverse=study.direction.name == "MAXIMIZE")[:top]
    ranks = {t.number: i for i, t in enumerate(complete)}
    others = [t for t in trials if t.number not in ranks]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for t in [*others, *reversed(complete)]:  # grey first, the best last: on top
        steps, values = zip(*sorted(t.intermediate_values.items()), strict=True)
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
        ax.legend(handles=handles, loc="upper right", fontsize=8, title=f"trial  {metric}", title_fontsize=8)
    ax.set(title=f"{metric} per epoch of {len(trials)} trials ({len(complete)} best in colour)",
           xlabel="epoch", ylabel=metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if _spans_decades(v for t in trials for v in t.intermediate_values.values()):
        ax.set_yscale("log", nonpositive="mask")
    return fig


# --- The loss landscape, from the curvature probes

def _last_probe(r: TrialRecord) -> dict[str, float] | None:
    return next((h for h in reversed(r.history)
                 if h.get("hessian_max_eig") is not None and h.get("neg_curvature_share") is not None), None)


def _trial_list(numbers: Sequence[int], *, most: int = 10) -> str:
    """``#2, #3, ...``; past ``most`` numbers, the first ones, the last and the count, so that a
    long study's title stays as wide as its figure."""
    if len(numbers) <= most:
        return ", ".join(f"#{n}" for n in numbers)
    return f"{', '.join(f'#{n}' for n in numbers[:most - 1])}, …, #{numbers[-1]} ({len(numbers)} trials)"


def curvature_figures(records: Sequence[TrialRecord], *, group_by: str = DEFAULT_GROUP_BY,
                      top: int = DEFAULT_TOP, minimize: bool = True) -> dict[str, Any]:
    """Each of ``CURVATURE_PLOTS`` by name: a Figure, or a string saying why it is not drawn."""
    return {"landscape_spectrum": plot_landscape(records, group_by=group_by, minimize=minimize),
            "spectral_density": plot_spectral_density(records, top=top, minimize=minimize),
            "loss_slices": plot_loss_slices(records, minimize=minimize)}


def plot_landscape(records: Sequence[TrialRecord], *, group_by: str = DEFAULT_GROUP_BY,
                   minimize: bool = True):
    """Every probed trial by sharpness λ_max (x) and negative-curvature share (y) at its last probe,
    coloured by value, marker by ``group_by`` (the notebook's axis, after Park & Kim 2022). Trials
    without a probe are named in the title; with none at all, a note is returned instead."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    order = ranked(records, minimize=minimize)
    placed = [(r, _last_probe(r)) for r in order if _last_probe(r) is not None]
    missing = [r.number for r in order if _last_probe(r) is None]
    if not placed:
        return f"no trial has a curvature probe ({len(records)} trials)"
    searched = any(group_by in r.params for r in records)
    groups = sorted({r.knob(group_by, searched=searched) for r, _ in placed}, key=_sort_key)
    markers = dict(zip(groups, "osD^vPX*<>" * 3, strict=False))
    values = [r.value for r, _ in placed if r.value is not None and math.isfinite(r.value)]
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    scatter = None
    for r, h in reversed(placed):  # the best drawn last, on top
        x, y = h["hessian_max_eig"], h["neg_curvature_share"]
        marker = markers[r.knob(group_by, searched=searched)]
        if r.value is not None and math.isfinite(r.value):
            scatter = ax.scatter([x], [y], c=[r.value], cmap="viridis_r" if minimize else "viridis",
                                 vmin=min(values), vmax=max(values), marker=marker, s=70,
                                 edgecolors=_PALETTE[0] if r is order[0] else "k",
                                 linewidths=2.0 if r is order[0] else 0.5, zorder=3)
        else:  # pruned or failed: no value to colour by
            ax.scatter([x], [y], marker=marker, s=70, facecolors="none", edgecolors=_GREY, zorder=2)
        ax.annotate(f"#{r.number}", (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7.5)
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="value" + (" (lower is better)" if minimize else ""))
    ax.legend(handles=[Line2D([], [], ls="", marker=markers[g], color="k", mfc="none", label=str(g))
                       for g in groups], title=group_by, fontsize=8, title_fontsize=8, loc="best")
    if _spans_decades(h["hessian_max_eig"] for _, h in placed):
        ax.set_xscale("log")
    ax.set_ylim(0.0, 1.2 * max([h["neg_curvature_share"] for _, h in placed] + [1e-3]))
    ax.set_xlabel("sharpness: Hessian λ_max at the last probe")
    ax.set_ylabel("negative-curvature share\n(spectral density below -ε)")
    ax.text(0.01, 0.99, "flat, many saddle points", transform=ax.transAxes, va="top", fontsize=8, color="0.4")
    ax.text(0.99, 0.01, "steep, few saddle points", transform=ax.transAxes, ha="right", fontsize=8,
            color="0.4")
    ax.grid(True, alpha=0.3)
    title = f"loss-landscape spectrum of {len(placed)} probed trials (best ringed red)"
    if missing:
        title += f"\nnot shown, no curvature probe: {_trial_list(sorted(missing))}"
    ax.set_title(title, fontsize=10)
    return fig


def plot_spectral_density(records: Sequence[TrialRecord], *, top: int = DEFAULT_TOP, minimize: bool = True):
    """The Hessian's eigenvalue density (SLQ, ``mixer.curvature.spectral_density``) at the first and last
    probe of the ``top`` best completed probed trials; a Ritz value is a Gaussian of 2 % of the radius."""
    from matplotlib.figure import Figure

    from mixer.curvature import Ritz, spectral_density

    best = [r for r in ranked(records, minimize=minimize) if r.state == "COMPLETE" and r.probes][:top]
    if not best:
        return "no completed trial has stored curvature probes (Ritz values)"
    ncols = min(len(best), 4)
    nrows = -(-len(best) // ncols)
    fig = Figure(figsize=(3.6 * ncols + 0.6, 3.3 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(best):]:
        ax.set_visible(False)
    for ax, r in zip(axes, best, strict=False):
        shown = [r.probes[0], r.probes[-1]] if len(r.probes) > 1 else r.probes
        values = [v for p in shown for v in p["values"]]
        sigma = 0.02 * (max(abs(v) for v in values) or 1.0)
        grid = np.linspace(min(values) - 4 * sigma, max(values) + 4 * sigma, 400)
        shares = {int(h["epoch"]): h.get("neg_curvature_share") for h in r.history}
        empty = np.zeros(0)  # a probe stores only the nodes and weights, all the density reads
        ritz = [Ritz(np.asarray(p["values"]), np.asarray(p["weights"]), empty, empty, empty) for p in shown]
        densities = [spectral_density(q, grid, sigma=sigma) for q in ritz]
        # The extreme Ritz values carry tiny quadrature weights (the start vector barely meets their
        # eigenvectors): a floor far below the peak shows them, and a tick under each marks it.
        floor = 1e-9 * max(float(d.max()) for d in densities)
        for p, d, style, colour in zip(shown, densities, ("--", "-")[2 - len(shown):],
                                       (_PALETTE[1], _PALETTE[0])[2 - len(shown):], strict=True):
            share = shares.get(int(p["epoch"]))
            label = f"epoch {p['epoch']}" + (f": share {share:.3g}" if share is not None else "")
            ax.plot(grid, np.maximum(d, floor), style, color=colour, label=label)
            ax.plot(p["values"], [floor * 3] * len(p["values"]), "|", color=colour, ms=9)
        ax.axvline(0.0, color="k", lw=0.6)
        ax.set_yscale("log")
        ax.set_title(f"#{r.number}  {r.value:.6g}  {r.diagnosis}".rstrip(), fontsize=9)
        ax.set_xlabel("Hessian eigenvalue", fontsize=9)
        ax.legend(fontsize=7.5, title="first / last probe" if len(shown) > 1 else "only probe",
                  title_fontsize=7.5)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[::ncols]:
        ax.set_ylabel("spectral density (log)\n| Ritz values", fontsize=9)
    fig.suptitle(f"Hessian spectrum of the {len(best)} best probed trials", fontsize=10)
    return fig


def plot_loss_slices(records: Sequence[TrialRecord], *, minimize: bool = True):
    """The training loss on the probe batch along v_min (the most negative curvature) and downhill along the
    gradient at the last probe of the best and the most plateau-like trial with slices; dotted: the second
    order model along v_min (slope from the two innermost points, curvature λ_min), bent down at a saddle."""
    from matplotlib.figure import Figure

    order = [r for r in ranked(records, minimize=minimize) if r.slices]
    if not order:
        return "no trial has loss slices (they are taken at a probe at the last epoch of a completed trial)"
    chosen = {order[0].number: (order[0], "best")}
    flat = [r for r in order if r.plateau]
    if flat:
        r = max(flat, key=lambda r: r.plateau[1] - r.plateau[0])
        chosen[r.number] = (r, "best and most plateau-like" if r.number in chosen else "most plateau-like")
    fig = Figure(figsize=(4.6 * len(chosen) + 0.4, 3.9), layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, (r, why) in zip(axes, chosen.values(), strict=True):
        s = r.slices
        alpha, along = np.asarray(s["alpha"]), np.asarray(s["v_min"])
        ax.plot(alpha, along, "-o", ms=3, color=_PALETTE[0],
                label=f"along v_min (λ_min {s['lambda_min']:.3g})")
        ax.plot(alpha, s["gradient"], "-s", ms=3, color=_PALETTE[1], label="downhill along the gradient")
        mid = len(alpha) // 2
        slope = (along[mid + 1] - along[mid - 1]) / (alpha[mid + 1] - alpha[mid - 1])
        ax.plot(alpha, along[mid] + slope * alpha + 0.5 * s["lambda_min"] * alpha ** 2, ":",
                color=_PALETTE[0], label="second order along v_min")
        plateau = f", plateau epochs {r.plateau[0]}-{r.plateau[1]}" if r.plateau else ""
        ax.set_title(f"{why}: #{r.number}  {r.diagnosis}\nprobe at epoch {s['epoch']}{plateau}", fontsize=9)
        ax.set_xlabel("step α (parameter space, unit direction)", fontsize=9)
        ax.legend(fontsize=7.5)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("training loss on the probe batch", fontsize=9)
    return fig
