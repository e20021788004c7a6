"""cellstage.metrics: Top-k and developmental Adjacent-k accuracies (seed 000 §3.2)."""

from .accuracy import (
    adjacent_k_accuracy,
    adjacent_k_dynamic_accuracy,
    compute_metrics,
    confusion,
    top_k_accuracy,
)

__all__ = [
    "adjacent_k_accuracy",
    "adjacent_k_dynamic_accuracy",
    "compute_metrics",
    "confusion",
    "top_k_accuracy",
]
