"""Pure forward/backward pairs for the Mixer: linear, layernorm, GELU with fused dropout, BCE.

Each op is a stateless pair ``op_forward(...) -> (out, cache)``, ``op_backward(dout, cache) ->
(dx, ...)`` (CS231n ``layers.py``); randomness comes from the caller's ``np.random.Generator``.
Results are computed in place in our own temporaries, never in a caller's array. Python float
constants are "weak" scalars (NEP 50), so the dtype follows the input's."""

from __future__ import annotations

import functools
import math

import numpy as np

from mixer._parallel import bounds

__all__ = ["GELU_TANH_COEF", "TOKEN_BLOCK_COLUMNS", "bce_with_logits_backward", "bce_with_logits_forward",
           "dropout_mask", "erf", "gelu_backward", "gelu_forward", "layernorm_backward", "layernorm_forward",
           "linear_backward", "linear_forward", "token_linear_backward", "token_linear_forward"]

# sqrt(2/pi) and the cubic coefficient of the tanh approximation of GELU (Hendrycks & Gimpel;
# the same constants as torch's GELU(approximate="tanh")).
_K = math.sqrt(2.0 / math.pi)
GELU_TANH_COEF = 0.044715
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
# Dropout masks compare 16-bit random integers with a threshold: resolution 2^-16.
_MASK_LEVELS = 1 << 16
# Token-mixing matmuls have one long axis (batch*dim columns) and two short ones: OpenBLAS runs
# them faster on column blocks of this size than in one call, as a block's operands stay in L2.
TOKEN_BLOCK_COLUMNS = 1024


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of ones: axis sums as BLAS matrix-vector products beat ``ndarray.sum`` here."""
    ones = np.ones(n, dtype=dtype)
    ones.flags.writeable = False
    return ones


@functools.lru_cache(maxsize=64)
def _column_blocks(n: int) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in bounds(n, TOKEN_BLOCK_COLUMNS))


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Features-last affine map (torch ``nn.Linear``): x (n, in), w (out, in), b (out,) -> ``x @ w.T + b``."""
    out = x @ w.T
    out += b
    return out, (x, w)


def linear_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``linear_forward``: dout (n, out) -> dx (n, in), dw (out, in), db (out,)."""
    x, w = cache
    return dout @ w, dout.T @ x, _ones(dout.shape[0], dout.dtype) @ dout


def token_linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Features-first affine map, the token-mixing layer: x (in, n), w (out, in) -> ``w @ x + b[:, None]``."""
    out = np.empty((w.shape[0], x.shape[1]), dtype=np.result_type(x, w))
    for cols in _column_blocks(x.shape[1]):
        np.matmul(w, x[:, cols], out=out[:, cols])
    out += b[:, None]
    return out, (x, w)


def token_linear_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``token_linear_forward``: dout (out, n) -> dx (in, n), dw (out, in), db (out,)."""
    x, w = cache
    dx = np.empty(x.shape, dtype=np.result_type(dout, w))
    dw = np.zeros(w.shape, dtype=np.result_type(dout, x))
    for cols in _column_blocks(x.shape[1]):
        np.matmul(w.T, dout[:, cols], out=dx[:, cols])
        dw += dout[:, cols] @ x[:, cols].T
    return dx, dw, dout @ _ones(dout.shape[1], dout.dtype)


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, *,
                      eps: float = 1e-5) -> tuple[np.ndarray, tuple]:
    """LayerNorm of x (n, dim) over the last axis (torch ``nn.LayerNorm(dim)``, biased variance).

    Caches ``(xhat, w, rstd)``, not x: the residual stream it reads is updated in place."""
    dim = x.shape[-1]
    ones = _ones(dim, x.dtype)
    mean = x @ ones
    mean *= 1.0 / dim
    xhat = x - mean[:, None]
    sq = xhat * xhat
    rstd = sq @ ones
    rstd *= 1.0 / dim
    rstd += eps
    np.sqrt(rstd, out=rstd)
    np.divide(1.0, rstd, out=rstd)
    xhat *= rstd[:, None]
    np.multiply(xhat, w, out=sq)
    sq += b
    return sq, (xhat, w, rstd)


def layernorm_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``layernorm_forward``: dout (n, dim) -> dx (n, dim), dw (dim,), db (dim,).

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * w; both means are
    matrix-vector products with w, so they need no (n, dim) temporary."""
    xhat, w, rstd = cache
    dim = xhat.shape[-1]
    prod = dout * xhat
    ones = _ones(dout.shape[0], dout.dtype)
    dw = ones @ prod
    db = ones @ dout
    mean_g = dout @ w
    mean_gx = prod @ w
    scale = rstd / dim
    mean_g *= scale          # rstd * mean(g)
    mean_gx *= scale         # rstd * mean(g * xhat)
    np.multiply(xhat, mean_gx[:, None], out=prod)
    dx = dout * w
    dx *= rstd[:, None]
    dx -= mean_g[:, None]
    dx -= prod
    return dx, dw, db


