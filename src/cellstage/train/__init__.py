"""cellstage.train: fine-tuning of cell-stage classifiers with k-fold cross-validation.

The Lightning layer underneath (fit, resume, data, transforms, backbones) is :mod:`cellstage.training`.
"""

from .cv import aggregate_folds, make_folds, run_fold
from .recipes import RECIPES, Baseline, Pretrained, as_recipe

__all__ = ["RECIPES", "Baseline", "Pretrained", "aggregate_folds", "as_recipe", "make_folds", "run_fold"]
