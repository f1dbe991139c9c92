# Control modules on the frozen backbone: latents encoded once, one model per condition set x training size.
import hashlib as _hashlib
import json as _json

# The backbone rules define the bundle; until they are included, the configured bundle folder is used.
MODEL_BUNDLE = globals().get("BACKBONE_BUNDLE", CFG["backbone"]["bundle"])
MODEL_BUNDLE_FILES = globals().get(
    "BACKBONE_FILES", [f"{MODEL_BUNDLE}/models/autoencoder.pt", f"{MODEL_BUNDLE}/models/model.pt"]
)
MODEL_DIR = f"{RESULTS}/models/{{condset}}/n{{size}}"
MODELS = expand(f"{RESULTS}/models/{{condset}}/n{{size}}/vcm.pt", condset=CFG["condition_sets"], size=CFG["training"]["sizes"])


def _model_settings(wildcards):
    """Rerun trigger: what one model depends on (not the other condition sets, not the cohort's size)."""
    parts = [
        {k: v for k, v in CFG["training"].items() if k != "sizes"},
        CFG["backbone"],
        CFG["condition_sets"].get(wildcards.condset),
        CFG["cohort"]["ddim_steps"],  # previews
        CFG["conditions"]["lv_labels"],  # previews' LV Dice
    ]
    return _hashlib.sha256(_json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


QC_SEGMENTER = f"{RESULTS}/models/qc_segmenter/segmenter.pt"


rule train_qc_segmenter:
    input:
        dataset=f"{RESULTS}/dataset.h5",
    output:
        model=QC_SEGMENTER,
        report=f"{RESULTS}/models/qc_segmenter/segmenter.json",
    params:
        settings=section("qc.segmenter", "training.sizes", "conditions.lv_labels"),
    resources:
        mem_mb=mem_mb("train_qc_segmenter"),
    log:
        f"{LOGS}/train_qc_segmenter.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_qc_segmenter.tsv"
    threads: 2
    shell:
        "python -m vcm train-segmenter --config {CONFIG_FILE} --dataset {input.dataset} --out {output.model}"
        " --threads {threads} > {log} 2>&1"


# The re-segmentation of synthetic images (QC, evaluation, previews): the QC segmenter when configured.
QC_SEGMENTER_INPUT = [QC_SEGMENTER] if CFG["qc"]["backend"] == "segmenter" else []
QC_SEGMENTER_ARG = f"--segmenter {QC_SEGMENTER}" if QC_SEGMENTER_INPUT else ""


rule encode_latents:
    input:
        dataset=f"{RESULTS}/dataset.h5",
        bundle=MODEL_BUNDLE_FILES,
    output:
        f"{RESULTS}/latents.h5",
    params:
        settings=section("backbone"),
        bundle=MODEL_BUNDLE,
    resources:
        mem_mb=mem_mb("encode_latents"),
    log:
        f"{LOGS}/encode_latents.log",
    benchmark:
        f"{RESULTS}/benchmarks/encode_latents.tsv"
    threads: 2
    shell:
        "python -m vcm encode-latents --config {CONFIG_FILE} --dataset {input.dataset} --bundle {params.bundle}"
        " --out {output} --threads {threads} > {log} 2>&1"


def _train_threads(wildcards):
    """A model's time budget is wall-clock, so every model trains at once: the local cores are shared between
    them (a lone model gets them all: 1.8x the steps of 1 thread on 2 cores); 2 on a cluster (no --cores).
    Over-subscribing a few cores is worse than sharing them (measured: 2 threads ran 4x slower than 1 on 2 busy
    cores)."""
    cores = workflow.global_resources.get("_cores")
    if cores is None or cores >= 1024:
        return 2
    return max(1, cores // max(1, len(MODELS)))


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
        loss=report(f"{MODEL_DIR}/loss.png", category="Models", subcategory="{condset} n{size}", labels={"figure": "loss"}),
        loss_csv=f"{MODEL_DIR}/loss.csv",
        preview=report(
            f"{MODEL_DIR}/preview/preview.png",
            category="Models",
            subcategory="{condset} n{size}",
            labels={"figure": "preview"},
        ),
        metrics=f"{MODEL_DIR}/preview/preview_metrics.json",
    wildcard_constraints:
        condset=r"[A-Za-z0-9_.-]+",
        size=r"\d+",
    params:
        settings=_model_settings,
        bundle=MODEL_BUNDLE,
        out_dir=lambda w: f"{RESULTS}/models/{w.condset}/n{w.size}",
        template_dir=f"{RESULTS}/template",
        segmenter=QC_SEGMENTER_ARG,
    resources:
        mem_mb=mem_mb("train_vcm"),
    log:
        f"{LOGS}/train_vcm/{{condset}}_n{{size}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_vcm/{{condset}}_n{{size}}.tsv"
    threads: _train_threads
    shell:
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={threads} python -m vcm train-vcm --config {CONFIG_FILE}"
        " --dataset {input.dataset} --latents {input.latents} --bundle {params.bundle}"
        " --condition-set {wildcards.condset} --size {wildcards.size} --template-dir {params.template_dir}"
        " {params.segmenter} --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"


rule models:
    input:
        MODELS,
