"""Optuna sweeps of the NumPy Mixer, tracked in MLflow."""
