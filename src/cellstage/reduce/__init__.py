"""Data reduction after seed 003: Level One/Two filters and the Level Three grading network.

The grader (torch) is imported on use, so the torch-free Levels One and Two (rules aml_level_one,
aml_level_two in the io environment) and the reduction table (report environment) import this
package without torch."""

from .filters import (
                      blur_filter,
                      central_compactness,
                      compactness_filter,
                      lab_kmeans_nuclei,
                      laplacian_variance,
                      reduction_table,
)

__all__ = ["blur_filter", "central_compactness", "compactness_filter", "lab_kmeans_nuclei",
           "laplacian_variance", "reduction_table", "grade_crops", "load_grader", "train_grader"]


def __getattr__(name):
    if name in ("grade_crops", "load_grader", "train_grader"):
        from . import grader

        return getattr(grader, name)
    raise AttributeError(f"module 'cellstage.reduce' has no attribute {name!r}")
