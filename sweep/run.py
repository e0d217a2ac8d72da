"""``python -m sweep.run SPACE.yaml``: run (or resume) a whole study from one search-space file.

Nothing is created until the space file is valid, its data loads and tracking is reachable. Then the
study is opened (``sweep.study``), its trials run here or in ``--workers`` processes (``sweep.workers``)
until its budget is spent, and one process summarises it (``sweep.report``) and publishes its best
model (``sweep.publish``). Exit codes: see the parser's epilog."""

from __future__ import annotations

# NumPy (and so Optuna, MLflow, mixer) is imported inside functions only: a worker process must set
# its BLAS thread count in the environment before NumPy is first imported.
import argparse
import contextlib
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sweep.locks import study_lock
from sweep.messages import UsageError, one_line, redact
from sweep.progress import Progress, format_value, log_to, strip_foreign_handlers
from sweep.study import (
    budget_used,
    fail_lost_runs,
    open_storage,
    open_study,
    quiet_optuna,
    reap_dead_local_trials,
    run_trials,
    sampler_seed,
)
from sweep.workers import run_workers, worker_main

__all__ = ["UsageError", "budget_used", "build_parser", "main", "open_storage", "open_study", "run_trials"]

log = logging.getLogger("sweep")

#: Study attribute: how many finished trials the last summary and published model covered.
SUMMARISED_ATTR = "summarised_trials"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sweep.run`` (docker-compose.yml's worker command is checked by it)."""
    p = argparse.ArgumentParser(
        # The console script's name when that is what runs (mixer.evaluate.prog_name, without NumPy).
        prog=("mixer-sweep" if Path(sys.argv[0] if sys.argv else "").stem == "mixer-sweep"
              else "python -m sweep.run"),
        description="Run an Optuna study of the NumPy Mixer described by one search-space YAML file, "
                    "tracked in MLflow. Running the same command again resumes the study. Values given "
                    "here override the file's.",
        epilog="Exit status: 0 done; 1 a failed run (no trial completed, a worker crashed, metrics not "
               "delivered to MLflow); 2 bad usage, a bad space file, an unreachable tracking server or "
               "storage; 130 interrupted (the running trials are re-run when the command is run again).",
    )
    p.add_argument("space", help="search-space YAML file (e.g. search_spaces/default.yaml)")
    p.add_argument("--n-trials", type=_bounded(int, 1), metavar="N",
                   help="the study's total number of trials (overrides budget.n_trials); trials "
                        "already in the study count, so a resumed study only runs the missing ones")
    p.add_argument("--timeout", type=_bounded(float, 0, strict=True), metavar="S",
                   help="start no new trial after S seconds of this command (overrides budget.timeout)")
    p.add_argument("--workers", type=_bounded(int, 1), default=1, metavar="K",
                   help="worker processes on this machine sharing the study, each with cores/K BLAS "
                        "threads (default 1: train in this process)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: a journal file path, or an RDB URL such as postgresql://user@host/db"
                        " to share the study across machines (default: $MIXER_STORAGE, which keeps a "
                        "password off the command line, else <out>/<study>/optuna.journal)")
    p.add_argument("--study-name", metavar="NAME", help="study name (overrides the file's `study`)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (default: $MLFLOW_TRACKING_URI, "
                        "else the local store that `mlflow ui` opens)")
    p.add_argument("--out", default="runs", metavar="DIR",
                   help="output folder; the study's files go to DIR/<study>/ (default: runs)")
    p.add_argument("--seed", type=_bounded(int, 0), metavar="S",
                   help="study seed (overrides the file's `seed`): trial seeds and the sampler's seed "
                        "derive from it")
    p.add_argument("--train-csv", metavar="CSV",
                   help="train on this labelled CSV instead of the file's data (sets data.source: csv; "
                        "see also $MIXER_DATA_DIR)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow at all")
    p.add_argument("--republish", action="store_true",
                   help="summarise the study and publish its best model again, even if that was done "
                        "already (a finished study's re-run otherwise does nothing)")
    # Internal: set by the parent process on the workers it starts ("<parent pid>:<index>").
    p.add_argument("--worker-of", help=argparse.SUPPRESS)
    return p


def _bounded(kind: type, low: float, *, strict: bool = False) -> Any:
    """An argparse ``type``: ``kind(text)``, refused unless >= ``low`` (> ``low`` if ``strict``)."""
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value > low if strict else value >= low):  # "not" also refuses nan
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {value}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 failed run, 2 bad usage/config, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        if args.worker_of:
            return worker_main(_Settings(args), args.worker_of)
        return _main(args, argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any trial started: nothing to clean up
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if (full := _disk_full(exc)) is None:
            raise
        # The running trial stays RUNNING in the storage; the next run fails it and runs it again.
        folder = Path(args.out).resolve()
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        print(f"error: no space left on the device of {folder} ({free / 2**20:.1f} MiB free): "
              f"{full.strerror}. Free some space and run the same command again to resume the study.",
              file=sys.stderr)
        return 1
    finally:
        # main() may be called in-process (tests, notebooks): leave logging as it was.
        added = [h for h in root.handlers if h not in handlers]
        root.handlers = handlers
        for h in added:
            h.close()
        root.setLevel(level)
        logging.captureWarnings(False)


def _disk_full(exc: BaseException | None) -> OSError | None:
    """The "no space left" error that ``exc`` is or arose from (Optuna's journal raises an
    AssertionError while handling it), else None."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class _Settings:
    """The space with the command line's overrides applied."""

    def __init__(self, args: argparse.Namespace):
        from sweep.space import SpaceError, load_space

        try:
            self.space = load_space(args.space, train_csv=args.train_csv)
        except SpaceError as exc:
            raise UsageError(str(exc)) from None
        s = self.space
        self.space_path = Path(args.space).resolve()
        self.study_name = args.study_name or s.study_name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", self.study_name):
            where = "--study-name" if args.study_name else f"{args.space}: study"
            raise UsageError(f"{where}: a study name is 1-100 letters, digits, '_', '.' or '-' (it names "
                             f"a folder and an MLflow experiment), got {self.study_name[:80]!r}"
                             + ("..." if len(self.study_name) > 80 else ""))
        self.seed = s.seed if args.seed is None else args.seed
        # The sampler's base seed: the file's sampler.seed, else the study seed; --seed overrides both.
        self.sampler_seed = s.sampler.seed if s.sampler.seed is not None and args.seed is None else self.seed
        self.n_trials = args.n_trials if args.n_trials is not None else s.n_trials
        self.timeout = args.timeout if args.timeout is not None else s.timeout
        if self.n_trials is None and self.timeout is None:
            raise UsageError(f"{args.space}: budget: set budget.n_trials or budget.timeout "
                             f"(or --n-trials / --timeout)")
        self.seed_given = args.seed  # passed on to workers only when given
        self.train_csv = str(Path(args.train_csv).resolve()) if args.train_csv else None
        self.workers = args.workers
        self.out_dir = Path(args.out).resolve() / self.study_name
        self.tracking = not args.no_tracking
        self.tracking_uri = args.tracking_uri
        self.experiment = s.experiment or self.study_name
        storage = args.storage or os.environ.get("MIXER_STORAGE") or str(self.out_dir / "optuna.journal")
        self.rdb = "://" in storage
        self.storage = storage if self.rdb else str(Path(storage).resolve())
        if self.storage.startswith("sqlite") and args.workers > 1:
            raise UsageError("SQLite does not take concurrent writers well: use the default journal "
                             "file or PostgreSQL with --workers > 1")


def _check_data(settings: _Settings) -> None:
    """Load the study's data once (cached for its trials); a data error is a UsageError."""
    from mixer.data import DataError
    from sweep.objective import load_data
    from sweep.space import split_flat

    data_config, _ = split_flat(settings.space.data)
    try:
        load_data(data_config)
    except (DataError, OSError) as exc:
        raise UsageError(f"{settings.space_path}: data: {exc}") from None


def _check_writable(folder: Path) -> None:
    """A UsageError unless files can be created under ``folder`` (tried in its nearest existing
    ancestor, so that nothing is created yet)."""
    base = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as exc:
        raise UsageError(f"--out: cannot write under {base}: {exc.strerror or exc}") from None


def _make_tracker(settings: _Settings) -> Any:
    if not settings.tracking:
        return None
    try:
        from sweep.tracking import Tracker, TrackingUnavailable
    except ImportError as exc:
        raise UsageError(f"MLflow tracking is not available ({exc}); run with --no-tracking") from None
    strip_foreign_handlers()  # importing MLflow installed its own log handlers
    try:
        tracker = Tracker(settings.tracking_uri, settings.experiment)
        tracker.check_reachable()
    except TrackingUnavailable as exc:
        raise UsageError(f"MLflow tracking: {exc} (start the server, pass --tracking-uri, "
                         f"or run with --no-tracking)") from None
    finally:
        strip_foreign_handlers()  # again: creating a SQLite store runs alembic's logging config
    return tracker


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    settings = _Settings(args)
    space = settings.space
    log_to(None)
    _check_data(settings)  # a bad row fails here, before a study or a run exists, not in every trial
    _check_writable(settings.out_dir)
    tracker = _make_tracker(settings)  # before anything is created: an unreachable server exits 2
    quiet_optuna()
    from sweep.objective import Interrupts, Objective

    storage = open_storage(settings.storage, rdb=settings.rdb)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    log_to(settings.out_dir / "sweep.log")
    study, created = open_study(storage, settings.study_name, direction=space.direction,
                                sampler=space.build_sampler(seed=settings.sampler_seed),
                                pruner=space.build_pruner())
    _check_or_record_study(study, created, settings)
    if created:
        for params in space.enqueue:
            study.enqueue_trial(params)
    reaped = [] if settings.rdb else reap_dead_local_trials(study)
    existing = study.get_trials(deepcopy=False)
    if (settings.n_trials and budget_used(existing) >= settings.n_trials and not args.republish
            and study.user_attrs.get(SUMMARISED_ATTR) == _finished(existing)):
        print(f"study {settings.study_name} complete ({len(existing)} trials), its summary and best "
              f"model published: nothing to do (--republish to publish them again, --n-trials to "
              f"add trials)", file=sys.stderr)
        return 0
    study.sampler = space.build_sampler(seed=sampler_seed(settings.sampler_seed, len(existing), 0,
                                                          shared=settings.rdb))
    if tracker is not None:
        tracker.ensure_parent_run(study)

    progress = Progress(sys.stderr, study=settings.study_name, total=settings.n_trials,
                        metric=space.metric, direction=space.direction)
    progress.prime(existing)
    logging.getLogger().addHandler(progress.warnings_handler())
    where = redact(settings.storage)
    verb = f"resuming ({progress.done} trials done)" if not created else "new study"
    budget = (f"{settings.n_trials} trials" if settings.n_trials else "no trial limit") + (
        f", timeout {settings.timeout:g} s" if settings.timeout else "")
    progress.message(f"study {settings.study_name}: {verb}; {budget}; {args.workers} worker(s); "
                     f"storage {where}; log {settings.out_dir / 'sweep.log'}")
    if reaped:
        progress.message(f"trials {reaped} were left running by a dead worker: "
                         f"marked failed and queued again")

    interrupted, failures, tracking_errors = False, [], 0
    try:
        if args.workers == 1:
            interrupts = Interrupts()
            interrupts.install()
            objective = Objective(space, study_seed=settings.seed, tracker=tracker, interrupts=interrupts,
                                  on_epoch=progress.epoch)
            try:
                run_trials(study, objective, n_trials=settings.n_trials, timeout=settings.timeout,
                           interrupts=interrupts,
                           after_trial=lambda: progress.update(study.get_trials(deepcopy=False)),
                           on_stale=fail_lost_runs(tracker.uri) if tracker is not None else None)
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            tracking_errors = objective.tracking_errors
        else:
            # The parent only reads the storage: a plain KeyboardInterrupt is safe anywhere. Install it
            # explicitly, since a shell starts background jobs with SIGINT ignored.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            interrupted, failures, tracking_errors = run_workers(settings, study, progress)
    except KeyboardInterrupt:
        interrupted = True
    progress.update(study.get_trials(deepcopy=False))
    progress.close()

    if interrupted:
        if tracker is not None:
            tracker.close()
        cmd = shlex.join(["python", "-m", "sweep.run", *map(redact, argv)])
        hidden = " (give the password where it shows ***, or set MIXER_STORAGE)" if "***" in cmd else ""
        print(f"interrupted: the running trial(s) were marked failed and will be re-run; the study is "
              f"saved in {where}. Resume with{hidden}:\n  {cmd}", file=sys.stderr)
        return 130

    code = _summarise(study, settings, tracker, republish=args.republish)
    if tracker is not None:
        from sweep.tracking import ui_hint

        if undelivered := tracker.close():
            print(f"error: {undelivered} metric points could not be delivered to MLflow", file=sys.stderr)
            code = 1
        if hint := ui_hint(tracker.uri, tracker.experiment_id, metric=space.metric,
                           direction=space.direction):
            print(hint)
    if tracking_errors:
        print(f"error: {tracking_errors} MLflow calls failed (see {settings.out_dir / 'sweep.log'})",
              file=sys.stderr)
        code = 1
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
        code = 1
    print(f"study {settings.study_name}: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return code


def _finished(trials: list[Any]) -> int:
    """What ``SUMMARISED_ATTR`` counts: the finished trials."""
    return sum(t.state.is_finished() for t in trials)


def _summarise(study: Any, settings: _Settings, tracker: Any, *, republish: bool) -> int:
    """The study's files, its MLflow summary and its published model, made by one process only: the
    first to take the ``publish`` lock once no trial runs (docs/architecture.md, "One publisher")."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        code = max(_study_files(study, settings, None), _report(study, settings))
        print("other workers are still running trials of this study; the last one to finish logs the "
              "study summary and publishes the best model", file=sys.stderr)
        return code
    finished = _finished(trials)
    with study_lock(study, study.study_name, "publish"):
        if study.user_attrs.get(SUMMARISED_ATTR) == finished and not republish:
            print(f"study {settings.study_name}: another worker has summarised it and published its "
                  f"best model", file=sys.stderr)
            return 0
        code = max(_study_files(study, settings, tracker), _report(study, settings))
        code = max(code, _publish(study, settings, tracked=tracker is not None))
        if code == 0:
            study.set_user_attr(SUMMARISED_ATTR, finished)
    return code


def _study_files(study: Any, settings: _Settings, tracker: Any) -> int:
    """Write trials.csv and the Optuna plots; with ``tracker``, also summarise the study on its
    parent run (which logs them there) and close that run. Returns the exit code."""
    from sweep.report import ReportWriteError, write_study_files

    if tracker is None:
        try:
            write_study_files(study, settings.out_dir)
        except ReportWriteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    print(f"logging the study summary to MLflow ({redact(tracker.uri)}) ...", file=sys.stderr, flush=True)
    try:
        tracker.finish_study(study, settings.out_dir)
    except Exception as exc:  # noqa: BLE001 - the study's own results are safe in the storage
        log.error("finishing the study's MLflow run failed: %s", one_line(exc))
        print(f"error: could not finish the study's MLflow run: {one_line(exc)}", file=sys.stderr)
        if tracker.parent_run_id:  # not left RUNNING: a re-run summarises it again
            from mlflow import MlflowClient

            with contextlib.suppress(Exception):
                MlflowClient(tracker.uri).set_terminated(tracker.parent_run_id, "FAILED")
        return 1
    return 0


def _publish(study: Any, settings: _Settings, *, tracked: bool) -> int:
    """Retrain the best trial, save it as a model bundle and (if tracked) log it as an MLflow model."""
    from optuna.trial import TrialState

    from sweep.publish import PublishError, publish_best

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return 0
    k = settings.space.ensemble_top_k
    more = f" (and up to {k - 1} more for the ensemble, if the data has a test set)" if k > 1 else ""
    print(f"retraining the best trial to ship it as a model{more} ...", file=sys.stderr, flush=True)
    started, tty, retrained = time.monotonic(), sys.stderr.isatty(), 0

    def shown(m: Any, epochs: int) -> None:
        nonlocal retrained
        value = f"{settings.space.metric} {format_value(getattr(m, settings.space.metric))}"
        if tty:
            print(f"\r\x1b[K  retraining: epoch {m.epoch}/{epochs} {value}", end="", file=sys.stderr,
                  flush=True)
        elif m.epoch == epochs:  # a log file gets a line per model: a member can take minutes
            retrained += 1
            print(f"  retrained model {retrained} to epoch {epochs}: {value} "
                  f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    try:
        result = publish_best(study, tracking_uri=settings.tracking_uri, out_dir=settings.out_dir,
                              register_name=settings.space.register_model, ensemble_top_k=k,
                              log_model=tracked, on_epoch=shown)
    except PublishError as exc:
        print(f"error: the best model was not published: {exc}", file=sys.stderr)
        return 1
    finally:
        if tty:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
    print(f"retrained and {'logged' if tracked else 'saved'} the best model in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    print(result.summary())
    return 0


def _check_or_record_study(study: Any, created: bool, settings: _Settings) -> None:
    """A resumed study must keep its seed, metric and direction; a new one records them."""
    space = settings.space
    mine = {"study_seed": settings.seed, "metric": space.metric, "direction": space.direction}
    if created:
        study.set_metric_names([space.metric])  # optuna-dashboard shows it instead of "Objective 0"
        for key, value in {**mine, "space_file": str(settings.space_path)}.items():
            study.set_user_attr(key, value)
        return
    attrs = study.user_attrs
    if (direction := study.direction.name.lower()) != space.direction:
        raise UsageError(f"study {settings.study_name!r} exists with direction {direction}, the space says "
                         f"{space.direction}: pass --study-name to start a new study")
    for key, value in mine.items():
        if key in attrs and attrs[key] != value:
            raise UsageError(f"study {settings.study_name!r} was created with {key}={attrs[key]!r}, "
                             f"this run asks for {key}={value!r}: pass --study-name to start a new study")


def _report(study: Any, settings: _Settings) -> int:
    """Print the best trial and write best_config.yaml. Returns the exit code."""
    import yaml
    from optuna.trial import TrialState

    from mixer.bundle import atomic_write
    from mixer.config import dump_run_config
    from sweep.space import split_flat

    out = settings.out_dir
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        print(f"no trial completed ({len(trials)} trials); see {out / 'trials.csv'}", file=sys.stderr)
        return 1
    best = study.best_trial
    doc = dump_run_config(*split_flat(best.user_attrs["config"]), int(best.user_attrs["seed"]))
    score = f"{settings.space.metric} {format_value(best.value)}"
    text = (f"# Best trial {best.number} of study {settings.study_name}: {score}\n"
            f"# Train it again: python -m mixer.train {out / 'best_config.yaml'}\n"
            + yaml.safe_dump(doc, sort_keys=False))
    atomic_write(out / "best_config.yaml", lambda fh: fh.write(text), mode="w")
    print(f"best trial {best.number}: {score}")
    for name, value in best.params.items():
        print(f"  {name}: {value:.6g}" if isinstance(value, float) else f"  {name}: {value}")
    print(f"wrote {out / 'best_config.yaml'} and {out / 'trials.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
