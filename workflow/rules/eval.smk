# Evaluation of the trained models, train-on-synthetic/test-on-real, cohort figures and the run summary.
# Include after model.smk (MODEL_BUNDLE_FILES, MODELS) and the cohort rules (cohort.h5 per set).
#
# Defines for the lead's `rule all`:
#   EVAL_TARGETS  every final file of these rules (per-model tables, table.md/html, tstr.csv, figures, summary.md)
EVAL_DIR = f"{RESULTS}/eval"
COHORT_SETS = list(CFG["cohort"]["sets"])
EVAL_CONDSETS = list(CFG["condition_sets"])
EVAL_SIZES = list(CFG["training"]["sizes"])

# one evaluation per method x condition set x size (each against the uncontrolled backbone on the same noise)
EVAL_MODEL_TABLES = expand(
    f"{EVAL_DIR}/{{method}}/{{condset}}_n{{size}}.csv", method=METHODS, condset=EVAL_CONDSETS, size=EVAL_SIZES
)
EVAL_MODELS = expand(
    f"{RESULTS}/models/{{method}}/{{condset}}/n{{size}}/vcm.pt",
    method=METHODS,
    condset=EVAL_CONDSETS,
    size=EVAL_SIZES,
)
# the mask-edit check for every model whose condition set has an LV mask to edit
MASK_EDITS = expand(
    f"{EVAL_DIR}/mask_edit/{{method}}/{{condset}}_n{{size}}.json",
    method=METHODS,
    condset=[c for c in EVAL_CONDSETS if any("lv" in g for g in CFG["condition_sets"][c])],
    size=EVAL_SIZES,
)
TSTR_TABLES = expand(f"{EVAL_DIR}/tstr/{{condset}}.csv", condset=COHORT_SETS)
COHORT_FILES = expand(f"{RESULTS}/cohorts/{{condset}}/cohort.h5", condset=COHORT_SETS)
COHORT_FIGURES = expand(
    f"{RESULTS}/cohorts/{{condset}}/{{figure}}.png",
    condset=COHORT_SETS,
    figure=["cohort_montage", "qc_hist", "privacy_hist", "design", "design_montage"],
)
COHORT_DESIGN = expand(f"{RESULTS}/cohorts/{{condset}}/design.json", condset=COHORT_SETS)
EVAL_TABLES = [f"{EVAL_DIR}/table.md", f"{EVAL_DIR}/table.html", f"{EVAL_DIR}/tstr.csv"]
SUMMARY = f"{RESULTS}/summary.md"
EVAL_TARGETS = [
    *EVAL_MODEL_TABLES,
    *EVAL_TABLES,
    *COHORT_FIGURES,
    *COHORT_DESIGN,
    SUMMARY,
]  # SUMMARY pulls MASK_EDITS

# MedicalNet weights for FID 3D are a local file (never downloaded): an input when configured, so that a
# missing file stops the DAG before any job and a new file reruns the evaluation.
_MEDICALNET = (CFG.get("evaluation") or {}).get("medicalnet_weights")


rule evaluate:
    input:
        model=f"{RESULTS}/models/{{method}}/{{condset}}/n{{size}}/vcm.pt",
        loss=f"{RESULTS}/models/{{method}}/{{condset}}/n{{size}}/loss.csv",  # seconds per training step
        dataset=f"{RESULTS}/dataset.h5",
        bundle=MODEL_BUNDLE_FILES,
        template_head=f"{RESULTS}/template/t1_head.nii.gz",
        template_labels=f"{RESULTS}/template/labels.nii.gz",
        segmenter=QC_SEGMENTER_INPUT,
        medicalnet=[_MEDICALNET] if _MEDICALNET else [],
    output:
        table=report(
            f"{EVAL_DIR}/{{method}}/{{condset}}_n{{size}}.csv",
            caption="../report/evaluation.rst",
            category="Evaluation",
            subcategory="per model",
            labels={"model": "{method} {condset} n{size}", "table": "controlled vs uncontrolled"},
        ),
        subjects=f"{EVAL_DIR}/{{method}}/{{condset}}_n{{size}}_subjects.csv",
        info=f"{EVAL_DIR}/{{method}}/{{condset}}_n{{size}}.json",
    log:
        f"{LOGS}/evaluate/{{method}}/{{condset}}_n{{size}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{method}}/{{condset}}_n{{size}}.tsv"
    wildcard_constraints:
        method=METHOD_PATTERN,
        condset=r"[A-Za-z0-9_.-]+",
        size=r"\d+",
    conda:
        "../envs/torch.yaml"
    # One thread (as train_vcm): parallel one-thread jobs use a few shared cores best; a profile may raise it.
    threads: 1
    resources:
        mem_mb=mem_mb("evaluate"),
    params:
        settings=lambda w: eval_digest(
            CFG.get("evaluation"),
            CFG["cohort"]["sampler"],
            CFG["cohort"]["steps"],
            CFG["conditions"],
            CFG["segmentation"],
            CFG["qc"].get("backend"),
            CFG["registration"]["seed"],
        ),
        config=CONFIG_FILE,
        bundle=bundle_dir,
        template_dir=template_dir,
        segmenter=QC_SEGMENTER_ARG,
    shell:
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={threads} python -m vcm evaluate --config {params.config:q}"
        " --dataset {input.dataset:q} --model {input.model:q} --bundle {params.bundle:q}"
        " --template-dir {params.template_dir:q} {params.segmenter} --out {output.table:q}"
        " --threads {threads} > {log:q} 2>&1"


