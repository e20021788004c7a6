# Checks that must run before `configfile:` (Snakefile): snakemake's own loader names neither the
# file nor the line of a YAML syntax error.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from cellstage.config import check_yaml_syntax

check_yaml_syntax("config/config.yaml")
