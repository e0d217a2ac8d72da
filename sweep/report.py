"""A study's trials side by side: one figure of curves and one ranked table, logged to the parent run.

    python -m sweep.report STUDY [--storage URL] [--tracking-uri URI] [--group-by PARAM] [--top K]
                                 [--out DIR]

Reads every trial of the Optuna study ``STUDY`` (default storage: the sweep's journal file
``runs/<STUDY>/optuna.journal``) and writes to ``--out`` (default ``runs/<STUDY>/report/``):

* ``curves.png`` — one column per value of ``--group-by`` (default ``scheduler``); top row: train
  (dashed) and validation (solid) loss per epoch on one shared log axis; below: learning rate,
  mean gradient norm and, where a curvature probe ran, λ_max (solid) and λ_min (dotted). The
  ``--top`` best completed trials are in colour (the legend names trial, value and diagnosis);
  every other trial is grey, a pruned one ends in an ×.
* ``trials.md`` and ``trials.csv`` — the trials ranked (completed by objective value, then pruned
  by their best reported value, then the rest) with state, value, best validation loss, epochs
  run, pruned epoch, diagnosis and parameters.

Per-epoch curves come from each trial's ``history`` user attribute; a trial without one is read
from its MLflow run (``mlflow_run_id``) when MLflow is reachable. When the study has a parent
MLflow run (user attribute ``mlflow_parent_run_id``) and the tracking store is reachable
(``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the local store ``sweep.run`` uses), the
three files are logged to it under ``report/``; otherwise the report says why and still succeeds.

Exit status: 0 written, 2 bad usage (unknown study, missing storage, bad option).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sweep.messages import UsageError, one_line, redact
from sweep.study import open_storage

__all__ = ["TrialRecord", "collect", "find_study", "main", "plot_curves", "ranked", "trials_table",
           "write_study_files"]

CURVE_KEYS = ("train_loss", "val_loss", "lr", "grad_norm_mean", "hessian_max_eig", "hessian_min_eig")
DEFAULT_GROUP_BY = "scheduler"
DEFAULT_TOP = 5

log = logging.getLogger("sweep")


@dataclass
class TrialRecord:
    """What the report needs from one trial."""

    number: int
    state: str                      # Optuna state name: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None
    params: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    diagnosis: str = ""
    pruned_epoch: int | None = None
    mlflow_run_id: str | None = None
    history_source: str = "none"    # "optuna", "mlflow" or "none"

    def knob(self, name: str) -> Any:
        """A parameter's value: sampled (``params``) or fixed by the space (``config``)."""
        if name in self.params:
            return self.params[name]
        return self.config.get(name)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(int(h["epoch"]), float(h[key])) for h in self.history
                  if h.get(key) is not None and "epoch" in h]
        return [p[0] for p in points], [p[1] for p in points]

    @property
    def best_val_loss(self) -> float | None:
        values = [v for v in self.curve("val_loss")[1] if math.isfinite(v)]
        return min(values) if values else None


# ---------------------------------------------------------------------------------------------
# Reading the study


def _studies_under(root: Path) -> list[str]:
    import optuna

    names: list[str] = []
    for journal in sorted(root.glob("*/optuna.journal")):
        try:
            names.extend(optuna.get_all_study_names(open_storage(str(journal), rdb=False)))
        except Exception:  # noqa: BLE001 - an unreadable journal just is not listed
            continue
    return names


def find_study(storage: str | None, study_name: str):
    """The Optuna storage holding ``study_name``.

    ``storage`` is a database URL (``postgresql://…``, ``sqlite:///…``), a journal file path
    (optionally ``journal:`` or ``file:`` prefixed) or None for ``runs/<study>/optuna.journal``.

    Raises:
        UsageError: the storage does not open or the journal file does not exist, or the study is
            not in the storage (the message lists the studies that are).
    """
    import optuna

    if storage is None:
        storage = str(Path("runs") / study_name / "optuna.journal")
        if not Path(storage).is_file():
            listing = ", ".join(_studies_under(Path("runs"))) or "none"
            raise UsageError(f"no study {study_name!r}: {storage} does not exist "
                             f"(studies under runs/: {listing}); pass --storage for another storage")
    elif "://" not in storage or storage.startswith(("file:", "journal:")):
        for prefix in ("journal://", "file://", "journal:", "file:"):
            storage = storage.removeprefix(prefix) if storage.startswith(prefix) else storage
        if not Path(storage).is_file():
            raise UsageError(f"journal file {storage} does not exist")
    opened = open_storage(storage, rdb="://" in storage)
    names = optuna.get_all_study_names(opened)
    if study_name not in names:
        listing = ", ".join(sorted(names)) if names else "none"
        raise UsageError(f"no study {study_name!r} in {redact(storage)} (studies there: {listing})")
    return opened


