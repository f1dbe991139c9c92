"""Train the ``tiny`` backbone: a small AutoencoderKL, then a covariate-conditioned latent diffusion U-Net.

``python -m vcm train-backbone --data corpus.h5 --work-dir WORK --out BUNDLE`` trains, from an HDF5 in the
``dataset.h5`` layout (``/image`` N×1×D×H×W in [0, 1], ``/covariates`` N×4 scaled, ``/splits/train`` and
``/splits/val``), the two networks of a BrainLDM-like backbone at CPU scale (:func:`vcm.models.backbone.
tiny_definitions`) and writes them as a bundle that :func:`vcm.models.backbone.load_bundle` reads:

1. **autoencoder** (stage ``ae``): :class:`~monai.networks.nets.AutoencoderKL`, loss
   ``L1(x, x̂) + w_kl · KL`` (KL summed over the latent, averaged over the batch), left-right flip augmentation,
   optionally a :class:`~monai.networks.nets.PatchDiscriminator` least-squares adversarial term after a
   warm-up (off by default); ``--ae-region-weight`` counts the L1 near the ventricles more (off by default).
   No perceptual loss: its pretrained weights cannot be downloaded here.
2. **latents**: the posterior mean ``mu`` of every image and of its left-right flip (axis 0 of the LAS grid),
   encoded once; ``scale_factor = 1 / std`` of the training latents.
3. **diffusion** (stage ``ldm``): :class:`~monai.networks.nets.DiffusionModelUNet` on
   ``cat[z_t, covariates broadcast]`` with cross-attention to the covariates (B, 1, 4), exactly as
   :meth:`vcm.models.backbone.Backbone.eps` calls it; DDPM epsilon objective with the project's schedule
   (:func:`vcm.diffusion.ddpm_scheduler`); an exponential moving average (EMA) of the weights is what ships.
4. **decoder refinement** (stage ``dec``, only with ``--dec-steps``/``--dec-minutes``): the decoder alone trains
   further on latents from the frozen encoder, with an L1 loss that counts the voxels near the ventricles
   ``1 + --dec-region-weight`` times (the corpus' ``/label``); the latent space, and so the U-Net, stay valid.
   ``--from-bundle B`` runs this stage alone on the trained bundle ``B``.

The stages use AdamW with a linear warm-up and a cosine decay over the stage's budget (``--*-steps`` and/or
``--*-minutes``, whichever ends first), log every step to ``<work>/<stage>/losses.csv`` (+ ``loss.png``), and
write ``<work>/<stage>/checkpoint_latest.pt`` every ``--checkpoint-every`` steps; a rerun resumes from it
(step counter, optimiser, EMA, random generators and elapsed time included), and a finished stage
(``checkpoint_final.pt``) is not retrained. Checkpoints follow the project's one policy
(:mod:`vcm.training.checkpoints`): each carries the signature of the stage's network definitions, and one of
other definitions is renamed ``<name>.stale`` with a warning while the stage trains from scratch. The work
folder is deliberately not the bundle folder: Snakemake deletes the outputs of a failed job, and the
checkpoints must survive it.

At the end the bundle gets float16 weights (:func:`vcm.models.backbone.save_bundle` with ``dtype``; loading
casts back to float32), ``training_record.json`` and ``samples.png`` (3-plane views of real images, their
reconstructions and DDIM samples at young/old × small/large-ventricle covariates).

The package, one concept per module:

* :mod:`vcm.backbone_training.corpus`: the training HDF5 in memory;
* :mod:`vcm.backbone_training.loop`: the loop the stages share (budget, schedule, loss log, checkpoints);
* :mod:`vcm.backbone_training.autoencoder`: stage 1 and the latents it encodes;
* :mod:`vcm.backbone_training.diffusion`: stage 3, the latent U-Net and its EMA;
* :mod:`vcm.backbone_training.region`: the reconstruction loss weighted near the ventricles (stages 1 and 4);
* :mod:`vcm.backbone_training.decoder`: stage 4, the decoder refined near the ventricles;
* :mod:`vcm.backbone_training.samples`: DDIM samples and the samples figure;
* :mod:`vcm.backbone_training.train`: the whole stage, corpus to bundle and training record;
* :mod:`vcm.backbone_training.cli`: the ``train-backbone`` command line.

Import the submodules directly; this package imports nothing.
"""
