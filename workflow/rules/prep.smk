# Data preparation: demo cohort, template, input checks, registration, segmentation, conditions.


rule demo_cohort:
    output:
        manifest=f"{RESULTS}/demo/manifest.csv",
    log:
        f"{LOGS}/demo_cohort.log",
    benchmark:
        f"{RESULTS}/benchmarks/demo_cohort.tsv"
    conda:
        # the demo world's anatomy (vcm.anatomy) warps with MONAI
        "../envs/torch.yaml"
    threads: 2  # one process per subject at a time; the files do not depend on the count
    resources:
        mem_mb=mem_mb("demo_cohort"),
    params:
        demo=lambda w: CFG["data"]["demo"],
        out_dir=lambda w, output: os.path.dirname(output.manifest),
    shell:
        "python -m vcm demo --out-dir {params.out_dir:q} --n-subjects {params.demo[n_subjects]}"
        " --seed {params.demo[seed]} --spacing-mm {params.demo[spacing_mm]} --workers {threads} > {log:q} 2>&1"


rule template:
    output:
        t1_head=f"{RESULTS}/template/t1_head.nii.gz",
        t1_brain=f"{RESULTS}/template/t1_brain.nii.gz",
        labels=f"{RESULTS}/template/labels.nii.gz",
    log:
        f"{LOGS}/template.log",
    benchmark:
        f"{RESULTS}/benchmarks/template.tsv"
    conda:
        "../envs/prep.yaml"
    resources:
        mem_mb=mem_mb("template"),
    params:
        out_dir=lambda w, output: os.path.dirname(output.t1_head),
    shell:
        "python -m vcm template --out-dir {params.out_dir:q} > {log:q} 2>&1"


# A condition set that uses the second modality (t2) makes prep register and store it (manifest column t2).
USE_T2 = uses_second_image(CFG)
T2_OUT = [f"{PREP}/{{subject}}/t2.nii.gz"] if USE_T2 else []


checkpoint check_inputs:
    input:
        manifest=MANIFEST,
    output:
        subjects=f"{RESULTS}/inputs/subjects.csv",
        excluded=f"{RESULTS}/inputs/excluded.csv",
    log:
        f"{LOGS}/check_inputs.log",
    benchmark:
        f"{RESULTS}/benchmarks/check_inputs.tsv"
    conda:
        "../envs/prep.yaml"
    params:
        settings=section(
            "segmentation.backend", "data.strict", "data.gates.min_fov_mm", "data.gates.min_voxels"
        ),
        t2=USE_T2,
        config=CONFIG_FILE,
        meta_dir=lambda w, output: os.path.dirname(output.subjects),
    shell:
        "python -m vcm check-inputs --config {params.config:q} --manifest {input.manifest:q}"
        " --out {output.subjects:q} --excluded {output.excluded:q} --meta-dir {params.meta_dir:q}"
        " > {log:q} 2>&1"


# Per-subject stages never fail on a bad subject: a failed gate (data.gates) or an error records the
# exclusion in the stage's status (prep/<subject>/status/<stage>.json), the outputs it did not write become
# placeholders, and the next stages pass the subject through; subject_gates gathers the statuses.
# Per-subject rules read the subject's manifest row from inputs/<subject>.json (written by check_inputs,
# rewritten only when the row changes); params must not depend on the checkpoint (remote jobs reject that).
SUBJECT_META = f"{RESULTS}/inputs/{{subject}}.json"


