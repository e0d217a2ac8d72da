"""A study's trials side by side: one figure of curves and one ranked table, logged to the parent run.

    python -m sweep.report STUDY [--storage URL] [--tracking-uri URI] [--group-by PARAM] [--top K]
                                 [--out DIR]

Reads every trial of the Optuna study (default storage ``runs/<STUDY>/optuna.journal``) and writes
``curves.png`` (a column per ``--group-by`` value, the ``--top`` best trials in colour), the loss
landscape's figures, ``trials.md`` and ``trials.csv`` (ranked) to ``--out`` (default
``runs/<STUDY>/report/``), each file whole or not at all, and logs them to the study's parent MLflow
run under ``report/`` if it is reachable (else it says why and still succeeds). Curves missing from
Optuna are read from MLflow. Exit status: 0 written, 1 a file could not be written, 2 bad usage."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import methodcaller
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd

from mixer.bundle import atomic_write
from sweep.messages import UsageError, one_line, redact
from sweep.plots import (
    CURVATURE_PLOTS,
    DEFAULT_GROUP_BY,
    DEFAULT_TOP,
    IMPORTANCE_MIN_COMPLETE,
    STUDY_PLOTS,
    curvature_figures,
    metric_name,
    plot_curves,
    plot_intermediate_values,
    ranked,
    study_figures,
)
from sweep.study import open_storage

__all__ = ["CURVATURE_PLOTS", "IMPORTANCE_MIN_COMPLETE", "ReportWriteError", "TrialRecord", "collect",
           "curvature_figures", "find_study", "main", "metric_name", "plot_curves",
           "plot_intermediate_values", "ranked", "STUDY_PLOTS", "study_figures", "trials_table",
           "write_figures", "write_study_files"]

CURVE_KEYS = ("train_loss", "val_loss", "lr", "grad_norm_mean", "hessian_max_eig", "hessian_min_eig",
              "neg_curvature_share")

log = logging.getLogger("sweep")


class ReportWriteError(Exception):
    """A report file could not be written (disk full, unwritable folder); the message names the folder.
    Each file is written whole or not at all, so the previous version of a file is intact."""


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
    history_source: str = "none"    # "optuna", "mlflow" or "none"
    plateau: list[int] | None = None  # [first, last] epoch; these three: see sweep.objective
    probes: list[dict[str, Any]] = field(default_factory=list)
    slices: dict[str, Any] | None = None

    def knob(self, name: str, *, searched: bool) -> Any:
        """A parameter's value: a ``searched`` one from ``params`` only (a trial that did not sample a
        conditional parameter has none, not the config's unused default), any other from ``config``."""
        return self.params.get(name) if searched else self.config.get(name)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(int(h["epoch"]), float(h[key])) for h in self.history
                  if h.get(key) is not None and "epoch" in h]
        return [p[0] for p in points], [p[1] for p in points]

    @property
    def best_val_loss(self) -> float | None:
        return min((v for v in self.curve("val_loss")[1] if math.isfinite(v)), default=None)


# --- Reading the study

def _studies_under(root: Path) -> list[str]:
    import optuna

    names: list[str] = []
    for journal in sorted(root.glob("*/optuna.journal")):
        with contextlib.suppress(Exception):  # an unreadable journal just is not listed
            names.extend(optuna.get_all_study_names(open_storage(str(journal), rdb=False)))
    return names