def _history_from_mlflow(client, run_id: str) -> list[dict[str, float]]:
    by_epoch: dict[int, dict[str, float]] = {}
    for key in CURVE_KEYS:
        for m in client.get_metric_history(run_id, key):
            by_epoch.setdefault(int(m.step), {"epoch": int(m.step)})[key] = float(m.value)
    return [by_epoch[e] for e in sorted(by_epoch)]


def collect(study, *, mlflow_client=None) -> list[TrialRecord]:
    """One record per trial; histories missing from Optuna are read from MLflow if a client is given."""
    from mixer.diagnosis import diagnose

    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        history = [dict(h) for h in attrs.get("history") or []]
        source = "optuna" if history else "none"
        run_id = attrs.get("mlflow_run_id")
        if not history and run_id and mlflow_client is not None:
            try:
                history = _history_from_mlflow(mlflow_client, run_id)
                source = "mlflow" if history else "none"
            except Exception:  # noqa: BLE001 - a missing run leaves the trial without curves
                history = []
        diagnosis = attrs.get("diagnosis") or ""
        if not diagnosis and history:
            diagnosis = diagnose(history, diverged=attrs.get("status") == "diverged").label
        pruned = attrs.get("pruned_epoch")
        records.append(TrialRecord(
            number=t.number, state=t.state.name, value=t.value, params=dict(t.params),
            config=dict(attrs.get("config") or {}), history=history, diagnosis=diagnosis,
            pruned_epoch=int(pruned) if pruned is not None else None, mlflow_run_id=run_id,
            history_source=source,
        ))
    return records


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


# ---------------------------------------------------------------------------------------------
# The table


def trials_table(records: Sequence[TrialRecord], *, group_by: str = DEFAULT_GROUP_BY,
                 minimize: bool = True) -> pd.DataFrame:
    """The ranked trials: rank, trial, state, value, best_val_loss, epochs, pruned_epoch, diagnosis,
    then the group-by knob and every sampled parameter."""
    order = ranked(records, minimize=minimize)
    param_names = sorted({name for r in order for name in r.params})
    if group_by not in param_names:
        param_names = [group_by, *param_names]
    rows = []
    for rank, r in enumerate(order, start=1):
        row: dict[str, Any] = {
            "rank": rank, "trial": r.number, "state": r.state.lower(),
            "value": r.value, "best_val_loss": r.best_val_loss,
            "epochs": len(r.history), "pruned_epoch": r.pruned_epoch, "diagnosis": r.diagnosis,
        }
        for name in param_names:
            row[name] = r.knob(name)
        rows.append(row)
    columns = ["rank", "trial", "state", "value", "best_val_loss", "epochs", "pruned_epoch",
               "diagnosis", *param_names]
    table = pd.DataFrame(rows, columns=columns)
    table["pruned_epoch"] = table["pruned_epoch"].astype("Int64")
    return table


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(table[c]) else "---"
                          for c in table.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |"
            for row in table.astype(object).itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