rule mask_edit:
    input:
        model=f"{RESULTS}/models/{{method}}/{{condset}}/n{{size}}/vcm.pt",
        dataset=f"{RESULTS}/dataset.h5",
        bundle=MODEL_BUNDLE_FILES,
        segmenter=QC_SEGMENTER_INPUT,
    output:
        report(
            f"{EVAL_DIR}/mask_edit/{{method}}/{{condset}}_n{{size}}.json",
            caption="../report/mask_edit.rst",
            category="Evaluation",
            subcategory="per model",
            labels={"model": "{method} {condset} n{size}", "table": "mask edit"},
        ),
    log:
        f"{LOGS}/mask_edit/{{method}}/{{condset}}_n{{size}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/mask_edit/{{method}}/{{condset}}_n{{size}}.tsv"
    wildcard_constraints:
        method=METHOD_PATTERN,
        condset=r"[A-Za-z0-9_.-]+",
        size=r"\d+",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb("evaluate"),
    params:
        settings=lambda w: eval_digest(
            CFG.get("evaluation"),
            CFG["cohort"]["sampler"],
            CFG["cohort"]["steps"],
            CFG["conditions"],
            CFG["qc"].get("backend"),
        ),
        config=CONFIG_FILE,
        bundle=bundle_dir,
        # for the atlas backend; the template exists once dataset.h5 does
        template_dir=f"{RESULTS}/template",
        segmenter=QC_SEGMENTER_ARG,
    shell:
        "python -m vcm mask-edit --config {params.config:q} --dataset {input.dataset:q}"
        " --model {input.model:q} --bundle {params.bundle:q} --template-dir {params.template_dir:q}"
        " {params.segmenter} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule tstr:
    input:
        cohort=f"{RESULTS}/cohorts/{{condset}}/cohort.h5",
        dataset=f"{RESULTS}/dataset.h5",
    output:
        table=f"{EVAL_DIR}/tstr/{{condset}}.csv",
        info=f"{EVAL_DIR}/tstr/{{condset}}.json",
    log:
        f"{LOGS}/tstr/{{condset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tstr/{{condset}}.tsv"
    wildcard_constraints:
        condset=r"[A-Za-z0-9_.-]+",
    conda:
        "../envs/torch.yaml"
    threads: 2  # the DAG's last job: alone on the machine in the demo
    resources:
        mem_mb=mem_mb("tstr"),
    params:
        settings=lambda w: eval_digest(
            CFG.get("tstr"), CFG["training"]["sizes"], CFG["conditions"]["lv_labels"]
        ),
        config=CONFIG_FILE,
    shell:
        "python -m vcm tstr --config {params.config:q} --dataset {input.dataset:q} --cohort {input.cohort:q}"
        " --out {output.table:q} --threads {threads} > {log:q} 2>&1"


