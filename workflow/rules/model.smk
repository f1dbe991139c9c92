# Control modules on the frozen backbone: latents encoded once, one model per method x condition set x training
# size (training.methods: VCM and the ControlNet baseline side by side).
# The backbone rules define the bundle; until they are included, the configured bundle folder is used.
MODEL_BUNDLE = globals().get("BACKBONE_BUNDLE", CFG["backbone"]["bundle"])
MODEL_BUNDLE_FILES = globals().get(
    "BACKBONE_FILES", [f"{MODEL_BUNDLE}/models/autoencoder.pt", f"{MODEL_BUNDLE}/models/model.pt"]
)
# One model per method x condition set x training size; the file is vcm.pt whatever the method (the format
# of every control module, vcm.models.build).
MODEL_DIR = f"{RESULTS}/models/{{method}}/{{condset}}/n{{size}}"
MODELS = expand(
    f"{RESULTS}/models/{{method}}/{{condset}}/n{{size}}/vcm.pt",
    method=METHODS,
    condset=CFG["condition_sets"],
    size=CFG["training"]["sizes"],
)


QC_SEGMENTER = f"{RESULTS}/models/qc_segmenter/segmenter.pt"


rule train_qc_segmenter:
    input:
        dataset=f"{RESULTS}/dataset.h5",
    output:
        model=QC_SEGMENTER,
        report=f"{RESULTS}/models/qc_segmenter/segmenter.json",
    log:
        f"{LOGS}/train_qc_segmenter.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_qc_segmenter.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb("train_qc_segmenter"),
    params:
        settings=section("qc.segmenter", "training.sizes", "conditions.lv_labels"),
        config=CONFIG_FILE,
    shell:
        "python -m vcm train-segmenter --config {params.config:q} --dataset {input.dataset:q}"
        " --out {output.model:q} --threads {threads} > {log:q} 2>&1"


# The re-segmentation of synthetic images (QC, evaluation, previews): the QC segmenter when configured.
QC_SEGMENTER_INPUT = [QC_SEGMENTER] if CFG["qc"]["backend"] == "segmenter" else []
QC_SEGMENTER_ARG = shell_option("--segmenter", QC_SEGMENTER) if QC_SEGMENTER_INPUT else ""


rule encode_latents:
    input:
        dataset=f"{RESULTS}/dataset.h5",
        bundle=MODEL_BUNDLE_FILES,
    output:
        f"{RESULTS}/latents.h5",
    log:
        f"{LOGS}/encode_latents.log",
    benchmark:
        f"{RESULTS}/benchmarks/encode_latents.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb("encode_latents"),
    params:
        settings=section("backbone"),
        config=CONFIG_FILE,
        bundle=bundle_dir,
    shell:
        "python -m vcm encode-latents --config {params.config:q} --dataset {input.dataset:q}"
        " --bundle {params.bundle:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule train_vcm:
    input:
        dataset=f"{RESULTS}/dataset.h5",
        latents=rules.encode_latents.output[0],
        bundle=MODEL_BUNDLE_FILES,
        template_head=f"{RESULTS}/template/t1_head.nii.gz",
        template_labels=f"{RESULTS}/template/labels.nii.gz",
        segmenter=QC_SEGMENTER_INPUT,
    output:
        # checkpoints/ is deliberately not an output: Snakemake deletes a failed job's outputs, and a rerun
        # resumes from checkpoints/checkpoint_latest.pt
        model=f"{MODEL_DIR}/vcm.pt",
        loss=report(
            f"{MODEL_DIR}/loss.png",
            caption="../report/loss.rst",
            category="Models",
            subcategory="{method} {condset} n{size}",
            labels={"model": "{method} {condset} n{size}", "figure": "loss"},
        ),
        loss_csv=f"{MODEL_DIR}/loss.csv",
        preview=report(
            f"{MODEL_DIR}/preview/preview.png",
            caption="../report/preview.rst",
            category="Models",
            subcategory="{method} {condset} n{size}",
            labels={"model": "{method} {condset} n{size}", "figure": "preview"},
        ),
        metrics=f"{MODEL_DIR}/preview/preview_metrics.json",
    log:
        f"{LOGS}/train_vcm/{{method}}/{{condset}}_n{{size}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_vcm/{{method}}/{{condset}}_n{{size}}.tsv"
    wildcard_constraints:
        method=METHOD_PATTERN,
        condset=r"[A-Za-z0-9_.-]+",
        size=r"\d+",
    conda:
        "../envs/torch.yaml"
    threads: train_threads
    resources:
        mem_mb=mem_mb("train_vcm"),
    params:
        settings=model_settings,
        config=CONFIG_FILE,
        bundle=bundle_dir,
        out_dir=lambda w: f"{RESULTS}/models/{w.method}/{w.condset}/n{w.size}",
        template_dir=template_dir,
        segmenter=QC_SEGMENTER_ARG,
    shell:
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={threads} python -m vcm train-vcm --config {params.config:q}"
        " --dataset {input.dataset:q} --latents {input.latents:q} --bundle {params.bundle:q}"
        " --method {wildcards.method} --condition-set {wildcards.condset} --size {wildcards.size}"
        " --template-dir {params.template_dir:q}"
        " {params.segmenter} --out-dir {params.out_dir:q} --threads {threads} > {log:q} 2>&1"


rule models:
    input:
        MODELS,
    localrule: True