# ---------------------------------------------------------------------------------------------
# The figure


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

    order = ranked(records, minimize=minimize)
    best = [r for r in order if r.state == "COMPLETE" and r.value is not None][:top]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    colours = {r.number: palette[i % len(palette)] for i, r in enumerate(best)}

    # Trials without curves (failed before an epoch) would only add empty panels.
    drawn = [r for r in records if r.history]
    groups = sorted({r.knob(group_by) for r in drawn}, key=_sort_key) or [None]
    has_curvature = any(r.curve("hessian_max_eig")[0] for r in records)
    rows = ["loss", "lr", "grad", *(["curvature"] if has_curvature else [])]
    ncols = len(groups)
    heights = {"loss": 3.2, "lr": 1.4, "grad": 1.5, "curvature": 1.8}
    fig = Figure(figsize=(max(7.0, 5.0 * ncols), sum(heights[r] for r in rows) + 1.4),
                 layout="constrained")
    axes = fig.subplots(len(rows), ncols, sharex=True, sharey="row", squeeze=False,
                        gridspec_kw={"height_ratios": [heights[r] for r in rows]})
    grey = "#9a9a9a"

    for col, group in enumerate(groups):
        members = [r for r in order if r.history and r.knob(group_by) == group]
        coloured = [r for r in members if r.number in colours]
        others = [r for r in members if r.number not in colours]
        n_pruned = sum(r.state == "PRUNED" for r in members)
        n_done = sum(r.state == "COMPLETE" for r in members)
        for r in [*others, *coloured]:  # grey first so the top trials draw on top
            c = colours.get(r.number, grey)
            top_trial = r.number in colours
            style = {"color": c, "lw": 1.8 if top_trial else 0.9, "alpha": 1.0 if top_trial else 0.55,
                     "zorder": 3 if top_trial else 1}
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
        handles = [Line2D([], [], color=colours[r.number], lw=1.8,
                          label=f"#{r.number}  {r.value:.4g}  {r.diagnosis}".rstrip())
                   for r in coloured]
        if others:
            handles.append(Line2D([], [], color=grey, lw=0.9,
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
# The study's own files: the full table and Optuna's plots

_OPTUNA_PLOTS = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate")


def write_study_files(study, out_dir: str | Path) -> list[tuple[Path, str | None]]:
    """Write ``trials.csv`` and Optuna's plots (``plots/<name>.png``) of ``study`` into ``out_dir``.

    ``trials.csv`` is ``study.trials_dataframe()`` without the per-epoch history and the full
    config (too wide for a table; they stay in the storage). A plot the study cannot support yet
    (importances need two completed trials whose parameters differ) is left out, and why is logged.

    Returns:
        Each file written with the artifact folder it belongs in: None for ``trials.csv``,
        ``"plots"`` for the PNGs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "trials.csv"
    frame = study.trials_dataframe()
    frame = frame.drop(columns=[c for c in ("user_attrs_history", "user_attrs_config") if c in frame])
    frame.to_csv(table, index=False)
    files: list[tuple[Path, str | None]] = [(table, None)]
    for name, why in _study_plots(study, out / "plots"):
        if isinstance(why, Path):
            files.append((why, "plots"))
        else:
            log.info("study plot %s skipped: %s", name, why)
    return files


def _study_plots(study, folder: Path) -> list[tuple[str, Path | str]]:
    """Each Optuna plot: (name, the PNG written) or (name, why it was skipped)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # headless: the sweep runs on servers and in CI
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    done: list[tuple[str, Path | str]] = []
    for name in _OPTUNA_PLOTS:
        if name == "param_importances" and (why := _importances_unsupported(study)):
            done.append((name, why))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, empty-plot warnings
                axes = getattr(ovm, f"plot_{name}")(study)
            fig = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            if not any(ax.has_data() for ax in fig.axes):
                done.append((name, "nothing to plot yet"))
                continue
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            done.append((name, path))
        except Exception as exc:  # noqa: BLE001 - a plot the study cannot support is left out
            done.append((name, one_line(exc)))
        finally:
            plt.close("all")
    return done


def _importances_unsupported(study) -> str | None:
    """Why parameter importances mean nothing yet (Optuna would draw equal bars), or None."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return f"needs >= 2 completed trials, the study has {len(complete)}"
    names = {name for t in complete for name in t.params}
    if not any(len({repr(t.params.get(name)) for t in complete}) > 1 for name in names):
        return "no parameter varies across the completed trials"
    return None


# ---------------------------------------------------------------------------------------------
# MLflow


def _no_local_store(uri: str) -> str | None:
    """Why the local store ``uri`` names does not exist, or None: the report reads a store, never
    creates one (opening a missing one would)."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        return None if path.is_file() else f"no MLflow database at {path}"
    if uri.startswith("file:") or "://" not in uri:
        path = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
        return None if path.is_dir() else f"no MLflow store at {path}"
    return None


def _mlflow_client(uri: str):
    """An MlflowClient for ``uri`` and None, or None and why not."""
    try:
        from mlflow import MlflowClient

        from sweep.tracking import TrackingUnavailable, check_reachable
    except ImportError:
        return None, "mlflow is not installed"
    why = _no_local_store(uri)
    if why is None:
        try:
            check_reachable(uri, timeout=5.0)
        except TrackingUnavailable as exc:
            why = str(exc)
    return (None, why) if why else (MlflowClient(tracking_uri=uri), None)


def log_report(client, parent_run_id: str, paths: Sequence[Path]) -> None:
    """Attach the report files to the study's parent run under ``report/``."""
    client.get_run(parent_run_id)  # raises if the run is not in this store
    for path in paths:
        client.log_artifact(parent_run_id, str(path), artifact_path="report")


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweep.report", description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="the study name")
    p.add_argument("--storage", help="Optuna storage: database URL or journal file "
                                     "(default runs/<STUDY>/optuna.journal)")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else sweep.run's local store)")
    p.add_argument("--group-by", default=DEFAULT_GROUP_BY,
                   help=f"the parameter whose values get one panel each (default {DEFAULT_GROUP_BY})")
    p.add_argument("--top", type=int, default=DEFAULT_TOP,
                   help=f"best completed trials drawn in colour (default {DEFAULT_TOP})")
    p.add_argument("--out", help="output folder (default runs/<STUDY>/report)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        return _report(args)
    except UsageError as exc:
        print(f"sweep.report: error: {exc}", file=sys.stderr)
        return 2


def _report(args: argparse.Namespace) -> int:
    import optuna

    from sweep.tracking import resolve_uri

    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got --top={args.top}")
    study = optuna.load_study(study_name=args.study, storage=find_study(args.storage, args.study))
    if len(study.directions) != 1:
        raise UsageError(f"study {args.study!r} has {len(study.directions)} objectives; "
                         "the report ranks single-objective studies only")
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    tracking_uri = resolve_uri(args.tracking_uri)
    client, why_not = _mlflow_client(tracking_uri)
    records = collect(study, mlflow_client=client)
    if not records:
        raise UsageError(f"study {args.study!r} has no trials")
    known = {name for r in records for name in (*r.params, *r.config)}
    if args.group_by not in known:
        raise UsageError(f"--group-by {args.group_by!r} is not a parameter of this study "
                         f"(known: {', '.join(sorted(known)) or 'none'})")

    out = Path(args.out) if args.out else Path("runs") / args.study / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = trials_table(records, group_by=args.group_by, minimize=minimize)
    csv_path, md_path, png_path = out / "trials.csv", out / "trials.md", out / "curves.png"
    table.to_csv(csv_path, index=False)
    md_path.write_text(f"# Study {args.study}\n\n" + to_markdown(table))
    n = len(records)
    counts = pd.Series([r.state.lower() for r in records]).value_counts()
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    objective = (getattr(study, "metric_names", None) or ["value"])[0]
    shown = min(args.top, int(counts.get("complete", 0)))
    title = (f"study {args.study}: {n} trials ({summary}); top {shown} "
             f"by {objective} ({'lowest' if minimize else 'highest'}) in colour")
    fig = plot_curves(records, group_by=args.group_by, top=args.top, minimize=minimize, title=title)
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}, {md_path}, {csv_path} ({n} trials: {summary})")
    missing = [r.number for r in records if r.history_source == "none"]
    from_mlflow = [r.number for r in records if r.history_source == "mlflow"]
    if from_mlflow:
        print(f"curves of trial(s) {', '.join(map(str, from_mlflow))} read from MLflow")
    if missing:
        print(f"no curves for trial(s) {', '.join(map(str, missing))} (no history in Optuna or MLflow)")

    parent = study.user_attrs.get("mlflow_parent_run_id")
    if not parent:
        print("not logged to MLflow: the study has no mlflow_parent_run_id")
    elif client is None:
        print(f"not logged to MLflow: {why_not}")
    else:
        try:
            log_report(client, parent, [png_path, md_path, csv_path])
            print(f"logged to MLflow run {parent} at {redact(tracking_uri)} under report/")
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the report
            print(f"not logged to MLflow ({redact(tracking_uri)}): {type(exc).__name__}: {one_line(exc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
