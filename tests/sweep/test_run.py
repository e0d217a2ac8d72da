"""The command ``python -m sweep.run``: validation, a whole study, resume, workers, storages, tracking."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest

from mixer.config import load_run_config
from mixer.data import load
from mixer.train import fit
from sweep.objective import trial_seed
from sweep.run import budget_used, main, open_storage, open_study, run_trials
from sweep.space import load_space

ROOT = Path(__file__).resolve().parents[2]
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

# Tiny synthetic study; the percentile pruner at 1 % prunes every trial that is not the best so far
# at some epoch, so pruning is certain once the lr range includes hopeless values.
TINY = """\
study: tiny
seed: 0
data: {source: synthetic, n_rows: 300}
train: {epochs: 3, dim: 8, depth: 1, batch_size: 64}
sampler: {name: tpe, options: {n_startup_trials: 3}}
pruner: {name: percentile, options: {percentile: 1.0, n_startup_trials: 1, n_warmup_steps: 0}}
budget: {n_trials: 6}
params:
  lr: {type: float, low: 1.0e-5, high: 0.05, log: true}
  eta_min: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
  patch_size: {type: categorical, choices: [7, 14]}
  scheduler: {type: categorical, choices: [constant, cosine, cosine_warm_restarts]}
  t_0: {type: int, low: 1, high: 2, when: {scheduler: cosine_warm_restarts}}
