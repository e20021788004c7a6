"""cellstage.metrics: Top-k and developmental Adjacent-k accuracies (seed 000 §3.2), and
annotator agreement on the 11-label intermediate scale (seed 000 §4.1, Tables 2-3)."""

from .accuracy import (
    adjacent_k_accuracy,
    adjacent_k_dynamic_accuracy,
    compute_metrics,
    confusion,
    top_k_accuracy,
)
from .agreement import (
    AGREEMENT_METRICS,
    AGREEMENT_NAMES,
    intermediate_label,
    intermediate_scale,
    label_agreement,
)

__all__ = [
    "AGREEMENT_METRICS",
    "AGREEMENT_NAMES",
    "intermediate_label",
    "intermediate_scale",
    "label_agreement",
    "adjacent_k_accuracy",
    "adjacent_k_dynamic_accuracy",
    "compute_metrics",
    "confusion",
    "top_k_accuracy",
]
