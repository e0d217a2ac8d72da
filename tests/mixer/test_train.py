from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import mixer.model
from mixer.config import DataConfig, MixerConfig, TrainConfig, dump_run_config
from mixer.data import load
from mixer.train import fit, main, probe_size

TINY = TrainConfig(model=MixerConfig(n_features=42, patch_size=6, dim=16, depth=2, dropout=0.1,
                                     stochastic_depth=0.1),
                   epochs=3, batch_size=32, lr=3e-3)


@pytest.fixture(scope="module")
def data():
    return load(DataConfig(n_rows=800, seed=0))


def _curves(result):
    return [{k: v for k, v in m.as_dict().items() if not k.endswith("seconds")} for m in result.history]


def test_same_seed_gives_a_bit_identical_history(data):
    assert _curves(fit(TINY, data, seed=5)) == _curves(fit(TINY, data, seed=5))


def test_other_seed_gives_another_history(data):
    assert _curves(fit(TINY, data, seed=5)) != _curves(fit(TINY, data, seed=6))


def test_history_has_every_metric_per_epoch(data):
    result = fit(TINY, data, seed=0)
    assert result.status == "completed" and result.reason is None
    assert [m.epoch for m in result.history] == [1, 2, 3]
    for m in result.history:
        assert 0 <= m.val_accuracy <= 1 and 0 <= m.val_f1 <= 1
        assert m.grad_norm_max >= m.grad_norm_mean > 0
        assert m.update_ratio > 0 and m.epoch_seconds > 0
        assert m.hessian_min_eig is None  # no probe unless curvature_every > 0


def test_best_params_are_those_of_the_best_epoch(data):
    result = fit(TINY, data, seed=1)
    best = min(result.history, key=lambda m: m.val_loss)
    assert result.best_epoch == best.epoch
    logits = mixer.model.predict_logits(result.best_params, data.x_val, TINY.model)
    y = data.y_val
    loss = np.mean(y * np.logaddexp(0, -logits.astype(np.float64))
                   + (1 - y) * np.logaddexp(0, logits.astype(np.float64)))
    assert loss == pytest.approx(best.val_loss, rel=1e-6)


def test_callback_can_stop_the_run(data):
    seen = []
    result = fit(TINY, data, seed=0, on_epoch=lambda m: seen.append(m.epoch) or m.epoch == 2)
    assert seen == [1, 2] and result.status == "stopped" and len(result.history) == 2
    assert "epoch 2" in result.reason


def test_non_finite_loss_ends_as_diverged_not_a_traceback(data, monkeypatch):
    real = mixer.model.loss_and_grads
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, grads = real(*args, **kwargs)
        return (float("nan") if calls["n"] > 30 else loss), grads

    monkeypatch.setattr(mixer.model, "loss_and_grads", poisoned)
    result = fit(TINY, data, seed=0)
    assert result.status == "diverged" and "nan" in result.reason
    assert len(result.history) == 1  # 640 rows / 32 = 20 steps per epoch: step 31 is in epoch 2


def test_learning_rate_follows_the_schedule(data):
    # warmup epoch 1 reaches lr; then cosine over t_max=2 epochs: lr, midpoint; then the floor.
    config = dataclasses.replace(TINY, scheduler="cosine", warmup_epochs=1, t_max=2, epochs=4, eta_min=1e-4)
    lrs = [m.lr for m in fit(config, data, seed=0).history]
    assert lrs == pytest.approx([3e-3, 3e-3, (3e-3 + 1e-4) / 2, 1e-4])


def test_learns_the_synthetic_data(data):
    config = dataclasses.replace(TINY, epochs=8, model=dataclasses.replace(TINY.model, dropout=0.0,
                                                                          stochastic_depth=0.0))
    history = fit(config, data, seed=0).history
    assert history[-1].train_loss < 0.8 * history[0].train_loss
    assert max(m.val_accuracy for m in history) > 0.75


def test_curvature_probe_runs_every_k_epochs_and_is_timed_apart(data):
    config = dataclasses.replace(TINY, curvature_every=2, curvature_batch=64, curvature_iters=5)
    history = fit(config, data, seed=0).history
    assert [m.hessian_max_eig is not None for m in history] == [False, True, False]
    probed = history[1]
    assert probed.hessian_max_eig >= probed.hessian_min_eig and probed.curvature_seconds > 0


# No dropout and a learning rate that cannot move the weights: the train loss is flat from epoch 2.
STALLING = dataclasses.replace(TINY, epochs=7, lr=1e-9, curvature_batch=64, curvature_iters=6,
                               model=dataclasses.replace(TINY.model, dropout=0.0, stochastic_depth=0.0))


def probed(history):
    return [m.epoch for m in history if m.hessian_max_eig is not None]


@pytest.mark.parametrize("on_plateau, at_end, expected", [
    (True, True, [5, 7]),    # epochs 2..5 flat: the plateau rule's 4 epochs are reached at 5
    (True, False, [5]),
    (False, True, [7]),
    (False, False, []),      # curvature_every 0 and both switches off: no probe at all
])
def test_fit_probes_where_training_stalls_and_at_the_last_epoch(data, on_plateau, at_end, expected):
    config = dataclasses.replace(STALLING, curvature_on_plateau=on_plateau, curvature_at_end=at_end)
    result = fit(config, data, seed=0)
    assert probed(result.history) == expected
    assert sorted(result.probes) == expected
    assert (result.probe_batch is None) == (not expected)
    for m in result.history:
        if m.epoch in expected:
            assert 0 <= m.neg_curvature_share <= 1 and 4 <= m.lanczos_steps <= 6
            assert m.curvature_seconds > 0
            assert m.hessian_min_eig == result.probes[m.epoch].lambda_min
    if len(expected) == 2:  # the second probe starts from the first one's Ritz vectors; same point
        first, second = (result.probes[e] for e in expected)
        assert second.lambda_max == pytest.approx(first.lambda_max, rel=1e-2)


