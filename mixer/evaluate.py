"""Score a saved model on a labelled CSV: ``python -m mixer.evaluate MODEL TEST.csv``.

Prints accuracy, precision, recall, F1, ROC AUC and the confusion matrix (``--json`` for machines),
and a warning on stderr when the rows do not look like the model's training data. Also holds what
the mixer command lines share: ``threshold_arg``, ``prog_name``, ``quiet_broken_pipe``,
``data_warnings`` and ``score_inputs``."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mixer.bundle import BundleError, ModelBundle
from mixer.data import FEATURE_NAMES, DataError, labels, read_csv
from mixer.metrics import BinaryMetrics, binary_metrics

# The shell's status for a process killed by SIGPIPE (128 + 13), which is what `cmd | head` reports.
EXIT_BROKEN_PIPE = 141
EPILOG = ("Exit status: 0 done; 2 bad usage or bad input (a missing, truncated or corrupt file, a "
          "directory, no 'label' column, a bad value: the message names the file, the column and the row); "
          f"{EXIT_BROKEN_PIPE} the reader of stdout closed it early (e.g. | head)")


def evaluate_frame(bundle: ModelBundle, frame: pd.DataFrame, *, source: str,
                   threshold: float = 0.5) -> BinaryMetrics:
    """Score the labelled raw rows of ``frame`` (read from ``source``) with ``bundle``; DataError if
    there is no ``label`` column or a bad value (naming ``source``, column and row)."""
    y = labels(frame, source=source)
    return binary_metrics(y, bundle.predict_proba(frame, source=source), threshold=threshold)


def data_warnings(bundle: ModelBundle, columns: Sequence[str], *, model: str, data: str) -> list[str]:
    """Why the CSV ``data`` (with these columns) may not be the kind of rows ``model`` was trained on: a
    model trained on synthetic rows (``info["data_config"]``, as ``sweep.publish`` and ``mixer.train --save``
    write it) scores real rows badly without any error, and the pipeline holds the training column order."""
    found = [c for c in map(str, columns) if c in FEATURE_NAMES]
    order = list(bundle.pipeline.feature_names)
    out = []
    if (bundle.info.get("data_config") or {}).get("source") == "synthetic":
        out.append(f"warning: {model} was trained on synthetic rows, and {data} is a CSV file: "
                   "its scores on real rows say little")
    first = next((i for i, (a, b) in enumerate(zip(found, order, strict=False)) if a != b), None)
    if first is not None:
        out.append(f"warning: {data}: feature columns in another order than the training data's "
                   f"(column {first + 1} is {found[first]!r}, {order[first]!r} in training): scored by "
                   "name, but check that it is the same kind of data")
    return out


def score_inputs(args: argparse.Namespace, score: Callable[..., Any]) -> Any:
    """``score(bundle, frame, source=, threshold=)`` on the files and threshold a command was given, after
    their ``data_warnings`` on stderr; None once the error is printed if a file is unusable or bad."""
    try:
        bundle, frame = ModelBundle.load(args.model), read_csv(args.data)
        for line in data_warnings(bundle, frame.columns, model=args.model, data=args.data):
            print(line, file=sys.stderr)
        return score(bundle, frame, source=args.data, threshold=args.threshold)
    except (BundleError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def prog_name(script: str, module: str) -> str:
    """A command's name as the user typed it, for its usage line: ``script`` (the console script,
    ``pyproject.toml``'s ``[project.scripts]``) if that is what runs, else ``python -m module``."""
    return script if Path(sys.argv[0] if sys.argv else "").stem == script else f"python -m {module}"


def quiet_broken_pipe(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main`` so that a reader of its stdout that stops early (``| head``) ends it
    quietly with ``EXIT_BROKEN_PIPE`` instead of a BrokenPipeError traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
            sys.stdout.flush()  # what is still buffered fails here, inside the try
        except BrokenPipeError:
            # Python's recipe (the `signal` docs, "Note on SIGPIPE"): stdout onto devnull, so that the
            # interpreter's own flush at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        return code

    return wrapper


def threshold_arg(text: str) -> float:
    """argparse type for ``--threshold``: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"threshold must be in [0, 1], got {text}")
    return value


def format_report(metrics: BinaryMetrics, *, model: str, data: str) -> str:
    """The human-readable report that ``main`` prints."""
    m = metrics
    auc = "n/a (one class only)" if math.isnan(m.roc_auc) else f"{m.roc_auc:.4f}"
    width = max(len(f"{v:,}") for v in (m.tn, m.fp, m.fn, m.tp, 999_999))
    return "\n".join([
        f"model      {model}",
        f"data       {data} ({m.rows:,} rows, {m.positives:,} labelled 1)",
        f"threshold  {m.threshold:g}",
        "",
        *(f"{name:<11}{getattr(m, name):.4f}" for name in ("accuracy", "precision", "recall", "f1")),
        f"roc_auc    {auc}",
        "",
        "confusion matrix (rows: true label, columns: predicted)",
        f"{'':10}{'pred 0':>{width}}  {'pred 1':>{width}}",
        f"{'true 0':10}{m.tn:>{width},}  {m.fp:>{width},}",
        f"{'true 1':10}{m.fn:>{width},}  {m.tp:>{width},}",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog_name("mixer-evaluate", "mixer.evaluate"),
        description="Score a saved model bundle on a labelled UNSW-NB15 CSV (either layout).",
        epilog=EPILOG,
    )
    parser.add_argument("model", help="model bundle (.npz) written by ModelBundle.save / sweep.publish")
    parser.add_argument("data", help="CSV of raw rows with a 0/1 'label' column")
    parser.add_argument("--threshold", type=threshold_arg, default=0.5,
                        help="predict 1 when P(label=1) >= this (default 0.5)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return parser


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics = score_inputs(args, evaluate_frame)
    if metrics is None:
        return 2
    print(json.dumps({"model": str(args.model), "data": str(args.data), **metrics.as_dict()}) if args.json
          else format_report(metrics, model=str(args.model), data=str(args.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
