"""A NumPy MLP-Mixer for tabular rows: model, hand-written backward pass, training, data.

The public surface other code calls; everything else lives in modules named for what they hold."""

from __future__ import annotations

from typing import Any

from mixer.config import DataConfig, MixerConfig, TrainConfig
from mixer.data import DataError, Dataset, Pipeline, load
from mixer.metrics import bce_with_logits, binary_metrics, roc_auc
from mixer.model import flops_per_example, init_params, loss_and_grads, predict_logits
from mixer.synthetic import synthetic_frame
from mixer.yaml_io import load_yaml

# mixer.train is imported on first use, not here: `python -m mixer.train` runs that module as
# __main__, and importing it from the package first would load it twice (runpy warns about that).
_FROM_TRAIN = ("EpochMetrics", "FitResult", "fit")


def __getattr__(name: str) -> Any:
    if name in _FROM_TRAIN:
        import mixer.train

        return getattr(mixer.train, name)
    raise AttributeError(f"module 'mixer' has no attribute {name!r}")

__all__ = [
    "DataConfig", "DataError", "Dataset", "EpochMetrics", "FitResult", "MixerConfig", "Pipeline",
    "TrainConfig", "bce_with_logits", "binary_metrics", "fit", "flops_per_example", "init_params", "load",
    "load_yaml", "loss_and_grads", "predict_logits", "roc_auc", "synthetic_frame",
]
