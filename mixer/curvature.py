"""Curvature of the training loss: Hessian-vector products, Lanczos, the spectrum, the escape test.

Is the loss surface at a point θ of training bowl-like, flat, or a saddle? Without forming the Hessian,
Lanczos on products ``H v`` (central differences of two eval-mode gradients) gives the extreme
eigenvalues and the spectral density; an escape test checks a saddle (docs/architecture.md)."""

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

__all__ = ["Curvature", "Escape", "Ritz", "central_difference_hvp", "default_step", "escape_test",
           "extreme_eigenvalues", "flatten", "hvp", "lanczos", "loss_fn", "loss_gradient_fn", "loss_slices",
           "neg_ratio", "negative_share", "spectral_density", "unflatten"]

# Weight of each previous Ritz vector in a warm start, against a unit random vector (docs/architecture.md).
WARM_WEIGHT = 0.1
# Steps a Lanczos run takes before it may stop early, so that a warm start still explores.
MIN_STEPS = 4


@dataclass(frozen=True)
class Ritz:
    """What a Lanczos run found: Ritz values (ascending, the quadrature's nodes), their quadrature
    weights (summing to 1; 0 for nodes found after a restart), the residuals ``||A y - θ y||`` of
    the Ritz pairs, and the unit Ritz vectors of the two extremes."""

    values: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    vector_min: np.ndarray = field(repr=False)
    vector_max: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Curvature:
    """Hessian eigenvalues of the loss at one point, as the Lanczos probe saw them. ``neg_ratio`` is
    ``|lambda_min| / lambda_max``: above ~0.01 the negative curvature is more than round-off.
    ``neg_share`` is the spectral density's mass below ``-eps`` times the spectral radius; ``seconds``
    is wall time; ``iters`` the Lanczos steps taken (fewer when converged)."""

    lambda_max: float
    lambda_min: float
    neg_ratio: float
    neg_share: float = 0.0
    seconds: float = 0.0
    iters: int = 0
    ritz: Ritz | None = field(default=None, repr=False, compare=False)


def flatten(params: Params, *, dtype: np.dtype | type | None = None) -> np.ndarray:
    """All parameters in one vector, in sorted-key order (the order ``unflatten`` expects)."""
    dtype = np.dtype(dtype) if dtype is not None else np.result_type(*params.values())
    return np.concatenate([np.asarray(params[k], dtype=dtype).ravel() for k in sorted(params)])


def unflatten(vector: np.ndarray, like: Params) -> Params:
    """Split ``vector`` back into arrays with the keys and shapes of ``like`` (dtype of ``vector``)."""
    keys = sorted(like)
    ends = np.cumsum([int(np.size(like[key])) for key in keys])
    n = int(ends[-1])
    if vector.shape != (n,):
        raise ValueError(f"vector must have shape ({n},) to match the parameters, got {vector.shape}")
    return {key: part.reshape(np.shape(like[key]))
            for key, part in zip(keys, np.split(vector, ends[:-1]), strict=True)}


def default_step(theta: np.ndarray, v: np.ndarray) -> float:
    """The central-difference step ``ε = c · sqrt(u) · (1 + ||θ||) / ||v||``, ``u`` the dtype's round-off,
    ``c`` 1, or 0.03 in float32, where truncation error dominates (benchmarks/README.md has the scan)."""
    v_norm = float(np.linalg.norm(v))
    if v_norm == 0.0:
        raise ValueError("the direction v must be non-zero, got ||v||=0")
    unit_roundoff = float(np.finfo(theta.dtype).eps)
    factor = 1.0 if theta.dtype == np.float64 else 0.03
    return factor * unit_roundoff ** 0.5 * (1.0 + float(np.linalg.norm(theta))) / v_norm


def central_difference_hvp(grad: GradFn, theta: np.ndarray, v: np.ndarray, *,
                           eps: float | None = None) -> np.ndarray:
    """``H(θ) v ≈ (g(θ + εv) - g(θ - εv)) / 2ε`` for a flat gradient ``g``; ``eps`` None: ``default_step``."""
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
    """``(theta, grad)``: the flat parameters and the flat eval-mode loss gradient on ``(x, y)``, cast to
    ``dtype`` (None: the params' own; float64 makes the finite differences accurate to ~1e-10)."""
    from mixer.model import loss_and_grads  # imported here: the model imports nothing of ours

    theta = flatten(params, dtype=dtype)
    xd = np.asarray(x, dtype=theta.dtype)

    def grad(vector: np.ndarray) -> np.ndarray:
        _, grads = loss_and_grads(unflatten(vector, params), xd, y, config, train=False)
        return flatten(grads, dtype=theta.dtype)

    return theta, grad


