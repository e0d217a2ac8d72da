"""Curvature of the training loss: Hessian-vector products, Lanczos, the spectrum, the escape test.

The probe answers one question about a point θ of training: is the loss surface there bowl-like
(all Hessian eigenvalues >= 0), flat, or a saddle (a clearly negative eigenvalue)? It never forms
the Hessian (400k parameters would need 1.3 TB): it only needs products ``H v``.

* ``hvp`` gets ``H v`` by a central difference of the analytic gradient,
  ``(g(θ + εv) - g(θ - εv)) / 2ε``, with ``ε = c · sqrt(u) · (1 + ||θ||) / ||v||`` (``u`` the unit
  round-off of the probe's dtype): a step relative to the size of the weights and independent of
  the length of ``v``. The textbook optimum for central differences is ``u^(1/3)`` (truncation
  O(ε²) against rounding O(u/ε)), but it assumes third derivatives no larger than the loss; along
  a Mixer's sharp directions they are far larger. In float64 ``c = 1`` leaves the truncation
  negligible. In float32 ``sqrt(u)`` is not small enough: a trained Mixer's extremes came out up
  to 50 % off, and a float64 probe with the same step was as wrong, so it is truncation, not
  rounding. Scanning ``c`` on tiny Mixers against their exact Hessian and on the default study's
  and the headline's shapes against float64, ``c = 0.03`` has the smallest worst case (about
  1e-3; ``c = 0.1`` lets truncation reach 1 %, ``c = 0.01`` lets rounding reach 2e-3). So ``fit``
  probes in the training dtype. An exact
  forward-over-reverse product would cost about the same two passes per product (each linear
  layer's tangent doubles its matmuls), so it would buy precision the probe does not need, not
  speed. The gradient is taken in eval mode (``train=False``: no dropout, no drop-path) so that
  ``H`` is the Hessian of one deterministic function.
* ``lanczos`` runs at most ``iters`` steps of the Lanczos iteration with full reorthogonalisation
  (every new vector is made orthogonal to all previous ones, twice, because finite-difference
  products are only nearly symmetric and plain three-term Lanczos would grow ghost copies of the
  extreme eigenvalues). The eigenvalues of the small tridiagonal ``T`` (Ritz values) converge to
  the extreme eigenvalues of ``H`` first; with ``iters = n`` they are all of ``H``'s. It stops
  early once both extreme Ritz pairs have converged (``tol``), and it can be warm-started from
  the previous probe's extreme Ritz vectors, which the weights have moved only a little.
* The same run gives the spectral density by stochastic Lanczos quadrature (as PyHessian does):
  the Ritz values are the nodes and the squared first components of the eigenvectors of ``T``
  the weights of a quadrature of the start vector's spectral measure, which for a random start
  vector is an estimate of the eigenvalue density. ``spectral_density`` broadens it by
  Gaussians; ``negative_share`` is its mass below ``-eps``.
* ``extreme_eigenvalues`` puts these together on a probe batch: ``λ_max`` (sharpness),
  ``λ_min``, ``neg_ratio = |λ_min| / λ_max`` (how deep the most negative direction is; the
  saddle rule's number) and ``neg_share`` (how much of the spectrum is negative: the landscape's
  position, a different question). Ritz values lie inside ``[λ_min(H), λ_max(H)]``, so a
  negative ``lambda_min`` is a certificate that ``H`` has an eigenvalue at least that negative
  (up to the finite-difference error); an unconverged probe can only under-state it.
* ``escape_test`` steps along ``±v_min`` and compares the loss's fall with ``½ α² λ_min``:
  a saddle is confirmed when the loss really bends down as the curvature says.

Cost: each Lanczos step is one product, i.e. two forward+backward passes on the probe batch, plus
O(steps² · n) for the reorthogonalisation (small next to the passes); the escape test adds three
forward passes. ``benchmarks/bench_curvature.py`` measures it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mixer.config import MixerConfig

Params = dict[str, np.ndarray]
MatVec = Callable[[np.ndarray], np.ndarray]
GradFn = Callable[[np.ndarray], np.ndarray]

__all__ = [
    "Curvature",
    "Escape",
    "Ritz",
    "central_difference_hvp",
    "default_step",
    "escape_test",
    "extreme_eigenvalues",
    "flatten",
    "hvp",
    "lanczos",
    "loss_fn",
    "loss_gradient_fn",
    "loss_slices",
    "neg_ratio",
    "negative_share",
    "spectral_density",
    "unflatten",
]

# Weight of each previous Ritz vector in a warm start, against a unit random vector. It lifts the
# start vector's component along the extremes from ~1/sqrt(n) to ~0.1, and adds at most
# WARM_WEIGHT² (1 %) of spurious mass at each end of the quadrature's spectral measure.
WARM_WEIGHT = 0.1
# Steps a Lanczos run takes before it may stop early, so that a warm start still explores.
MIN_STEPS = 4


@dataclass(frozen=True)
class Ritz:
    """What a Lanczos run found.

    Attributes:
        values: Ritz values, ascending (the quadrature's nodes).
        weights: squared first components of the eigenvectors of ``T`` (the quadrature's weights,
            summing to 1; 0 for nodes found after a restart, outside the start vector's space).
        residuals: ``||A y - θ y||`` of each Ritz pair.
        vector_min, vector_max: the unit Ritz vectors of the extremes.
    """

    values: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    vector_min: np.ndarray = field(repr=False)
    vector_max: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Curvature:
    """Hessian eigenvalues of the loss at one point, as the Lanczos probe saw them.

    Attributes:
        lambda_max: largest Ritz value (estimate of the largest Hessian eigenvalue: sharpness).
        lambda_min: smallest Ritz value (estimate of the most negative eigenvalue, if any).
        neg_ratio: ``|lambda_min| / lambda_max`` if ``lambda_min < 0`` (and ``lambda_max > 0``),
            else 0. Above ~0.01 the negative curvature is more than round-off.
        neg_share: the spectral density's mass below ``-eps`` times the spectral radius.
        seconds: wall time of the probe.
        iters: Lanczos steps taken (fewer than asked when converged or the Krylov space is exhausted).
        residual_max: ``||H y - λ_max y||`` for the Ritz vector ``y`` (how converged λ_max is).
        residual_min: the same for ``λ_min``.
        ritz: the whole run (nodes and weights of the density, extreme Ritz vectors).
    """

    lambda_max: float
    lambda_min: float
    neg_ratio: float
    neg_share: float = 0.0
    seconds: float = 0.0
    iters: int = 0
    residual_max: float = float("nan")
    residual_min: float = float("nan")
    ritz: Ritz | None = field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------------------------------------
# Flat parameter vectors


def flatten(params: Params, *, dtype: np.dtype | type | None = None) -> np.ndarray:
    """All parameters in one vector, in sorted-key order (the order ``unflatten`` expects)."""
    dtype = np.dtype(dtype) if dtype is not None else np.result_type(*params.values())
    return np.concatenate([np.asarray(params[k], dtype=dtype).ravel() for k in sorted(params)])


def unflatten(vector: np.ndarray, like: Params) -> Params:
    """Split ``vector`` back into arrays with the keys and shapes of ``like`` (dtype of ``vector``)."""
    n = sum(int(np.size(a)) for a in like.values())
    if vector.shape != (n,):
        raise ValueError(f"vector must have shape ({n},) to match the parameters, got {vector.shape}")
    out: Params = {}
    offset = 0
    for key in sorted(like):
        size = int(np.size(like[key]))
        out[key] = vector[offset:offset + size].reshape(np.shape(like[key]))
        offset += size
    return out


# ---------------------------------------------------------------------------------------------
# Hessian-vector products


def default_step(theta: np.ndarray, v: np.ndarray) -> float:
    """The central-difference step ε for direction ``v`` at ``theta`` (see the module docstring)."""
    v_norm = float(np.linalg.norm(v))
    if v_norm == 0.0:
        raise ValueError("the direction v must be non-zero, got ||v||=0")
    unit_roundoff = float(np.finfo(theta.dtype).eps)
    factor = 1.0 if theta.dtype == np.float64 else 0.03  # float32: see the module docstring
    return factor * unit_roundoff ** 0.5 * (1.0 + float(np.linalg.norm(theta))) / v_norm


def central_difference_hvp(grad: GradFn, theta: np.ndarray, v: np.ndarray, *,
                           eps: float | None = None) -> np.ndarray:
    """``H(θ) v ≈ (g(θ + εv) - g(θ - εv)) / 2ε`` for any gradient function ``g`` of a flat vector.

    Args:
        grad: the gradient of a scalar function, flat vector in, flat vector out.
        theta: the point (float64 for accurate products).
        v: the direction, same shape as ``theta``.
        eps: the step; None picks ``default_step(theta, v)``.
    """
    if v.shape != theta.shape:
        raise ValueError(f"v must have the shape of theta {theta.shape}, got {v.shape}")
    if eps is None:
        eps = default_step(theta, v)
    elif not eps > 0:
        raise ValueError(f"eps must be > 0, got eps={eps}")
    v = np.asarray(v, dtype=theta.dtype)
    return (grad(theta + eps * v) - grad(theta - eps * v)) / (2.0 * eps)


def loss_gradient_fn(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, *,
                     dtype: np.dtype | type | None = np.float64) -> tuple[np.ndarray, GradFn]:
    """The point θ and the flat eval-mode gradient function of the Mixer's loss on ``(x, y)``.

    Args:
        dtype: the precision of the probe; params and inputs are cast to it (None keeps the
            params' own dtype). float64 makes the finite differences accurate to ~1e-10.

    Returns:
        ``(theta, grad)``: the flattened parameters and ``grad(theta) -> flat gradient``.
    """
    from mixer.model import loss_and_grads  # imported here: the model imports nothing of ours

    theta = flatten(params, dtype=dtype)
    xd = np.asarray(x, dtype=theta.dtype)

    def grad(vector: np.ndarray) -> np.ndarray:
        _, grads = loss_and_grads(unflatten(vector, params), xd, y, config, train=False)
        return flatten(grads, dtype=theta.dtype)

    return theta, grad


def hvp(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, v: np.ndarray, *,
        eps: float | None = None, dtype: np.dtype | type | None = np.float64) -> np.ndarray:
    """Hessian of the (eval-mode) training loss on ``(x, y)`` times ``v``, flat in sorted-key order.

    ``v`` is a flat vector over all parameters in the order of ``flatten(params)``. For many
    products at one point use ``loss_gradient_fn`` + ``central_difference_hvp`` (casts once).
    """
    theta, grad = loss_gradient_fn(params, x, y, config, dtype=dtype)
    return central_difference_hvp(grad, theta, np.asarray(v, dtype=theta.dtype), eps=eps)


def loss_fn(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, *,
            dtype: np.dtype | type | None = None) -> tuple[np.ndarray, Callable[[np.ndarray], float]]:
    """The point θ and the flat eval-mode loss function of the Mixer on ``(x, y)`` (forward only)."""
    from mixer.metrics import bce_with_logits
    from mixer.model import predict_logits

    theta = flatten(params, dtype=dtype)
    xd = np.asarray(x, dtype=theta.dtype)

    def loss(vector: np.ndarray) -> float:
        logits = predict_logits(unflatten(vector.astype(theta.dtype, copy=False), params), xd, config)
        return bce_with_logits(logits, y, pos_weight=config.pos_weight)

    return theta, loss


# ---------------------------------------------------------------------------------------------
# Lanczos and the spectral density


def _tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the symmetric tridiagonal matrix with diagonal ``alpha``, off-diagonal ``beta``."""
    return np.linalg.eigh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))


def lanczos(matvec: MatVec, n: int, *, iters: int, seed: int, tol: float = 0.0,
            warm: Sequence[np.ndarray] = ()) -> Ritz:
    """Lanczos with full (twice-applied) reorthogonalisation; restarts on an invariant subspace.

    A restart (β = 0 in T) happens when the Krylov space of the start vector is exhausted before
    ``iters`` steps, e.g. when the start vector misses some eigenvectors: the iteration continues
    with a fresh random vector orthogonal to everything so far, so that ``iters = n`` always
    reaches the full spectrum.

    Args:
        matvec: ``v -> A v`` for a symmetric ``n × n`` operator ``A``.
        n: the dimension.
        iters: the most steps to take (capped at ``n``); ``iters = n`` gives all of ``A``'s eigenvalues.
        seed: seeds the random start vector (same seed, same result).
        tol: after ``MIN_STEPS`` steps, stop once both extreme Ritz pairs have a residual
            ``||A y - θ y|| <= tol · max|θ|`` (it bounds their distance to an eigenvalue of ``A``);
            0 takes all ``iters`` steps.
        warm: vectors close to the wanted eigenvectors (the previous probe's ``vector_min`` and
            ``vector_max``), each added with weight ``WARM_WEIGHT`` to the random start vector.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got iters={iters}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got tol={tol}")
    k = min(iters, n)
    rng = np.random.default_rng(seed)
    basis = np.zeros((k, n))
    alpha = np.zeros(k)
    beta = np.zeros(k)  # beta[j] couples steps j, j + 1 (0 at a restart); the last: the residual scale
    q = rng.standard_normal(n)
    q /= np.linalg.norm(q)
    for y in warm:
        q += WARM_WEIGHT * np.asarray(y, dtype=np.float64) / np.linalg.norm(y)
    q /= np.linalg.norm(q)
    scale = 0.0  # running size of the operator, to decide what "β is zero" means
    for j in range(k):
        basis[j] = q
        w = np.asarray(matvec(q), dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"matvec must return shape ({n},), got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise FloatingPointError(f"matvec returned non-finite values at Lanczos step {j + 1}")
        alpha[j] = q @ w
        w -= alpha[j] * q
        if j > 0:
            w -= beta[j - 1] * basis[j - 1]
        # Twice is enough (Kahan-Parlett): one pass leaves O(u·κ) components, two leave O(u).
        for _ in range(2):
            w -= basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta[j] = b = float(np.linalg.norm(w))
        scale = max(scale, abs(alpha[j]), b)
        steps = j + 1
        if steps == k:
            break
        if tol and steps >= MIN_STEPS:
            values, vectors = _tridiagonal_eigh(alpha[:steps], beta[:steps - 1])
            # Residual of a Ritz pair = |β_j · last component of its eigenvector of T| (Paige).
            if b * max(abs(vectors[-1, 0]), abs(vectors[-1, -1])) <= tol * np.abs(values).max():
                break
        if b <= 1e-10 * max(scale, 1e-300):
            # Invariant subspace: T so far holds exact eigenvalues of it; continue elsewhere.
            w = rng.standard_normal(n)
            for _ in range(2):
                w -= basis[:j + 1].T @ (basis[:j + 1] @ w)
            beta[j] = 0.0
            q = w / np.linalg.norm(w)
        else:
            q = w / b
    values, vectors = _tridiagonal_eigh(alpha[:steps], beta[:steps - 1])
    ritz_vectors = basis[:steps].T @ vectors[:, [0, -1]]
    return Ritz(values=values, weights=vectors[0] ** 2, residuals=np.abs(beta[steps - 1] * vectors[-1]),
                vector_min=ritz_vectors[:, 0], vector_max=ritz_vectors[:, 1])


def spectral_density(ritz: Ritz, grid: np.ndarray, *, sigma: float) -> np.ndarray:
    """The quadrature's eigenvalue density on ``grid``, each node a Gaussian of width ``sigma``."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got sigma={sigma}")
    z = (np.asarray(grid, dtype=np.float64)[:, None] - ritz.values) / sigma
    return np.exp(-0.5 * z ** 2) @ ritz.weights / (sigma * math.sqrt(2 * math.pi))


def negative_share(ritz: Ritz, threshold: float, *, sigma: float) -> float:
    """The mass of ``spectral_density(ritz, ·, sigma=sigma)`` below ``threshold``."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got sigma={sigma}")
    below = [0.5 * math.erfc((v - threshold) / (sigma * math.sqrt(2))) for v in ritz.values]
    return float(np.dot(ritz.weights, below))


def neg_ratio(lambda_min: float, lambda_max: float) -> float:
    """``|λ_min| / λ_max`` when ``λ_min < 0 < λ_max``; 0 when ``λ_min >= 0``; inf if no positive side."""
    if lambda_min >= 0:
        return 0.0
    if lambda_max <= 0:
        return float("inf")
    return abs(lambda_min) / lambda_max


def extreme_eigenvalues(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, *,
                        iters: int = 20, seed: int = 0, dtype: np.dtype | type | None = np.float64,
                        eps: float | None = None, tol: float = 0.0, warm: Curvature | None = None,
                        share_eps: float = 0.01) -> Curvature:
    """λ_max, λ_min, their ratio and the negative share of the eval-mode loss's Hessian on ``(x, y)``.

    Args:
        params: the model's parameters (not modified).
        x, y: the probe batch (keep it fixed across a run so probes are comparable).
        config: the model's architecture.
        iters: the most Lanczos steps (Hessian-vector products); capped at the number of parameters.
        seed: seeds the Lanczos start vector.
        dtype: precision of the probe (float64 by default; None keeps the params' dtype).
        eps: finite-difference step; None picks ``default_step`` per product.
        tol: stop when the extremes have converged (see ``lanczos``); 0 takes ``iters`` steps.
        warm: the previous probe of this run, whose extreme Ritz vectors start this one.
        share_eps: ``neg_share`` counts the density below ``-share_eps`` times the spectral
            radius, broadened by a quarter of that, so that the bulk of near-zero eigenvalues
            does not leak into it.
    """
    start = time.perf_counter()
    theta, grad = loss_gradient_fn(params, x, y, config, dtype=dtype)

    def matvec(v: np.ndarray) -> np.ndarray:
        return central_difference_hvp(grad, theta, v.astype(theta.dtype, copy=False), eps=eps)

    previous = () if warm is None or warm.ritz is None else (warm.ritz.vector_min, warm.ritz.vector_max)
    ritz = lanczos(matvec, theta.size, iters=iters, seed=seed, tol=tol, warm=previous)
    lam_min, lam_max = float(ritz.values[0]), float(ritz.values[-1])
    cut = share_eps * max(abs(lam_min), abs(lam_max))
    share = negative_share(ritz, -cut, sigma=cut / 4) if cut > 0 else 0.0
    return Curvature(
        lambda_max=lam_max,
        lambda_min=lam_min,
        neg_ratio=neg_ratio(lam_min, lam_max),
        neg_share=share,
        seconds=time.perf_counter() - start,
        iters=int(ritz.values.size),
        residual_max=float(ritz.residuals[-1]),
        residual_min=float(ritz.residuals[0]),
        ritz=ritz,
    )


# ---------------------------------------------------------------------------------------------
# Escaping a saddle, and the loss along a line


@dataclass(frozen=True)
class Escape:
    """The loss one step ``α`` either way along a unit direction ``v``, against the second-order model.

    Attributes:
        alpha: the step length (in parameter space, ``v`` of length 1).
        loss: the loss at θ; ``loss_plus`` and ``loss_minus`` at ``θ ± α v``.
        predicted: ``-½ α² λ`` (the decrease the curvature ``λ = vᵀHv`` predicts).
        gain: the measured decrease ``loss - (loss_plus + loss_minus) / 2`` over ``predicted``:
            1 when the loss falls as predicted, <= 0 when it does not fall. The mean of the two
            sides cancels the gradient's first-order term, which would otherwise pass for curvature.
    """

    alpha: float
    loss: float
    loss_plus: float
    loss_minus: float
    predicted: float
    gain: float


def escape_test(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, direction: np.ndarray,
                curvature: float, *, fraction: float = 0.003, dtype: np.dtype | type | None = None) -> Escape:
    """Step along ``±direction`` (e.g. ``Ritz.vector_min``) whose curvature is ``curvature < 0``.

    The step is scaled so that the second-order model predicts a fall of ``fraction`` of the
    loss: some 1e4 times float32's round-off of the loss, and small enough that at the tests'
    constructed saddles the quadratic model holds within 10 % (at 1 % quartic terms add 30 %).
    """
    if not curvature < 0:
        raise ValueError(f"the escape test needs negative curvature, got curvature={curvature}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got fraction={fraction}")
    theta, loss = loss_fn(params, x, y, config, dtype=dtype)
    v = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    at = loss(theta)
    alpha = math.sqrt(2 * fraction * at / -curvature)
    plus, minus = loss(theta + alpha * v), loss(theta - alpha * v)
    predicted = -0.5 * alpha ** 2 * curvature
    return Escape(alpha=alpha, loss=at, loss_plus=plus, loss_minus=minus, predicted=predicted,
                  gain=(at - (plus + minus) / 2) / predicted)


def loss_slices(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, direction: np.ndarray, *,
                alphas: np.ndarray, dtype: np.dtype | type | None = None) -> dict[str, np.ndarray]:
    """1-D slices of the eval-mode loss on ``(x, y)``, for drawing.

    Returns:
        ``alpha`` (as given), ``direction`` (the loss at ``θ + α v`` for the unit ``v`` along
        ``direction``, e.g. ``Ritz.vector_min``) and ``gradient`` (at ``θ - α g/||g||``, so that
        positive steps go downhill).
    """
    theta, loss = loss_fn(params, x, y, config, dtype=dtype)
    _, grad = loss_gradient_fn(params, x, y, config, dtype=theta.dtype)
    alphas = np.asarray(alphas, dtype=np.float64)
    out = {"alpha": alphas}
    for name, d in (("direction", np.asarray(direction, dtype=np.float64)), ("gradient", -grad(theta))):
        unit = d / np.linalg.norm(d)
        out[name] = np.array([loss(theta + a * unit) for a in alphas])
    return out
