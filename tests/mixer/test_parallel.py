"""The model's runtime: shards on a thread pool, and the thread count chosen per kind of work."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from mixer import _parallel
from mixer import model as M
from mixer._parallel import PROBES, bounds, fastest, parallel_map
from mixer.config import MixerConfig


@pytest.fixture(autouse=True)
def default_threads_after_each_test():
    yield
    M.set_num_threads(None)


def _map_until_chosen(fn, key, items=8) -> tuple[int, list[int]]:
    """Call parallel_map with ``key`` until a thread count is chosen; (chosen, threads per later call)."""
    calls = 0
    while not any(k[0] == key[0] for k in M.threads_chosen()):
        parallel_map(fn, range(items), key=key)
        calls += 1
        assert calls <= 2 * PROBES + 1, "no thread count chosen after the warm-up and the probes"
    assert calls == 2 * PROBES + 1
    (chosen,) = [v for k, v in M.threads_chosen().items() if k[0] == key[0]]
    used = []
    for _ in range(3):
        names = set()

        def recorded(i, names=names):
            names.add(threading.current_thread().name)
            fn(i)

        parallel_map(recorded, range(items), key=key)
        used.append(len(names))
    return chosen, used


def test_parallel_map_keeps_the_item_order():
    M.set_num_threads(3, adaptive=False)
    assert parallel_map(lambda i: i * i, range(50)) == [i * i for i in range(50)]


def test_bounds_cut_rows_into_near_equal_contiguous_shards():
    assert bounds(50, 16) == [(0, 12), (12, 25), (25, 37), (37, 50)]
    assert bounds(16, 16) == [(0, 16)]
    assert bounds(1, 32) == [(0, 1)]


def test_adaptive_threads_keep_two_where_two_are_faster():
    # sleep releases the GIL, like NumPy's big matmuls: two threads take half the time.
    M.set_num_threads(2)
    chosen, used = _map_until_chosen(lambda i: time.sleep(0.004), ("sleepy",))
    assert chosen == 2
    assert max(used) == 2


def test_adaptive_threads_fall_back_to_one_where_more_are_slower():
    # Items are slow off the calling thread, as a small model's shards are when two threads
    # pass the GIL back and forth: one thread is faster.
    def work(i):
        time.sleep(0.002 if threading.current_thread() is threading.main_thread() else 0.06)

    M.set_num_threads(2)
    chosen, used = _map_until_chosen(work, ("contended",))
    assert chosen == 1
    assert used == [1, 1, 1]


def test_adaptive_threads_choose_per_work_and_shape_and_not_when_told_not_to():
    small = MixerConfig(n_features=6, patch_size=2, dim=8, depth=2)
    other = MixerConfig(n_features=6, patch_size=2, dim=12, depth=2)
    x = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    y = np.arange(64) % 2
    M.set_num_threads(2)
    params = M.init_params(small, 0)
    expected = M.loss_and_grads(params, x, y, small)
    for _ in range(2 * PROBES + 1):
        loss, grads = M.loss_and_grads(params, x, y, small)
        assert loss == expected[0]
        assert all(np.array_equal(grads[k], expected[1][k]) for k in params)
    (key,) = M.threads_chosen()
    assert key[0] == "train" and key[-2:] == (4, 2)  # 4 shards, ceiling 2
    assert M.threads_chosen()[key] in (1, 2)
    for _ in range(2 * PROBES + 1):  # another shape is another kind of work
        M.loss_and_grads(M.init_params(other, 0), x, y, other)
    for _ in range(2 * PROBES + 1):  # and so is prediction
        M.predict_logits(params, np.tile(x, (2, 1)), small)
    assert sorted(k[0] for k in M.threads_chosen()) == ["predict", "train", "train"]
    M.set_num_threads(2, adaptive=False)  # forgets the choices and stops choosing
    assert M.threads_chosen() == {}
    for _ in range(2 * PROBES + 1):
        M.loss_and_grads(params, x, y, small)
    assert M.threads_chosen() == {}


def test_fastest_takes_the_lowest_median_and_fewer_threads_on_a_tie():
    assert fastest({1: [3.0, 1.0, 2.0], 2: [1.5, 1.5, 9.0]}) == 2
    assert fastest({1: [1.0, 1.0, 1.0], 2: [1.0, 1.0, 1.0]}) == 1


def test_set_num_threads_rejects_nonsense():
    with pytest.raises(ValueError, match="n=0"):
        M.set_num_threads(0)


def test_mixer_num_threads_sets_the_default_and_is_checked(monkeypatch):
    monkeypatch.setenv("MIXER_NUM_THREADS", "3")
    M.set_num_threads(None)
    assert M.get_num_threads() == 3
    monkeypatch.setenv("MIXER_NUM_THREADS", "many")
    M.set_num_threads(None)
    with pytest.raises(ValueError, match="MIXER_NUM_THREADS must be a positive integer, got 'many'"):
        M.get_num_threads()


@pytest.mark.parametrize(("version", "files", "expected"), [
    ("v2", {"cpu.max": "200000 100000\n"}, 2),
    ("v2", {"cpu.max": "150000 100000\n"}, 2),         # 1.5 CPUs: rounded up
    ("v2", {"cpu.max": "20000 100000\n"}, 1),          # a fifth of a CPU: still one thread
    ("v2", {"cpu.max": "max 100000\n"}, 8),            # no quota: the affinity
    ("v1", {"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ("v1", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),
    ("none", {}, 8),                                    # no cgroup files at all
    ("garbage", {"cpu.max": "nonsense\n"}, 8),
])
def test_default_threads_are_capped_by_the_containers_cpu_quota(tmp_path, monkeypatch, version, files,
                                                                 expected):
    # `cpus: 2` in docker-compose.yml on an 8-core host: the affinity still shows all 8 cores.
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(_parallel, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("MIXER_NUM_THREADS", raising=False)
    M.set_num_threads(None)
    assert M.get_num_threads() == expected


def test_mixer_num_threads_wins_over_the_cpu_quota(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    monkeypatch.setattr(_parallel, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setenv("MIXER_NUM_THREADS", "2")
    M.set_num_threads(None)
    assert M.get_num_threads() == 2