# Registration and segmentation run in one job per subject (two stages, two statuses): half the per-subject
# jobs a 1 000-subject dry run plans and a cluster queues (docs/benchmarks.md, DAG build). A change to either
# stage's settings reruns both; condition sets rerun neither (the structures they need are the trigger).
rule register_segment:
    input:
        t1=lambda w: subject_row(w)["t1"],
        t2=lambda w: [subject_row(w)["t2"]] if USE_T2 else [],
        template_head=rules.template.output.t1_head,
        template_labels=rules.template.output.labels,
        meta=SUBJECT_META,
    output:
        t1=f"{PREP}/{{subject}}/t1.nii.gz",
        t2=T2_OUT,
        info=f"{PREP}/{{subject}}/registration.json",
        png=report(
            f"{PREP}/{{subject}}/registration.png",
            caption="../report/registration.rst",
            category="Registration",
            subcategory="{subject}",
            labels={"subject": "{subject}", "figure": "registration"},
        ),
        labels=f"{PREP}/{{subject}}/labels.nii.gz",
        volumes=f"{PREP}/{{subject}}/volumes.json",
        register_status=f"{PREP}/{{subject}}/status/register.json",
        segment_status=f"{PREP}/{{subject}}/status/segment.json",
    log:
        f"{LOGS}/register_segment/{{subject}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/register_segment/{{subject}}.tsv"
    conda:
        "../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb("register_segment"),
    params:
        settings=section(
            "grid",
            "registration",
            "intensity",
            "segmentation",
            "conditions.lv_labels",
            "data.gates.min_template_ncc",
            "data.gates.affine_determinant",
            "data.gates.lv_ml",
            "data.gates.brain_ml",
            "data.gates.min_structure_voxels",
        ),
        # the structures the condition sets need, not the sets themselves: a new set reruns no segmentation
        structures=eval_digest(required_structures(CFG)),
        config=CONFIG_FILE,
        t2=lambda w, input: shell_option("--t2", input.t2[0]) if USE_T2 else "",
        template_dir=template_dir,
        out_dir=lambda w, output: os.path.dirname(output.t1),
    shell:
        "python -m vcm register-segment --config {params.config:q} --subject {wildcards.subject}"
        " --t1 {input.t1:q} {params.t2} --meta {input.meta:q} --template-dir {params.template_dir:q}"
        " --out-dir {params.out_dir:q} --register-status {output.register_status:q}"
        " --segment-status {output.segment_status:q} --threads {threads} > {log:q} 2>&1"


CONDITION_FILES = condition_names(CFG)


rule conditions:
    input:
        t1=rules.register_segment.output.t1,
        labels=rules.register_segment.output.labels,
        volumes=rules.register_segment.output.volumes,
        previous=rules.register_segment.output.segment_status,
        meta=SUBJECT_META,
        t2=T2_OUT,
    output:
        masks=expand(f"{PREP}/{{{{subject}}}}/conditions/{{name}}.nii.gz", name=CONDITION_FILES),
        covariates=f"{PREP}/{{subject}}/conditions/covariates.json",
        status=f"{PREP}/{{subject}}/status/conditions.json",
    log:
        f"{LOGS}/conditions/{{subject}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/conditions/{{subject}}.tsv"
    conda:
        "../envs/prep.yaml"
    resources:
        mem_mb=mem_mb("conditions"),
    params:
        settings=section("grid", "conditions", "condition_sets"),
        config=CONFIG_FILE,
        t2=lambda w, input: shell_option("--t2", input.t2[0]) if USE_T2 else "",
        out_dir=lambda w, output: os.path.dirname(output.covariates),
    shell:
        "python -m vcm conditions --config {params.config:q} --subject {wildcards.subject} --t1 {input.t1:q}"
        " --labels {input.labels:q} --volumes {input.volumes:q} --meta {input.meta:q}"
        " {params.t2}"
        " --out-dir {params.out_dir:q} --status {output.status:q} --previous-status {input.previous:q}"
        " > {log:q} 2>&1"


# The outcome of every subject that passed the input checks: excluded.csv (the input checks' exclusions and
# the per-subject stages', with stage, gate and reason) and passed.csv, the subjects dataset.h5 is built from.
checkpoint subject_gates:
    input:
        subjects=rules.check_inputs.output.subjects,
        excluded=rules.check_inputs.output.excluded,
        statuses=lambda w: expand(rules.conditions.output.status, subject=input_subjects()),
    output:
        excluded=report(
            f"{RESULTS}/excluded.csv",
            caption="../report/excluded.rst",
            category="Inputs",
            labels={"table": "excluded subjects"},
        ),
        passed=f"{RESULTS}/passed.csv",
    log:
        f"{LOGS}/subject_gates.log",
    benchmark:
        f"{RESULTS}/benchmarks/subject_gates.tsv"
    # reads one small JSON per subject: not worth a cluster queue's wait
    localrule: True
    conda:
        "../envs/prep.yaml"
    params:
        # the per-subject folders' root (their statuses are inputs, known only after check_inputs)
        prep_dir=PREP,
    shell:
        "python -m vcm subject-gates --subjects {input.subjects:q} --inputs-excluded {input.excluded:q}"
        " --prep-dir {params.prep_dir:q} --excluded {output.excluded:q} --passed {output.passed:q}"
        " > {log:q} 2>&1"
