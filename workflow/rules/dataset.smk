# The training HDF5 from every subject that passed the input checks.


rule dataset:
    input:
        subjects=rules.check_inputs.output.subjects,
        covariates=lambda w: expand(rules.conditions.output.covariates, subject=passed_subjects()),
        labels=lambda w: expand(rules.segment.output.labels, subject=passed_subjects()),
    output:
        f"{RESULTS}/dataset.h5",
    params:
        settings=section("dataset", "training.sizes", "conditions", "grid"),
        t2=USE_T2,
    conda:
        PREP_ENV
    resources:
        mem_mb=mem_mb("dataset"),
    log:
        f"{LOGS}/dataset.log",
    benchmark:
        f"{RESULTS}/benchmarks/dataset.tsv"
    shell:
        "python -m vcm dataset --config {CONFIG_FILE} --subjects {input.subjects} --prep-dir {PREP}"
        " --out {output} > {log} 2>&1"
