"""Data reduction after seed 003: Level One/Two filters and the Level Three grading network."""

from .filters import (
                      blur_filter,
                      central_compactness,
                      compactness_filter,
                      lab_kmeans_nuclei,
                      laplacian_variance,
                      reduction_table,
)
from .grader import grade_crops, load_grader, train_grader

__all__ = ["blur_filter", "central_compactness", "compactness_filter", "lab_kmeans_nuclei",
           "laplacian_variance", "reduction_table", "grade_crops", "load_grader", "train_grader"]
