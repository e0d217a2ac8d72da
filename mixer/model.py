"""The MLP-Mixer for tabular rows: parameters, forward, hand-written backward, loss.

A row of ``n_features`` values is cut into ``n_tokens`` tokens of ``patch_size``
consecutive features, each projected to ``dim`` channels; ``depth`` blocks then
alternate a token-mixing MLP and a channel-mixing MLP (pre-norm, residual,
dropout, stochastic depth rising linearly to ``stochastic_depth`` at the last
block); a final LayerNorm, a mean over tokens and a linear head give one logit,
scored by binary cross-entropy with ``pos_weight``.

Parameters are one flat dict with dotted names (``blocks.3.token.fc1.w``), weights
shaped (out, in) like torch ``nn.Linear``. Gradients come back in a dict with the
same keys. Float32 for training; float64 works the same (gradient checks).

Speed (see DESIGN.md, "Speed", and benchmarks/README.md for measurements):

- Activations are token-major, (tokens, batch, dim), stored as 2-D
  (tokens*batch, dim). Token mixing is then one matmul ``W @ X.reshape(tokens,
  batch*dim)`` and channel mixing one matmul ``X @ W.T``; neither needs a transpose.
- A batch is cut into shards of ``SHARD_ROWS`` rows that run on a small thread
  pool (NumPy releases the GIL inside BLAS calls and ufunc loops), and their
  gradients are summed. BLAS itself is kept single-threaded: multi-threaded
  OpenBLAS is *slower* than one thread on these skinny matrices (measured 3-20x
  on the token-mixing shapes), so parallelism over shards is the only kind used.
  The shard size is fixed, and each shard draws its dropout masks from its own
  generator seeded from the caller's ``rng``, so results do not depend on the
  number of threads.
- The thread count is ``MIXER_NUM_THREADS`` if set, else the CPUs this process may
  run on; ``set_num_threads`` changes it. Sweep workers sharing a machine should
  set it to the cores each one owns. It is a ceiling: for each kind of work
  (training or prediction) and model shape, the first calls alternate between one
  thread and all of them, timed, and the faster is kept for the rest of the process.
  A small model's shards hold the GIL most of the time, and two threads passing it
  back and forth were measured 1.3-2.1x slower than one (dim 32, depth 1-2); from
  dim 128 on, two are faster (1.2x, and 1.7x for the headline model):
  ``benchmarks/bench_threads.py``.
- Drop-path skips the dropped samples' branch work instead of multiplying it by 0
  (``_residual_forward``); the GELU caches its own derivative, so its backward pass
  is one multiply (``layers.gelu_forward``); the first call tunes the process
  (single-threaded BLAS, an allocator that keeps freed buffers: ``_tune_process``).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from mixer import layers as L
from mixer.config import MixerConfig

__all__ = [
    "EVAL_ROWS",
    "GATHER_MIN_DROPPED",
    "SHARD_ROWS",
    "drop_path_rates",
    "flops_per_example",
    "get_num_threads",
    "init_params",
    "loss_and_grads",
    "param_count",
    "param_shapes",
    "predict_logits",
    "set_num_threads",
    "threads_chosen",
]

# Rows per shard of a training batch. Fixed (not derived from the thread count) so that the
# masks and the order of the gradient sum, hence the results, are the same on any machine.
SHARD_ROWS = 16
# Rows per chunk in predict_logits: small enough for a chunk's activations to stay in cache
# (measured: 32 rows 2.5 s of CPU per 4,000 rows of the headline model, 256 rows 3.0 s), and
# memory stays flat however many rows come in.
EVAL_ROWS = 32


# --------------------------------------------------------------------------- parameters
def param_shapes(config: MixerConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, in the (stable) order ``init_params`` creates them."""
    T, P, D = config.n_tokens, config.patch_size, config.dim
    Ht, Hc = config.token_hidden, config.channel_hidden
    shapes: dict[str, tuple[int, ...]] = {"embed.w": (D, P), "embed.b": (D,)}
    for i in range(config.depth):
        pre = f"blocks.{i}."
        shapes.update({
            pre + "token.norm.w": (D,), pre + "token.norm.b": (D,),
            pre + "token.fc1.w": (Ht, T), pre + "token.fc1.b": (Ht,),
            pre + "token.fc2.w": (T, Ht), pre + "token.fc2.b": (T,),
            pre + "channel.norm.w": (D,), pre + "channel.norm.b": (D,),
            pre + "channel.fc1.w": (Hc, D), pre + "channel.fc1.b": (Hc,),
            pre + "channel.fc2.w": (D, Hc), pre + "channel.fc2.b": (D,),
        })
    shapes.update({"norm.w": (D,), "norm.b": (D,), "head.w": (1, D), "head.b": (1,)})
    return shapes


