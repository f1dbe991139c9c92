"""Training a control module on a frozen backbone (paper §3.2, eq. 4, appendix B.2) and its previews.

One model per condition set × training size (``/splits/train_<size>`` of ``dataset.h5``). Two methods share
the stage, the data, the schedule and the outputs, so that they can be compared:

* ``vcm`` (the paper): VCM predicts ``(gamma, beta)`` that modulate the frozen model's noise prediction,
  ``eps' = eps_t * (1 + gamma) + beta``; loss eq. 4, ``MSE(eps, eps') + λ(‖γ‖₁ + ‖β‖₁)``, λ⁻¹ = b·c·h·w·d.
* ``controlnet`` (the baseline the paper compares with): MONAI's 3D
  :class:`~monai.networks.nets.ControlNet`, a trainable copy of the frozen U-Net's encoder initialised from
  it, whose zero-initialised residuals are added to the frozen U-Net's skip connections; its conditioning
  embedding downsamples the conditions to the latent grid by the autoencoder's factor. Loss ``MSE(eps,
  eps_pred)``.

Every step (the data stays in memory; nothing that can be computed once is computed per step):

1. draw the *global* batch: subject indices (balanced: every subject once before any twice), left-right
   flips, posterior noise, time steps ``t ~ U{0..999}``, noise ``eps`` and the modality-dropout keep mask,
   all from one seeded generator, so that a 2-process DDP run sees the same samples as a 1-process run and a
   resumed run the same samples as an uninterrupted one; each rank takes its slice;
2. ``z0 = (mu + sigma * n) * scale_factor`` from the pre-encoded posterior (``latents.h5``; ``mu`` alone for a
   backbone whose U-Net was trained on posterior means, such as the tiny one), picking the flipped image's
   latent for flipped samples and flipping their conditions with it;
3. ``z_t = add_noise(z0, eps, t)`` (DDPM, BrainLDM's schedule); the frozen backbone's ``eps_t`` without grad;
4. the control module, the loss, AdamW (linear warm-up, then cosine annealing to ``lr / 10``).

Multimodal sets: *modality latent dropout* (paper) zeroes an encoder branch's output per sample, keeping
only A, only B or both with probability 0.3 / 0.3 / 0.4 (:func:`~vcm.models.vcm.subset_probabilities`);
``training.modality_dropout: input`` zeroes the inputs instead (the ablation). ControlNet has one
conditioning input, so it always drops at the input.

Outputs in ``--out-dir``: ``vcm.pt`` (the declared output, written last and atomically), ``loss.csv``,
``loss.png``, ``preview/`` and, not a declared output (Snakemake deletes failed outputs),
``checkpoints/checkpoint_latest.pt`` (every ``training.checkpoint_every`` steps) and
``checkpoints/checkpoint_final.pt``. A rerun resumes from the latest checkpoint; after the final one it only
rewrites ``vcm.pt`` and the previews; a checkpoint of other settings is renamed ``<name>.stale`` and training
starts over (:mod:`vcm.training.checkpoints`). Checkpoints hold only tensors and plain Python types and load
with ``torch.load(weights_only=True)``. Under ``torchrun --nproc_per_node N`` the stage trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); ``training.batch_size`` is the global batch; rank 0
writes every file.

The package, one concept per module:

* :mod:`vcm.training.settings`: :class:`~vcm.training.settings.Settings`, read from the config;
* :mod:`vcm.training.batches`: the split in memory and the seeded draw of a batch;
* :mod:`vcm.training.schedule`: the learning-rate schedule;
* :mod:`vcm.training.checkpoints`: the project's checkpoint store and policy, random state, stop signals;
* :mod:`vcm.training.distributed`: the torchrun process group;
* :mod:`vcm.training.loop`: :func:`~vcm.training.loop.train` and the loss;
* :mod:`vcm.training.preview`: the previews and the held-out noise-prediction error;
* :mod:`vcm.training.cli`: the ``train-vcm`` and ``preview`` stages.

Import the submodules directly; this package imports nothing.
"""
