"""A NumPy MLP-Mixer for tabular rows: model, hand-written backward pass, training, data.

The public surface other code calls; everything else lives in modules named for what they hold.
"""

from __future__ import annotations

from mixer.config import DataConfig, MixerConfig, TrainConfig
from mixer.data import DataError, Dataset, Pipeline, load
from mixer.model import flops_per_example, init_params, loss_and_grads, predict_logits
from mixer.train import EpochMetrics, FitResult, fit

__all__ = [
    "DataConfig",
    "DataError",
    "Dataset",
    "EpochMetrics",
    "FitResult",
    "MixerConfig",
    "Pipeline",
    "TrainConfig",
    "fit",
    "flops_per_example",
    "init_params",
    "load",
    "loss_and_grads",
    "predict_logits",
]
