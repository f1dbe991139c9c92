"""Stage 4 of the backbone (optional): the decoder refined where the labels matter, the latent space kept.

The autoencoder of stage 1 weighs every voxel alike (unless ``--ae-region-weight``), so the ventricles — a few
per cent of the image, and what every control figure of the project measures — come out of its decoder
blurred. :func:`refine_decoder` trains only the decoder (and its ``post_quant_conv``) further, on latents
drawn from the frozen encoder's posterior, with an L1 loss that counts the voxels near the ventricles more:

    w = 1 + region_weight · [ventricles dilated by region_margin voxels],   loss = Σ w·|x̂ − x| / Σ w.

``latent_noise`` adds Gaussian noise of that fraction of the latents' spread to the latents decoded in training.
The encoder is not touched, so the latents, their ``scale_factor`` and the latent U-Net trained on them stay
valid: this stage can refine the decoder of a bundle that is already trained (``--from-bundle``) and ships as a
new ``models/autoencoder.pt`` alone. The corpus needs its label map (``/label``) for the region.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcm.backbone_training.autoencoder import fingerprint, reconstruction_errors
from vcm.backbone_training.corpus import FLIP_DIM, Corpus
from vcm.backbone_training.loop import (
    Budget,
    StageLoop,
    StageOptions,
    StageSummary,
    finished_stage,
    last_value,
    save_final,
    stage_store,
    tail_mean,
)
from vcm.backbone_training.region import VENTRICLES, region_mask, weighted_l1
from vcm.errors import StageError

__all__ = ["DecoderOptions", "decoder_parameters", "refine_decoder"]

logger = logging.getLogger(__name__)


@dataclass
class DecoderOptions(StageOptions):
    """How the decoder is refined (the ``--dec-*`` options); ``steps`` 0 and no ``minutes``: the stage is off."""

    steps: int | None = 0
    batch_size: int = 2
    lr: float = 5e-4
    warmup: int = 50
    region_weight: float = 5.0
    region_labels: tuple[int, ...] = VENTRICLES
    region_margin: int = 2
    latent_noise: float = 0.0
    val_every: int = 200

    @property
    def enabled(self) -> bool:
        return bool(self.steps) or bool(self.minutes)


def decoder_parameters(ae: nn.Module) -> list[nn.Parameter]:
    """What this stage trains: the decoder and the convolution in front of it."""
    return [*ae.post_quant_conv.parameters(), *ae.decoder.parameters()]


@dataclass
class _DecoderStep:
    """One step: posterior latents of a batch from the frozen encoder, decoded, weighted L1 on the decoder."""

    ae: nn.Module
    optimiser: torch.optim.Optimizer
    images: torch.Tensor
    region: torch.Tensor
    opts: DecoderOptions

    def __call__(self, g: torch.Generator) -> dict[str, float]:
        opts = self.opts
        idx = torch.randint(self.images.shape[0], (opts.batch_size,), generator=g)
        x = self.images[idx].to(opts.device).float()
        r = self.region[idx].to(opts.device)
        flip = (torch.rand(opts.batch_size, generator=g) < 0.5).to(opts.device).view(-1, 1, 1, 1, 1)
        x, r = torch.where(flip, x.flip(FLIP_DIM), x), torch.where(flip, r.flip(FLIP_DIM), r)
        with torch.no_grad():
            mu, sigma = self.ae.encode(x)
            z = mu + sigma * torch.randn(mu.shape, generator=g).to(opts.device)
            if opts.latent_noise > 0:
                # The diffusion model's latents are not posterior samples: a decoder that has seen latents
                # off the posterior renders them with the subjects' contrast rather than its own.
                z = z + opts.latent_noise * mu.std() * torch.randn(mu.shape, generator=g).to(opts.device)
        recon = self.ae.decode(z)
        loss = weighted_l1(recon, x, r, opts.region_weight)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        with torch.no_grad():
            l1 = (recon - x).abs()
            region_l1 = (l1 * r).sum() / r.sum().clamp_min(1)
        return {"loss": loss.item(), "l1": l1.mean().item(), "region_l1": region_l1.item()}


def _validation(ae: nn.Module, images: torch.Tensor, region: torch.Tensor, batch: int) -> dict[str, float]:
    """Held-out L1 of the reconstruction from the posterior mean, over the image and inside the region."""
    total = inside = n = n_region = 0.0
    for i, err in reconstruction_errors(ae, images, batch):
        r = region[i : i + err.shape[0]].to(err.device)
        total, n = total + err.sum().item(), n + err.numel()
        inside, n_region = inside + (err * r).sum().item(), n_region + r.sum().item()
    return {"val_l1": total / max(n, 1), "val_region_l1": inside / max(n_region, 1)}


def refine_decoder(
    ae: nn.Module, corpus: Corpus, definitions: dict[str, Any], work: Path, opts: DecoderOptions
) -> tuple[nn.Module, StageSummary]:
    """Stage 4: train the decoder of ``ae`` further with the region-weighted L1; the encoder stays as it is.

    Args:
        ae: the trained autoencoder (its decoder is changed in place).
        corpus: the training images and their label maps.
        definitions: the backbone definitions without the diffusion U-Net (they sign the checkpoints, with the
            starting weights: a checkpoint refined from another autoencoder is never resumed).
        work: the stage's work folder (checkpoints, ``losses.csv``, ``loss.png``).
        opts: the training options.

    Returns:
        the autoencoder with the refined decoder (eval mode) and the stage's summary; a finished stage
        (``checkpoint_final.pt``) is loaded, not retrained.

    Raises:
        StageError: the corpus has no label map.
    """
    if corpus.labels is None:
        raise StageError(f"{corpus.path}: no /label dataset: the decoder stage needs the label maps")
    store = stage_store(work, {**definitions, "start_autoencoder_sha256": fingerprint(ae)})
    done = finished_stage(store, "dec", {"autoencoder": ae})
    if done is not None:
        return ae.eval(), done
    ae.requires_grad_(False)
    params = decoder_parameters(ae)
    for p in params:
        p.requires_grad_(True)
    region = region_mask(corpus.labels, tuple(opts.region_labels), opts.region_margin)
    logger.info(
        "dec: region = labels %s dilated by %d voxels, %.1f %% of the voxels, weight 1 + %g",
        list(opts.region_labels),
        opts.region_margin,
        100 * float(region.mean()),
        opts.region_weight,
    )
    optimiser = torch.optim.AdamW(params, lr=opts.lr)
    loop = StageLoop(
        "dec",
        store,
        {"autoencoder": ae},
        {"decoder": optimiser},
        Budget(opts.steps or None, opts.minutes, opts.warmup),
        opts.lr_final,
        ["loss", "l1", "region_l1", "val_l1", "val_region_l1"],
        opts.seed,
        opts.checkpoint_every,
    )
    train = torch.from_numpy(corpus.train)
    step = _DecoderStep(ae, optimiser, corpus.images[train], region[train], opts)
    val_fn = None
    if len(corpus.val):
        val = torch.from_numpy(corpus.val)
        val_images, val_region = corpus.images[val], region[val]

        def val_fn() -> dict[str, float]:
            return _validation(ae, val_images, val_region, opts.batch_size)

    rows = loop.run(step, val_fn, opts.val_every, train_key="loss", val_key="val_region_l1")
    summary = StageSummary(
        steps=loop.step,
        wall_s=round(loop.elapsed, 1),
        train_loss=tail_mean(rows, "loss"),
        val_loss=last_value(rows, "val_l1"),
        extra={
            "train_region_l1": tail_mean(rows, "region_l1"),
            "val_region_l1": last_value(rows, "val_region_l1"),
            "loss": "L1 x (1 + region_weight * region), decoder only",
        },
    )
    save_final(store, {"autoencoder": ae}, summary)
    ae.requires_grad_(False)
    return ae.eval(), summary
