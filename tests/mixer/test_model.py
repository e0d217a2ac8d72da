"""The whole Mixer: gradient checks, initialisation, dtypes, eval path, drop-path, torch parity."""

from __future__ import annotations

import functools
import math

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
    # Piecewise-linear encoding before the patch embedding, with dropout on.
    "bins-p2-train": (MixerConfig(n_features=4, patch_size=2, dim=3, depth=2, bins=4, dropout=0.2), True),
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


def test_piecewise_linear_reads_minus_one_below_each_piece_plus_one_above_and_linear_inside():
    from statistics import NormalDist

    bins = 4
    inner = [NormalDist().inv_cdf(q) for q in (0.25, 0.5, 0.75)]  # 0 is the middle edge
    x = np.array([[-10.0, 0.0, inner[2], 10.0]])
    z = M.piecewise_linear(x, bins).reshape(4, bins)
    np.testing.assert_array_equal(z[0], [-1, -1, -1, -1])   # below every piece: saturated
    np.testing.assert_array_equal(z[1], [1, 1, -1, -1])     # the median fills the lower two
    np.testing.assert_allclose(z[2], [1, 1, 1, -1])
    np.testing.assert_array_equal(z[3], [1, 1, 1, 1])
    # Halfway between two edges reads 0 in that piece; the encoding keeps the order of values.
    mid = np.array([[(inner[0] + inner[1]) / 2]])
    np.testing.assert_allclose(M.piecewise_linear(mid, bins)[0], [1, 0, -1, -1], atol=1e-12)
    v = np.linspace(-4, 4, 101)[:, None]
    assert (np.diff(M.piecewise_linear(v, bins).sum(axis=1)) >= 0).all()


def test_bins_widen_only_the_patch_embedding():
    plain = MixerConfig(n_features=6, patch_size=3, dim=5, depth=1)
    binned = MixerConfig(n_features=6, patch_size=3, dim=5, depth=1, bins=8)
    shapes, wide = M.param_shapes(plain), M.param_shapes(binned)
    assert wide.pop("embed.w") == (5, 24) and shapes.pop("embed.w") == (5, 3)
    assert wide == shapes
    assert M.flops_per_example(binned) > M.flops_per_example(plain)
    with pytest.raises(ValueError, match="bins must be 0"):
        MixerConfig(bins=1)


def test_drop_path_drops_whole_branches_of_some_samples_and_rescales_the_rest():
    # Block 1's only live branch adds a constant c to every token of a row: kept, the row ends as
    # in eval mode with c / (1 - rate) there; dropped, as with nothing there. For b identical rows
    # the training loss must then be (k * kept + (b - k) * dropped) / b for a whole number k of
    # kept rows: a branch half applied, or kept without the rescaling, would break that. The model
    # has three ways of dropping (every row, a single row zeroed, the kept rows gathered): all run.
    rate = 0.5
    config = MixerConfig(n_features=4, patch_size=2, dim=3, depth=2, stochastic_depth=rate)
    assert M.drop_path_rates(config) == [0.0, rate]
    params = M.init_params(config, 0, dtype=np.float64)
    for key in ("token.fc2.w", "token.fc2.b", "channel.fc2.w"):
        params[f"blocks.1.{key}"][:] = 0.0
    c = np.random.default_rng(1).standard_normal(config.dim)
    x = np.random.default_rng(2).standard_normal((1, config.n_features))

    def eval_loss(bias: np.ndarray) -> float:
        return M.loss_and_grads({**params, "blocks.1.channel.fc2.b": bias}, x, np.ones(1), config)[0]

    kept, dropped = eval_loss(c / (1 - rate)), eval_loss(np.zeros_like(c))
    params["blocks.1.channel.fc2.b"] = c
    paths = set()
    for seed in range(40):
        b = 1 + seed % 6
        loss, _ = M.loss_and_grads(params, np.repeat(x, b, axis=0), np.ones(b), config, train=True,
                                   rng=np.random.default_rng(seed))
        k = b * (loss - dropped) / (kept - dropped)
        assert k == pytest.approx(round(k), abs=1e-9), (seed, k)
        k = round(k)
        paths.add("all dropped" if k == 0 else "none dropped" if k == b else
                  "one dropped" if k == b - 1 else "several dropped")
    assert paths == {"all dropped", "none dropped", "one dropped", "several dropped"}


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


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_is_bce_against_softened_targets_and_its_gradients_match(smoothing):
    config = MixerConfig(n_features=6, patch_size=2, dim=4, depth=2, pos_weight=2.0)
    params = M.init_params(config, seed=5, dtype=np.float64)
    x, y = batch(config, 20)
    loss, grads = M.loss_and_grads(params, x, y, config, label_smoothing=smoothing)
    target = y * (1 - smoothing) + smoothing / 2
    z = M.predict_logits(params, x, config)
    expected = np.mean((1 - target) * z + (1 + (2.0 - 1) * target) * np.logaddexp(0, -z))
    assert loss == pytest.approx(expected, rel=1e-12)
    assert loss != M.loss_and_grads(params, x, y, config)[0]
    h = 1e-6
    for key in ("head.w", "blocks.0.token.fc1.w", "embed.w"):
        p = params[key]
        numeric = np.zeros_like(p)
        flat = p.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            plus = M.loss_and_grads(params, x, y, config, label_smoothing=smoothing)[0]
            flat[i] = old - h
            minus = M.loss_and_grads(params, x, y, config, label_smoothing=smoothing)[0]
            flat[i] = old
            numeric.reshape(-1)[i] = (plus - minus) / (2 * h)
        assert rel_error(grads[key], numeric, scale=grad_scale(grads)) < 1e-6, key
    with pytest.raises(ValueError, match="label_smoothing"):
        M.loss_and_grads(params, x, y, config, label_smoothing=1.0)


def test_sam_gradient_matches_torch_at_the_perturbed_weights():
    torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install torch)")
    from benchmarks.torch_mixer import TorchMixer, load_numpy_params, loss_fn
    from mixer.optim import sam_gradients

    config = MixerConfig(n_features=12, patch_size=3, dim=10, depth=3, pos_weight=2.0)
    params = M.init_params(config, 0, dtype=np.float64)
    x, y = batch(config, 21)
    rho = 0.05
    _, grads = M.loss_and_grads(params, x, y, config)
    sam = sam_gradients(params, grads, rho, lambda: M.loss_and_grads(params, x, y, config)[1])

    module = TorchMixer(config).double().eval()
    load_numpy_params(module, params)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float64))
    named = dict(module.named_parameters())
    loss_fn(config)(module(xt), yt).backward()
    with torch.no_grad():  # SAM's ascent step, as Foret et al. write it
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in named.values()))
        for p in named.values():
            p += rho * p.grad / norm
            p.grad = None
    loss_fn(config)(module(xt), yt).backward()
    for key, g in sam.items():
        layer, kind = key.rsplit(".", 1)
        expected = named[f"{layer}.{'weight' if kind == 'w' else 'bias'}"].grad.numpy()
        assert rel_error(g, expected, scale=grad_scale(sam)) < 1e-10, key
