"""Adam / AdamW over a flat parameter dict, with global-norm clipping and optional gradient noise;
SAM's gradient (``sam_gradients``) and the weights' moving average (``ema_update``).

One step, in the order torch applies them (``clip_grad_norm_`` then ``optim.Adam``/``AdamW``)::

    grad_norm = ||g||                                  (global L2 norm over every key, reported)
    g *= min(1, clip_norm / (grad_norm + 1e-6))       if clip_norm > 0
    g += N(0, sigma_t^2),  sigma_t = grad_noise / (1 + t) ** grad_noise_decay     if grad_noise > 0
    g += weight_decay * p                              Adam (L2, decoupled=False)
    p -= lr * weight_decay * p                         AdamW (decoupled=True)
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^s) + eps)

with ``s`` the 1-based step number and ``t = s - 1`` the number of steps taken before this one, so
the first step's noise has std ``grad_noise`` (the schedule of Neelakantan et al., 2015, whose
decay 0.55 is the default; the noise goes on the gradient, i.e. into every update)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mixer.config import TrainConfig

__all__ = ["Adam", "StepStats", "ema_update", "sam_gradients"]

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
_CLIP_EPS = 1e-6


@dataclass(frozen=True)
class StepStats:
    """What one step measured: the global L2 norm of the gradient as given (before clipping and
    noise), and ||new params - old params|| / ||old params|| over all keys (0 if params are 0)."""

    grad_norm: float
    update_ratio: float


class Adam:
    """Adam (torch ``optim.Adam`` semantics) or, with ``decoupled=True``, AdamW. The keys, shapes and
    dtype of ``params`` fix the state; ``step`` updates the arrays in place at ``lr`` or a scheduled
    rate. ``clip_norm`` and ``grad_noise`` (the noise's std at step 1) are off at 0; ``rng`` is
    required for the noise."""

    def __init__(self, params: dict[str, np.ndarray], *, lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = False, clip_norm: float = 0.0, grad_noise: float = 0.0,
                 grad_noise_decay: float = 0.55, rng: np.random.Generator | None = None) -> None:
        rules = {"> 0": lambda v: v > 0, "in [0, 1)": lambda v: 0.0 <= v < 1.0, ">= 0": lambda v: v >= 0}
        checks = (("lr", lr, "> 0"), ("beta1", beta1, "in [0, 1)"), ("beta2", beta2, "in [0, 1)"),
                  ("eps", eps, "> 0"), ("weight_decay", weight_decay, ">= 0"),
                  ("clip_norm", clip_norm, ">= 0"), ("grad_noise", grad_noise, ">= 0"),
                  ("grad_noise_decay", grad_noise_decay, ">= 0"))
        for name, value, rule in checks:
            if not rules[rule](value):
                raise ValueError(f"{name} must be {rule}, got {name}={value}")
        if grad_noise > 0 and rng is None:
            raise ValueError(f"grad_noise={grad_noise} needs rng (a np.random.Generator)")
        if not params:
            raise ValueError("params is empty")
        dtypes = {np.dtype(p.dtype) for p in params.values()}
        if len(dtypes) != 1 or not np.issubdtype(next(iter(dtypes)), np.floating):
            raise ValueError(f"params must share one floating dtype, got {sorted(map(str, dtypes))}")

        self.lr = float(lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decoupled = bool(decoupled)
        self.clip_norm = float(clip_norm)
        self.grad_noise = float(grad_noise)
        self.grad_noise_decay = float(grad_noise_decay)
        self.rng = rng
        self.dtype = next(iter(dtypes))
        self.step_count = 0

        self.keys = list(params)
        self.shapes = {k: tuple(params[k].shape) for k in self.keys}
        offsets = np.cumsum([0] + [int(np.prod(self.shapes[k])) for k in self.keys])
        self.size = int(offsets[-1])
        self._slices = {k: slice(int(a), int(b)) for k, a, b in zip(self.keys, offsets[:-1], offsets[1:],
                                                                       strict=True)}
        # Flat state and scratch; per-key views made once, so a step allocates nothing per key.
        self._m = np.zeros(self.size, dtype=self.dtype)
        self._v = np.zeros(self.size, dtype=self.dtype)
        self._g = np.empty(self.size, dtype=self.dtype)  # gradient gathered, then the update
        self._tmp = np.empty(self.size, dtype=self.dtype)
        self._g_views = {k: self._g[self._slices[k]].reshape(self.shapes[k]) for k in self.keys}
        self._p_flat = np.empty(self.size, dtype=self.dtype) if self.weight_decay > 0 else None

    @classmethod
    def from_config(cls, config: TrainConfig, params: dict[str, np.ndarray], *,
                    rng: np.random.Generator | None) -> Adam:
        """The optimiser ``config`` describes (``optimizer="adamw"`` -> decoupled weight decay)."""
        return cls(params, lr=config.lr, beta1=config.beta1, beta2=config.beta2, eps=config.eps,
                   weight_decay=config.weight_decay, decoupled=config.optimizer == "adamw",
                   clip_norm=config.clip_norm, grad_noise=config.grad_noise,
                   grad_noise_decay=config.grad_noise_decay, rng=rng)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], *,
             lr: float | None = None) -> StepStats:
        """Update ``params`` in place from ``grads`` (same keys and shapes; not modified) at this step's
        ``lr`` (a schedule's; None: the constructor's)."""
        lr = self.lr if lr is None else float(lr)
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got lr={lr}")
        for name, d in (("params", params), ("grads", grads)):
            if d.keys() != self.shapes.keys():
                missing = [k for k in self.keys if k not in d]
                extra = [k for k in d if k not in self.shapes]
                what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
                raise KeyError(f"{name}: {what}")
        g, tmp, m, v = self._g, self._tmp, self._m, self._v
        for k in self.keys:
            # Assigning into the view checks the shape and casts float64 grads to the state dtype.
            try:
                self._g_views[k][...] = grads[k]
            except ValueError:
                raise ValueError(f"grads[{k!r}]: shape {np.shape(grads[k])}, "
                                 f"expected {self.shapes[k]}") from None
        grad_norm = math.sqrt(float(np.dot(g, g)))

        if self.clip_norm > 0:
            coef = self.clip_norm / (grad_norm + _CLIP_EPS)
            if coef < 1.0:
                g *= coef
        if self.grad_noise > 0:
            std = self.grad_noise / (1.0 + self.step_count) ** self.grad_noise_decay
            self.rng.standard_normal(dtype=self.dtype, out=tmp)
            tmp *= std
            g += tmp

        # The old parameters, flat: needed for L2 / decoupled decay and for the update ratio.
        p_sq = 0.0
        pflat = self._p_flat
        for k in self.keys:
            p = params[k]
            if p.shape != self.shapes[k]:
                raise ValueError(f"params[{k!r}]: shape {p.shape}, expected {self.shapes[k]}")
            if pflat is not None:
                pflat[self._slices[k]] = p.reshape(-1)
            else:
                p_sq += float(np.vdot(p, p))
        if pflat is not None:
            p_sq = float(np.dot(pflat, pflat))
            if not self.decoupled:
                np.multiply(pflat, self.weight_decay, out=tmp)
                g += tmp

        self.step_count += 1
        s = self.step_count
        b1, b2 = self.beta1, self.beta2
        m *= b1
        np.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        # lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) == (lr*sqrt(bc2)/bc1) * m / (sqrt(v) + eps*sqrt(bc2)),
        # which saves a pass over the state.
        sqrt_bc2 = math.sqrt(1.0 - b2**s)
        step_size = lr * sqrt_bc2 / (1.0 - b1**s)
        np.sqrt(v, out=tmp)
        tmp += self.eps * sqrt_bc2
        np.divide(m, tmp, out=g)
        g *= step_size  # g now holds the update subtracted from the parameters
        if self.decoupled and pflat is not None:
            np.multiply(pflat, lr * self.weight_decay, out=tmp)
            g += tmp
        u_sq = float(np.dot(g, g))
        for k in self.keys:
            params[k] -= self._g_views[k]
        ratio = math.sqrt(u_sq / p_sq) if p_sq > 0 else 0.0
        return StepStats(grad_norm=grad_norm, update_ratio=ratio)

    def state_dict(self) -> dict[str, np.ndarray]:
        """A flat copy of the state: ``m.<key>``, ``v.<key>`` (the params' shapes) and ``step``."""
        state: dict[str, np.ndarray] = {"step": np.array(self.step_count, dtype=np.int64)}
        for k in self.keys:
            state[f"m.{k}"] = self._m[self._slices[k]].reshape(self.shapes[k]).copy()
            state[f"v.{k}"] = self._v[self._slices[k]].reshape(self.shapes[k]).copy()
        return state


def sam_gradients(params: dict[str, np.ndarray], grads: dict[str, np.ndarray], rho: float,
                  gradient: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """SAM's gradient (Foret et al., 2021): ``gradient()`` at ``w + rho * g / ||g||``, the steepest ascent.

    ``params`` (``w``) are moved in place for the call and then restored bit for bit; ``grads``
    (``g``) is the gradient at ``w`` on the same batch. A zero gradient is returned as it is."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got rho={rho}")
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if norm == 0.0:
        return grads
    saved = {k: p.copy() for k, p in params.items()}
    scale = rho / norm
    try:
        for k, p in params.items():
            p += (scale * grads[k]).astype(p.dtype, copy=False)
        return gradient()
    finally:
        for k, p in params.items():
            p[...] = saved[k]


def ema_update(average: dict[str, np.ndarray], params: dict[str, np.ndarray], decay: float,
               step: int) -> None:
    """``average <- d * average + (1 - d) * params`` in place, ``d = min(decay, (1 + step) / (10 + step))``:
    Polyak averaging, with the ramp of TensorFlow's ``ExponentialMovingAverage(num_updates=step)`` so that
    the weights' random start does not linger. ``step`` counts the optimiser steps, this one included."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got decay={decay}")
    d = min(decay, (1 + step) / (10 + step))
    for k, a in average.items():
        a += (1.0 - d) * (params[k] - a)
