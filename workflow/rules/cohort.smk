# Synthetic cohorts: one generate_shard job per shard (DDIM sampling + decode + QC + resampling of failures),
# then one merge per condition set into cohort.h5 + manifest.csv + qc.csv.
#
# Include after model.smk (uses MODEL_BUNDLE_FILES, QC_SEGMENTER_*; shard_settings() is in common.smk).
# Defines for downstream rules:
#   COHORTS        every configured cohort's cohort.h5 (for rule all)
#   COHORT_SHARDS  the shard ids, 00000, 00001, ... (vcm.cohort.plan.shard_ids: the package owns them)
import hashlib as _hashlib
import json as _json
from vcm.cohort.plan import shard_ids

# The cohort is sampled from the model of cohort.method (COHORT_METHOD, common.smk) trained on the largest
# configured training set. Its folder does not name the method: a cohort is one per condition set, and changing
# cohort.method reruns its shards (their model is another file, and shard_settings reads the cohort section).
COHORT_TRAIN_SIZE = max(CFG["training"]["sizes"])
COHORT_SHARDS = shard_ids(CFG)
COHORT_DIR = f"{RESULTS}/cohorts/{{condset}}"
COHORTS = expand(f"{RESULTS}/cohorts/{{condset}}/cohort.h5", condset=CFG["cohort"]["sets"])
# cohort.design's CSV targets: inputs, so that a changed file remakes the shards
DESIGN_FILES = [t["csv"] for t in CFG["cohort"]["design"].values() if isinstance(t, dict) and "csv" in t]


rule generate_shard:
    input:
        dataset=f"{RESULTS}/dataset.h5",
        model=f"{RESULTS}/models/{COHORT_METHOD}/{{condset}}/n{COHORT_TRAIN_SIZE}/vcm.pt",
        bundle=MODEL_BUNDLE_FILES,
        template_head=f"{RESULTS}/template/t1_head.nii.gz",
        template_labels=f"{RESULTS}/template/labels.nii.gz",
        segmenter=QC_SEGMENTER_INPUT,
        design=DESIGN_FILES,
    output:
        # the subject folders next to it are deliberately not outputs: Snakemake deletes a failed job's outputs,
        # and a rerun keeps the subjects that were complete (subject.json) and makes the rest
        f"{COHORT_DIR}/shards/{{shard}}/shard.h5",
    log:
        f"{LOGS}/generate_shard/{{condset}}_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/generate_shard/{{condset}}_{{shard}}.tsv"
    wildcard_constraints:
        condset=r"[A-Za-z0-9_.-]+",
        shard=r"\d{5}",
    conda:
        "../envs/torch.yaml"
    # one thread, as train_vcm: parallel one-thread jobs suit a few shared cores; a profile can raise it
    threads: 1
    resources:
        mem_mb=mem_mb("generate_shard"),
    params:
        settings=shard_settings,
        config=CONFIG_FILE,
        bundle=bundle_dir,
        out_dir=lambda w: f"{RESULTS}/cohorts/{w.condset}/shards/{w.shard}",
        template_dir=template_dir,
        segmenter=QC_SEGMENTER_ARG,
    shell:
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={threads} python -m vcm generate-shard"
        " --config {params.config:q} --dataset {input.dataset:q} --model {input.model:q}"
        " --bundle {params.bundle:q} --condition-set {wildcards.condset} --shard {wildcards.shard}"
        " --template-dir {params.template_dir:q} {params.segmenter} --out-dir {params.out_dir:q}"
        " --threads {threads} > {log:q} 2>&1"


rule merge_cohort:
    input:
        shards=expand(f"{COHORT_DIR}/shards/{{shard}}/shard.h5", shard=COHORT_SHARDS, allow_missing=True),
    output:
        cohort=f"{COHORT_DIR}/cohort.h5",
        manifest=f"{COHORT_DIR}/manifest.csv",
        qc=f"{COHORT_DIR}/qc.csv",
    log:
        f"{LOGS}/merge_cohort/{{condset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/merge_cohort/{{condset}}.tsv"
    wildcard_constraints:
        condset=r"[A-Za-z0-9_.-]+",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb("merge_cohort"),
    params:
        settings=_hashlib.sha256(
            _json.dumps(
                [{k: v for k, v in CFG["cohort"].items() if k not in ("sets", "qc_workers")}, CFG["qc"]],
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16],
        config=CONFIG_FILE,
        out_dir=lambda w: f"{RESULTS}/cohorts/{w.condset}",
    shell:
        "python -m vcm merge-cohort --config {params.config:q} --condition-set {wildcards.condset}"
        " --shards {input.shards:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule cohorts:
    input:
        COHORTS,
    localrule: True