def init_params(config: MixerConfig, seed: int, *, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Fresh parameters, initialised as torch does by default.

    Linear layers: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's
    kaiming_uniform_(a=sqrt(5)) and its bias rule), drawn in that order, layer by layer, from
    ``np.random.default_rng(seed)``. LayerNorm: weight 1, bias 0. Values are drawn in float64
    and rounded to ``dtype``, so float32 and float64 parameters of one seed agree.
    """
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
    """Matmul FLOPs of one training example, forward + backward (2*m*n*k per matmul).

    Backward costs two matmuls per forward one (input and weight gradients), except the patch
    embedding, whose input needs no gradient. Elementwise work is not counted.
    ``backward=False``: the forward pass alone (evaluation).
    """
    T, P, D = config.n_tokens, config.patch_size, config.dim
    embed = 2 * T * P * D
    block = 2 * (2 * T * D * config.token_hidden) + 2 * (2 * T * D * config.channel_hidden)
    head = 2 * D
    forward = embed + config.depth * block + head
    return 3 * forward - embed if backward else forward


def drop_path_rates(config: MixerConfig) -> list[float]:
    """Drop-path probability of each block: linear from 0 (first) to stochastic_depth (last)."""
    if config.depth == 1:
        return [0.0]
    return [config.stochastic_depth * i / (config.depth - 1) for i in range(config.depth)]


# --------------------------------------------------------------------------- threads
_T = TypeVar("_T")
_R = TypeVar("_R")
_lock = threading.Lock()
_num_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0  # worker threads besides the caller's
_tuned = False
_adaptive = True
# Timed calls of each thread count before one is chosen (after one untimed warm-up call).
PROBES = 3
_chosen: dict[tuple, int] = {}                   # (work, shape, dtype, ..., items, ceiling) -> threads
_timings: dict[tuple, dict[int, list[float]]] = {}  # the same keys while still probing


def _default_threads() -> int:
    env = os.environ.get("MIXER_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"MIXER_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"MIXER_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """Threads the model runs shards on (see the module docstring)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n: int | None, *, adaptive: bool = True) -> None:
    """Run shards on up to ``n`` threads (None: back to the default). Results do not depend on it.

    Args:
        adaptive: use fewer threads for work that measured faster on one (see the module
            docstring); False: always ``n`` (benchmarks comparing thread counts).
    """
    global _num_threads, _pool, _adaptive
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got n={n!r}")
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n
        _adaptive = adaptive
        _chosen.clear()
        _timings.clear()


def threads_chosen() -> dict[tuple, int]:
    """The thread count chosen so far per kind of work.

    Keys are ``(work, shape, dtype, ..., items, ceiling)``: work is "train" (then also whether
    dropout is on) or "predict", shape as ``_shape`` gives it, items the shards or chunks per call.
    """
    with _lock:
        return dict(_chosen)


def _threads_for(key: tuple | None, ceiling: int) -> tuple[int, bool]:
    """(threads to use for this call, whether to time it): the chosen count, or the next probe."""
    if key is None or not _adaptive:
        return ceiling, False
    chosen = _chosen.get(key)  # once chosen, no lock on this per-batch path (a dict read is atomic)
    if chosen is not None:
        return chosen, False
    with _lock:
        timings = _timings.get(key)
        if timings is None:  # the first call warms caches and the pool: not timed
            _timings[key] = {1: [], ceiling: []}
            return ceiling, False
    ones, alls = len(timings[1]), len(timings[ceiling])
    return (1 if ones <= alls else ceiling), True


