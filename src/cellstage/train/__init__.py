"""cellstage.train: fine-tuning of cell-stage classifiers with k-fold cross-validation.

The Lightning layer underneath (fit, resume, data, transforms, backbones) is :mod:`cellstage.training`.
"""

from .cv import aggregate_folds, default_lr, make_folds, run_fold

__all__ = ["aggregate_folds", "default_lr", "make_folds", "run_fold"]
