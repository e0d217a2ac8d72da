"""The MLP-Mixer for tabular rows: parameters, forward, hand-written backward, loss.

A row of ``n_features`` values is cut into ``n_tokens`` tokens of ``patch_size`` consecutive
features (with ``bins``, each value first spread over that many pieces by ``piecewise_linear``),
each projected to ``dim`` channels; ``depth`` blocks then alternate a token-mixing MLP and a
channel-mixing MLP (pre-norm, residual, dropout, stochastic depth rising linearly to
``stochastic_depth`` at the last block); a final LayerNorm, a mean over tokens and a linear head
give one logit, scored by binary cross-entropy with ``pos_weight``.

Parameters are one flat dict with dotted names, weights (out, in) like torch ``nn.Linear``, float32
or float64; activations are token-major (tokens*batch, dim) (docs/architecture.md)."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from mixer import layers as L
from mixer._parallel import bounds, get_num_threads, parallel_map, set_num_threads, threads_chosen
from mixer.config import MixerConfig
from mixer.metrics import normal_quantiles

__all__ = ["EVAL_ROWS", "GATHER_MIN_DROPPED", "SHARD_ROWS", "drop_path_rates", "flops_per_example",
           "get_num_threads", "init_params", "loss_and_grads", "param_count", "param_shapes",
           "piecewise_linear", "predict_logits", "set_num_threads", "threads_chosen"]

# Rows per shard of a training batch. Fixed (not derived from the thread count) so that the
# masks and the order of the gradient sum, hence the results, are the same on any machine.
SHARD_ROWS = 16
# Rows per chunk in predict_logits: small enough for a chunk's activations to stay in cache,
# and memory stays flat however many rows come in.
EVAL_ROWS = 32
# The outer edges of piecewise_linear's pieces, as normal quantiles: beyond them a value saturates.
EDGE_TAIL = 0.0005


def param_shapes(config: MixerConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, in the (stable) order ``init_params`` creates them."""
    T, P, D = config.n_tokens, config.patch_width, config.dim
    Ht, Hc = config.token_hidden, config.channel_hidden
    shapes: dict[str, tuple[int, ...]] = {"embed.w": (D, P), "embed.b": (D,)}
    # The token MLP maps T -> Ht -> T, the channel MLP D -> Hc -> D; both are pre-normed over D.
    for block in _block_keys(config.depth):
        for keys, n, h in zip(block, (T, D), (Ht, Hc), strict=True):
            shapes.update(zip(keys, ((D,), (D,), (h, n), (h,), (n, h), (n,)), strict=True))
    shapes.update({"norm.w": (D,), "norm.b": (D,), "head.w": (1, D), "head.b": (1,)})
    return shapes


def init_params(config: MixerConfig, seed: int, *, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Fresh parameters, as torch initialises them: a linear layer's weight, then its bias, ~
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_(a=sqrt(5))) from ``default_rng(seed)``;
    LayerNorm weight 1, bias 0. Drawn in float64 and rounded to ``dtype`` (float32 or float64), so
    float32 and float64 parameters of one seed agree."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got dtype={dtype}")
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(config).items():
        layer, kind = name.rsplit(".", 1)
        if layer.endswith("norm"):
            params[name] = (np.ones if kind == "w" else np.zeros)(shape, dtype=dtype)
        else:
            # A linear layer's weight comes first, so its fan-in is known for the bias too.
            fan_in = shape[1] if kind == "w" else params[layer + ".w"].shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            params[name] = rng.uniform(-bound, bound, size=shape).astype(dtype)
    return params


def param_count(config: MixerConfig) -> int:
    """The number of scalar parameters."""
    return sum(math.prod(s) for s in param_shapes(config).values())


def flops_per_example(config: MixerConfig, *, backward: bool = True) -> int:
    """Matmul FLOPs (2*m*n*k each) of one example, forward + backward (``backward=False``: forward
    only). Backward costs two matmuls per forward one, but one for the patch embedding (its input needs
    no gradient). Elementwise work is not counted."""
    T, P, D = config.n_tokens, config.patch_width, config.dim
    embed = 2 * T * P * D
    block = 2 * (2 * T * D * config.token_hidden) + 2 * (2 * T * D * config.channel_hidden)
    head = 2 * D
    forward = embed + config.depth * block + head
    return 3 * forward - embed if backward else forward


@functools.cache
def _edges(bins: int) -> np.ndarray:
    return normal_quantiles(bins + 1, tail=EDGE_TAIL)