def _record(key: tuple, threads: int, seconds: float) -> None:
    with _lock:
        timings = _timings.get(key)
        if timings is None:  # set_num_threads cleared it meanwhile
            return
        timings[threads].append(seconds)
        if all(len(t) >= PROBES for t in timings.values()):
            _chosen[key] = _faster(timings)
            del _timings[key]


def _faster(timings: dict[int, list[float]]) -> int:
    """The thread count with the lowest median time; the fewer threads on a tie."""
    return min(timings, key=lambda t: (statistics.median(timings[t]), t))


def _after_fork_in_child() -> None:
    # A forked child has no pool threads; an inherited executor would wait for them forever.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _tune_process() -> None:
    """Once per process: single-threaded BLAS, and an allocator that keeps freed buffers.

    BLAS: see the module docstring. Uses threadpoolctl when it is installed; otherwise BLAS keeps
    its own thread count (set OPENBLAS_NUM_THREADS=1 before starting Python for the same effect).

    Allocator: a step allocates and frees a few hundred activation arrays of 0.1-1 MB. glibc
    serves those from fresh mmap()s (or trims them from the heap on free), so every new array
    page-faults: measured 250 us for a 710 kB array versus 17 us with the memory kept, which made
    the token-mixing GELU 5x slower. Raising the mmap and trim thresholds keeps the memory in the
    heap for reuse; peak RSS is unchanged (it is the high-water mark either way).
    """
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        threadpool_limits(limits=1, user_api="blas")
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
    mallopt(m_trim_threshold, 512 << 20)


def _map(fn: Callable[[_T], _R], items: Sequence[_T], key: tuple | None = None) -> list[_R]:
    """``[fn(i) for i in items]`` on up to ``get_num_threads()`` threads, the calling one included.

    Items are handed out one at a time (shards of a batch, or chunks of rows to predict), so a
    thread slowed by other load on the machine simply takes fewer. Results are in item order.
    ``key`` names the kind of work: the first calls with a key are timed on one thread and on
    all of them, and the faster count is used from then on.
    """
    _tune_process()
    n = len(items)
    ceiling = min(get_num_threads(), n)
    if ceiling <= 1:
        return [fn(item) for item in items]
    if key is not None:
        key = (*key, n, ceiling)
    threads, timed = _threads_for(key, ceiling)
    if not timed:
        return _run(fn, items, threads)
    started = time.perf_counter()
    results = _run(fn, items, threads)
    _record(key, threads, time.perf_counter() - started)
    return results


def _run(fn: Callable[[_T], _R], items: Sequence[_T], threads: int) -> list[_R]:
    global _pool, _pool_size
    n = len(items)
    if threads <= 1:
        return [fn(item) for item in items]
    with _lock:
        if _pool is None or _pool_size < threads - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size = get_num_threads() - 1
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="mixer")
        pool = _pool
    results: list = [None] * n
    counter = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        for k in iter(counter.__next__, None):
            if k >= n:
                return
            results[k] = fn(items[k])

    helpers = [pool.submit(work) for _ in range(threads - 1)]
    try:
        work()
    finally:
        for future in helpers:
            future.result()
    return results


def _shape(config: MixerConfig) -> tuple[int, ...]:
    """What a step's cost depends on, for choosing its thread count."""
    return (config.n_tokens, config.patch_size, config.dim, config.depth, config.token_hidden,
            config.channel_hidden)


# --------------------------------------------------------------------------- forward / backward
_TOKEN_KEYS = ("token.norm.w", "token.norm.b", "token.fc1.w", "token.fc1.b", "token.fc2.w", "token.fc2.b")
_CHANNEL_KEYS = ("channel.norm.w", "channel.norm.b", "channel.fc1.w", "channel.fc1.b",
                 "channel.fc2.w", "channel.fc2.b")
Weights = tuple[np.ndarray, ...]
Shape3 = tuple[int, int, int]


@functools.lru_cache(maxsize=16)
def _block_keys(depth: int) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    """Parameter names of each block, (token names, channel names), built once per depth."""
    return tuple((tuple(f"blocks.{i}.{k}" for k in _TOKEN_KEYS),
                  tuple(f"blocks.{i}.{k}" for k in _CHANNEL_KEYS)) for i in range(depth))


