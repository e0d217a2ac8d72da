"""ModelBundle: one file holding parameters, Mixer config and fitted pipeline, checked on load."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest

from mixer.bundle import BundleError, ModelBundle, sigmoid
from mixer.config import MixerConfig
from mixer.data import FEATURE_NAMES, Pipeline, read_csv
from mixer.model import init_params

CONFIG = MixerConfig(n_features=42, patch_size=6, dim=8, depth=2)


@pytest.fixture(scope="module")
def rows(real_csv) -> pd.DataFrame:
    return read_csv(real_csv).head(600)


@pytest.fixture(scope="module")
def bundle(rows) -> ModelBundle:
    pipeline = Pipeline.fit(rows.head(500), scaling="log_standard", source="train rows")
    return ModelBundle(init_params(CONFIG, 3), CONFIG, pipeline, info={"trial_number": 7})


def _rewrite(path, *, meta=None, params=None):
    """Rewrite a saved bundle with its metadata and/or parameters edited (a tampered file)."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    old = json.loads(str(arrays["__bundle__"]))
    if meta is not None:
        arrays["__bundle__"] = np.array(json.dumps(meta(old)))
    if params is not None:
        arrays = params(arrays)
    np.savez(path, **arrays)


def test_saved_bundle_loads_back_to_identical_probabilities(bundle, rows, tmp_path):
    path = bundle.save(tmp_path / "model.npz")
    loaded = ModelBundle.load(path)
    fresh = rows.tail(100)
    before = bundle.predict_proba(fresh, source="fresh rows")
    after = loaded.predict_proba(fresh, source="fresh rows")
    assert np.array_equal(before, after)
    assert loaded.config == bundle.config
    assert loaded.pipeline.feature_names == bundle.pipeline.feature_names
    assert list(loaded.params) == list(bundle.params)
    assert loaded.info == {"trial_number": 7}
    # Not a constant model: the probabilities actually depend on the rows.
    assert before.std() > 1e-3 and ((before > 0) & (before < 1)).all()


def test_bundle_file_holds_no_pickled_object(bundle, tmp_path):
    path = bundle.save(tmp_path / "model.npz")
    with np.load(path, allow_pickle=False) as archive:  # would raise on any object array
        assert all(archive[k].dtype != object for k in archive.files)
        meta = json.loads(str(archive["__bundle__"]))
    assert meta["config"] == dataclasses.asdict(CONFIG)
    assert meta["pipeline"]["feature_names"] == list(bundle.pipeline.feature_names)


def test_probabilities_ignore_id_label_and_attack_cat_columns(bundle, rows):
    full = rows.tail(50).assign(attack_cat="Normal")
    bare = full[list(FEATURE_NAMES)]
    assert np.array_equal(bundle.predict_proba(full, source="a"), bundle.predict_proba(bare, source="b"))


def test_load_names_a_parameter_with_the_wrong_shape(bundle, tmp_path):
    path = bundle.save(tmp_path / "model.npz")
    key = "param/" + next(k for k in bundle.params if bundle.params[k].ndim == 2)

    def shrink(arrays):
        arrays[key] = arrays[key][:, :-1]
        return arrays

    _rewrite(path, params=shrink)
    with pytest.raises(BundleError, match=rf"model\.npz.*{key.removeprefix('param/')!r}.*shape"):
        ModelBundle.load(path)


def test_load_names_a_missing_parameter(bundle, tmp_path):
    path = bundle.save(tmp_path / "model.npz")
    victim = list(bundle.params)[-1]

    def drop(arrays):
        del arrays["param/" + victim]
        return arrays

    _rewrite(path, params=drop)
    with pytest.raises(BundleError, match=rf"{victim!r} is missing"):
        ModelBundle.load(path)


def test_load_names_a_pipeline_that_disagrees_with_the_config(bundle, tmp_path):
    path = bundle.save(tmp_path / "model.npz")

    def drop_two_features(meta):
        p = meta["pipeline"]
        p["feature_names"] = p["feature_names"][:40]
        p["mean"], p["std"] = p["mean"][:40], p["std"][:40]
        p["categories"] = {k: v for k, v in p["categories"].items() if k in p["feature_names"]}
        return meta

    _rewrite(path, meta=drop_two_features)
    with pytest.raises(BundleError, match=r"n_features=42 but the pipeline produces 40 features"):
        ModelBundle.load(path)


def test_load_names_a_config_that_disagrees_with_the_parameters(bundle, tmp_path):
    path = bundle.save(tmp_path / "model.npz")

    def deeper(meta):
        meta["config"]["depth"] = 3
        return meta

    _rewrite(path, meta=deeper)
    with pytest.raises(BundleError, match=r"parameter 'blocks\.2\..*' is missing"):
        ModelBundle.load(path)


def test_save_refuses_parameters_of_another_config(bundle, tmp_path):
    other = dataclasses.replace(bundle, config=dataclasses.replace(CONFIG, dim=12))
    with pytest.raises(BundleError, match="shape"):
        other.save(tmp_path / "model.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"not an archive", b""])
def test_load_rejects_a_file_that_is_not_a_bundle(tmp_path, content):
    path = tmp_path / "model.npz"
    path.write_bytes(content)
    with pytest.raises(BundleError, match="model.npz: not a model bundle"):
        ModelBundle.load(path)


@pytest.mark.parametrize(("damage", "message"), [("truncated", "not a model bundle"),
                                                 ("flipped", "corrupt or truncated model file")])
def test_load_names_a_truncated_or_corrupt_file(bundle, tmp_path, damage, message):
    path = bundle.save(tmp_path / "model.npz")
    blob = bytearray(path.read_bytes())
    if damage == "truncated":  # the zip directory at the end is gone
        blob = blob[: len(blob) // 2]
    else:  # a byte inside the parameters' data: the directory is intact, the CRC check fails on reading
        blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=f"model.npz: {message}"):
        ModelBundle.load(path)


def test_load_names_a_directory_as_a_directory(tmp_path):
    with pytest.raises(BundleError, match=f"^{tmp_path}: is a directory, not a model file$"):
        ModelBundle.load(tmp_path)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask-022", "umask-077", "umask-002"])
def test_saved_file_mode_follows_the_umask_as_open_does(bundle, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = bundle.save(tmp_path / "model.npz")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(BundleError, match="nowhere.npz: model file not found"):
        ModelBundle.load(tmp_path / "nowhere.npz")


def test_failed_save_leaves_the_previous_file_intact(bundle, tmp_path, monkeypatch):
    path = bundle.save(tmp_path / "model.npz")
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    changed = dataclasses.replace(bundle, info={"trial_number": 8})
    with pytest.raises(OSError, match="disk full"):
        changed.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary file left behind


def test_sigmoid_is_stable_for_extreme_logits():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = sigmoid(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]))
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == 0.5
    assert np.all(np.diff(out) >= 0)