def piecewise_linear(x: np.ndarray, bins: int) -> np.ndarray:
    """(..., P) -> (..., P * bins): each value spread over ``bins`` pieces (Gorishniy et al., 2022).

    Piece i lies between the standard normal's quantiles at i/bins and (i+1)/bins (the outer edges
    at ``EDGE_TAIL`` and 1 - ``EDGE_TAIL``: the scalings standardise each feature) and reads -1 below
    its piece, +1 above it and linearly in between."""
    e = _edges(bins).astype(x.dtype)
    z = (x[..., None] - e[:-1]) * (1.0 / (e[1:] - e[:-1])).astype(x.dtype)
    np.clip(z, 0.0, 1.0, out=z)
    z *= 2
    z -= 1
    return z.reshape(*x.shape[:-1], x.shape[-1] * bins)


def drop_path_rates(config: MixerConfig) -> list[float]:
    """Drop-path probability of each block: linear from 0 (first) to stochastic_depth (last)."""
    return [config.stochastic_depth * i / max(1, config.depth - 1) for i in range(config.depth)]


_MLP_KEYS = ("norm.w", "norm.b", "fc1.w", "fc1.b", "fc2.w", "fc2.b")  # the order of a branch's Weights
Weights = tuple[np.ndarray, ...]
Shape3 = tuple[int, int, int]


@functools.lru_cache(maxsize=16)
def _block_keys(depth: int) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    """Parameter names of each block, (token names, channel names), built once per depth."""
    return tuple((tuple(f"blocks.{i}.token.{k}" for k in _MLP_KEYS),
                  tuple(f"blocks.{i}.channel.{k}" for k in _MLP_KEYS)) for i in range(depth))


def _block_weights(params: dict[str, np.ndarray], depth: int) -> list[tuple[Weights, Weights]]:
    """(token weights, channel weights) per block, looked up once per batch, not once per shard."""
    return [(tuple(params[k] for k in tk), tuple(params[k] for k in ck)) for tk, ck in _block_keys(depth)]