def _block_weights(params: dict[str, np.ndarray], depth: int) -> list[tuple[Weights, Weights]]:
    """(token weights, channel weights) per block, looked up once per batch, not once per shard."""
    return [(tuple(params[k] for k in tk), tuple(params[k] for k in ck)) for tk, ck in _block_keys(depth)]


def _token_mlp_forward(
    h: np.ndarray, w: Weights, shape3: Shape3, form: str, drop: float,
    rng: np.random.Generator | None, need_grad: bool,
) -> tuple[np.ndarray, tuple]:
    """LayerNorm -> Linear over tokens -> GELU -> Dropout -> Linear: (T*b, D) -> (T*b, D)."""
    T, b, D = shape3
    n, ln = L.layernorm_forward(h, w[0], w[1])
    x = n.reshape(T, b * D)
    z, _ = L.token_linear_forward(x, w[2], w[3])
    a, g = L.gelu_forward(z, form=form, p=drop, rng=rng, need_grad=need_grad)
    out, _ = L.token_linear_forward(a, w[4], w[5])
    return out.reshape(T * b, D), (ln, x, g, a)


def _token_mlp_backward(
    dout: np.ndarray, cache: tuple, w: Weights, shape3: Shape3
) -> tuple[np.ndarray, Weights]:
    T, b, D = shape3
    ln, x, g, a = cache
    da, dw2, db2 = L.token_linear_backward(dout.reshape(T, b * D), (a, w[4]))
    dz = L.gelu_backward(da, g)
    dx, dw1, db1 = L.token_linear_backward(dz, (x, w[2]))
    dh, dnw, dnb = L.layernorm_backward(dx.reshape(T * b, D), ln)
    return dh, (dnw, dnb, dw1, db1, dw2, db2)


def _channel_mlp_forward(
    h: np.ndarray, w: Weights, shape3: Shape3, form: str, drop: float,
    rng: np.random.Generator | None, need_grad: bool,
) -> tuple[np.ndarray, tuple]:
    """LayerNorm -> Linear over channels -> GELU -> Dropout -> Linear: (T*b, D) -> (T*b, D)."""
    n, ln = L.layernorm_forward(h, w[0], w[1])
    z, _ = L.linear_forward(n, w[2], w[3])
    a, g = L.gelu_forward(z, form=form, p=drop, rng=rng, need_grad=need_grad)
    out, _ = L.linear_forward(a, w[4], w[5])
    return out, (ln, n, g, a)


def _channel_mlp_backward(
    dout: np.ndarray, cache: tuple, w: Weights, shape3: Shape3
) -> tuple[np.ndarray, Weights]:
    ln, n, g, a = cache
    da, dw2, db2 = L.linear_backward(dout, (a, w[4]))
    dz = L.gelu_backward(da, g)
    dn, dw1, db1 = L.linear_backward(dz, (n, w[2]))
    dh, dnw, dnb = L.layernorm_backward(dn, ln)
    return dh, (dnw, dnb, dw1, db1, dw2, db2)


# Drop-path runs a branch on the kept samples only once at least this many are dropped; a single
# dropped sample is cheaper to zero through the output mask than to gather around (measured).
GATHER_MIN_DROPPED = 2


