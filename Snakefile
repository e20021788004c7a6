# cellstage: whole-slide images -> single-cell classifications. This file only wires;
# every stage lives in workflow/rules/, every algorithm in src/cellstage/.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/preflight.smk"


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/crops.smk"
include: "workflow/rules/reduce.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/annotators.smk"
include: "workflow/rules/aml.smk"


onsuccess:
    report_exclusions()


rule all:
    default_target: True
    input:
        final_outputs(),
