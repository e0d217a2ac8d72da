from __future__ import annotations

import numpy as np
import pytest

from mixer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mixer.config import MixerConfig, TrainConfig
from mixer.model import init_params

CONFIG = TrainConfig(model=MixerConfig(patch_size=7, dim=8, depth=2), lr=0.01)


def test_round_trip_keeps_params_config_and_optimizer_state(tmp_path):
    params = init_params(CONFIG.model, 0)
    state = {"m.embed.w": np.ones(3, np.float32), "step": np.array(4)}
    path = save_checkpoint(tmp_path / "ck.npz", params, CONFIG, optimizer_state=state, extra={"epoch": 3})
    back = load_checkpoint(path)
    assert back.config == CONFIG and back.extra == {"epoch": 3}
    assert list(back.params) == list(params)
    for key in params:
        np.testing.assert_array_equal(back.params[key], params[key])
    assert int(back.optimizer_state["step"]) == 4


def test_wrong_shape_names_the_first_mismatched_key(tmp_path):
    params = init_params(CONFIG.model, 0)
    key = next(k for k in params if k.endswith(".w") and params[k].ndim == 2)
    params[key] = params[key][:, :1]
    save_checkpoint(tmp_path / "ck.npz", params, CONFIG)
    with pytest.raises(CheckpointError, match=rf"{key}.*shape"):
        load_checkpoint(tmp_path / "ck.npz")


def test_missing_parameter_is_named(tmp_path):
    params = init_params(CONFIG.model, 0)
    dropped = list(params)[-1]
    del params[dropped]
    save_checkpoint(tmp_path / "ck.npz", params, CONFIG)
    with pytest.raises(CheckpointError, match=rf"{dropped!r} is missing"):
        load_checkpoint(tmp_path / "ck.npz")


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.npz"):
        load_checkpoint(path)