def test_the_probe_batch_is_at_most_2_percent_of_the_training_rows(data):
    default = TrainConfig()
    assert probe_size(default, 16_000) == default.curvature_batch == 256  # the headline's training rows
    assert probe_size(default, 3_200) == 64  # the default study's
    assert probe_size(default, 640) == 32 and probe_size(default, 20) == 20
    config = dataclasses.replace(STALLING, curvature_every=7)
    assert len(fit(config, data, seed=0).probe_batch[0]) == probe_size(config, len(data.x_train)) == 32


def test_a_run_stopped_by_its_callback_gets_no_end_probe(data):
    config = dataclasses.replace(STALLING, curvature_at_end=True)
    result = fit(config, data, seed=0, on_epoch=lambda m: m.epoch == 3)
    assert result.status == "stopped" and probed(result.history) == []


def test_a_probe_at_clear_negative_curvature_tries_the_escape_step(data):
    config = dataclasses.replace(STALLING, epochs=2, curvature_every=1, curvature_iters=12)
    history = fit(config, data, seed=0).history
    for m in history:
        tried = m.hessian_min_eig < 0 and m.neg_curvature_ratio >= 0.05
        assert (m.escape_gain is not None) == tried
    assert any(m.escape_gain is not None for m in history)  # this tiny model has clear negative curvature


def test_cli_trains_a_config_and_prints_a_line_per_epoch(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(dump_run_config(DataConfig(n_rows=300), TINY, 0)))
    assert main([str(path), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "best epoch" in out


def test_cli_trains_a_hand_written_config_with_lr_in_exponent_notation(tmp_path, capsys):
    # PyYAML alone reads "1e-4" as a string, and TrainConfig then fails comparing it with 0.
    path = tmp_path / "run.yaml"
    path.write_text("data: {n_rows: 300}\n"
                    "train: {epochs: 1, lr: 1e-4, eta_min: 1e-5, dim: 8, depth: 1, patch_size: 6}\n"
                    "seed: 0\n")
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "lr 1.00e-04" in out


def test_cli_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("train: {patch_size: 5}\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "patch_size" in err


def test_python_dash_m_mixer_train_runs_without_runpy_warnings():
    # The package must not import mixer.train itself, or `python -m mixer.train` loads it twice
    # and runpy prints a RuntimeWarning to every user.
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "mixer.train", "--help"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr and "usage:" in proc.stdout


def test_sam_changes_the_run_reproducibly_and_leaves_the_shuffling_alone(data):
    sam = dataclasses.replace(TINY, sam_rho=0.05)
    first, again, plain = fit(sam, data, seed=2), fit(sam, data, seed=2), fit(TINY, data, seed=2)
    assert _curves(first) == _curves(again)
    assert first.status == "completed"
    assert [m.val_loss for m in first.history] != [m.val_loss for m in plain.history]
    # Step 1's loss is taken at the same weights on the same batch before SAM moves anything.
    one_step = dataclasses.replace(TINY, epochs=1, batch_size=len(data.x_train))
    assert (fit(dataclasses.replace(one_step, sam_rho=0.05), data, seed=2).history[0].train_loss
            == fit(one_step, data, seed=2).history[0].train_loss)


def test_label_smoothing_trains_on_soft_targets_and_scores_validation_on_the_plain_labels(data):
    smooth = dataclasses.replace(TINY, label_smoothing=0.2)
    result = fit(smooth, data, seed=3)
    assert [m.train_loss for m in result.history] != [m.train_loss for m in fit(TINY, data, seed=3).history]
    logits = mixer.model.predict_logits(result.params, data.x_val, TINY.model).astype(np.float64)
    y = data.y_val
    plain = np.mean(y * np.logaddexp(0, -logits) + (1 - y) * np.logaddexp(0, logits))
    assert result.history[-1].val_loss == pytest.approx(plain, rel=1e-6)


def test_a_moving_average_is_what_is_scored_and_returned_and_training_itself_is_unchanged(data):
    averaged = dataclasses.replace(TINY, ema_decay=0.99)
    result, plain = fit(averaged, data, seed=4), fit(TINY, data, seed=4)
    assert [m.train_loss for m in result.history] == [m.train_loss for m in plain.history]
    assert [m.val_loss for m in result.history] != [m.val_loss for m in plain.history]
    # Validation scored the returned weights, and those are not the training weights.
    logits = mixer.model.predict_logits(result.params, data.x_val, TINY.model).astype(np.float64)
    y = data.y_val
    assert result.history[-1].val_loss == pytest.approx(
        np.mean(y * np.logaddexp(0, -logits) + (1 - y) * np.logaddexp(0, logits)), rel=1e-6)
    assert any(not np.array_equal(result.params[k], plain.params[k]) for k in plain.params)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        dataclasses.replace(TINY, ema_decay=1.0)


def test_bins_train_through_fit(data):
    binned = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, bins=8))
    result = fit(binned, data, seed=5)
    assert result.status == "completed"
    assert result.params["embed.w"].shape == (16, 6 * 8)
    assert result.history[-1].val_loss < result.history[0].val_loss
