"""The whole Mixer: gradient checks, initialisation, dtypes, eval path, threads, and torch parity."""

from __future__ import annotations

import functools
import math
import threading
import time

import numpy as np
import pytest

from mixer import layers as L
from mixer import model as M
from mixer.config import MixerConfig


def rel_error(a: np.ndarray, b: np.ndarray, *, scale: float = 0.0) -> float:
    """Largest difference relative to the largest magnitude, or to ``scale`` if that is larger.

    Some gradients are exactly zero: a token-mixing fc2 bias adds a constant across channels,
    which the next LayerNorm removes. Those are compared against 1% of the model's largest
    gradient (``scale``) instead of against their own rounding noise.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-12, scale, np.max(np.abs(a)), np.max(np.abs(b))))


def grad_scale(grads: dict[str, np.ndarray]) -> float:
    return 0.01 * max(float(np.max(np.abs(g))) for g in grads.values())


def batch(config: MixerConfig, n: int, seed: int = 0, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, config.n_features)).astype(dtype)
    y = np.arange(n) % 2  # both classes, whatever n
    return x, rng.permutation(y)


# Tiny models covering patch sizes (1 token ... many), depths, both GELUs, pos_weight, and
# dropout + drop-path on. 20 rows: more than one shard (SHARD_ROWS = 16).
GRAD_CASES = {
    "tanh-p2": (MixerConfig(n_features=6, patch_size=2, dim=5, depth=2), False),
    "erf-p3-posw": (MixerConfig(n_features=6, patch_size=3, dim=4, depth=3, gelu="erf",
                                pos_weight=2.5, token_expansion=2.0, channel_expansion=1.5), False),
    "p1-dropout-droppath": (MixerConfig(n_features=4, patch_size=1, dim=4, depth=3, dropout=0.3,
                                        stochastic_depth=0.5, pos_weight=0.7), True),
    "one-token-erf-train": (MixerConfig(n_features=6, patch_size=6, dim=5, depth=1, gelu="erf",
                                        dropout=0.2), True),
    "p2-erf-train-deep": (MixerConfig(n_features=8, patch_size=2, dim=3, depth=4, gelu="erf",
                                      dropout=0.25, stochastic_depth=0.6, pos_weight=3.0,
                                      token_expansion=1.5), True),
    # Drop-path at 0.9 on 3 rows: whole branches skipped, single samples zeroed, subsets gathered.
    "droppath-only-high": (MixerConfig(n_features=4, patch_size=2, dim=3, depth=3,
                                       stochastic_depth=0.9, token_expansion=1.0), True),
}
GRAD_ROWS = {"droppath-only-high": 3}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_model_gradients_match_centred_differences(case):
    config, train = GRAD_CASES[case]
    params = M.init_params(config, seed=3, dtype=np.float64)
    # Non-trivial LayerNorm parameters, so their gradients are exercised away from 1 and 0.
    prng = np.random.default_rng(4)
    for key in params:
        if ".norm." in key or key.startswith("norm."):
            params[key] += 0.3 * prng.standard_normal(params[key].shape)
    x, y = batch(config, GRAD_ROWS.get(case, 20))

    def loss() -> float:
        # Re-seeded for every evaluation: identical dropout and drop-path masks.
        rng = np.random.default_rng(11) if train else None
        return M.loss_and_grads(params, x, y, config, train=train, rng=rng)[0]

    rng = np.random.default_rng(11) if train else None
    value, grads = M.loss_and_grads(params, x, y, config, train=train, rng=rng)
    assert value == loss()
    assert list(grads) == list(params)
    h = 1e-6
    for key, p in params.items():
        numeric = np.zeros_like(p)
        flat = p.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            plus = loss()
            flat[i] = old - h
            minus = loss()
            flat[i] = old
            numeric.reshape(-1)[i] = (plus - minus) / (2 * h)
        assert grads[key].shape == p.shape
        assert rel_error(grads[key], numeric, scale=grad_scale(grads)) < 1e-6, key


def test_drop_path_zeroes_whole_branches_of_some_samples_and_rescales_the_rest():
    # The model skips dropped samples instead of multiplying them by 0 (three code paths: all
    # dropped, one dropped, several gathered). All must equal h + mask * branch(h) / (1 - rate).
    T, D, rate = 3, 5, 0.5
    config = MixerConfig(n_features=6, patch_size=2, dim=D, depth=1)
    wt = M._block_weights(M.init_params(config, 0, dtype=np.float64), 1)[0][0]
    paths = set()
    for seed in range(40):
        b = 1 + seed % 6
        shape3 = (T, b, D)
        h = np.random.default_rng(seed).standard_normal((T * b, D))
        before = h.copy()
        cache = M._residual_forward(h, M._token_mlp_forward, wt, shape3, config, rate,
                                    np.random.default_rng(seed), True)
        full = M._token_mlp_forward(before, wt, shape3, "tanh", 0.0, None, False)[0].reshape(shape3)
        delta = (h - before).reshape(shape3)
        dropped = np.all(delta == 0, axis=(0, 2))
        if cache is None:
            paths.add("all dropped")
            assert dropped.all()
            continue
        paths.add("gathered" if cache[0] is not None else "masked" if dropped.any() else "none dropped")
        np.testing.assert_allclose(delta[:, ~dropped], full[:, ~dropped] / (1 - rate), rtol=1e-12)
    assert paths == {"all dropped", "gathered", "masked", "none dropped"}


def test_training_mode_actually_drops():
    config = MixerConfig(n_features=6, patch_size=2, dim=8, depth=2, dropout=0.3, stochastic_depth=0.3)
    params = M.init_params(config, 0, dtype=np.float64)
    x, y = batch(config, 32)
    eval_loss, _ = M.loss_and_grads(params, x, y, config)
    a, ga = M.loss_and_grads(params, x, y, config, train=True, rng=np.random.default_rng(1))
    b, gb = M.loss_and_grads(params, x, y, config, train=True, rng=np.random.default_rng(1))
    c, _ = M.loss_and_grads(params, x, y, config, train=True, rng=np.random.default_rng(2))
    assert a != eval_loss and c != a
    assert a == b and all(np.array_equal(ga[k], gb[k]) for k in ga)


def test_extreme_logits_give_a_finite_loss_and_gradients():
    config = MixerConfig(n_features=6, patch_size=2, dim=8, depth=1, pos_weight=2.0)
    params = M.init_params(config, 0, dtype=np.float32)
    x, y = batch(config, 8, dtype=np.float32)
    params["head.b"][:] = 0.0
    params["head.w"] *= 1e4  # logits in the thousands, of both signs
    logits = M.predict_logits(params, x, config)
    assert np.abs(logits).max() > 500
    loss, grads = M.loss_and_grads(params, x, y, config)
    assert np.isfinite(loss) and loss > 100
    assert all(np.isfinite(g).all() for g in grads.values())


def test_training_without_rng_is_refused():
    config = MixerConfig(n_features=6, patch_size=2, dim=4, depth=1, dropout=0.1)
    params = M.init_params(config, 0)
    x, y = batch(config, 4)
    with pytest.raises(ValueError, match="rng"):
        M.loss_and_grads(params, x, y, config, train=True)


def test_bad_inputs_are_refused_with_the_shape():
    config = MixerConfig(n_features=6, patch_size=2, dim=4, depth=1)
    params = M.init_params(config, 0)
    with pytest.raises(ValueError, match=r"n_features=6.*\(4, 5\)"):
        M.loss_and_grads(params, np.zeros((4, 5)), np.zeros(4), config)
    with pytest.raises(ValueError, match="y.shape"):
        M.loss_and_grads(params, np.zeros((4, 6)), np.zeros(3), config)
    with pytest.raises(ValueError, match="0 and 1"):
        M.loss_and_grads(params, np.zeros((2, 6)), np.array([0, 2]), config)


def test_same_seed_same_params_other_seed_other_params():
    config = MixerConfig(n_features=6, patch_size=2, dim=8, depth=2)
    a, b, c = M.init_params(config, 5), M.init_params(config, 5), M.init_params(config, 6)
    assert list(a) == list(b) == list(c)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not np.array_equal(a[k], c[k]) for k in a if ".norm." not in k and not k.startswith("norm."))
    # float32 and float64 of one seed are the same draws.
    d = M.init_params(config, 5, dtype=np.float64)
    assert all(np.array_equal(a[k], d[k].astype(np.float32)) for k in a)


def test_init_follows_torch_linear_and_layernorm_rules():
    config = MixerConfig(n_features=42, patch_size=3, dim=64, depth=2)
    params = M.init_params(config, 0)
    assert list(params)[:4] == ["embed.w", "embed.b", "blocks.0.token.norm.w", "blocks.0.token.norm.b"]
    assert list(params)[-4:] == ["norm.w", "norm.b", "head.w", "head.b"]
    assert params["blocks.1.token.fc1.w"].shape == (config.token_hidden, config.n_tokens)
    assert params["blocks.1.channel.fc2.w"].shape == (config.dim, config.channel_hidden)
    assert sum(p.size for p in params.values()) == M.param_count(config)
    for key, p in params.items():
        assert p.dtype == np.float32
        layer, kind = key.rsplit(".", 1)
        if layer.endswith("norm"):
            np.testing.assert_array_equal(p, 1.0 if kind == "w" else 0.0)
            continue
        fan_in = params[layer + ".w"].shape[1]
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(p).max() <= bound, key
        if p.size >= 50:  # uniform over the whole range, not a narrower one
            assert np.abs(p).max() > 0.9 * bound, key
            assert abs(p.std() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3), key


def test_float32_stays_float32_through_every_op(monkeypatch):
    # Wrap every layer function the model calls and record the dtype of every array in and out:
    # a silent float64 upcast anywhere in the forward or backward pass would show up here.
    seen: set[np.dtype] = set()

    def arrays(obj):
        if isinstance(obj, np.ndarray):
            yield obj
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                yield from arrays(o)

    def spy(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            for a in arrays((args, tuple(kwargs.values()), result)):
                if a.dtype.kind == "f":
                    seen.add(a.dtype)
            return result
        return wrapped

    for name in L.__all__:
        if callable(getattr(L, name)):
            monkeypatch.setattr(L, name, spy(getattr(L, name)))
    config = MixerConfig(n_features=6, patch_size=2, dim=8, depth=2, dropout=0.2, stochastic_depth=0.2,
                         pos_weight=2.0)
    params = M.init_params(config, 0, dtype=np.float32)
    x, y = batch(config, 40, dtype=np.float64)  # float64 data is cast to the params' dtype
    loss, grads = M.loss_and_grads(params, x, y.astype(np.float64), config, train=True,
                                   rng=np.random.default_rng(0))
    logits = M.predict_logits(params, x, config)
    assert seen == {np.dtype(np.float32)}
    assert isinstance(loss, float)
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}
    assert logits.dtype == np.float32


def test_float32_and_float64_agree():
    config = MixerConfig(n_features=6, patch_size=2, dim=8, depth=3, gelu="erf")
    x, y = batch(config, 24)
    l64, g64 = M.loss_and_grads(M.init_params(config, 1, dtype=np.float64), x, y, config)
    l32, g32 = M.loss_and_grads(M.init_params(config, 1, dtype=np.float32), x, y, config)
    assert l32 == pytest.approx(l64, rel=1e-5)
    assert max(rel_error(g32[k], g64[k], scale=grad_scale(g64)) for k in g64) < 1e-4


def test_predict_logits_is_the_eval_forward_in_chunks():
    config = MixerConfig(n_features=6, patch_size=3, dim=8, depth=2, dropout=0.5, stochastic_depth=0.5,
                         pos_weight=1.7)
    params = M.init_params(config, 2, dtype=np.float64)
    x, y = batch(config, 2 * M.EVAL_ROWS + 37)
    logits = M.predict_logits(params, x, config)
    assert logits.shape == (len(x),)
    # The loss of these logits is the eval-mode loss of loss_and_grads ...
    loss, _ = L.bce_with_logits_forward(logits, y, pos_weight=config.pos_weight)
    assert loss == pytest.approx(M.loss_and_grads(params, x, y, config)[0], rel=1e-12)
    # ... no rows give no logits ...
    assert M.predict_logits(params, x[:0], config).shape == (0,)
    # ... and chunking does not change any row.
    np.testing.assert_allclose(logits[:5], M.predict_logits(params, x[:5], config), rtol=1e-12)
    np.testing.assert_allclose(logits[-3:], M.predict_logits(params, x[-3:], config), rtol=1e-12)


def test_results_do_not_depend_on_the_thread_count():
    config = MixerConfig(n_features=6, patch_size=2, dim=8, depth=2, dropout=0.3, stochastic_depth=0.3)
    params = M.init_params(config, 0)
    x, y = batch(config, 50, dtype=np.float32)
    runs = []
    try:
        for threads in (1, 3):
            M.set_num_threads(threads, adaptive=False)
            assert M.get_num_threads() == threads
            runs.append(M.loss_and_grads(params, x, y, config, train=True, rng=np.random.default_rng(7)))
            runs.append(M.predict_logits(params, np.tile(x, (12, 1)), config))
    finally:
        M.set_num_threads(None)
    assert runs[0][0] == runs[2][0]
    assert all(np.array_equal(runs[0][1][k], runs[2][1][k]) for k in params)
    np.testing.assert_array_equal(runs[1], runs[3])


def _map_until_chosen(fn, key, items=8) -> tuple[int, list[int]]:
    """Call M._map with ``key`` until a thread count is chosen; (chosen, threads used per later call)."""
    calls = 0
    while not any(k[0] == key[0] for k in M.threads_chosen()):
        M._map(fn, range(items), key=key)
        calls += 1
        assert calls <= 2 * M.PROBES + 1, "no thread count chosen after the warm-up and the probes"
    assert calls == 2 * M.PROBES + 1
    (chosen,) = [v for k, v in M.threads_chosen().items() if k[0] == key[0]]
    used = []
    for _ in range(3):
        names = set()

        def recorded(i, names=names):
            names.add(threading.current_thread().name)
            fn(i)

        M._map(recorded, range(items), key=key)
        used.append(len(names))
    return chosen, used


def test_adaptive_threads_keep_two_where_two_are_faster():
    # sleep releases the GIL, like NumPy's big matmuls: two threads take half the time.
    M.set_num_threads(2)
    try:
        chosen, used = _map_until_chosen(lambda i: time.sleep(0.004), ("sleepy",))
    finally:
        M.set_num_threads(None)
    assert chosen == 2
    assert max(used) == 2


def test_adaptive_threads_fall_back_to_one_where_more_are_slower():
    # Items are slow off the calling thread, as a small model's shards are when two threads
    # pass the GIL back and forth: one thread is faster.
    def work(i):
        time.sleep(0.002 if threading.current_thread() is threading.main_thread() else 0.06)

    M.set_num_threads(2)
    try:
        chosen, used = _map_until_chosen(work, ("contended",))
    finally:
        M.set_num_threads(None)
    assert chosen == 1
    assert used == [1, 1, 1]


def test_adaptive_threads_choose_per_work_and_shape_and_not_when_told_not_to():
    config = MixerConfig(n_features=6, patch_size=2, dim=8, depth=2)
    params = M.init_params(config, 0)
    x, y = batch(config, 64, dtype=np.float32)
    M.set_num_threads(2)
    try:
        expected = M.loss_and_grads(params, x, y, config)
        for _ in range(2 * M.PROBES + 1):
            loss, grads = M.loss_and_grads(params, x, y, config)
            assert loss == expected[0]
            assert all(np.array_equal(grads[k], expected[1][k]) for k in params)
        (key,) = M.threads_chosen()
        assert key[0] == "train" and key[1] == M._shape(config) and key[-2:] == (4, 2)  # 4 shards, ceiling 2
        assert M.threads_chosen()[key] in (1, 2)
        M.set_num_threads(2, adaptive=False)  # forgets the choices and stops choosing
        assert M.threads_chosen() == {}
        for _ in range(2 * M.PROBES + 1):
            M.loss_and_grads(params, x, y, config)
        assert M.threads_chosen() == {}
    finally:
        M.set_num_threads(None)


def test_faster_takes_the_lowest_median_and_fewer_threads_on_a_tie():
    assert M._faster({1: [3.0, 1.0, 2.0], 2: [1.5, 1.5, 9.0]}) == 2
    assert M._faster({1: [1.0, 1.0, 1.0], 2: [1.0, 1.0, 1.0]}) == 1


def test_set_num_threads_rejects_nonsense():
    with pytest.raises(ValueError, match="n=0"):
        M.set_num_threads(0)


def test_drop_path_rates_rise_linearly_to_stochastic_depth():
    config = MixerConfig(depth=5, stochastic_depth=0.4)
    assert M.drop_path_rates(config) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert M.drop_path_rates(MixerConfig(depth=1, stochastic_depth=0.4)) == [0.0]


def test_flops_per_example_counts_every_matmul():
    config = MixerConfig(n_features=42, patch_size=3, dim=198, depth=10, token_expansion=4,
                         channel_expansion=0.5)
    T, D, Ht, Hc = 14, 198, 56, 99
    forward = 2 * T * 3 * D + 10 * (2 * 2 * T * Ht * D + 2 * 2 * T * D * Hc) + 2 * D
    assert M.flops_per_example(config, backward=False) == forward
    assert M.flops_per_example(config) == 3 * forward - 2 * T * 3 * D
    # The design's figure: ~1.1 TFLOP for one epoch of 20,000 + 4,000 rows.
    epoch = 20_000 * M.flops_per_example(config) + 4_000 * forward
    assert 1.0e12 < epoch < 1.2e12


@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_loss_and_gradients_match_torch_on_the_same_weights(gelu):
    torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install torch)")
    from benchmarks.torch_mixer import TorchMixer, load_numpy_params, loss_fn

    config = MixerConfig(n_features=12, patch_size=3, dim=10, depth=3, gelu=gelu, pos_weight=2.0,
                         dropout=0.3, stochastic_depth=0.2)
    params = M.init_params(config, 0, dtype=np.float64)
    x, y = batch(config, 21)
    module = TorchMixer(config).double().eval()
    load_numpy_params(module, params)
    loss_t = loss_fn(config)(module(torch.from_numpy(x)), torch.from_numpy(y.astype(np.float64)))
    loss_t.backward()
    loss, grads = M.loss_and_grads(params, x, y, config)
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    named = dict(module.named_parameters())
    for key, g in grads.items():
        layer, kind = key.rsplit(".", 1)
        expected = named[f"{layer}.{'weight' if kind == 'w' else 'bias'}"].grad.numpy()
        assert rel_error(g, expected, scale=grad_scale(grads)) < 1e-10, key
