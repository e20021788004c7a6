"""Result tables and figures (the paper's shapes), regenerated from the stage outputs."""

from .tables import METRICS, best_experiment, fold_table, markdown_table, summary_table

__all__ = ["METRICS", "best_experiment", "fold_table", "markdown_table", "summary_table"]