def _residual_forward(
    h: np.ndarray, mlp: Callable, w: Weights, shape3: Shape3, config: MixerConfig,
    rate: float, rng: np.random.Generator | None, need_grad: bool,
) -> tuple | None:
    """h (T*b, D) += drop_path(dropout(mlp(h))), in place. Returns the cache (None: branch skipped).

    Drop-path is the same function as computing every sample and multiplying the dropped ones by
    0, but when at least ``GATHER_MIN_DROPPED`` samples are dropped the branch runs on the kept
    samples only and its output is added back into their rows: at the headline
    stochastic_depth=0.3 the rate averages 0.15 over the blocks, work not done at all.
    """
    T, b, D = shape3
    drop = config.dropout if rng is not None else 0.0
    idx = None
    path = None
    scale = 1.0
    if rng is not None and rate > 0:
        keep = rng.random(b) >= rate
        scale = 1.0 / (1.0 - rate)
        dropped = b - int(np.count_nonzero(keep))
        if dropped == b:
            return None
        if dropped >= GATHER_MIN_DROPPED:
            idx = np.flatnonzero(keep)
        elif dropped:
            path = keep.astype(h.dtype).reshape(1, b, 1)
    if idx is None:
        hk, shape_k = h, shape3
    else:
        shape_k = (T, len(idx), D)
        hk = h.reshape(shape3).take(idx, axis=1).reshape(T * len(idx), D)
    out, cache = mlp(hk, w, shape_k, config.gelu, drop, rng, need_grad)
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
    if idx is None:
        h += out
    else:
        h3 = h.reshape(shape3)
        part = h3.take(idx, axis=1)
        part += out3
        h3[:, idx] = part
    return idx, mask, cache, shape_k


def _residual_backward(
    dh: np.ndarray, rcache: tuple | None, mlp_backward: Callable, w: Weights, shape3: Shape3
) -> Weights:
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
    dx, grads = mlp_backward(dk, cache, w, shape_k)
    if idx is None:
        dh += dx
    else:
        dh3 = dh.reshape(shape3)
        part = dh3.take(idx, axis=1)
        part += dx.reshape(shape_k)
        dh3[:, idx] = part
    return grads


def _forward(
    p: dict[str, np.ndarray],
    blocks: list[tuple[Weights, Weights]],
    x: np.ndarray,
    config: MixerConfig,
    rng: np.random.Generator | None,
    caches: list | None,
) -> tuple[np.ndarray, tuple | None]:
    """Logits of x (b, n_features) -> (b,). ``rng`` None = eval mode (no dropout, no drop-path).

    With a ``caches`` list, appends one cache per block and returns the head's cache too;
    without, keeps nothing (eval: memory stays at a few activations).
    """
    T, P, D = config.n_tokens, config.patch_size, config.dim
    b = x.shape[0]
    shape3 = (T, b, D)
    need_grad = caches is not None
    # (b, T*P) -> token-major (T*b, P): the only transposed copy, and the smallest array.
    xt = np.ascontiguousarray(x.reshape(b, T, P).transpose(1, 0, 2)).reshape(T * b, P)
    h, _ = L.linear_forward(xt, p["embed.w"], p["embed.b"])
    for (wt, wc), rate in zip(blocks, drop_path_rates(config), strict=True):
        ct = _residual_forward(h, _token_mlp_forward, wt, shape3, config, rate, rng, need_grad)
        cc = _residual_forward(h, _channel_mlp_forward, wc, shape3, config, rate, rng, need_grad)
        if caches is not None:
            caches.append((ct, cc))
    nf, lnf = L.layernorm_forward(h, p["norm.w"], p["norm.b"])
    pooled = nf.reshape(shape3).mean(axis=0)
    logits = pooled @ p["head.w"][0]
    logits += p["head.b"][0]
    return logits, ((xt, lnf, pooled) if caches is not None else None)


def _backward(
    p: dict[str, np.ndarray],
    blocks: list[tuple[Weights, Weights]],
    config: MixerConfig,
    dlogits: np.ndarray,
    head_cache: tuple,
    caches: list,
) -> dict[str, np.ndarray]:
    """Gradients of every parameter from dlogits (b,), unwinding ``_forward``'s caches."""
    T, D = config.n_tokens, config.dim
    xt, lnf, pooled = head_cache
    b = pooled.shape[0]
    shape3 = (T, b, D)
    g: dict[str, np.ndarray] = {}
    g["head.w"] = (dlogits @ pooled)[None, :]
    g["head.b"] = dlogits.sum(keepdims=True)
    # d(mean over tokens): every token gets dpooled / T.
    dpooled = np.multiply.outer(dlogits, p["head.w"][0] * (1.0 / T))
    dnf = np.broadcast_to(dpooled, shape3).reshape(T * b, D)
    dh, g["norm.w"], g["norm.b"] = L.layernorm_backward(dnf, lnf)
    keys = _block_keys(config.depth)
    for i in reversed(range(config.depth)):
        wt, wc = blocks[i]
        ct, cc = caches.pop()
        grads_c = _residual_backward(dh, cc, _channel_mlp_backward, wc, shape3)
        g.update(zip(keys[i][1], grads_c, strict=True))
        grads_t = _residual_backward(dh, ct, _token_mlp_backward, wt, shape3)
        g.update(zip(keys[i][0], grads_t, strict=True))
    # The patch embedding's input is data: only its weight and bias need gradients.
    g["embed.w"] = dh.T @ xt
    g["embed.b"] = np.ones(dh.shape[0], dh.dtype) @ dh
    return g


