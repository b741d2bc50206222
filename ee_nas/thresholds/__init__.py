"""Vectorized exit-threshold tuning on cached per-exit outputs (see DESIGN.md definitions)."""
from .confidence import MEASURES, confidence
from .oracle import oracle_policy
from .sweep import threshold_sweep
from .tuner import (ExitPolicy, cross_fitted_accuracy, evaluate_policy, exit_indices, tune_thresholds,
                    tune_thresholds_from_logits)

__all__ = [
    "MEASURES", "confidence", "oracle_policy", "threshold_sweep", "ExitPolicy", "cross_fitted_accuracy",
    "evaluate_policy",
    "exit_indices", "tune_thresholds", "tune_thresholds_from_logits", "plot_threshold_sweep",
]


def __getattr__(name):
    # matplotlib is imported only when plotting is asked for
    if name == "plot_threshold_sweep":
        from .plots import plot_threshold_sweep

        return plot_threshold_sweep
    raise AttributeError(name)