rule cohort_figures:
    input:
        cohort=f"{RESULTS}/cohorts/{{condset}}/cohort.h5",
    output:
        montage=report(
            f"{RESULTS}/cohorts/{{condset}}/cohort_montage.png",
            caption="../report/cohort_montage.rst",
            category="Cohorts",
            subcategory="{condset}",
            labels={"cohort": "{condset}", "figure": "montage"},
        ),
        qc_hist=report(
            f"{RESULTS}/cohorts/{{condset}}/qc_hist.png",
            caption="../report/qc_hist.rst",
            category="Cohorts",
            subcategory="{condset}",
            labels={"cohort": "{condset}", "figure": "QC histograms"},
        ),
        privacy_hist=report(
            f"{RESULTS}/cohorts/{{condset}}/privacy_hist.png",
            caption="../report/privacy_hist.rst",
            category="Cohorts",
            subcategory="{condset}",
            labels={"cohort": "{condset}", "figure": "privacy screen"},
        ),
        design=report(
            f"{RESULTS}/cohorts/{{condset}}/design.png",
            caption="../report/design.rst",
            category="Cohorts",
            subcategory="{condset}",
            labels={"cohort": "{condset}", "figure": "design: target vs achieved"},
        ),
        design_json=report(
            f"{RESULTS}/cohorts/{{condset}}/design.json",
            caption="../report/design.rst",
            category="Cohorts",
            subcategory="{condset}",
            labels={"cohort": "{condset}", "figure": "design: KS statistics"},
        ),
        design_montage=report(
            f"{RESULTS}/cohorts/{{condset}}/design_montage.png",
            caption="../report/design_montage.rst",
            category="Cohorts",
            subcategory="{condset}",
            labels={"cohort": "{condset}", "figure": "montage by LV volume"},
        ),
    log:
        f"{LOGS}/cohort_figures/{{condset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cohort_figures/{{condset}}.tsv"
    wildcard_constraints:
        condset=r"[A-Za-z0-9_.-]+",
    conda:
        "../envs/prep.yaml"
    params:
        settings=lambda w: eval_digest(CFG["qc"], CFG["conditions"]["lv_labels"]),
        config=CONFIG_FILE,
    shell:
        "python -m vcm cohort-figures --config {params.config:q} --cohort {input.cohort:q}"
        " --montage {output.montage:q} --qc-hist {output.qc_hist:q} --privacy-hist {output.privacy_hist:q}"
        " --design {output.design:q} --design-json {output.design_json:q}"
        " --design-montage {output.design_montage:q} > {log:q} 2>&1"


rule eval_tables:
    input:
        evals=EVAL_MODEL_TABLES,
        tstr=TSTR_TABLES,
    output:
        md=f"{EVAL_DIR}/table.md",
        html=report(
            f"{EVAL_DIR}/table.html",
            caption="../report/eval_table.rst",
            category="Evaluation",
            subcategory="all models",
            labels={"table": "evaluation and TSTR"},
        ),
        tstr=report(
            f"{EVAL_DIR}/tstr.csv",
            caption="../report/tstr.rst",
            category="Evaluation",
            subcategory="all models",
            labels={"table": "TSTR Dice"},
        ),
    log:
        f"{LOGS}/eval_tables.log",
    benchmark:
        f"{RESULTS}/benchmarks/eval_tables.tsv"
    conda:
        # its stage lives in vcm.evaluation, which imports torch
        "../envs/torch.yaml"
    shell:
        "python -m vcm eval-tables --eval {input.evals:q} --tstr {input.tstr:q}"
        " --md {output.md:q} --html {output.html:q} --tstr-out {output.tstr:q} > {log:q} 2>&1"


rule summary:
    input:
        dataset=f"{RESULTS}/dataset.h5",
        excluded=rules.subject_gates.output.excluded,
        models=EVAL_MODELS,
        evals=EVAL_MODEL_TABLES,
        tstr=rules.eval_tables.output.tstr,
        cohorts=COHORT_FILES,
        figures=COHORT_FIGURES,  # linked from the cohorts table once they exist
        design=COHORT_DESIGN,  # the cohorts' target-vs-achieved table
        mask_edits=MASK_EDITS,
        segmenter=QC_SEGMENTER_INPUT,
    output:
        report(SUMMARY, caption="../report/summary.rst", category="Summary", labels={"file": "summary.md"}),
    log:
        f"{LOGS}/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/summary.tsv"
    conda:
        # reads the models' metadata from vcm.pt with torch
        "../envs/torch.yaml"
    params:
        config=CONFIG_FILE,
        segmenter_json=(
            shell_option("--segmenter-json", f"{RESULTS}/models/qc_segmenter/segmenter.json")
            if QC_SEGMENTER_INPUT
            else ""
        ),
    shell:
        "python -m vcm summary --config {params.config:q} --dataset {input.dataset:q}"
        " --excluded {input.excluded:q} --models {input.models:q} --eval {input.evals:q} --tstr {input.tstr:q}"
        " --cohorts {input.cohorts:q} --mask-edit {input.mask_edits:q}"
        " {params.segmenter_json} --out {output:q} > {log:q} 2>&1"