# --------------------------------------------------------------------------- public entry points
def _check_inputs(
    params: dict[str, np.ndarray], x: np.ndarray, config: MixerConfig, *, allow_empty: bool = False
) -> np.ndarray:
    """x as a C-contiguous array of the parameters' dtype, after checking its shape."""
    try:
        dtype = params["embed.w"].dtype
    except KeyError:
        raise KeyError("params has no 'embed.w'; build them with init_params(config, seed)") from None
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != config.n_features:
        raise ValueError(f"x must have shape (batch, n_features={config.n_features}), got x.shape={x.shape}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError("x must have at least one row, got x.shape[0]=0")
    return np.ascontiguousarray(x, dtype=dtype)


def _bounds(n: int, rows: int) -> list[tuple[int, int]]:
    """Cut n rows into ceil(n / rows) contiguous, near-equal shards."""
    k = -(-n // rows)
    cuts = [i * n // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def loss_and_grads(
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    config: MixerConfig,
    *,
    train: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean binary cross-entropy of a batch and its gradient with respect to every parameter.

    Args:
        params: as ``init_params`` makes them (float32 or float64; everything follows).
        x: (batch, n_features), cast to the parameters' dtype.
        y: (batch,) labels in {0, 1}.
        config: the architecture the parameters belong to.
        train: enable dropout and drop-path (masks drawn from ``rng``).
        rng: required when ``train`` is True. A batch consumes one draw per shard from it.

    Returns:
        The loss (a Python float) and a dict with exactly the keys of ``params``.
    """
    x = _check_inputs(params, x, config)
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape (batch,) = ({x.shape[0]},), got y.shape={y.shape}")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"y must hold only 0 and 1, got values {np.unique(y)[:5].tolist()}")
    y = y.astype(x.dtype, copy=False)
    if train and rng is None:
        raise ValueError("train=True needs rng (a np.random.Generator) to draw dropout and drop-path masks")
    n = x.shape[0]
    bounds = _bounds(n, SHARD_ROWS)
    random = train and (config.dropout > 0 or config.stochastic_depth > 0)
    if random:
        seeds = rng.integers(0, 2**63, size=len(bounds))
        # SFC64: the fastest of NumPy's bit generators (dropout masks are ~10% of a step).
        shard_rngs: list[np.random.Generator | None] = [
            np.random.Generator(np.random.SFC64(int(s))) for s in seeds]
    else:
        shard_rngs = [None] * len(bounds)

    blocks = _block_weights(params, config.depth)

    def run(k: int) -> tuple[float, dict[str, np.ndarray]]:
        lo, hi = bounds[k]
        caches: list = []
        logits, head_cache = _forward(params, blocks, x[lo:hi], config, shard_rngs[k], caches)
        loss_sum, bce_cache = L.bce_with_logits_forward(
            logits, y[lo:hi], pos_weight=config.pos_weight, reduction="sum")
        dlogits = L.bce_with_logits_backward(bce_cache, 1.0 / n)
        return loss_sum, _backward(params, blocks, config, dlogits, head_cache, caches)

    results = _map(run, range(len(bounds)), key=("train", _shape(config), x.dtype.char, random))
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
    bounds = _bounds(x.shape[0], EVAL_ROWS)
    blocks = _block_weights(params, config.depth)
    chunks = _map(lambda b: _forward(params, blocks, x[b[0]:b[1]], config, None, None)[0], bounds,
                  key=("predict", _shape(config), x.dtype.char))
    return np.concatenate(chunks)