def _mlp_forward(h: np.ndarray, tokens: bool, w: Weights, shape3: Shape3, form: str, drop: float,
                 rng: np.random.Generator | None, need_grad: bool) -> tuple[np.ndarray, tuple]:
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: (T*b, D) -> (T*b, D); the linears mix the
    tokens (on h viewed as (T, b*D)) if ``tokens``, else the channels of each token."""
    T, b, D = shape3
    n, ln = L.layernorm_forward(h, w[0], w[1])
    x, linear = (n.reshape(T, b * D), L.token_linear_forward) if tokens else (n, L.linear_forward)
    z, _ = linear(x, w[2], w[3])
    a, g = L.gelu_forward(z, form=form, p=drop, rng=rng, need_grad=need_grad)
    out, _ = linear(a, w[4], w[5])
    return out.reshape(T * b, D), (ln, x, g, a)


def _mlp_backward(dout: np.ndarray, tokens: bool, cache: tuple, w: Weights,
                  shape3: Shape3) -> tuple[np.ndarray, Weights]:
    T, b, D = shape3
    ln, x, g, a = cache
    linear_backward = L.token_linear_backward if tokens else L.linear_backward
    da, dw2, db2 = linear_backward(dout.reshape(T, b * D) if tokens else dout, (a, w[4]))
    dz = L.gelu_backward(da, g)
    dx, dw1, db1 = linear_backward(dz, (x, w[2]))
    dh, dnw, dnb = L.layernorm_backward(dx.reshape(T * b, D), ln)
    return dh, (dnw, dnb, dw1, db1, dw2, db2)


# Drop-path runs a branch on the kept samples only once at least this many are dropped; a single
# dropped sample is cheaper to zero through the output mask than to gather around.
GATHER_MIN_DROPPED = 2


def _residual_forward(h: np.ndarray, tokens: bool, w: Weights, shape3: Shape3, config: MixerConfig,
                      rate: float, rng: np.random.Generator | None, need_grad: bool) -> tuple | None:
    """h (T*b, D) += drop_path(dropout(mlp(h))), in place. Returns the cache (None: branch skipped)."""
    T, b, D = shape3
    drop = config.dropout if rng is not None else 0.0
    idx = None
    path = None
    scale = 1.0
    hk, shape_k = h, shape3
    if rng is not None and rate > 0:
        keep = rng.random(b) >= rate
        scale = 1.0 / (1.0 - rate)
        dropped = b - int(np.count_nonzero(keep))
        if dropped == b:
            return None
        if dropped >= GATHER_MIN_DROPPED:
            idx = np.flatnonzero(keep)
            shape_k = (T, len(idx), D)
            hk = h.reshape(shape3).take(idx, axis=1).reshape(T * len(idx), D)
        elif dropped:
            path = keep.astype(h.dtype).reshape(1, b, 1)
    out, cache = _mlp_forward(hk, tokens, w, shape_k, config.gelu, drop, rng, need_grad)
    out3 = out.reshape(shape_k)
    mask: np.ndarray | float | None = None
    if drop > 0:
        mask = L.dropout_mask(shape_k, drop, rng, dtype=out.dtype, scale=scale)
        if path is not None:
            mask *= path
    elif path is not None:
        mask = path * scale
    elif scale != 1.0:
        mask = scale
    if mask is not None:
        out3 *= mask
    _add_samples(h, idx, shape3, out3)
    return idx, mask, cache, shape_k


def _residual_backward(dh: np.ndarray, rcache: tuple | None, tokens: bool, w: Weights,
                       shape3: Shape3) -> Weights:
    """Gradients of a residual branch's weights; adds the branch's input gradient into dh."""
    if rcache is None:
        return tuple(np.zeros_like(a) for a in w)
    idx, mask, cache, shape_k = rcache
    if idx is None:
        dk = dh if mask is None else (dh.reshape(shape_k) * mask).reshape(dh.shape)
    else:
        dk3 = dh.reshape(shape3).take(idx, axis=1)
        if mask is not None:
            dk3 *= mask
        dk = dk3.reshape(shape_k[0] * shape_k[1], shape_k[2])
    dx, grads = _mlp_backward(dk, tokens, cache, w, shape_k)
    _add_samples(dh, idx, shape3, dx.reshape(shape_k))
    return grads


def _add_samples(h: np.ndarray, idx: np.ndarray | None, shape3: Shape3, delta: np.ndarray) -> None:
    """h (T*b, D) += delta (T, k, D) in place, on the samples ``idx`` only (None: all b of them)."""
    if idx is None:
        h += delta.reshape(h.shape)
        return
    h3 = h.reshape(shape3)
    part = h3.take(idx, axis=1)
    part += delta
    h3[:, idx] = part


def _forward(p: dict[str, np.ndarray], blocks: list[tuple[Weights, Weights]], x: np.ndarray,
             config: MixerConfig, rng: np.random.Generator | None,
             caches: list | None) -> tuple[np.ndarray, tuple | None]:
    """Logits of x (b, n_features) -> (b,). ``rng`` None = eval mode (no dropout, no drop-path).

    With a ``caches`` list, appends one cache per block and returns the head's cache too; without,
    keeps nothing (eval: memory stays at a few activations)."""
    T, P, D = config.n_tokens, config.patch_size, config.dim
    b = x.shape[0]
    shape3 = (T, b, D)
    need_grad = caches is not None
    # (b, T*P) -> token-major (T*b, P): the only transposed copy, and the smallest array.
    xt = np.ascontiguousarray(x.reshape(b, T, P).transpose(1, 0, 2)).reshape(T * b, P)
    if config.bins:
        xt = piecewise_linear(xt, config.bins)
    h, _ = L.linear_forward(xt, p["embed.w"], p["embed.b"])
    for (wt, wc), rate in zip(blocks, drop_path_rates(config), strict=True):
        ct = _residual_forward(h, True, wt, shape3, config, rate, rng, need_grad)
        cc = _residual_forward(h, False, wc, shape3, config, rate, rng, need_grad)
        if caches is not None:
            caches.append((ct, cc))
    nf, lnf = L.layernorm_forward(h, p["norm.w"], p["norm.b"])
    pooled = nf.reshape(shape3).mean(axis=0)
    logits = pooled @ p["head.w"][0]
    logits += p["head.b"][0]
    return logits, ((xt, lnf, pooled) if caches is not None else None)


def _backward(p: dict[str, np.ndarray], blocks: list[tuple[Weights, Weights]], config: MixerConfig,
              dlogits: np.ndarray, head_cache: tuple, caches: list) -> dict[str, np.ndarray]:
    """Gradients of every parameter from dlogits (b,), unwinding ``_forward``'s caches."""
    T, D = config.n_tokens, config.dim
    xt, lnf, pooled = head_cache
    b = pooled.shape[0]
    shape3 = (T, b, D)
    g: dict[str, np.ndarray] = {"head.w": (dlogits @ pooled)[None, :], "head.b": dlogits.sum(keepdims=True)}
    # d(mean over tokens): every token gets dpooled / T.
    dpooled = np.multiply.outer(dlogits, p["head.w"][0] * (1.0 / T))
    dnf = np.broadcast_to(dpooled, shape3).reshape(T * b, D)
    dh, g["norm.w"], g["norm.b"] = L.layernorm_backward(dnf, lnf)
    for (tk, ck), (wt, wc) in zip(reversed(_block_keys(config.depth)), reversed(blocks), strict=True):
        ct, cc = caches.pop()
        g.update(zip(ck, _residual_backward(dh, cc, False, wc, shape3), strict=True))
        g.update(zip(tk, _residual_backward(dh, ct, True, wt, shape3), strict=True))
    # The patch embedding's input is data: only its weight and bias need gradients.
    g["embed.w"] = dh.T @ xt
    g["embed.b"] = np.ones(dh.shape[0], dh.dtype) @ dh
    return g