def hvp(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, v: np.ndarray, *,
        eps: float | None = None, dtype: np.dtype | type | None = np.float64) -> np.ndarray:
    """Hessian of the eval-mode training loss on ``(x, y)`` times ``v``, both flat as ``flatten(params)``;
    for many products at one point, ``loss_gradient_fn`` + ``central_difference_hvp`` cast only once."""
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


def _tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.linalg.eigh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))


def lanczos(matvec: MatVec, n: int, *, iters: int, seed: int, tol: float = 0.0,
            warm: Sequence[np.ndarray] = ()) -> Ritz:
    """Lanczos on ``matvec`` (symmetric ``n × n``) with full (twice-applied) reorthogonalisation.

    At most ``iters`` steps (capped at ``n``; ``iters = n`` gives the whole spectrum: an exhausted
    Krylov space restarts, β = 0 in T, from a fresh random vector orthogonal to all so far). After
    ``MIN_STEPS`` steps it stops once both extreme Ritz pairs have ``||A y - θ y|| <= tol · max|θ|``
    (``tol`` 0: all steps). ``warm`` vectors (the previous probe's extremes) are added with weight
    ``WARM_WEIGHT`` to the start vector, which ``seed`` draws."""
    for name, value, low in (("n", n, 1), ("iters", iters, 1), ("tol", tol, 0)):
        if not value >= low:
            raise ValueError(f"{name} must be >= {low}, got {name}={value}")
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

    Keep the probe batch fixed across a run, so probes are comparable. ``iters``, ``seed`` and
    ``tol`` go to ``lanczos``; ``warm`` is the run's previous probe, whose Ritz vectors start this
    one. ``neg_share`` counts the density below ``-share_eps`` times the spectral radius, broadened
    by a quarter of that, so the near-zero bulk does not leak in."""
    start = time.perf_counter()
    theta, grad = loss_gradient_fn(params, x, y, config, dtype=dtype)

    def matvec(v: np.ndarray) -> np.ndarray:
        return central_difference_hvp(grad, theta, v.astype(theta.dtype, copy=False), eps=eps)

    previous = () if warm is None or warm.ritz is None else (warm.ritz.vector_min, warm.ritz.vector_max)
    ritz = lanczos(matvec, theta.size, iters=iters, seed=seed, tol=tol, warm=previous)
    lam_min, lam_max = float(ritz.values[0]), float(ritz.values[-1])
    cut = share_eps * max(abs(lam_min), abs(lam_max))
    share = negative_share(ritz, -cut, sigma=cut / 4) if cut > 0 else 0.0
    return Curvature(lambda_max=lam_max, lambda_min=lam_min, neg_ratio=neg_ratio(lam_min, lam_max),
                     neg_share=share, seconds=time.perf_counter() - start, iters=int(ritz.values.size),
                     ritz=ritz)


@dataclass(frozen=True)
class Escape:
    """The loss at θ and at ``θ ± α v`` (unit ``v``), against the second-order model: ``predicted`` is
    ``-½ α² λ``, ``gain`` the measured decrease ``loss - (loss_plus + loss_minus) / 2`` over it (1 when
    the loss falls as predicted, <= 0 when it does not). Averaging the two sides cancels the
    gradient's first-order term, which would otherwise pass for curvature."""

    alpha: float
    loss: float
    loss_plus: float
    loss_minus: float
    predicted: float
    gain: float


def escape_test(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, direction: np.ndarray,
                curvature: float, *, fraction: float = 0.003, dtype: np.dtype | type | None = None) -> Escape:
    """Step along ``±direction`` (e.g. ``Ritz.vector_min``), whose curvature is ``curvature < 0``, as far
    as makes the second-order model predict a fall of ``fraction`` of the loss: far above float32's
    round-off, yet small enough for the quadratic model to hold (docs/architecture.md)."""
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
    """1-D slices of the eval-mode loss on ``(x, y)``, for drawing: ``alpha`` (as given), ``direction``
    (the loss at ``θ + α v``, ``v`` the unit ``direction``) and ``gradient`` (at ``θ - α g/||g||``)."""
    theta, loss = loss_fn(params, x, y, config, dtype=dtype)
    _, grad = loss_gradient_fn(params, x, y, config, dtype=theta.dtype)
    alphas = np.asarray(alphas, dtype=np.float64)
    out = {"alpha": alphas}
    for name, d in (("direction", np.asarray(direction, dtype=np.float64)), ("gradient", -grad(theta))):
        unit = d / np.linalg.norm(d)
        out[name] = np.array([loss(theta + a * unit) for a in alphas])
    return out