# Cephes ndtr.c (S. L. Moshier, public domain), behind scipy.special.erf: relative error ~1e-16 in
# float64, so the exact-GELU derivative (with exp(-x^2/2)) agrees with the forward far past the check.
_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF_U = (3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC_Q = (1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)
_ERFC_R = (5.64189583547755073984e-1, 1.27536670759978104416e0, 5.01905042251180477414e0,
           6.16021097993053585195e0, 7.40974269950448939160e0, 2.97886665372100240670e0)
_ERFC_S = (2.26052863220117276590e0, 9.39603524938001434673e0, 1.20489539808096656605e1,
           1.70814450747565897222e1, 9.60896809063285878198e0, 3.36907645100081516050e0)


def _polevl(x: np.ndarray, coefs: tuple[float, ...], *, monic: bool = False) -> np.ndarray:
    """Horner's rule; ``monic`` prepends an implicit leading coefficient 1 (Cephes p1evl)."""
    acc = x + coefs[0] if monic else np.full_like(x, coefs[0])
    for c in coefs[1:]:
        acc *= x
        acc += c
    return acc


# Eigen's single-precision erf (also XLA's and oneDNN's): x P(x^2) / Q(x^2) on x clamped to [-4, 4],
# within a few float32 ulps; branch-free, so much faster in NumPy than Cephes' masked gathers.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in x's dtype, with NumPy only (scipy is no runtime dependency):
    Eigen's approximation in float32 (error ~1e-7), else Cephes' (1 - erfc beyond |x| = 1, ~1e-16)."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        xc = np.clip(x, -4.0, 4.0)
        z = xc * xc
        p = _polevl(z, _ERF32_P)
        p *= xc
        p /= _polevl(z, _ERF32_Q)
        return p
    out = np.empty_like(x)
    ax = np.abs(x)
    small = ax <= 1.0
    xs = x[small]
    z = xs * xs
    out[small] = xs * _polevl(z, _ERF_T) / _polevl(z, _ERF_U, monic=True)
    large = ~small
    if large.any():
        xl = ax[large]
        mid = xl < 8.0
        p = np.where(mid, _polevl(xl, _ERFC_P), _polevl(xl, _ERFC_R))
        q = np.where(mid, _polevl(xl, _ERFC_Q, monic=True), _polevl(xl, _ERFC_S, monic=True))
        erfc = np.exp(-(xl * xl)) * p / q
        out[large] = np.copysign(1.0 - erfc, x[large])
    return out


def gelu_forward(x: np.ndarray, *, form: str = "tanh", p: float = 0.0, rng: np.random.Generator | None = None,
                 need_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """GELU, optionally followed by dropout, fused: one pass over the hidden activation.

    ``form="tanh"``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (the default: one tanh);
    ``form="erf"``: 0.5 x (1 + erf(x / sqrt(2))), exact (see ``erf``), slower. With ``p > 0`` and an
    ``rng`` the result is multiplied by a dropout mask (0, or 1/(1-p)). The cache is d(out)/dx itself,
    mask included, so the backward is one multiply; ``need_grad=False`` (eval) returns None for it."""
    if form == "tanh":
        x2 = x * x
        t = np.multiply(x2, _K * GELU_TANH_COEF)
        t += _K
        t *= x
        np.tanh(t, out=t)
    elif form == "erf":
        t = erf(x * _INV_SQRT2)
    else:
        raise ValueError(f"form must be 'tanh' or 'erf', got form={form!r}")
    # half = 0.5 (1 + t) * mask: the GELU's gate, with the dropout mask (and the 0.5) folded in.
    mask = dropout_mask(x.shape, p, rng, dtype=x.dtype, scale=0.5) if (rng is not None and p > 0) else None
    t += 1.0
    if mask is None:
        half = t * 0.5
    elif form == "tanh":
        half = mask  # the mask itself is not needed again
        half *= t
    else:
        half = mask * t
    out = half * x
    if not need_grad:
        return out, None
    # d/dx [0.5 x (1 + t)] * mask = half + 0.5 x t'(x) * mask, where
    #   tanh form: x t' = (1 - t^2) x s = (1 - t) (1 + t) s  ->  half * (1 + (1 - t) s)
    #   erf form:  x t' = s                                  ->  half + (mask / 2) s
    if form == "tanh":
        # s = x * d(tanh argument)/dx = x sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        s = x2
        s *= 3.0 * _K * GELU_TANH_COEF
        s += _K
        s *= x
        np.subtract(2.0, t, out=t)  # t held 1 + tanh; now 1 - tanh
        s *= t
        s += 1.0
        s *= half
    else:
        # s = x * d(erf(x/sqrt2))/dx = x * sqrt(2/pi) exp(-x^2/2)
        s = x * x
        s *= -0.5
        np.exp(s, out=s)
        s *= x
        s *= _K
        s *= 0.5 if mask is None else mask
        s += half
    return out, s


def gelu_backward(dout: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """Gradient of ``gelu_forward`` (including its dropout mask): dout (any) -> dx (same shape)."""
    return dout * cache


def dropout_mask(shape: tuple[int, ...], p: float, rng: np.random.Generator, *, dtype=np.float32,
                 scale: float = 1.0) -> np.ndarray:
    """A dropout mask: 0 with probability p, else scale / (1 - p). Both use p rounded to a multiple of
    2^-16 (16-bit integers against round(p * 65536)), so the mask's expectation is exactly ``scale``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got p={p}")
    n = math.prod(shape)
    threshold = round(p * _MASK_LEVELS)
    raw = rng.bit_generator.random_raw((n + 3) // 4)
    bits = raw.view(np.uint16)[:n].reshape(shape)
    mask = (bits >= threshold).astype(dtype)
    mask *= scale * _MASK_LEVELS / (_MASK_LEVELS - threshold)
    return mask


def bce_with_logits_forward(logits: np.ndarray, y: np.ndarray, *, pos_weight: float = 1.0,
                            reduction: str = "mean") -> tuple[float, tuple]:
    """Binary cross-entropy on logits z (n,) against targets y (n,) in [0, 1], as torch
    ``BCEWithLogitsLoss(pos_weight=...)``: (1 - y) z + (1 + (pos_weight - 1) y) logaddexp(0, -z), finite
    for any finite z. ``reduction`` is "mean" or "sum"; returns the loss (a Python float) and the cache."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got reduction={reduction!r}")
    if pos_weight <= 0:
        raise ValueError(f"pos_weight must be > 0, got pos_weight={pos_weight}")
    y = np.asarray(y).astype(logits.dtype, copy=False)
    lw = 1.0 + (pos_weight - 1.0) * y
    per_row = (1.0 - y) * logits + lw * np.logaddexp(0.0, -logits)
    denom = len(logits) if reduction == "mean" else 1
    return float(per_row.sum(dtype=np.float64)) / denom, (logits, y, lw, denom)


def bce_with_logits_backward(cache: tuple, dloss: float = 1.0) -> np.ndarray:
    """d/d(logits) (n,) of ``bce_with_logits_forward``: (1 - y) - (1 + (pos_weight - 1) y) sigmoid(-z)."""
    z, y, lw, denom = cache
    sig_neg = np.exp(-np.logaddexp(0.0, z))
    dz = (1.0 - y) - lw * sig_neg
    dz *= dloss / denom
    return dz
