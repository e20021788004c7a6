"""cellstage.demo: deterministic synthetic PAS testis whole-slide data (two scans per section).

- :func:`generate` (``out_dir, preset="demo", seed=0, **overrides``) writes the demo data set
  described in docs/contracts.md ("Demo data") and returns the path of its ``slides.tsv``.
- :data:`PRESETS`: ``"demo"`` (7 sections, 1536² px at 40x) and ``"tiny"`` (4 sections, 768²).
- :func:`render_section` renders one 40x section in memory (image, labels, tubules, points).
- :func:`generate_smear` (``out_dir, preset="smear", seed=0``) writes synthetic AML bone-marrow
  smears (seed 003; :data:`SMEAR_PRESETS` ``"smear"``, ``"smear-tiny"``) and returns its sheet.
- ``python -m cellstage.demo OUT_DIR [--preset demo|tiny|smear|smear-tiny] [--seed N]``.
"""

from .generate import PRESETS, DemoPreset, generate, write_labels_tiff, write_pyramid_tiff
from .render import MPP_20X, MPP_40X, Section, random_homography, render_scan_20x, render_section
from .smear import SMEAR_PRESETS, SmearPreset, generate_smear, parse_labels

__all__ = ["generate", "PRESETS", "DemoPreset", "render_section", "render_scan_20x",
           "random_homography", "Section", "write_pyramid_tiff", "write_labels_tiff",
           "MPP_40X", "MPP_20X", "generate_smear", "SMEAR_PRESETS", "SmearPreset", "parse_labels"]
