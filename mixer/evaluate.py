"""Score a saved model on a labelled CSV: ``python -m mixer.evaluate MODEL TEST.csv``.

Prints accuracy, precision, recall, F1, ROC AUC and the confusion matrix (``--json`` for
machines). Exit status: 0 on success, 2 for bad input (missing file, unreadable model, no
``label`` column, a bad value; the message names the file, the column and the row).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mixer.bundle import BundleError, ModelBundle
from mixer.data import DataError, labels, read_csv
from mixer.metrics import BinaryMetrics, binary_metrics


def evaluate_csv(bundle: ModelBundle, path: str | Path, *, threshold: float = 0.5) -> BinaryMetrics:
    """Score the labelled CSV at ``path`` with ``bundle``.

    Raises:
        mixer.data.DataError: missing file, no ``label`` column or a bad value (naming file, column, row).
    """
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    frame = read_csv(path)
    y = labels(frame, source=str(path))
    proba = bundle.predict_proba(frame, source=str(path))
    return binary_metrics(y, proba, threshold=threshold)


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
        f"accuracy   {m.accuracy:.4f}",
        f"precision  {m.precision:.4f}",
        f"recall     {m.recall:.4f}",
        f"f1         {m.f1:.4f}",
        f"roc_auc    {auc}",
        "",
        "confusion matrix (rows: true label, columns: predicted)",
        f"{'':10}{'pred 0':>{width}}  {'pred 1':>{width}}",
        f"{'true 0':10}{m.tn:>{width},}  {m.fp:>{width},}",
        f"{'true 1':10}{m.fn:>{width},}  {m.tp:>{width},}",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mixer.evaluate",
        description="Score a saved model bundle on a labelled UNSW-NB15 CSV (either layout).",
    )
    parser.add_argument("model", help="model bundle (.npz) written by ModelBundle.save / sweep.publish")
    parser.add_argument("data", help="CSV of raw rows with a 0/1 'label' column")
    parser.add_argument("--threshold", type=threshold_arg, default=0.5,
                        help="predict 1 when P(label=1) >= this (default 0.5)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        bundle = ModelBundle.load(args.model)
        metrics = evaluate_csv(bundle, args.data, threshold=args.threshold)
    except (BundleError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(args.data), **metrics.as_dict()}))
    else:
        print(format_report(metrics, model=str(args.model), data=str(args.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
