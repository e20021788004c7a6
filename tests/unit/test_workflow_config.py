"""The workflow's config, schemas, sheet and pinned environments agree with each other."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "workflow/schemas"


def load_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


def test_default_config_is_valid():
    validate(load_config(), str(SCHEMAS / "config.schema.yaml"))


@pytest.mark.parametrize(
    "key, value",
    [
        (("registration", "ransac_threshold"), -1),
        (("finetune", "n_folds"), 1),
        (("segmentation", "method"), "stardist"),
        (("grading", "threshold"), 2),
        (("finetune", "grid"), {"init": ["imagenet21k"]}),
        (("seed",), -1),
        (("seed",), 2**32),
        (("segmentation", "diameter"), 0),
    ],
)
def test_bad_config_value_is_rejected_naming_the_field(key, value):
    config = copy.deepcopy(load_config())
    node = config
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    with pytest.raises(WorkflowError) as err:
        validate(config, str(SCHEMAS / "config.schema.yaml"))
    assert key[-1] in str(err.value) or str(value) in str(err.value)


def test_static_classes_in_config_are_known_classes():
    from cellstage.taxonomy import Taxonomy

    config = load_config()
    tax = Taxonomy(tuple(config["classes"]), tuple(config["static_classes"]))
    assert tax.dynamic == ("Spg Ad", "Spg", "Pl-Z", "P", "rsptd", "esptd")
    with pytest.raises(ValueError, match="static_classes"):
        Taxonomy(("A", "B"), ("C",))


@pytest.mark.parametrize("key, value, message", [
    ("static_classes", ["PMC", "Sertoli"], "static_classes: ['Sertoli'] are not in classes"),
    ("reference_scan", "60x", "reference_scan: '60x' is not a key of scans ['20x', '40x']"),
])
def test_cross_key_errors_name_both_keys(key, value, message):
    """What the schema cannot express is checked at start-up (cellstage.config.check_config, called
    by common.smk and by every CLI command's config reading)."""
    from cellstage.config import validate_config
    from cellstage.utils import CellstageError

    config = dict(load_config(), **{key: value})
    with pytest.raises(CellstageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(config, where="config/config.yaml")


def test_demo_sheet_is_valid():
    sheet = pd.read_csv(REPO / "config/slides.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet = sheet.replace({"": None})
    sheet["mpp"] = pd.to_numeric(sheet["mpp"])
    sheet = sheet.astype(object).where(pd.notna(sheet), None)
    validate(sheet, str(SCHEMAS / "slides.schema.yaml"))
    assert set(sheet["split"]) == {"train", "test", "unlabelled"}
    assert set(sheet["scan"]) == set(load_config()["scans"])


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.strip().lstrip("- ").strip()
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[name.lower()] = version
    return out


def test_rule_environments_agree_with_project_pins():
    project = _pins((REPO / "requirements.txt").read_text().splitlines())
    envs = sorted((REPO / "workflow/envs").glob("*.yaml"))
    assert {e.stem for e in envs} >= {"io", "seg", "ml", "report"}
    for env in envs:
        if env.stem == "bioformats":  # numpy<2: its own documented exceptions, checked below
            continue
        pins = _pins(env.read_text().splitlines())
        assert pins, f"{env} pins nothing"
        for name, version in pins.items():
            assert project.get(name) == version, (
                f"{env.name}: {name}=={version} but requirements.txt has {project.get(name)}"
            )


def _commented_pins(lines) -> dict[str, tuple[str, str]]:
    """{name: (version, trailing comment)} of the `name==version  # comment` lines."""
    out = {}
    for line in lines:
        line = line.strip().lstrip("- ").strip()
        if "==" in line and not line.startswith("#"):
            pin, _, comment = line.partition("#")
            name, version = pin.strip().split("==", 1)
            out[name.lower()] = (version.strip(), comment.strip())
    return out


def test_bioformats_environment_pins_and_their_exceptions():
    """bioformats.yaml (python-javabridge needs numpy<2) equals requirements.txt except on lines
    that say why: `# differs: <why>` (in requirements.txt at another version) or
    `# bioformats-only: <why>` (not in requirements.txt). A stale or silent exception fails."""
    project = _pins((REPO / "requirements.txt").read_text().splitlines())
    text = (REPO / "workflow/envs/bioformats.yaml").read_text()
    pins = _commented_pins(text.splitlines())
    assert {"numpy", "python-bioformats", "python-javabridge"} <= set(pins)
    for name, (version, comment) in pins.items():
        where = f"bioformats.yaml: {name}=={version}"
        if comment.startswith("differs:"):
            assert name in project, f"{where} says 'differs' but requirements.txt does not pin {name}"
            assert project[name] != version, f"{where} says 'differs' but requirements.txt has the same version"
            assert len(comment) > len("differs:") + 10, f"{where}: say why it differs"
        elif comment.startswith("bioformats-only:"):
            assert name not in project, f"{where} says 'bioformats-only' but requirements.txt pins {project.get(name)}"
            assert len(comment) > len("bioformats-only:") + 10, f"{where}: say why it is needed"
        else:
            assert project.get(name) == version, (
                f"{where} but requirements.txt has {project.get(name)}; make them equal or document the "
                f"exception on the line (# differs: why / # bioformats-only: why)"
            )
    assert pins["numpy"][0].startswith("1.26.")
    assert "- numpy=1.26.*" in text  # the conda-side numpy agrees with the pip pin
    assert "- python=3.11" in text and "openjdk" in text
    # every module the convert path imports at top level is pinned here
    assert {"zarr", "tifffile", "pandas", "opencv-python-headless", "typer"} <= set(pins)


def test_every_rule_declares_log_and_conda():
    import re

    for smk in (REPO / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.split(r"\n(?=rule |checkpoint )", text):
            if not rule.startswith(("rule ", "checkpoint ")):
                continue
            name = rule.split()[1].rstrip(":")
            assert "\n    log:" in rule, f"{smk.name}: rule {name} has no log"
            assert "\n    conda:" in rule, f"{smk.name}: rule {name} has no conda env"


def _schema_keys(node: dict, where: str = ""):
    """(dotted key, subschema, required?) of every property of a JSON schema, depth first."""
    for key, sub in node.get("properties", {}).items():
        yield f"{where}{key}", sub, key in node.get("required", [])
        yield from _schema_keys(sub, f"{where}{key}.")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _schema_keys(node["additionalProperties"], f"{where}<name>.")


def test_every_config_key_has_a_description_and_a_default():
    """Defaults live only in the schema: a key that is not required has one there, so the workflow
    can index the validated config directly (config["grading"]["enabled"]) and no rule, script or
    stage function repeats a default."""
    schema = yaml.safe_load((SCHEMAS / "config.schema.yaml").read_text())
    for key, sub, required in _schema_keys(schema):
        assert sub.get("description"), f"config.schema.yaml: {key} has no description"
        assert required or "default" in sub, f"config.schema.yaml: {key} has no default"


def test_validation_fills_every_nested_default():
    """snakemake's validate() fills the defaults of a missing section's keys too (the section's own
    default is {}), so a config that gives only the required keys yields every value a rule reads."""
    config = {k: load_config()[k] for k in ("samples", "classes", "static_classes", "scans", "reference_scan")}
    validate(config, str(SCHEMAS / "config.schema.yaml"))
    assert config["finetune"]["grid"]["init"] == ["scratch", "simclr"]
    assert config["grading"]["loss_weights"] == {"useful": 3.0, "unsuitable": 1.0}
    assert config["registration"]["min_inliers"] == 30
    assert config["segmentation"]["match_radius_px"] == 10
    assert config["segmentation"]["diameter"] is None
    partial = copy.deepcopy(config)
    partial["grading"] = {"loss_weights": {"useful": 2.0}}
    validate(partial, str(SCHEMAS / "config.schema.yaml"))
    assert partial["grading"]["loss_weights"] == {"useful": 2.0, "unsuitable": 1.0}
    assert partial["grading"]["epochs"] == 8


def test_backbone_names_are_checked_against_timm_at_start_up():
    from cellstage.train.grid import check_backbone, experiments
    from cellstage.utils import CellstageError

    check_backbone("resnet18", "finetune.grid")  # a paper backbone: no timm import
    check_backbone("convnext_atto.d2_in1k", "finetune.grid")  # any timm model, pretrained tag allowed
    finetune = {"recipe": {"scratch": "baseline"}, "losses": {},
                "grid": {"scan": ["40x"], "background": [True], "backbone": ["resnt18"], "init": ["scratch"],
                         "distance": [False]}}
    with pytest.raises(CellstageError, match=r"finetune.grid.backbone: 'resnt18' is not a timm model.*'resnet18'"):
        experiments(finetune, ["40x"])
