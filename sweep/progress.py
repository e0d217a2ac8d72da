"""What a person watching a study sees: one progress line on stderr (rewritten in place on a terminal,
a line per finished trial otherwise, so that logs stay readable), and where the log records go, so that
nothing else writes under that line."""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Progress", "log_to", "strip_foreign_handlers"]


def log_to(target: TextIO | Path | None) -> None:
    """Send the process's log records (ours, Optuna's, MLflow's, warnings) to one place. ``None`` holds
    them in memory until a later call names the file (the output folder must not be created before the
    space is validated and tracking is reachable)."""
    import logging.handlers

    root = logging.getLogger()
    held = [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    handler: logging.Handler
    if target is None:
        handler = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    else:
        handler = logging.FileHandler(target) if isinstance(target, Path) else logging.StreamHandler(target)
    # The host too: workers in containers sharing one sweep.log on a volume are all PID 1.
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {socket.gethostname()} %(process)d %(name)s %(levelname)s %(message)s"))
    root.handlers.clear()
    for h in held:
        if target is not None:
            h.setTarget(handler)
            h.flush()
        h.close()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    strip_foreign_handlers()


def strip_foreign_handlers() -> None:
    """Route every library's log records to ours. MLflow installs its own stderr handlers when imported,
    and creating a SQLite store runs alembic's logging config (a stderr handler on sqlalchemy.engine,
    existing loggers disabled): they would print tracebacks under the progress line."""
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger):
            continue
        lg.disabled = False
        if name.split(".")[0] in ("mlflow", "alembic", "sqlalchemy", "urllib3", "optuna", "huey"):
            lg.handlers.clear()
            lg.propagate = True


def _fmt_time(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_value(v: float | None) -> str:
    """A metric value as every line of the sweep prints it."""
    return "-" if v is None else f"{v:.6g}"


class Progress:
    """The progress of one study on ``stream``: trials finished, pruned and failed, the best value and the
    elapsed time; on a terminal (``tty``, default ``stream.isatty()``) failures and new bests print above
    the line."""

    def __init__(self, stream: TextIO, *, study: str, total: int | None, metric: str, direction: str,
                 tty: bool | None = None):
        self.stream, self.study, self.total = stream, study, total
        self.metric, self.direction = metric, direction
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.seen: set[int] = set()
        self.best: tuple[float, int] | None = None
        self.counts = {"completed": 0, "pruned": 0, "failed": 0}
        self.done, self.running, self._line_shown = 0, "", False

    def prime(self, trials: list[Any]) -> None:
        """Count the trials a resumed study already has, without a line for each."""
        self._absorb(trials, announce=False)

    def update(self, trials: list[Any]) -> None:
        self._absorb(trials, announce=True)
        self._draw()

    def epoch(self, number: int, m: Any, epochs: int) -> None:
        value = format_value(getattr(m, self.metric))
        self.running = f"trial {number} epoch {m.epoch}/{epochs} {self.metric} {value}"
        self._draw()  # draws on a terminal only

    def message(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)
        self._draw()

    def warnings_handler(self) -> logging.Handler:
        """A handler for the root logger that also shows tracking's warnings (a server outage and
        what is still waiting) here, beside the log file."""
        progress = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                progress.message(f"warning: {record.getMessage()}")

        handler = _Handler(logging.WARNING)
        handler.addFilter(logging.Filter("sweep.tracking"))
        return handler

    def close(self) -> None:
        self._clear(end="\n")

    def _absorb(self, trials: list[Any], *, announce: bool) -> None:
        from optuna.trial import TrialState

        from sweep.study import budget_used

        for t in trials:
            if t.number in self.seen or not t.state.is_finished():
                continue
            self.seen.add(t.number)
            key = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned"}.get(t.state, "failed")
            self.counts[key] += 1
            self.done += budget_used([t])  # t is finished: COMPLETE, PRUNED or a FAIL that counts
            new_best = t.state == TrialState.COMPLETE and t.value is not None and (
                self.best is None or (t.value < self.best[0] if self.direction == "minimize"
                                      else t.value > self.best[0]))
            if new_best:
                self.best = (t.value, t.number)
            if announce:
                self.running = ""
                line = self._trial_line(t, key, new_best)
                if not self.tty:
                    print(f"{line} | {self._status()}", file=self.stream, flush=True)
                elif key == "failed" or new_best:
                    self.message(line)

    def _trial_line(self, t: Any, key: str, new_best: bool) -> str:
        if key == "completed":
            return f"trial {t.number} completed: {self.metric} {format_value(t.value)}" + (
                " (new best)" if new_best else "")
        if key == "pruned":
            epoch = t.user_attrs.get("pruned_epoch")
            return f"trial {t.number} pruned at epoch {epoch} ({self.metric} {format_value(t.value)})"
        status = t.user_attrs.get("status") or "failed"
        reason = t.user_attrs.get("reason") or "no reason recorded"
        return f"trial {t.number} failed: {status}: {reason}"

    def _status(self) -> str:
        total = "?" if self.total is None else str(self.total)
        best = "-" if self.best is None else f"{format_value(self.best[0])} (trial {self.best[1]})"
        counts = " · ".join(f"{n} {key}" for key, n in self.counts.items())
        return (f"{self.study}: {self.done}/{total} trials · {counts} · best {self.metric} {best} · "
                f"{_fmt_time(time.monotonic() - self.started)}")

    def _clear(self, end: str = "\r\x1b[K") -> None:
        if self.tty and self._line_shown:
            self.stream.write(end)
            self.stream.flush()
            self._line_shown = False

    def _draw(self) -> None:
        if not self.tty:
            return
        text = self._status() + (f" · {self.running}" if self.running else "")
        # A wrapped line cannot be rewritten in place: keep it within the terminal's width.
        text = text[:max(20, shutil.get_terminal_size().columns - 1)]
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._line_shown = True
