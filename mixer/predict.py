"""Score unlabelled rows: ``python -m mixer.predict MODEL INPUT.csv [--out FILE]``.

Writes a CSV row per input row: ``id`` (the input's, else the 1-based data row number), ``probability``
(P(label = 1)) and ``prediction`` (1 iff probability >= ``--threshold``); a ``label`` column is ignored.
Output goes to stdout or, atomically, to ``--out FILE``, only once every row is scored: a bad value
exits 2 naming the file, row and column, never skipping a row. A summary line goes to stderr, after
a warning if the rows do not look like the model's training data."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from mixer.bundle import ModelBundle, atomic_write
from mixer.evaluate import EXIT_BROKEN_PIPE, prog_name, quiet_broken_pipe, score_inputs, threshold_arg

# Seven significant digits: what a float32 model's probabilities carry (more would print noise).
FLOAT_FORMAT = "%.7g"
EPILOG = ("Exit status: 0 done; 2 bad usage or bad input (a missing, truncated or corrupt file, a "
          "directory, a bad value: the message names the file, the column and the row), or an --out "
          f"that cannot be written; {EXIT_BROKEN_PIPE} the reader of stdout closed it early (e.g. | head)")


def predict_frame(bundle: ModelBundle, frame: pd.DataFrame, *, source: str,
                  threshold: float = 0.5) -> pd.DataFrame:
    """One output row per input row: ``id``, ``probability``, ``prediction`` (0/1); DataError naming
    ``source``, the column and the row of a bad value."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got threshold={threshold}")
    proba = bundle.predict_proba(frame, source=source)
    ids = frame["id"].to_numpy() if "id" in frame.columns else np.arange(1, len(frame) + 1)
    return pd.DataFrame({"id": ids, "probability": proba,
                         "prediction": (proba >= threshold).astype(np.int64)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog_name("mixer-predict", "mixer.predict"),
        description="Score raw UNSW-NB15 rows (either layout, label optional) with a saved model bundle.",
        epilog=EPILOG,
    )
    parser.add_argument("model", help="model bundle (.npz) written by ModelBundle.save / sweep.publish")
    parser.add_argument("data", help="CSV of raw rows to score")
    parser.add_argument("--out", default="-",
                        help="output CSV (id,probability,prediction); '-' (default) = stdout")
    parser.add_argument("--threshold", type=threshold_arg, default=0.5,
                        help="prediction is 1 when probability >= this (default 0.5)")
    return parser


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = score_inputs(args, predict_frame)
    if out is None:
        return 2
    if args.out == "-":
        out.to_csv(sys.stdout, index=False, float_format=FLOAT_FORMAT)
        where = "stdout"
    else:
        try:
            atomic_write(args.out, lambda fh: out.to_csv(fh, index=False, float_format=FLOAT_FORMAT),
                         mode="w")
        except OSError as exc:
            print(f"error: {args.out}: cannot write: {exc.strerror or exc}", file=sys.stderr)
            return 2
        where = args.out
    print(f"scored {len(out):,} rows from {args.data}: {int(out['prediction'].sum()):,} predicted 1 "
          f"(threshold {args.threshold:g}) -> {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
