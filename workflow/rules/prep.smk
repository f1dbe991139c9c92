# Data preparation: demo cohort, template, input checks, registration, segmentation, conditions.


rule demo_cohort:
    output:
        manifest=f"{RESULTS}/demo/manifest.csv",
    params:
        demo=lambda w: CFG["data"]["demo"],
    conda:
        PREP_ENV
    resources:
        mem_mb=mem_mb("demo_cohort"),
    log:
        f"{LOGS}/demo_cohort.log",
    shell:
        "python -m vcm demo --out-dir {RESULTS}/demo --n-subjects {params.demo[n_subjects]}"
        " --seed {params.demo[seed]} --spacing-mm {params.demo[spacing_mm]} > {log} 2>&1"


rule template:
    output:
        t1_head=f"{RESULTS}/template/t1_head.nii.gz",
        t1_brain=f"{RESULTS}/template/t1_brain.nii.gz",
        labels=f"{RESULTS}/template/labels.nii.gz",
    conda:
        PREP_ENV
    resources:
        mem_mb=mem_mb("template"),
    log:
        f"{LOGS}/template.log",
    shell:
        "python -m vcm template --out-dir {RESULTS}/template > {log} 2>&1"


checkpoint check_inputs:
    input:
        manifest=MANIFEST,
    output:
        subjects=f"{RESULTS}/inputs/subjects.csv",
        excluded=f"{RESULTS}/excluded.csv",
    params:
        settings=section("segmentation"),
    conda:
        PREP_ENV
    log:
        f"{LOGS}/check_inputs.log",
    shell:
        "python -m vcm check-inputs --config {CONFIG_FILE} --manifest {input.manifest}"
        " --out {output.subjects} --excluded {output.excluded} --meta-dir {RESULTS}/inputs > {log} 2>&1"


# A condition set that uses the second modality (t2) makes prep register and store it (manifest column t2).
USE_T2 = uses_second_image(CFG)
T2_OUT = [f"{PREP}/{{subject}}/t2.nii.gz"] if USE_T2 else []


rule register:
    input:
        t1=lambda w: subject_row(w)["t1"],
        t2=lambda w: [subject_row(w)["t2"]] if USE_T2 else [],
        template=rules.template.output.t1_head,
    output:
        t1=f"{PREP}/{{subject}}/t1.nii.gz",
        t2=T2_OUT,
        info=f"{PREP}/{{subject}}/registration.json",
        png=report(f"{PREP}/{{subject}}/registration.png", category="Registration", subcategory="{subject}"),
    params:
        settings=section("grid", "registration", "intensity"),
        t2=lambda w, input: f"--t2 '{input.t2[0]}'" if USE_T2 else "",
    conda:
        PREP_ENV
    resources:
        mem_mb=mem_mb("register"),
    log:
        f"{LOGS}/register/{{subject}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/register/{{subject}}.tsv"
    threads: 1
    shell:
        "python -m vcm register --config {CONFIG_FILE} --subject {wildcards.subject} --t1 {input.t1:q}"
        " {params.t2}"
        " --template-dir {RESULTS}/template --out-dir {PREP}/{wildcards.subject} --threads {threads} > {log} 2>&1"


# Per-subject rules read the subject's manifest row from inputs/<subject>.json (written by check_inputs,
# rewritten only when the row changes); params must not depend on the checkpoint (remote jobs reject that).
SUBJECT_META = f"{RESULTS}/inputs/{{subject}}.json"


rule segment:
    input:
        t1=lambda w: subject_row(w)["t1"],
        registered=rules.register.output.t1,
        info=rules.register.output.info,
        template=rules.template.output.labels,
        meta=SUBJECT_META,
    output:
        labels=f"{PREP}/{{subject}}/labels.nii.gz",
        volumes=f"{PREP}/{{subject}}/volumes.json",
    params:
        settings=section("grid", "segmentation", "conditions"),
    conda:
        PREP_ENV
    resources:
        mem_mb=mem_mb("segment"),
    log:
        f"{LOGS}/segment/{{subject}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment/{{subject}}.tsv"
    threads: 1
    shell:
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={threads} python -m vcm segment --config {CONFIG_FILE}"
        " --subject {wildcards.subject} --t1 {input.t1:q} --meta {input.meta} --reg-dir {PREP}/{wildcards.subject}"
        " --template-dir {RESULTS}/template --out-dir {PREP}/{wildcards.subject} > {log} 2>&1"


CONDITION_FILES = condition_names(CFG)


rule conditions:
    input:
        t1=rules.register.output.t1,
        labels=rules.segment.output.labels,
        volumes=rules.segment.output.volumes,
        meta=SUBJECT_META,
        t2=T2_OUT,
    output:
        masks=expand(f"{PREP}/{{{{subject}}}}/conditions/{{name}}.nii.gz", name=CONDITION_FILES),
        covariates=f"{PREP}/{{subject}}/conditions/covariates.json",
    params:
        settings=section("grid", "conditions", "condition_sets"),
        t2=lambda w, input: f"--t2 {input.t2[0]}" if USE_T2 else "",
    conda:
        PREP_ENV
    resources:
        mem_mb=mem_mb("conditions"),
    log:
        f"{LOGS}/conditions/{{subject}}.log",
    shell:
        "python -m vcm conditions --config {CONFIG_FILE} --subject {wildcards.subject} --t1 {input.t1}"
        " --labels {input.labels} --volumes {input.volumes} --meta {input.meta}"
        " {params.t2}"
        " --out-dir {PREP}/{wildcards.subject}/conditions > {log} 2>&1"
