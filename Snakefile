# vcm: synthetic labelled brain-MRI cohorts from a frozen 3D LDM steered by a Volumetric Conditioning Module.
# Thin workflow: every rule shells out to `python -m vcm <stage>`; edit config/config.yaml, not this file.
from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prep.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/backbone.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/eval.smk"


rule all:
    input:
        f"{RESULTS}/dataset.h5",
        f"{RESULTS}/excluded.csv",
        MODELS if HAVE_BACKBONE else [],
        COHORTS if HAVE_BACKBONE else [],
        EVAL_TARGETS if HAVE_BACKBONE else [],
    default_target: True
