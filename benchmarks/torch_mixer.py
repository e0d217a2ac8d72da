"""The same Mixer in PyTorch: the speed reference for bench_epoch.py and a cross-check in the tests.

Only the benchmark and an optional test import this (torch is an optional extra; nothing in
``mixer/`` does). Module names mirror the NumPy parameter names, so ``load_numpy_params``
maps ``blocks.3.token.fc1.w`` to ``blocks.3.token.fc1.weight`` one to one.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from mixer.config import MixerConfig
from mixer.model import drop_path_rates


class DropPath(nn.Module):
    """Per-sample stochastic depth on a (batch, ...) tensor, scaled by 1/keep."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear -> Dropout (the branch of a residual)."""

    def __init__(self, features: int, hidden: int, norm_dim: int, dropout: float, gelu: str):
        super().__init__()
        self.norm = nn.LayerNorm(norm_dim)
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, features)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.drop = nn.Dropout(dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, config: MixerConfig, drop_path: float):
        super().__init__()
        T, D = config.n_tokens, config.dim
        self.token = MLP(T, config.token_hidden, D, config.dropout, config.gelu)
        self.channel = MLP(D, config.channel_hidden, D, config.dropout, config.gelu)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, dim)
        y = self.token.norm(x).transpose(1, 2)
        x = x + self.drop_path(self.token.mlp(y).transpose(1, 2))
        return x + self.drop_path(self.channel.mlp(self.channel.norm(x)))


class TorchMixer(nn.Module):
    """Rows (batch, n_features) -> logits (batch,)."""

    def __init__(self, config: MixerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.patch_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, p) for p in drop_path_rates(config))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = self.embed(x.reshape(x.shape[0], c.n_tokens, c.patch_size))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1)).squeeze(1)


def load_numpy_params(model: TorchMixer, params: dict[str, np.ndarray]) -> None:
    """Copy NumPy parameters (``x.w``/``x.b``) into the module (``x.weight``/``x.bias``)."""
    state = {}
    for key, value in params.items():
        layer, kind = key.rsplit(".", 1)
        state[f"{layer}.{'weight' if kind == 'w' else 'bias'}"] = torch.from_numpy(np.array(value))
    model.load_state_dict(state, strict=True)


def loss_fn(config: MixerConfig) -> nn.Module:
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(config.pos_weight))


def time_epoch(
    config: MixerConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    batch_size: int = 32,
    lr: float = 1e-3,
    threads: int = 1,
    seed: int = 0,
    eval_batch: int = 256,
) -> dict[str, float]:
    """One epoch (shuffled mini-batches, Adam) plus validation; seconds of each part."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = TorchMixer(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    crit = loss_fn(config)
    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.float32))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(xt)))
    model.train()
    loss_sum = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(xt), batch_size):
        idx = order[start:start + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = crit(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)  # as fit reports it: the epoch's mean
    t1 = time.perf_counter()
    model.eval()
    xv = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32))
    yv = torch.from_numpy(np.asarray(y_val, dtype=np.float32))
    with torch.no_grad():
        logits = torch.cat([model(xv[i:i + eval_batch]) for i in range(0, len(xv), eval_batch)])
        val_loss = crit(logits, yv).item()
    t2 = time.perf_counter()
    return {"train_seconds": t1 - t0, "val_seconds": t2 - t1, "val_loss": val_loss,
            "train_loss": loss_sum / len(xt)}
