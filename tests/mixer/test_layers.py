"""Every op in mixer.layers: float64 centred-difference gradient checks, forward values, dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixer import layers as L


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the largest magnitude (robust to entries near zero)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-12, np.max(np.abs(a)), np.max(np.abs(b))))


def numeric_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f() / d x by centred differences, perturbing x in place (f reads x)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = f()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_linear_gradients_match_centred_differences(rng):
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    dout = rng.standard_normal((5, 3))
    out, cache = L.linear_forward(x, w, b)
    np.testing.assert_allclose(out, x @ w.T + b)
    dx, dw, db = L.linear_backward(dout, cache)

    def f():
        return float(np.sum(L.linear_forward(x, w, b)[0] * dout))

    for analytic, arr in ((dx, x), (dw, w), (db, b)):
        assert rel_error(analytic, numeric_grad(f, arr)) < 1e-6


def test_token_linear_mixes_the_first_axis_and_its_gradients_match(rng):
    x, w, b = rng.standard_normal((4, 7)), rng.standard_normal((6, 4)), rng.standard_normal(6)
    dout = rng.standard_normal((6, 7))
    out, cache = L.token_linear_forward(x, w, b)
    np.testing.assert_allclose(out, (x.T @ w.T + b).T)
    dx, dw, db = L.token_linear_backward(dout, cache)

    def f():
        return float(np.sum(L.token_linear_forward(x, w, b)[0] * dout))

    for analytic, arr in ((dx, x), (dw, w), (db, b)):
        assert rel_error(analytic, numeric_grad(f, arr)) < 1e-6


def test_token_linear_in_column_blocks_equals_one_matmul(rng):
    # Wide inputs are processed in blocks of TOKEN_BLOCK_COLUMNS columns (speed); same result.
    n = 2 * L.TOKEN_BLOCK_COLUMNS + 77
    x, w, b = rng.standard_normal((4, n)), rng.standard_normal((6, 4)), rng.standard_normal(6)
    dout = rng.standard_normal((6, n))
    out, cache = L.token_linear_forward(x, w, b)
    np.testing.assert_allclose(out, w @ x + b[:, None], rtol=1e-12)
    dx, dw, db = L.token_linear_backward(dout, cache)
    np.testing.assert_allclose(dx, w.T @ dout, rtol=1e-12)
    np.testing.assert_allclose(dw, dout @ x.T, rtol=1e-10)
    np.testing.assert_allclose(db, dout.sum(axis=1), rtol=1e-10)


def test_layernorm_normalises_rows_like_torch(rng):
    x = rng.standard_normal((6, 9)) * 5 + 3
    w, b = rng.standard_normal(9), rng.standard_normal(9)
    out, _ = L.layernorm_forward(x, w, b)
    mean, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)  # biased variance, as torch
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5) * w + b, rtol=1e-12, atol=1e-12)


def test_layernorm_gradients_match_centred_differences(rng):
    x = rng.standard_normal((6, 9)) * 2 + 1
    w, b = rng.standard_normal(9), rng.standard_normal(9)
    dout = rng.standard_normal((6, 9))
    _, cache = L.layernorm_forward(x, w, b)
    dx, dw, db = L.layernorm_backward(dout, cache)

    def f():
        return float(np.sum(L.layernorm_forward(x, w, b)[0] * dout))

    for analytic, arr in ((dx, x), (dw, w), (db, b)):
        assert rel_error(analytic, numeric_grad(f, arr)) < 1e-6


def test_layernorm_cache_keeps_xhat_not_the_input(rng):
    # The model updates its residual stream in place after the LayerNorm: the backward pass must
    # not depend on the input array surviving.
    x = rng.standard_normal((4, 5))
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    dout = rng.standard_normal((4, 5))
    _, cache = L.layernorm_forward(x, w, b)
    expected = L.layernorm_backward(dout, cache)
    x += 100.0
    for got, want in zip(L.layernorm_backward(dout, cache), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_erf_matches_math_erf_to_float64_precision():
    x = np.concatenate([np.linspace(-7, 7, 4001), [-40.0, -8.5, -1.0, 0.0, 1e-12, 1.0, 8.0, 9.5, 40.0]])
    expected = np.array([math.erf(v) for v in x])
    got = L.erf(x)
    assert got.dtype == np.float64
    assert np.max(np.abs(got - expected)) < 5e-16
    got32 = L.erf(x.astype(np.float32))
    assert got32.dtype == np.float32
    assert np.max(np.abs(got32 - expected)) < 5e-7


def test_gelu_forms_match_their_definitions(rng):
    x = rng.standard_normal(200) * 3
    tanh_out, _ = L.gelu_forward(x, form="tanh")
    k = math.sqrt(2 / math.pi)
    np.testing.assert_allclose(tanh_out, 0.5 * x * (1 + np.tanh(k * (x + 0.044715 * x**3))), rtol=1e-13)
    erf_out, _ = L.gelu_forward(x, form="erf")
    expected = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(erf_out, expected, rtol=1e-13, atol=1e-15)
    assert np.max(np.abs(tanh_out - erf_out)) > 1e-5  # two different functions


@pytest.mark.parametrize("form", ["tanh", "erf"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gelu_with_dropout_gradients_match_centred_differences(rng, form, p):
    x = rng.standard_normal((7, 6)) * 2.5
    dout = rng.standard_normal((7, 6))

    def run():
        # The same seed for every evaluation: identical masks.
        return L.gelu_forward(x, form=form, p=p, rng=np.random.default_rng(99) if p else None)

    out, cache = run()
    dx = L.gelu_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda: float(np.sum(run()[0] * dout)), x)) < 1e-6
    if p:
        assert np.count_nonzero(out == 0) > 0  # the mask did drop something
        plain, _ = L.gelu_forward(x, form=form)
        kept = out != 0
        np.testing.assert_allclose(out[kept], plain[kept] / (1 - p), rtol=1e-4)


def test_gelu_without_grad_gives_the_same_output_and_no_cache(rng):
    x = rng.standard_normal(50)
    out, cache = L.gelu_forward(x, need_grad=False)
    np.testing.assert_array_equal(out, L.gelu_forward(x)[0])
    assert cache is None


def test_dropout_mask_drops_p_and_keeps_the_expectation():
    p = 0.3
    mask = L.dropout_mask((400, 500), p, np.random.default_rng(0), dtype=np.float32)
    assert mask.dtype == np.float32
    dropped = np.mean(mask == 0)
    assert abs(dropped - p) < 0.005
    assert set(np.unique(mask)) == {0.0, np.float32(mask.max())}
    assert abs(float(mask.mean(dtype=np.float64)) - 1.0) < 0.01
    same = L.dropout_mask((400, 500), p, np.random.default_rng(0), dtype=np.float32)
    other = L.dropout_mask((400, 500), p, np.random.default_rng(1), dtype=np.float32)
    np.testing.assert_array_equal(mask, same)
    assert not np.array_equal(mask, other)


def test_dropout_mask_of_zero_keeps_everything_and_rejects_bad_p():
    np.testing.assert_array_equal(L.dropout_mask((3, 3), 0.0, np.random.default_rng(0)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="p=1.0"):
        L.dropout_mask((3, 3), 1.0, np.random.default_rng(0))


@pytest.mark.parametrize("pos_weight", [1.0, 3.5])
def test_bce_matches_the_definition_and_its_gradient(rng, pos_weight):
    z = rng.standard_normal(12) * 3
    y = (rng.random(12) < 0.5).astype(np.int64)
    loss, cache = L.bce_with_logits_forward(z, y, pos_weight=pos_weight)
    sig = 1 / (1 + np.exp(-z))
    expected = -np.mean(pos_weight * y * np.log(sig) + (1 - y) * np.log(1 - sig))
    assert loss == pytest.approx(expected, rel=1e-12)
    dz = L.bce_with_logits_backward(cache)

    def f():
        return L.bce_with_logits_forward(z, y, pos_weight=pos_weight)[0]

    assert rel_error(dz, numeric_grad(f, z)) < 1e-6


def test_bce_is_finite_for_extreme_logits():
    z = np.array([1000.0, -1000.0, 1000.0, -1000.0], dtype=np.float32)
    y = np.array([1, 0, 0, 1])
    loss, cache = L.bce_with_logits_forward(z, y, reduction="sum")
    # Right with confidence: 0; wrong with confidence: |z| each.
    assert loss == pytest.approx(2000.0)
    dz = L.bce_with_logits_backward(cache)
    assert dz.dtype == np.float32
    np.testing.assert_array_equal(dz, [0.0, 0.0, 1.0, -1.0])


def test_ops_keep_float32(rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    w, b = rng.standard_normal((5, 5)).astype(np.float32), np.zeros(5, np.float32)
    ops = [
        L.linear_forward(x, w, b)[0],
        L.token_linear_forward(x.T.copy(), w, b)[0],
        *L.layernorm_forward(x, np.ones(5, np.float32), b)[1][:3:2],
        *L.layernorm_backward(x, L.layernorm_forward(x, np.ones(5, np.float32), b)[1]),
    ]
    for form in ("tanh", "erf"):
        out, cache = L.gelu_forward(x, form=form, p=0.3, rng=np.random.default_rng(0))
        ops += [out, cache, L.gelu_backward(x, cache)]
    ops += [L.dropout_mask(x.shape, 0.2, np.random.default_rng(0), dtype=x.dtype),
            L.bce_with_logits_backward(L.bce_with_logits_forward(x[:, 0], np.ones(6), pos_weight=2.0)[1])]
    assert [o.dtype for o in ops] == [np.float32] * len(ops)
