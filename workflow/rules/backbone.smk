# The frozen backbone: a bundle folder (shipped tiny demo weights, or the real BrainLDM bundle), or, with
# `backbone: {retrain: true}`, the tiny backbone retrained here from a demo-generator pretraining corpus.
#
# Defines for downstream rules:
#   BACKBONE_BUNDLE  the bundle folder to load (models/autoencoder.pt, models/model.pt[, configs/network.json])
#   BACKBONE_FILES   its model files, to use as rule inputs
from pathlib import Path as _Path

from snakemake.exceptions import WorkflowError

BACKBONE_RETRAIN = bool(CFG["backbone"]["retrain"])
BACKBONE_TINY = f"{RESULTS}/backbone/tiny"
# Checkpoints, loss logs and cached latents: deliberately not a declared output (Snakemake deletes the outputs
# of a failed job; a rerun resumes from work/{ae,ldm}/checkpoint_latest.pt).
BACKBONE_WORK = f"{RESULTS}/backbone/work"
BACKBONE_CORPUS = f"{RESULTS}/backbone/corpus.h5"

# The recipe of the shipped resources/backbone/demo weights (docs/backbone.md): 400 demo-world subjects,
# factor-4 autoencoder (16, 32, 32) with 8 latent channels trained with the ventricles weighted 6x in its L1,
# 4.3 M-parameter latent U-Net, then stage 4: the decoder alone refined on noisy latents with the ventricles
# weighted 6x (the encoder, the latents and the U-Net stay as they were; +0.028 LV Dice on reconstructions,
# +0.016 through the demo's VCM; docs/backbone.md, session 29). Fixed step counts (2600 autoencoder, 4500 U-Net,
# 4000 decoder), so a retrain does not depend on the machine's speed. About 4 h on two CPU cores alone (corpus
# 28 min with two workers, autoencoder 61 min, U-Net ~105 min at 1.2-1.5 s a step, decoder 48 min at 0.7 s a step).
BACKBONE_CORPUS_SUBJECTS = 400
BACKBONE_TRAIN_ARGS = (
    "--seed 0 --checkpoint-every 100"
    " --ae-channels 16,32,32 --latent-channels 8 --ae-res-blocks 1 --ae-batch 2 --ae-lr 1e-3 --kl-weight 1e-8"
    " --ae-init-sigma 0.05 --ae-steps 2600 --ae-region-weight 5 --ae-region-margin 2"
    " --dm-channels 32,64,64 --dm-res-blocks 1,1,2 --dm-attention false,false,true --dm-head-channels 0,0,32"
    " --dm-batch 16 --dm-lr 4e-4 --ema-decay 0.995 --dm-steps 4500 --sample-every 500 --ddim-steps 50"
    " --dec-steps 4000 --dec-batch 2 --dec-lr 5e-4 --dec-region-weight 5 --dec-region-margin 2"
    " --dec-latent-noise 0.1 --dec-val-every 250"
)

if BACKBONE_RETRAIN:
    if CFG["backbone"]["kind"] != "tiny":
        raise WorkflowError("backbone.retrain: true retrains the tiny backbone; set backbone.kind: tiny")
    if not isinstance(CFG["grid"], str):
        raise WorkflowError("backbone.retrain: true needs a grid preset name (e.g. grid: demo)")
    BACKBONE_BUNDLE = BACKBONE_TINY
    BACKBONE_FILES = [
        f"{BACKBONE_TINY}/models/autoencoder.pt",
        f"{BACKBONE_TINY}/models/model.pt",
        f"{BACKBONE_TINY}/configs/network.json",
    ]
else:
    BACKBONE_BUNDLE = CFG["backbone"]["bundle"].rstrip("/")
    BACKBONE_FILES = [f"{BACKBONE_BUNDLE}/models/autoencoder.pt", f"{BACKBONE_BUNDLE}/models/model.pt"]
    # the model-zoo BrainLDM bundle has no configs/network.json (its networks are built from built-in definitions)
    if _Path(f"{BACKBONE_BUNDLE}/configs/network.json").is_file():
        BACKBONE_FILES.append(f"{BACKBONE_BUNDLE}/configs/network.json")


rule backbone_corpus:
    output:
        BACKBONE_CORPUS,
    log:
        f"{LOGS}/backbone_corpus.log",
    benchmark:
        f"{RESULTS}/benchmarks/backbone_corpus.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb("backbone_corpus"),
    params:
        settings=section("grid"),
        grid=CFG["grid"],
        n=BACKBONE_CORPUS_SUBJECTS,
    shell:
        "python -m vcm demo --corpus {output:q} --n-subjects {params.n} --grid {params.grid}"
        " --workers {threads} > {log:q} 2>&1"


rule train_backbone:
    input:
        corpus=BACKBONE_CORPUS,
    output:
        autoencoder=f"{BACKBONE_TINY}/models/autoencoder.pt",
        diffusion=f"{BACKBONE_TINY}/models/model.pt",
        network=f"{BACKBONE_TINY}/configs/network.json",
        record=f"{BACKBONE_TINY}/training_record.json",
        samples=report(
            f"{BACKBONE_TINY}/samples.png",
            caption="../report/backbone_samples.rst",
            category="Backbone",
            labels={"figure": "tiny backbone samples"},
        ),
    log:
        f"{LOGS}/train_backbone.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_backbone.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb("train_backbone"),
    params:
        settings=section("grid"),
        work=BACKBONE_WORK,
        out=lambda w, output: os.path.dirname(os.path.dirname(output.autoencoder)),
        args=BACKBONE_TRAIN_ARGS,
    shell:
        "python -m vcm train-backbone --data {input.corpus:q} --work-dir {params.work:q} --out {params.out:q}"
        " --threads {threads} --device auto {params.args} > {log:q} 2>&1"
