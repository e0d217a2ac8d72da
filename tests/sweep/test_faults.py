"""Faults that used to lose data or end in a traceback: a full disk, a torn journal, bad data, bad
names, an unwritable output folder, and a finished study run again. Each goes through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from mixer.synthetic import synthetic_frame
from sweep.run import main, open_storage
from tests.conftest import ROOT, _missing
from tests.sweep.test_run import write_space

SMALL = """\
study: small
seed: 0
data: {source: synthetic, n_rows: 300}
train: {epochs: 2, dim: 8, depth: 1, batch_size: 64}
sampler: {name: random}
pruner: {name: none}
budget: {n_trials: 3}
params:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""


def _study(out: Path, name: str = "small") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(out / name / "optuna.journal")))


def _finished(study: optuna.Study) -> int:
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def test_a_torn_journal_is_cut_back_with_a_backup_and_the_study_resumes(in_tmp, capsys):
    space = write_space(in_tmp, SMALL)
    assert main([str(space), "--no-tracking", "--n-trials", "2"]) == 0
    journal = in_tmp / "runs" / "small" / "optuna.journal"
    whole = journal.read_bytes()
    with open(journal, "ab") as fh:  # what a failed append on a full disk leaves
        fh.write(b'{"op_code":')
    capsys.readouterr()

    assert main([str(space), "--no-tracking", "--n-trials", "3"]) == 0
    err = capsys.readouterr().err
    assert "torn record (11 bytes" in err
    backups = list(journal.parent.glob("optuna.journal.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == whole + b'{"op_code":'
    assert _finished(_study(in_tmp / "runs")) == 3


def test_a_whole_line_that_is_not_a_record_counts_as_torn(in_tmp, capsys):
    space = write_space(in_tmp, SMALL)
    assert main([str(space), "--no-tracking", "--n-trials", "1"]) == 0
    journal = in_tmp / "runs" / "small" / "optuna.journal"
    with open(journal, "ab") as fh:
        fh.write(b'{"op_code": 5, "trial_id"\n')
    assert main([str(space), "--no-tracking", "--n-trials", "2"]) == 0
    assert "torn record" in capsys.readouterr().err
    assert _finished(_study(in_tmp / "runs")) == 2


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 4 MiB tmpfs (CI runs as root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        _missing(f"cannot mount a tmpfs for the disk-full test: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.faults
def test_a_disk_that_fills_mid_study_ends_it_with_exit_1_and_a_journal_that_resumes(tmp_path, small_disk):
    space = write_space(tmp_path, SMALL.replace("n_trials: 3", "n_trials: 400"))
    out = small_disk / "runs"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "sweep.run", str(space), "--no-tracking", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    journal = out / "small" / "optuna.journal"
    deadline = time.monotonic() + 120
    while not (journal.is_file() and journal.stat().st_size > 2000):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the study did not start"
        time.sleep(0.05)
    filler = _fill(small_disk)  # every free byte: the journal's next appends fail
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "no space left on the device of" in err and str(out) in err and "MiB free" in err
    assert "Traceback" not in err

    filler.unlink()
    done = subprocess.run([*cmd, "--n-trials", str(_finished(_study(out)) + 2)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    study = _study(out)
    assert all(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    # The trial the full disk interrupted was failed and run again.
    assert any(t.user_attrs.get("status") == "lost" for t in study.get_trials(deepcopy=False))


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


@pytest.mark.faults
def test_a_full_disk_under_a_local_mlflow_store_gives_a_few_lines_and_exit_1(tmp_path, small_disk):
    space = write_space(tmp_path, SMALL.replace("n_trials: 3", "n_trials: 60"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    store = f"sqlite:///{small_disk / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "sweep.run", str(space), "--out", str(tmp_path / "runs"),
                             "--tracking-uri", store], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "runs" / "small" / "optuna.journal"
    deadline = time.monotonic() + 120
    while not (journal.is_file() and b'"state":1' in journal.read_bytes()):  # a trial completed
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no trial completed"
        time.sleep(0.1)
    _fill(small_disk)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and len(err.splitlines()) < 80, err
    assert "could not be delivered" in err


def test_a_bad_csv_row_exits_2_naming_the_row_before_anything_is_created(in_tmp, capsys):
    frame = synthetic_frame(40, seed=0).astype({"sbytes": object})
    frame.loc[7, "sbytes"] = "lots"
    csv = in_tmp / "train.csv"
    frame.to_csv(csv, index=False)
    space = write_space(in_tmp, SMALL.replace("{source: synthetic, n_rows: 300}",
                                              f"{{source: csv, train_csv: {csv}}}"))
    assert main([str(space), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "'sbytes'" in err and "row" in err and str(csv) in err and "Traceback" not in err
    # No storage, no output folder, no MLflow store: the budget is untouched.
    assert sorted(p.name for p in in_tmp.iterdir()) == ["tiny.yaml", "train.csv"]


def test_a_finished_study_run_again_does_nothing_unless_republish(in_tmp, capsys):
    space = write_space(in_tmp, SMALL)
    assert main([str(space), "--no-tracking"]) == 0
    model = in_tmp / "runs" / "small" / "best_model.npz"
    first = model.stat().st_mtime_ns
    capsys.readouterr()

    assert main([str(space), "--no-tracking"]) == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err and "--republish" in err
    assert model.stat().st_mtime_ns == first

    assert main([str(space), "--no-tracking", "--republish"]) == 0
    assert "retraining the best trial" in capsys.readouterr().err
    assert model.stat().st_mtime_ns != first


def test_a_300_character_study_name_is_refused_with_exit_2(in_tmp, capsys):
    space = write_space(in_tmp, SMALL)
    assert main([str(space), "--no-tracking", "--study-name", "x" * 300]) == 2
    err = capsys.readouterr().err
    assert "--study-name" in err and "Traceback" not in err and len(err) < 400
    assert not (in_tmp / "runs").exists()


def test_an_unwritable_out_is_refused_before_the_tracking_store_is_created(in_tmp, capsys):
    space = write_space(in_tmp, SMALL)
    blocker = in_tmp / "a-file"
    blocker.write_text("not a folder")
    assert main([str(space), "--out", str(blocker / "runs")]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (in_tmp / "mlflow.db").exists()


def test_a_report_that_cannot_be_written_exits_1_and_fails_the_parent_run(in_tmp, capsys, monkeypatch):
    import errno

    from mlflow import MlflowClient

    import sweep.report

    def full(study, out_dir):
        raise sweep.report.ReportWriteError(f"cannot write the study's files in {out_dir}: "
                                            f"{os.strerror(errno.ENOSPC)}")

    monkeypatch.setattr(sweep.report, "write_study_files", full)
    space = write_space(in_tmp, SMALL)
    assert main([str(space), "--n-trials", "2"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    parent = _study(in_tmp / "runs").user_attrs["mlflow_parent_run_id"]
    store = f"sqlite:///{in_tmp / 'mlflow.db'}"
    assert MlflowClient(store).get_run(parent).info.status == "FAILED"


def test_tracking_warnings_reach_the_terminal_through_the_progress_handler(capsys):
    """sweep.run installs this handler on the root logger beside sweep.log's (tests/sweep/
    test_tracking.py covers the outages that log these warnings)."""
    import logging

    from sweep.progress import Progress

    progress = Progress(sys.stderr, study="small", total=1, metric="val_loss", direction="minimize",
                        tty=False)
    root = logging.getLogger()
    handler = progress.warnings_handler()
    root.addHandler(handler)
    try:
        logging.getLogger("sweep.tracking").warning("MLflow tracking at %s unavailable; %d points waiting",
                                                     "http://127.0.0.1:9", 5)
        logging.getLogger("sweep.objective").warning("not for the terminal")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "warning: MLflow tracking at http://127.0.0.1:9 unavailable; 5 points waiting" in err
    assert "not for the terminal" not in err


def test_a_new_local_mlflow_store_prints_no_mlflow_log_lines_on_the_terminal(tmp_path):
    space = write_space(tmp_path, SMALL)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "sweep.run", str(space), "--n-trials", "1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mlflow.db").is_file()
    assert "INFO mlflow" not in done.stderr and "Updating database tables" not in done.stderr, done.stderr