"""


def write_space(folder: Path, text: str = TINY, name: str = "tiny.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def journal_study(out: Path, name: str = "tiny") -> optuna.Study:
    storage = open_storage(str(out / name / "optuna.journal"), rdb=False)
    return optuna.load_study(study_name=name, storage=storage)


def curves(study: optuna.Study) -> list[list[float]]:
    return [[h["val_loss"] for h in t.user_attrs["history"]] for t in study.trials]


# ------------------------------------------------------------------------------------ usage, errors


def test_help_explains_every_flag(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--n-trials", "--timeout", "--workers", "--storage", "--study-name", "--tracking-uri",
                 "--out", "--seed", "--no-tracking"):
        assert flag in text
    assert "--worker-of" not in text


BAD = [
    ("params.patch_size.choices[1]", TINY.replace("choices: [7, 14]", "choices: [7, 5]")),
    ("params.lr.low", TINY.replace("low: 1.0e-5, high: 0.05", "low: 0.05, high: 1.0e-5")),
    ("params.t_0.when.scheduler", TINY.replace("when: {scheduler: cosine_warm_restarts}",
                                               "when: {scheduler: warm}")),
    ("train.dim", TINY.replace("dim: 8", "dim: 0")),
    ("sampler.options.n_startup", TINY.replace("n_startup_trials: 3", "n_startup: 3")),
]


@pytest.mark.parametrize("key, text", BAD, ids=[b[0] for b in BAD])
def test_bad_space_exits_2_naming_file_and_key_and_creates_nothing(in_tmp, capsys, key, text):
    path = write_space(in_tmp, text, name="bad.yaml")
    before = set(os.listdir(in_tmp))
    assert main([str(path)]) == 2  # tracking on: not even the MLflow store may appear
    err = capsys.readouterr().err
    assert f"{path}: {key}" in err and "Traceback" not in err
    assert set(os.listdir(in_tmp)) == before


def test_bad_space_exit_code_and_message_from_the_real_command(in_tmp):
    path = write_space(in_tmp, BAD[0][1], name="bad.yaml")
    proc = subprocess.run([sys.executable, "-m", "sweep.run", str(path), "--out", "out"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{path}: params.patch_size.choices[1]" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(in_tmp)) == ["bad.yaml"]


def test_unreachable_tracking_server_exits_2_naming_it_before_any_study(in_tmp, capsys):
    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    assert main([str(write_space(in_tmp)), "--tracking-uri", uri, "--out", "out"]) == 2
    assert uri in capsys.readouterr().err
    assert not (in_tmp / "out").exists()


def test_a_budget_is_required(in_tmp, capsys):
    path = write_space(in_tmp, TINY.replace("budget: {n_trials: 6}\n", ""))
    assert main([str(path), "--no-tracking"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main([str(path), "--no-tracking", "--n-trials", "1", "--out", "out"]) == 0


# ------------------------------------------------------------------------------------ a whole study


def test_study_end_to_end_prunes_writes_best_config_that_trains_to_the_same_value(in_tmp, capsys):
    path = write_space(in_tmp)
    assert main([str(path), "--no-tracking", "--out", "out"]) == 0
    captured = capsys.readouterr()
    study = journal_study(in_tmp / "out")
    states = [t.state for t in study.trials]
    assert len(states) == 6 and all(s in DONE for s in states)
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.user_attrs["pruned_epoch"] == len(t.user_attrs["history"]) < 3 for t in pruned)
    # progress: a line per finished trial (stderr is not a terminal here), the best on stdout
    assert captured.err.count("trial ") >= 6 and "6/6 trials" in captured.err
    assert f"best trial {study.best_trial.number}" in captured.out

    out = in_tmp / "out" / "tiny"
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6 and "params_lr" in rows[0] and "user_attrs_history" not in rows[0]
    assert (out / "plots" / "optimization_history.png").is_file()
    data_config, config, seed = load_run_config(out / "best_config.yaml")
    assert seed == study.best_trial.user_attrs["seed"]
    result = fit(config, load(data_config), seed=seed)
    assert min(m.val_loss for m in result.history) == study.best_value


def test_diverged_trials_fail_with_their_reason_and_the_study_goes_on(in_tmp, capsys):
    text = TINY.replace("  lr: {type: float, low: 1.0e-5, high: 0.05, log: true}",
                        "  lr: {type: categorical, choices: [1.0e+6, 1.0e+7]}")
    path = write_space(in_tmp, text)
    assert main([str(path), "--no-tracking", "--out", "out", "--n-trials", "3"]) == 1  # nothing completed
    err = capsys.readouterr().err
    study = journal_study(in_tmp / "out")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 3
    for t in study.trials:
        assert t.user_attrs["status"] == "diverged" and "nan" in t.user_attrs["reason"]
        assert f"trial {t.number} failed: diverged: {t.user_attrs['reason']}" in err
    assert "no trial completed" in err
    log = (in_tmp / "out" / "tiny" / "sweep.log").read_text()
    assert "trial 2 failed (diverged)" in log


def test_timeout_alone_bounds_the_study(in_tmp):
    path = write_space(in_tmp, TINY.replace("budget: {n_trials: 6}\n", "budget: {timeout: 0.5}\n"))
    started = time.monotonic()
    assert main([str(path), "--no-tracking", "--out", "out"]) == 0
    assert time.monotonic() - started < 30
    assert 1 <= len(journal_study(in_tmp / "out").trials)


def test_grid_study_stops_when_the_grid_is_done(in_tmp):
    text = TINY.replace("sampler: {name: tpe, options: {n_startup_trials: 3}}", "sampler: grid").replace(
        "  lr: {type: float, low: 1.0e-5, high: 0.05, log: true}\n"
        "  eta_min: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}\n", "").replace(
        "  scheduler: {type: categorical, choices: [constant, cosine, cosine_warm_restarts]}\n"
        "  t_0: {type: int, low: 1, high: 2, when: {scheduler: cosine_warm_restarts}}\n", "")
    path = write_space(in_tmp, text)
    assert main([str(path), "--no-tracking", "--out", "out", "--n-trials", "10"]) == 0
    trials = journal_study(in_tmp / "out").trials
    assert sorted(t.params["patch_size"] for t in trials) == [7, 14]


def test_progress_on_a_terminal_rewrites_one_line_and_prints_failures_above_it():
    import io
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from sweep.progress import Progress

    stream = io.StringIO()
    progress = Progress(stream, study="s", total=3, metric="val_loss", direction="minimize", tty=True)
    done = SimpleNamespace(number=0, state=TrialState.COMPLETE, value=0.5, user_attrs={"status": "completed"})
    failed = SimpleNamespace(number=1, state=TrialState.FAIL, value=None,
                             user_attrs={"status": "diverged", "reason": "loss is nan"})
    progress.update([done])
    progress.update([done, failed])
    progress.close()
    text = stream.getvalue()
    assert "\r\x1b[K" in text
    assert "trial 1 failed: diverged: loss is nan\n" in text
    last = text.rsplit("\r\x1b[K", 1)[1]
    assert "2/3 trials" in last and "1 completed" in last and "1 failed" in last and "0.5 (trial 0)" in last


def test_command_line_overrides_the_file(in_tmp):
    path = write_space(in_tmp)
    assert main([str(path), "--no-tracking", "--out", "o", "--n-trials", "2", "--study-name", "other",
                 "--seed", "5"]) == 0
    study = journal_study(in_tmp / "o", "other")
    assert len(study.trials) == 2
    assert study.trials[1].user_attrs["seed"] == trial_seed(5, 1)
    assert study.user_attrs["study_seed"] == 5


def test_storage_may_be_a_journal_file_elsewhere(in_tmp):
    path = write_space(in_tmp)
    assert main([str(path), "--no-tracking", "--out", "o", "--n-trials", "2",
                 "--storage", "shared/study.journal"]) == 0
    assert not (in_tmp / "o" / "tiny" / "optuna.journal").exists()
    study = optuna.load_study(study_name="tiny",
                              storage=open_storage(str(in_tmp / "shared" / "study.journal"), rdb=False))
    assert len(study.trials) == 2
    assert (in_tmp / "o" / "tiny" / "best_config.yaml").is_file()


def test_same_seed_same_parameters_and_curves_other_seed_other_parameters(in_tmp):
    path = write_space(in_tmp)
    for out, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main([str(path), "--no-tracking", "--out", out, "--seed", seed, "--n-trials", "4"]) == 0
    a, b, c = (journal_study(in_tmp / out) for out in "abc")
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert curves(a) == curves(b)
    assert [t.state for t in a.trials] == [t.state for t in b.trials]
    assert [t.params for t in a.trials] != [t.params for t in c.trials]


def test_resume_adds_only_the_missing_trials(in_tmp):
    path = write_space(in_tmp)
    assert main([str(path), "--no-tracking", "--out", "out", "--n-trials", "3"]) == 0
    first = journal_study(in_tmp / "out").trials
    assert main([str(path), "--no-tracking", "--out", "out", "--n-trials", "5"]) == 0
    assert main([str(path), "--no-tracking", "--out", "out", "--n-trials", "5"]) == 0  # nothing left
    trials = journal_study(in_tmp / "out").trials
    assert len(trials) == 5
    assert [(t.number, t.params, t.datetime_start) for t in trials[:3]] == [
        (t.number, t.params, t.datetime_start) for t in first]


def test_resuming_with_another_seed_is_refused(in_tmp, capsys):
    path = write_space(in_tmp)
    assert main([str(path), "--no-tracking", "--out", "out", "--n-trials", "1"]) == 0
    assert main([str(path), "--no-tracking", "--out", "out", "--seed", "9"]) == 2
    assert "--study-name" in capsys.readouterr().err


def test_ctrl_c_marks_the_trial_failed_and_rerunning_retries_it_with_the_same_seed(in_tmp):
    slow = TINY.replace("n_rows: 300", "n_rows: 1500").replace("epochs: 3", "epochs: 40")
    path = write_space(in_tmp, slow)
    cmd = [sys.executable, "-m", "sweep.run", str(path), "--no-tracking", "--out", "out", "--n-trials", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = in_tmp / "out" / "tiny" / "optuna.journal"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # wait until a trial is mid-way (has reported epochs)
        if journal.is_file() and journal.stat().st_size:
            running = [t for t in journal_study(in_tmp / "out").trials
                       if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values]
            if running:
                break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no trial started running")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Resume with" in err and "Traceback" not in err

    trials = journal_study(in_tmp / "out").trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["status"] == "interrupted"
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == failed[0].params

    assert main(cmd[3:]) == 0
    trials = journal_study(in_tmp / "out").trials
    assert budget_used(trials) == 2
    retried = trials[waiting[0].number]
    assert retried.state in DONE
    assert (retried.params, retried.user_attrs["seed"]) == (failed[0].params, failed[0].user_attrs["seed"])


def test_two_workers_share_the_budget_exactly_with_their_share_of_the_cores(in_tmp):
    # Trials long enough that the first worker cannot run all 8 before the second one has started
    # (finished its imports): on 300 rows it sometimes did.
    path = write_space(in_tmp, TINY.replace("n_rows: 300", "n_rows: 8000"))
    assert main([str(path), "--no-tracking", "--out", "out", "--workers", "2", "--n-trials", "8"]) == 0
    study = journal_study(in_tmp / "out")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == 8 and len(set(numbers)) == 8
    assert all(t.state in DONE for t in study.trials)
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2  # both took part
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for i in range(2):
        log = (in_tmp / "out" / "tiny" / "workers" / socket.gethostname() / f"worker-{i}.log").read_text()
        assert f"OMP_NUM_THREADS={threads} " in log and f"MIXER_NUM_THREADS={threads}" in log


# ------------------------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_workers_on_postgres_finish_the_same_budget(in_tmp, postgres_url):
    path = write_space(in_tmp)
    assert main([str(path), "--no-tracking", "--out", "out", "--workers", "2", "--n-trials", "6",
                 "--storage", postgres_url]) == 0
    study = optuna.load_study(study_name="tiny", storage=open_storage(postgres_url, rdb=True))
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state in DONE for t in study.trials)
    assert not (in_tmp / "out" / "tiny" / "optuna.journal").exists()


@pytest.mark.postgres
def test_workers_starting_at_once_create_one_study(postgres_url):
    results, errors = [], []

    def start():
        try:
            storage = open_storage(postgres_url, rdb=True)
            study, created = open_study(storage, "race", direction="minimize", sampler=None, pruner=None)
            results.append((study.study_name, created))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert optuna.get_all_study_names(open_storage(postgres_url)) == ["race"]
    assert sum(created for _, created in results) == 1


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test plays the dead worker with ask()
def test_a_trial_whose_worker_died_is_failed_and_retried_with_its_parameters(postgres_url):
    from sweep.objective import Interrupts, Objective

    space = load_space(write_space(Path(os.environ.get("TMPDIR", "/tmp")), name=f"pg{os.getpid()}.yaml"))
    storage = open_storage(postgres_url, rdb=True, heartbeat_interval=1, grace_period=2)
    study, _ = open_study(storage, "dead", direction="minimize", sampler=space.build_sampler(seed=0),
                          pruner=space.build_pruner())
    # A worker asks for a trial, starts it, beats once and dies.
    dead = study.ask()
    space.suggest(dead)
    dead.set_user_attr("seed", 4242)
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3)

    run_trials(study, Objective(space, study_seed=0), n_trials=2, timeout=None, interrupts=Interrupts())
    trials = study.trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state in DONE
    assert retry[0].params == trials[0].params and retry[0].user_attrs["seed"] == 4242
    assert budget_used(trials) == 2


# -------------------------------------------------------------------------------------- tracking


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_tracked_study_has_a_parent_run_and_one_child_run_per_trial(in_tmp, mlflow_server):
    from mlflow import MlflowClient

    path = write_space(in_tmp, TINY + "experiment: tiny-tracked\n")
    assert main([str(path), "--out", "out", "--n-trials", "3", "--tracking-uri", mlflow_server.uri]) == 0
    study = journal_study(in_tmp / "out")
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("tiny-tracked")
    runs = client.search_runs([experiment.experiment_id])
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    children = [r for r in runs if r.info.run_id != parent_id]
    assert len(children) == 3
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    by_id = {r.info.run_id: r for r in children}
    for t in study.trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags.get("mlflow.parentRunId") == parent_id
        assert run.info.status == ("KILLED" if t.state == optuna.trial.TrialState.PRUNED else "FINISHED")
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
            h["val_loss"] for h in t.user_attrs["history"]]


def test_the_best_value_is_printed_with_one_precision_and_the_final_phase_is_timed(in_tmp, capsys):
    import re

    space = write_space(in_tmp)
    assert main([str(space), "--no-tracking", "--n-trials", "3"]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    best = journal_study(in_tmp / "runs").best_value
    shown = {m for m in re.findall(r"val_loss (\d\.\d+)", text) if abs(float(m) - best) < 1e-3}
    assert shown == {f"{best:.6g}"}, text
    assert re.search(r"retrained and saved the best model in \d+ s", captured.err)
    assert re.search(r"study tiny: done in \d+ s", captured.err)


def test_train_csv_flag_trains_every_trial_and_worker_on_that_file(in_tmp, real_csv):
    space = write_space(in_tmp, TINY.replace("n_rows: 300", "n_rows: 300, seed: 0"))
    assert main([str(space), "--no-tracking", "--n-trials", "2", "--workers", "2",
                 "--train-csv", str(real_csv)]) == 0
    trials = journal_study(in_tmp / "runs").get_trials(deepcopy=False)
    assert len(trials) == 2
    assert {(t.user_attrs["config"]["source"], t.user_attrs["config"]["train_csv"]) for t in trials} == {
        ("csv", str(real_csv))}
