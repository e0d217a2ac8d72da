"""Curvature probe: Lanczos on known spectra, finite-difference HVPs, the real Mixer and a known saddle."""

from __future__ import annotations

import numpy as np
import pytest

from mixer.config import MixerConfig
from mixer.curvature import (
    Curvature,
    central_difference_hvp,
    escape_test,
    extreme_eigenvalues,
    flatten,
    hvp,
    lanczos,
    loss_gradient_fn,
    loss_slices,
    neg_ratio,
    negative_share,
    spectral_density,
    unflatten,
)
from mixer.diagnosis import Thresholds
from mixer.model import init_params, loss_and_grads, param_count


def symmetric_with_spectrum(eigs: np.ndarray, seed: int) -> np.ndarray:
    """Q diag(eigs) Q^T for a random orthogonal Q."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((eigs.size, eigs.size)))
    return (q * eigs) @ q.T


# --- Lanczos on matrices with a known spectrum ------------------------------------------------


@pytest.mark.parametrize("eigs", [
    np.linspace(-3.0, 10.0, 40),                                   # indefinite, evenly spread
    np.concatenate([[-0.5], np.full(30, 1.0), [7.0]]),             # repeated middle eigenvalue
    np.concatenate([[-2.0, -2.0], np.linspace(0.0, 1.0, 20)]),     # repeated negative one
])
def test_lanczos_with_full_dimension_recovers_the_whole_spectrum(eigs):
    a = symmetric_with_spectrum(eigs, seed=1)
    ritz = lanczos(lambda v: a @ v, eigs.size, iters=eigs.size, seed=0).values
    # Repeated eigenvalues need the restart on an invariant subspace to be found at all.
    np.testing.assert_allclose(np.sort(ritz), np.sort(eigs), atol=1e-9)


def test_lanczos_extremes_converge_in_few_iterations_on_a_large_operator():
    rng = np.random.default_rng(3)
    n = 2000
    eigs = np.concatenate([[-4.0], rng.uniform(0.0, 1.0, n - 2), [25.0]])
    # A diagonal operator in a random orthogonal basis, applied without forming the matrix.
    perm = rng.permutation(n)
    signs = rng.choice([-1.0, 1.0], n)

    def matvec(v):
        return signs * (eigs[perm] * (signs * v))

    ritz = lanczos(matvec, n, iters=30, seed=0).values
    assert ritz[-1] == pytest.approx(25.0, rel=1e-6)
    assert ritz[0] == pytest.approx(-4.0, rel=1e-6)


def test_ritz_values_never_leave_the_spectrum():
    eigs = np.linspace(-1.0, 2.0, 50)
    a = symmetric_with_spectrum(eigs, seed=5)
    for iters in (2, 5, 10):
        ritz = lanczos(lambda v: a @ v, 50, iters=iters, seed=1).values
        assert ritz.size == iters
        assert ritz[0] >= -1.0 - 1e-12 and ritz[-1] <= 2.0 + 1e-12


def test_lanczos_is_reproducible_by_seed():
    a = symmetric_with_spectrum(np.linspace(-1.0, 3.0, 60), seed=2)
    first = lanczos(lambda v: a @ v, 60, iters=6, seed=7).values
    again = lanczos(lambda v: a @ v, 60, iters=6, seed=7).values
    other = lanczos(lambda v: a @ v, 60, iters=6, seed=8).values
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_early_stopped_lanczos_stops_once_the_extremes_converge():
    rng = np.random.default_rng(3)
    n = 2000
    eigs = np.concatenate([[-4.0], rng.uniform(0.0, 1.0, n - 2), [25.0]])
    ritz = lanczos(lambda v: eigs * v, n, iters=200, seed=0, tol=1e-6)
    assert ritz.values.size < 60  # converged long before the cap
    assert ritz.values[0] == pytest.approx(-4.0, rel=1e-6)
    assert ritz.values[-1] == pytest.approx(25.0, rel=1e-6)
    assert max(ritz.residuals[0], ritz.residuals[-1]) <= 1e-6 * 25.0
    # The extreme Ritz vectors are the eigenvectors (here coordinate vectors) of the extremes.
    assert abs(ritz.vector_min[0]) == pytest.approx(1.0, abs=1e-6)
    assert abs(ritz.vector_max[-1]) == pytest.approx(1.0, abs=1e-6)
    assert lanczos(lambda v: eigs * v, n, iters=200, seed=0).values.size == 200  # tol=0: every step


def test_warm_started_lanczos_finds_a_moved_operators_extremes_in_fewer_steps():
    # Two nearby operators, as two probes of one run are: the second rotated and rescaled a little.
    rng = np.random.default_rng(0)
    n = 1000
    eigs = np.concatenate([[-1.0], rng.uniform(-0.8, 3.5, n - 2), [4.0]])
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    moved, _ = np.linalg.qr(q @ (np.eye(n) + 0.01 * rng.standard_normal((n, n))))
    a = (q * eigs) @ q.T
    b = (moved * (eigs * (1 + 0.01 * rng.standard_normal(n)))) @ moved.T
    exact = np.linalg.eigvalsh(b)
    first = lanczos(lambda v: a @ v, n, iters=200, seed=0, tol=1e-3)
    cold = lanczos(lambda v: b @ v, n, iters=200, seed=1, tol=1e-3)
    warm = lanczos(lambda v: b @ v, n, iters=200, seed=1, tol=1e-3, warm=(first.vector_min, first.vector_max))
    assert warm.values.size < cold.values.size
    for run in (cold, warm):
        assert run.values[0] == pytest.approx(exact[0], abs=4e-3)  # within tol · max|θ|
        assert run.values[-1] == pytest.approx(exact[-1], abs=4e-3)


@pytest.mark.parametrize("seed", range(4))
def test_stochastic_lanczos_quadrature_recovers_a_known_negative_share(seed):
    # 10 % of the spectrum in [-1, -0.2], the rest in [0, 1], and one sharp direction at 10.
    rng = np.random.default_rng(0)
    n = 4000
    eigs = np.concatenate([rng.uniform(-1.0, -0.2, n // 10), rng.uniform(0.0, 1.0, n - n // 10 - 1), [10.0]])
    ritz = lanczos(lambda v: eigs * v, n, iters=40, seed=seed)
    assert ritz.weights.sum() == pytest.approx(1.0)
    share = negative_share(ritz, -0.1, sigma=0.025)
    assert share == pytest.approx(0.1, abs=0.03)
    # The density it integrates: mass 1, and its mass below the threshold is the share.
    grid = np.linspace(-2.0, 11.0, 26001)
    density = spectral_density(ritz, grid, sigma=0.025)
    step = grid[1] - grid[0]
    assert density.sum() * step == pytest.approx(1.0, abs=1e-3)
    assert density[grid < -0.1].sum() * step == pytest.approx(share, abs=2e-3)
    # Uniform weights (Ritz values alone) would say 0.3 or so: the weights are what carry the density.
    assert np.mean(ritz.values < -0.1) > 0.2


def test_the_probe_reports_the_negative_share_of_its_spectrum():
    params, x, y = tiny_problem()
    c = extreme_eigenvalues(params, x, y, TINY, iters=param_count(TINY), seed=0)
    _, h = full_hessian(params, x, y, TINY)
    exact = np.linalg.eigvalsh(h)
    cut = 0.01 * max(-exact[0], exact[-1])
    # With all n steps the quadrature's nodes are the eigenvalues; one random start vector weighs them.
    assert c.neg_share == pytest.approx(np.mean(exact < -cut), abs=0.1)
    assert 0 < c.neg_share < 1


@pytest.mark.parametrize("kwargs, message", [
    ({"iters": 0}, "iters must be >= 1"),
    ({"iters": 3, "n": 0}, "n must be >= 1"),
    ({"iters": 3, "tol": -1.0}, "tol must be >= 0"),
])
def test_lanczos_rejects_bad_sizes(kwargs, message):
    n = kwargs.pop("n", 4)
    with pytest.raises(ValueError, match=message):
        lanczos(lambda v: v, n, seed=0, **kwargs)


def test_lanczos_refuses_a_non_finite_product():
    with pytest.raises(FloatingPointError, match="step 1"):
        lanczos(lambda v: v * np.nan, 5, iters=3, seed=0)


# --- finite-difference Hessian-vector products -------------------------------------------------


def test_central_difference_hvp_matches_the_exact_hessian_of_a_non_quadratic_function():
    # f(θ) = ½ θᵀAθ + ¼ Σ θ⁴ has H = A + diag(3θ²): the cubic term makes one-sided differences err.
    a = symmetric_with_spectrum(np.linspace(-2.0, 5.0, 30), seed=4)
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(30)

    def grad(t):
        return a @ t + t ** 3

    exact = a + np.diag(3.0 * theta ** 2)
    for _ in range(3):
        v = rng.standard_normal(30)
        np.testing.assert_allclose(central_difference_hvp(grad, theta, v), exact @ v, rtol=1e-6, atol=1e-6)


def test_hvp_is_linear_in_the_length_of_v():
    a = symmetric_with_spectrum(np.linspace(-1.0, 1.0, 10), seed=6)
    theta = np.ones(10)
    v = np.arange(10.0)

    def grad(t):
        return a @ t + np.sin(t)

    np.testing.assert_allclose(central_difference_hvp(grad, theta, 1e3 * v),
                               1e3 * central_difference_hvp(grad, theta, v), rtol=1e-7)


@pytest.mark.parametrize("v, eps, message", [
    (np.zeros(3), None, "non-zero"),
    (np.ones(3), -1.0, "eps must be > 0"),
    (np.ones(4), None, "shape"),
])
def test_hvp_rejects_bad_directions_and_steps(v, eps, message):
    with pytest.raises(ValueError, match=message):
        central_difference_hvp(lambda t: t, np.ones(3), v, eps=eps)


def test_flatten_and_unflatten_round_trip_in_sorted_key_order():
    params = {"b": np.arange(6.0, dtype=np.float32).reshape(2, 3), "a": np.array([7.0, 8.0], np.float32)}
    flat = flatten(params, dtype=np.float64)
    np.testing.assert_array_equal(flat, [7, 8, 0, 1, 2, 3, 4, 5])
    assert flat.dtype == np.float64
    back = unflatten(flat, params)
    assert back["b"].shape == (2, 3) and back["b"].dtype == np.float64
    np.testing.assert_array_equal(back["b"], params["b"])
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        unflatten(flat[:-1], params)


@pytest.mark.parametrize("lam_min, lam_max, expected", [
    (-1.0, 4.0, 0.25), (0.0, 4.0, 0.0), (0.5, 4.0, 0.0), (-1.0, 0.0, float("inf")),
])
def test_neg_ratio_is_zero_without_negative_curvature(lam_min, lam_max, expected):
    assert neg_ratio(lam_min, lam_max) == expected


def test_curvature_record_fields():
    c = Curvature(lambda_max=2.0, lambda_min=-1.0, neg_ratio=0.5)
    assert (c.lambda_max, c.lambda_min, c.neg_ratio) == (2.0, -1.0, 0.5)


# --- the real Mixer ----------------------------------------------------------------------------

TINY = MixerConfig(n_features=6, patch_size=2, dim=4, depth=1, token_expansion=2.0, channel_expansion=0.5)


def tiny_problem(config: MixerConfig = TINY, *, rows: int = 32, seed: int = 0):
    """float64 parameters of a tiny Mixer (108 of them for TINY) and a batch with random labels."""
    params = init_params(config, seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    x = rng.standard_normal((rows, config.n_features))
    y = (rng.random(rows) < 0.5).astype(np.int64)
    return params, x, y


def full_hessian(params, x, y, config) -> np.ndarray:
    """The whole Hessian, one gradient difference per column (H e_i), symmetrised."""
    theta, grad = loss_gradient_fn(params, x, y, config)
    eye = np.eye(theta.size)
    h = np.stack([central_difference_hvp(grad, theta, eye[i]) for i in range(theta.size)], axis=1)
    return h, (h + h.T) / 2


def test_probe_matches_the_full_finite_difference_hessian_of_a_tiny_mixer():
    params, x, y = tiny_problem()
    n = param_count(TINY)
    raw, h = full_hessian(params, x, y, TINY)
    # The analytic gradient is consistent: its differences give a symmetric matrix.
    assert np.abs(raw - raw.T).max() <= 1e-7 * np.abs(raw).max()
    exact = np.linalg.eigvalsh(h)
    assert exact[0] < 0 < exact[-1]  # this point is indefinite: both ends are tested
    c = extreme_eigenvalues(params, x, y, TINY, iters=n, seed=0)
    assert c.iters == n
    assert c.lambda_max == pytest.approx(exact[-1], rel=1e-3)
    assert c.lambda_min == pytest.approx(exact[0], rel=1e-3)
    assert c.neg_ratio == pytest.approx(-exact[0] / exact[-1], rel=1e-3)
    assert c.seconds > 0


def test_hessian_vector_products_agree_with_second_differences_of_the_loss():
    # vᵀHv from the loss alone (no gradient code involved) checks the products independently.
    params, x, y = tiny_problem()
    theta = flatten(params)
    rng = np.random.default_rng(1)

    def loss(t):
        return loss_and_grads(unflatten(t, params), x, y, TINY)[0]

    for _ in range(3):
        v = rng.standard_normal(theta.size)
        h = 1e-3
        second = (loss(theta + h * v) - 2 * loss(theta) + loss(theta - h * v)) / h ** 2
        assert v @ hvp(params, x, y, TINY, v) == pytest.approx(second, rel=1e-5)


def test_probe_is_reproducible_and_does_not_touch_the_parameters():
    params, x, y = tiny_problem()
    before = {k: v.copy() for k, v in params.items()}
    first = extreme_eigenvalues(params, x, y, TINY, iters=8, seed=3)
    again = extreme_eigenvalues(params, x, y, TINY, iters=8, seed=3)
    other = extreme_eigenvalues(params, x, y, TINY, iters=8, seed=4)
    assert (first.lambda_min, first.lambda_max) == (again.lambda_min, again.lambda_max)
    assert (first.lambda_min, first.lambda_max) != (other.lambda_min, other.lambda_max)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])


@pytest.mark.parametrize("sharpen, rel", [(1.0, 1e-2), (3.0, 1e-3)])
def test_float32_probes_agree_with_the_exact_hessian(sharpen, rel):
    # Weights × 3 make the loss bend fast (large third derivatives): the old float32 step,
    # sqrt(u)·(1 + ||θ||), was 1 % off there; the step chosen for float32 is 0.03 of it.
    params, x, y = tiny_problem()
    params = {k: v * sharpen if k.endswith(".w") and "norm" not in k else v for k, v in params.items()}
    _, h = full_hessian(params, x, y, TINY)
    exact = np.linalg.eigvalsh(h)
    c = extreme_eigenvalues(params, x, y, TINY, iters=param_count(TINY), seed=0, dtype=np.float32)
    assert c.lambda_min == pytest.approx(exact[0], rel=rel)
    assert c.lambda_max == pytest.approx(exact[-1], rel=rel)


def test_float32_parameters_are_probed_in_float64():
    params, x, y = tiny_problem()
    as32 = {k: v.astype(np.float32) for k, v in params.items()}
    c32 = extreme_eigenvalues(as32, x.astype(np.float32), y, TINY, iters=30)
    # The same point (rounded to float32) probed in float64: agrees far better than float32's 1e-7^(1/3).
    c64 = extreme_eigenvalues({k: v.astype(np.float64) for k, v in as32.items()}, x.astype(np.float32), y,
                              TINY, iters=30)
    assert c32.lambda_max == pytest.approx(c64.lambda_max, rel=1e-9)
    assert c32.lambda_min == pytest.approx(c64.lambda_min, rel=1e-9)


def test_probe_runs_in_eval_mode_without_dropout_or_drop_path():
    noisy = MixerConfig(n_features=6, patch_size=2, dim=4, depth=2, token_expansion=2.0,
                        channel_expansion=0.5, dropout=0.5, stochastic_depth=0.5)
    clean = MixerConfig(n_features=6, patch_size=2, dim=4, depth=2, token_expansion=2.0,
                        channel_expansion=0.5)
    params, x, y = tiny_problem(clean)
    a = extreme_eigenvalues(params, x, y, noisy, iters=10)
    b = extreme_eigenvalues(params, x, y, clean, iters=10)
    assert (a.lambda_min, a.lambda_max) == (b.lambda_min, b.lambda_max)


def branch_indices(params, names):
    """Positions in the flat vector (sorted-key order) of the named parameters."""
    out, offset = {}, 0
    for key in sorted(params):
        out[key] = np.arange(offset, offset + params[key].size)
        offset += params[key].size
    return np.concatenate([out[k] for k in names])


def switched_off_branch(branch: str):
    """The tiny problem with one MLP branch switched off (a saddle; see the test below)."""
    params, x, y = tiny_problem()
    pre = f"blocks.0.{branch}."
    for name in ("fc1.w", "fc1.b", "fc2.w"):
        params[pre + name][...] = 0.0
    params[pre + "norm.w"] *= 100.0
    params[pre + "norm.b"] *= 100.0
    return params, x, y


@pytest.mark.parametrize("branch", ["token", "channel"])
def test_probe_finds_the_saddle_of_a_switched_off_mlp_branch(branch):
    """A residual MLP branch with fc1.w, fc1.b and fc2.w all zero is a saddle in its own weights.

    The branch adds ``W2 · gelu(W1 a + b1) + b2`` to the residual stream, ``a`` the normalised
    input. At ``W1 = 0, b1 = 0, W2 = 0``: ``gelu(0) = 0``, so the gradient of ``W2`` (∝ gelu(·))
    vanishes, and the gradient of ``W1, b1`` (∝ W2ᵀ·) vanishes too. The second derivatives within
    ``(W1, b1)`` and within ``W2`` vanish as well (the output stays ``b2`` whatever one of the two
    groups does while the other is zero), but the mixed one does not:
    ``∂²L / ∂W2[o,h] ∂W1[h,k] = gelu'(0) · Σ_batch dL/dout[o] · a[k]``. The Hessian restricted to
    the branch is therefore ``[[0, C], [Cᵀ, 0]]``, whose eigenvalues are ``±σ_i(C)``; by Cauchy
    interlacing the full Hessian has ``λ_min <= -σ_max(C)``: moving ``W1`` and ``W2`` together
    along the top singular pair of ``C`` (with opposite signs) goes downhill quadratically.

    To make the test say something, the LayerNorm gain in front of the branch is scaled up: it
    scales ``a``, hence ``C``, but nothing else (the branch output ignores its input while it is
    switched off), so the saddle becomes more negative than any curvature the rest of the tiny
    Mixer has, and only a probe that really finds it can pass.
    """
    params, x, y = switched_off_branch(branch)
    pre = f"blocks.0.{branch}."
    _, grads = loss_and_grads(params, x, y, TINY)
    for name in ("fc1.w", "fc1.b", "fc2.w"):
        assert np.abs(grads[pre + name]).max() == 0.0  # a critical point in the branch's weights

    _, h = full_hessian(params, x, y, TINY)
    first = branch_indices(params, [pre + "fc1.w", pre + "fc1.b"])
    second = branch_indices(params, [pre + "fc2.w"])
    assert np.abs(h[np.ix_(first, first)]).max() < 1e-9
    assert np.abs(h[np.ix_(second, second)]).max() < 1e-9
    coupling = h[np.ix_(first, second)]
    bound = -np.linalg.svd(coupling, compute_uv=False)[0]
    rest = np.setdiff1d(np.arange(h.shape[0]), np.concatenate([first, second]))
    rest_min = np.linalg.eigvalsh(h[np.ix_(rest, rest)])[0]
    assert bound < rest_min - 0.1  # the saddle, not the rest of the model, is the most negative

    c = extreme_eigenvalues(params, x, y, TINY, iters=20, seed=0)  # the probe as fit runs it
    assert c.lambda_min <= bound + 1e-3 * abs(bound)  # the accuracy the probe claims
    assert c.neg_ratio > 0


@pytest.mark.parametrize("branch", ["token", "channel"])
def test_a_step_along_v_min_escapes_the_switched_off_branch_saddle_as_predicted(branch):
    params, x, y = switched_off_branch(branch)
    c = extreme_eigenvalues(params, x, y, TINY, iters=20, seed=0)
    e = escape_test(params, x, y, TINY, c.ritz.vector_min, c.lambda_min)
    assert e.loss_plus < e.loss and e.loss_minus < e.loss  # downhill both ways: a saddle, not a slope
    assert e.predicted == pytest.approx(0.003 * e.loss)  # the step is scaled to a 0.3 % predicted fall
    assert e.gain == pytest.approx(1.0, abs=0.2)  # the loss falls as ½ α² λ_min says
    assert e.gain >= Thresholds().escape_gain  # so the diagnosis would call it confirmed
    # Control: along the sharpest direction the loss rises, whatever curvature one claims for it.
    wrong = escape_test(params, x, y, TINY, c.ritz.vector_max, -c.lambda_max)
    assert wrong.gain < 0
    with pytest.raises(ValueError, match="negative curvature"):
        escape_test(params, x, y, TINY, c.ritz.vector_min, 0.5)


def test_loss_slices_along_v_min_and_down_the_gradient():
    params, x, y = switched_off_branch("channel")
    c = extreme_eigenvalues(params, x, y, TINY, iters=20, seed=0)
    alphas = np.linspace(-0.2, 0.2, 5)
    s = loss_slices(params, x, y, TINY, c.ritz.vector_min, alphas=alphas)
    assert set(s) == {"alpha", "direction", "gradient"} and s["direction"].shape == alphas.shape
    loss = loss_and_grads(params, x, y, TINY)[0]
    assert s["direction"][2] == pytest.approx(loss) and s["gradient"][2] == pytest.approx(loss)
    assert s["direction"][0] < loss and s["direction"][-1] < loss  # the saddle: down both ways
    assert s["gradient"][3] < loss < s["gradient"][1]  # a small step down the gradient descends