def find_study(storage: str | None, study_name: str):
    """The Optuna storage holding ``study_name``: ``storage`` is a database URL, a journal file path
    (optionally ``journal:`` or ``file:`` prefixed) or None for ``runs/<study>/optuna.journal``. Raises
    UsageError if the storage does not open, the journal file does not exist or the study is not in the
    storage (the message lists the studies that are)."""
    import optuna

    if storage is None:
        storage = str(Path("runs") / study_name / "optuna.journal")
        if not Path(storage).is_file():
            listing = ", ".join(_studies_under(Path("runs"))) or "none"
            raise UsageError(f"no study {study_name!r}: {storage} does not exist "
                             f"(studies under runs/: {listing}); pass --storage for another storage")
    elif "://" not in storage or storage.startswith(("file:", "journal:")):
        for prefix in ("journal://", "file://", "journal:", "file:"):
            storage = storage.removeprefix(prefix)
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
    from sweep.objective import trial_run_id

    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        history = [dict(h) for h in attrs.get("history") or []]
        source = "optuna" if history else "none"
        run_id = trial_run_id(study, t)  # on the trial, or on the study if the run came later
        if not history and run_id and mlflow_client is not None:
            with contextlib.suppress(Exception):  # a missing run leaves the trial without curves
                history = _history_from_mlflow(mlflow_client, run_id)
                source = "mlflow" if history else "none"
        diagnosis = attrs.get("diagnosis") or ""
        if not diagnosis and history:
            diagnosis = diagnose(history, diverged=attrs.get("status") == "diverged").label
        pruned = attrs.get("pruned_epoch")
        records.append(TrialRecord(
            number=t.number, state=t.state.name, value=t.value, params=dict(t.params),
            config=dict(attrs.get("config") or {}), history=history, diagnosis=diagnosis,
            pruned_epoch=int(pruned) if pruned is not None else None,
            history_source=source, plateau=attrs.get("plateau"), probes=list(attrs.get("probes") or []),
            slices=attrs.get("slices")))
    return records


# --- The table

def trials_table(records: Sequence[TrialRecord], *, group_by: str = DEFAULT_GROUP_BY,
                 minimize: bool = True) -> pd.DataFrame:
    """The ranked trials: rank, trial, state, value, best_val_loss, epochs, pruned_epoch, diagnosis,
    then the group-by knob and every sampled parameter."""
    order = ranked(records, minimize=minimize)
    r_params = {name for r in order for name in r.params}
    param_names = sorted(r_params) if group_by in r_params else [group_by, *sorted(r_params)]
    fixed = ["rank", "trial", "state", "value", "best_val_loss", "epochs", "pruned_epoch", "diagnosis"]
    # A searched knob named like a fixed column (``epochs``: scheduled, not run) gets its own column.
    headers = [f"param_{name}" if name in fixed else name for name in param_names]
    rows = [[rank, r.number, r.state.lower(), r.value, r.best_val_loss, len(r.history), r.pruned_epoch,
             r.diagnosis, *(r.knob(name, searched=name in r_params) for name in param_names)]
            for rank, r in enumerate(order, start=1)]
    table = pd.DataFrame(rows, columns=fixed + headers)
    table["pruned_epoch"] = table["pruned_epoch"].astype("Int64")
    # An integer parameter some trials lack stays integer (t_0 = 4, not 4.0) with empty cells.
    table[headers] = table[headers].convert_dtypes()
    return table


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(table[c]) else "---"
                          for c in table.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |"
            for row in table.astype(object).itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


# --- The study's own files: the full table and its plots