def _check_inputs(params: dict[str, np.ndarray], x: np.ndarray, config: MixerConfig, *,
                  allow_empty: bool = False) -> np.ndarray:
    """x as a C-contiguous array of the parameters' dtype, after checking its shape."""
    if "embed.w" not in params:
        raise KeyError("params has no 'embed.w'; build them with init_params(config, seed)")
    dtype = params["embed.w"].dtype
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != config.n_features:
        raise ValueError(f"x must have shape (batch, n_features={config.n_features}), got x.shape={x.shape}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError("x must have at least one row, got x.shape[0]=0")
    return np.ascontiguousarray(x, dtype=dtype)


def _shape(config: MixerConfig) -> tuple[int, ...]:
    """What a step's cost depends on: part of the key under which its thread count is chosen."""
    return (config.n_tokens, config.patch_width, config.dim, config.depth, config.token_hidden,
            config.channel_hidden)


def loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, config: MixerConfig, *,
                   train: bool = False, rng: np.random.Generator | None = None,
                   label_smoothing: float = 0.0) -> tuple[float, dict[str, np.ndarray]]:
    """Mean binary cross-entropy of a batch and its gradient with respect to every parameter.

    ``x`` (batch, n_features) is cast to the parameters' dtype; ``y`` (batch,) holds labels in {0, 1}.
    ``train`` enables dropout and drop-path, with masks from ``rng`` (required then; a batch takes
    one draw per shard from it). ``label_smoothing`` s in [0, 1) scores against ``y (1 - s) + s / 2``.
    Returns the loss (a Python float) and a dict with exactly the keys of ``params``."""
    x = _check_inputs(params, x, config)
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape (batch,) = ({x.shape[0]},), got y.shape={y.shape}")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"y must hold only 0 and 1, got values {np.unique(y)[:5].tolist()}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got label_smoothing={label_smoothing}")
    y = y.astype(x.dtype, copy=False)
    if label_smoothing:
        y = y * (1.0 - label_smoothing) + label_smoothing / 2
    if train and rng is None:
        raise ValueError("train=True needs rng (a np.random.Generator) to draw dropout and drop-path masks")
    n = x.shape[0]
    shards = bounds(n, SHARD_ROWS)
    random = train and (config.dropout > 0 or config.stochastic_depth > 0)
    shard_rngs: list[np.random.Generator | None] = [None] * len(shards)
    if random:
        # SFC64: the fastest of NumPy's bit generators (drawing dropout masks is a visible part of a step).
        seeds = rng.integers(0, 2**63, size=len(shards))
        shard_rngs = [np.random.Generator(np.random.SFC64(int(s))) for s in seeds]

    blocks = _block_weights(params, config.depth)

    def run(k: int) -> tuple[float, dict[str, np.ndarray]]:
        lo, hi = shards[k]
        caches: list = []
        logits, head_cache = _forward(params, blocks, x[lo:hi], config, shard_rngs[k], caches)
        loss_sum, bce_cache = L.bce_with_logits_forward(
            logits, y[lo:hi], pos_weight=config.pos_weight, reduction="sum")
        dlogits = L.bce_with_logits_backward(bce_cache, 1.0 / n)
        return loss_sum, _backward(params, blocks, config, dlogits, head_cache, caches)

    results = parallel_map(run, range(len(shards)), key=("train", _shape(config), x.dtype.char, random))
    loss = sum(r[0] for r in results) / n
    total = results[0][1]
    for _, grads in results[1:]:
        for key, value in grads.items():
            total[key] += value
    return loss, {key: total[key] for key in params}


def predict_logits(params: dict[str, np.ndarray], x: np.ndarray, config: MixerConfig) -> np.ndarray:
    """Eval-mode logits (batch,) in the parameters' dtype, computed ``EVAL_ROWS`` rows at a time."""
    x = _check_inputs(params, x, config, allow_empty=True)
    if x.shape[0] == 0:
        return np.empty(0, dtype=x.dtype)
    blocks = _block_weights(params, config.depth)
    chunks = parallel_map(lambda b: _forward(params, blocks, x[b[0]:b[1]], config, None, None)[0],
                          bounds(x.shape[0], EVAL_ROWS), key=("predict", _shape(config), x.dtype.char))
    return np.concatenate(chunks)
