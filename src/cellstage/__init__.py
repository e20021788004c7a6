"""cellstage: whole-slide images to single-cell classifications of continuously developing cells."""

__version__ = "0.1.0"
