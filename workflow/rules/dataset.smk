# The training HDF5 from every subject that passed every gate of preparation (subject_gates' passed.csv).


rule dataset:
    input:
        subjects=rules.subject_gates.output.passed,
        covariates=lambda w: expand(rules.conditions.output.covariates, subject=dataset_subjects()),
        labels=lambda w: expand(rules.register_segment.output.labels, subject=dataset_subjects()),
    output:
        f"{RESULTS}/dataset.h5",
    log:
        f"{LOGS}/dataset.log",
    benchmark:
        f"{RESULTS}/benchmarks/dataset.tsv"
    conda:
        "../envs/prep.yaml"
    resources:
        mem_mb=mem_mb("dataset"),
    params:
        settings=section("dataset", "training.sizes", "conditions", "grid"),
        t2=USE_T2,
        config=CONFIG_FILE,
        # the per-subject folders' root (their files are inputs, known only after subject_gates)
        prep_dir=PREP,
    shell:
        "python -m vcm dataset --config {params.config:q} --subjects {input.subjects:q}"
        " --prep-dir {params.prep_dir:q} --out {output:q} > {log:q} 2>&1"
