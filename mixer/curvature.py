"""Curvature of the training loss: Hessian-vector products and extreme eigenvalues by Lanczos.

The probe answers one question about a point θ of training: is the loss surface there bowl-like
(all Hessian eigenvalues >= 0), flat, or a saddle (a clearly negative eigenvalue)? It never forms
the Hessian (400k parameters would need 1.3 TB): it only needs products ``H v``.

* ``hvp`` gets ``H v`` by a central difference of the analytic gradient,
  ``(g(θ + εv) - g(θ - εv)) / 2ε``, with ``ε = sqrt(u) · (1 + ||θ||) / ||v||`` (``u`` the unit
  round-off of the probe's dtype): a step relative to the size of the weights and independent of
  the length of ``v``. The textbook optimum for central differences is ``u^(1/3)`` (truncation
  O(ε²) against rounding O(u/ε)), but it assumes third derivatives no larger than the loss; along
  a Mixer's sharp directions they are far larger, and in float32 that step understates λ_max
  badly where ``u^(1/2)`` does not. The gradient is taken in eval mode (``train=False``: no
  dropout, no drop-path) so that ``H`` is the Hessian of one deterministic function; the probe
  runs in float64 unless asked otherwise.
* ``lanczos`` runs ``iters`` steps of the Lanczos iteration with full reorthogonalisation (every
  new vector is made orthogonal to all previous ones, twice, because finite-difference products
  are only nearly symmetric and plain three-term Lanczos would grow ghost copies of the
  extreme eigenvalues). The eigenvalues of the small tridiagonal ``T`` (Ritz values) converge
  to the extreme eigenvalues of ``H`` first; with ``iters = n`` they are all of ``H``'s.
* ``extreme_eigenvalues`` puts the two together on a probe batch and reports ``λ_max``,
  ``λ_min`` and ``neg_ratio = |λ_min| / λ_max`` (0 when ``λ_min >= 0``): the share of the
  curvature that points downhill. Ritz values lie inside ``[λ_min(H), λ_max(H)]``, so a
  negative ``lambda_min`` from the probe is a certificate that ``H`` has a negative eigenvalue at
  least that negative (up to the finite-difference error), while an unconverged probe can only
  under-state the negative curvature, never invent it.

Cost: ``iters`` Hessian-vector products, each two forward+backward passes on the probe batch,
plus O(iters² · n) for the reorthogonalisation (small next to the passes); float32 is cheaper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mixer.config import MixerConfig

Params = dict[str, np.ndarray]
MatVec = Callable[[np.ndarray], np.ndarray]
GradFn = Callable[[np.ndarray], np.ndarray]

__all__ = [
    "Curvature",
    "central_difference_hvp",
    "default_step",
    "extreme_eigenvalues",
    "flatten",
    "hvp",
    "lanczos",
    "loss_gradient_fn",
    "unflatten",
]


@dataclass(frozen=True)
class Curvature:
    """Extreme Hessian eigenvalues of the loss at one point, as the Lanczos probe saw them.

    Attributes:
        lambda_max: largest Ritz value (estimate of the largest Hessian eigenvalue).
        lambda_min: smallest Ritz value (estimate of the most negative eigenvalue, if any).
        neg_ratio: ``|lambda_min| / lambda_max`` if ``lambda_min < 0`` (and ``lambda_max > 0``),
            else 0. Above ~0.01 the negative curvature is more than round-off.
        seconds: wall time of the probe.
        iters: Lanczos steps actually taken (fewer than asked when the Krylov space is exhausted).
        residual_max: ``||H y - λ_max y||`` for the Ritz vector ``y`` (how converged λ_max is).
        residual_min: the same for ``λ_min``.
    """

    lambda_max: float
    lambda_min: float
    neg_ratio: float
    seconds: float = 0.0
    iters: int = 0
    residual_max: float = float("nan")
    residual_min: float = float("nan")


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
    return unit_roundoff ** 0.5 * (1.0 + float(np.linalg.norm(theta))) / v_norm


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


# ---------------------------------------------------------------------------------------------
# Lanczos


@dataclass(frozen=True)
class _Tridiagonal:
    alpha: np.ndarray          # diagonal of T, shape (k,)
    beta: np.ndarray           # off-diagonal of T, shape (k - 1,); 0 where the iteration restarted
    beta_next: float           # the β_{k} that would continue the iteration (residual scale)


def _lanczos_tridiagonal(matvec: MatVec, n: int, *, iters: int, seed: int) -> _Tridiagonal:
    """Lanczos with full (twice-applied) reorthogonalisation; restarts on an invariant subspace.

    A restart (β = 0 in T) happens when the Krylov space of the start vector is exhausted before
    ``iters`` steps, e.g. when the start vector misses some eigenvectors: the iteration continues
    with a fresh random vector orthogonal to everything so far, so that ``iters = n`` always
    reaches the full spectrum.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got iters={iters}")
    k = min(iters, n)
    rng = np.random.default_rng(seed)
    basis = np.zeros((k, n))
    alpha = np.zeros(k)
    beta = np.zeros(max(k - 1, 0))
    q = rng.standard_normal(n)
    q /= np.linalg.norm(q)
    scale = 0.0  # running size of the operator, to decide what "β is zero" means
    beta_next = 0.0
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
        b = float(np.linalg.norm(w))
        scale = max(scale, abs(alpha[j]), b)
        if j == k - 1:
            beta_next = b
            break
        if b <= 1e-10 * max(scale, 1e-300):
            # Invariant subspace: T so far holds exact eigenvalues of it; continue elsewhere.
            w = rng.standard_normal(n)
            for _ in range(2):
                w -= basis[:j + 1].T @ (basis[:j + 1] @ w)
            q = w / np.linalg.norm(w)
            beta[j] = 0.0
        else:
            q = w / b
            beta[j] = b
    return _Tridiagonal(alpha=alpha, beta=beta, beta_next=beta_next)