def write_study_files(study, out_dir: str | Path) -> list[tuple[Path, str | None]]:
    """Write ``trials.csv`` (``study.trials_dataframe()`` less the history and config: too wide, they stay
    in the storage) and ``plots/<name>.png`` (``.txt`` saying why not, e.g. too few trials for importances)
    into ``out_dir``, each whole or not at all. Returns each file with its artifact folder (None for
    ``trials.csv``, ``"plots"``); raises ReportWriteError if a file could not be written."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    frame = study.trials_dataframe()
    frame = frame.drop(columns=["user_attrs_history", "user_attrs_config"], errors="ignore")
    figures = study_figures(study)
    try:
        files: list[tuple[Path, str | None]] = [
            (atomic_write(out / "trials.csv", partial(frame.to_csv, index=False), mode="w"), None)]
        files += [(path, "plots") for path in write_figures(figures, out / "plots")]
    except OSError as exc:
        raise ReportWriteError(f"cannot write the study's files in {out}: {exc.strerror or exc}") from exc
    finally:
        for fig in figures.values():
            if not isinstance(fig, str):
                plt.close(fig)
    return files


def write_figures(figures: dict[str, Any], folder: Path) -> list[Path]:
    """``<name>.png`` for each Figure, ``<name>.txt`` saying why for each string; each replaces the other."""
    files = []
    for name, fig in figures.items():
        png, note = folder / f"{name}.png", folder / f"{name}.txt"
        if isinstance(fig, str):
            log.info("plot %s skipped: %s", name, fig)
            files.append(atomic_write(note, methodcaller("write", f"{name}: not drawn, {fig}\n"), mode="w"))
            png.unlink(missing_ok=True)  # an older study's plot would contradict the note
        else:
            files.append(atomic_write(png, partial(fig.savefig, format="png", dpi=100, bbox_inches="tight")))
            note.unlink(missing_ok=True)
    return files


# --- MLflow

def _mlflow_client(uri: str):
    """An MlflowClient for ``uri`` and None, or None and why not. The report reads a store, never
    creates one: a local store that does not exist is not opened (opening it would create it)."""
    try:
        from mlflow import MlflowClient

        from sweep.tracking import TrackingUnavailable, check_reachable
    except ImportError:
        return None, "mlflow is not installed"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            return None, f"no MLflow database at {path}"
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
        if not path.is_dir():
            return None, f"no MLflow store at {path}"
    try:
        check_reachable(uri, timeout=5.0)
    except TrackingUnavailable as exc:
        return None, str(exc)
    return MlflowClient(tracking_uri=uri), None


# --- CLI

def _parser() -> argparse.ArgumentParser:
    from mixer.evaluate import prog_name

    p = argparse.ArgumentParser(prog=prog_name("mixer-report", "sweep.report"),
                                description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 written; 1 a file could not be written (disk full, "
                                       "unwritable folder); 2 bad usage (unknown study, missing storage)")
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
    except (UsageError, ReportWriteError) as exc:
        print(f"sweep.report: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


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
    table = trials_table(records, group_by=args.group_by, minimize=minimize)
    csv_path, md_path, png_path = out / "trials.csv", out / "trials.md", out / "curves.png"
    counts = pd.Series([r.state.lower() for r in records]).value_counts()
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    shown = min(args.top, int(counts.get("complete", 0)))
    title = (f"study {args.study}: {len(records)} trials ({summary}); top {shown} "
             f"by {metric_name(study)} ({'lowest' if minimize else 'highest'}) in colour")
    fig = plot_curves(records, group_by=args.group_by, top=args.top, minimize=minimize, title=title)
    landscape = curvature_figures(records, group_by=args.group_by, top=args.top, minimize=minimize)
    try:
        atomic_write(csv_path, partial(table.to_csv, index=False), mode="w")
        atomic_write(md_path, methodcaller("write", f"# Study {args.study}\n\n{to_markdown(table)}"),
                     mode="w")
        atomic_write(png_path, partial(fig.savefig, format="png", dpi=110))
        extra = write_figures(landscape, out)
    except OSError as exc:
        raise ReportWriteError(f"cannot write the report in {out}: {exc.strerror or exc}") from exc
    print(f"wrote {png_path}, {md_path}, {csv_path} ({len(records)} trials: {summary})")
    print(f"wrote {', '.join(p.name for p in extra)} in {out} (the loss landscape, from the probes)")
    for source, message in (("mlflow", "curves of trial(s) {} read from MLflow"),
                            ("none", "no curves for trial(s) {} (no history in Optuna or MLflow)")):
        numbers = [str(r.number) for r in records if r.history_source == source]
        if numbers:
            print(message.format(", ".join(numbers)))

    parent = study.user_attrs.get("mlflow_parent_run_id")
    if not parent:
        print("not logged to MLflow: the study has no mlflow_parent_run_id")
    elif client is None:
        print(f"not logged to MLflow: {why_not}")
    else:
        try:
            client.get_run(parent)  # raises if the run is not in this store
            for path in [png_path, md_path, csv_path, *extra]:
                client.log_artifact(parent, str(path), artifact_path="report")
            print(f"logged to MLflow run {parent} at {redact(tracking_uri)} under report/")
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the report
            print(f"not logged to MLflow ({redact(tracking_uri)}): {type(exc).__name__}: {one_line(exc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