def _tridiagonal_eigh(t: _Tridiagonal) -> tuple[np.ndarray, np.ndarray]:
    k = t.alpha.size
    matrix = np.diag(t.alpha)
    if k > 1:
        matrix += np.diag(t.beta, 1) + np.diag(t.beta, -1)
    return np.linalg.eigh(matrix)


def lanczos(matvec: MatVec, n: int, *, iters: int, seed: int) -> np.ndarray:
    """Ritz values (eigenvalues of the Lanczos tridiagonal ``T``), ascending.

    Args:
        matvec: ``v -> A v`` for a symmetric ``n × n`` operator ``A``.
        n: the dimension.
        iters: Lanczos steps (capped at ``n``); ``iters = n`` gives all of ``A``'s eigenvalues.
        seed: seeds the random start vector (same seed, same result).
    """
    values, _ = _tridiagonal_eigh(_lanczos_tridiagonal(matvec, n, iters=iters, seed=seed))
    return values


def neg_ratio(lambda_min: float, lambda_max: float) -> float:
    """``|λ_min| / λ_max`` when ``λ_min < 0 < λ_max``; 0 when ``λ_min >= 0``; inf if no positive side."""
    if lambda_min >= 0:
        return 0.0
    if lambda_max <= 0:
        return float("inf")
    return abs(lambda_min) / lambda_max


def extreme_eigenvalues(params: Params, x: np.ndarray, y: np.ndarray, config: MixerConfig, *,
                        iters: int = 20, seed: int = 0, dtype: np.dtype | type | None = np.float64,
                        eps: float | None = None) -> Curvature:
    """λ_max, λ_min and their ratio for the Hessian of the eval-mode loss on the probe ``(x, y)``.

    Args:
        params: the model's parameters (not modified).
        x, y: the probe batch (keep it fixed across a run so probes are comparable).
        config: the model's architecture.
        iters: Lanczos steps (Hessian-vector products); capped at the number of parameters.
        seed: seeds the Lanczos start vector.
        dtype: precision of the probe (float64 by default; None keeps the params' dtype).
        eps: finite-difference step; None picks ``default_step`` per product.
    """
    start = time.perf_counter()
    theta, grad = loss_gradient_fn(params, x, y, config, dtype=dtype)

    def matvec(v: np.ndarray) -> np.ndarray:
        return central_difference_hvp(grad, theta, v.astype(theta.dtype, copy=False), eps=eps)

    t = _lanczos_tridiagonal(matvec, theta.size, iters=iters, seed=seed)
    values, vectors = _tridiagonal_eigh(t)
    # Residual of a Ritz pair = |β_k · last component of its eigenvector of T| (Paige).
    residuals = np.abs(t.beta_next * vectors[-1, :])
    lam_min, lam_max = float(values[0]), float(values[-1])
    return Curvature(
        lambda_max=lam_max,
        lambda_min=lam_min,
        neg_ratio=neg_ratio(lam_min, lam_max),
        seconds=time.perf_counter() - start,
        iters=int(t.alpha.size),
        residual_max=float(residuals[-1]),
        residual_min=float(residuals[0]),
    )
