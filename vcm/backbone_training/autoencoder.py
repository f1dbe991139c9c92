"""Stage 1 of the backbone: the AutoencoderKL, its loss and validation, and the latents it encodes.

:func:`train_autoencoder` trains MONAI's :class:`~monai.networks.nets.AutoencoderKL` with
``L1(x, x̂) + w_kl · KL`` (:func:`kl_loss`), left-right flips, optional random crops, an optional
least-squares patch-adversarial term and, with ``region_weight``, the L1 counted more near the ventricles
(:mod:`vcm.backbone_training.region`; the encoder then learns to keep what the decoder needs there);
:func:`encode_latents` then encodes the posterior means the latent U-Net trains on, cached in the work folder
by :func:`load_or_encode_latents`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vcm.backbone_training.corpus import FLIP_DIM, Corpus
from vcm.backbone_training.loop import (
    Budget,
    StageLoop,
    StageOptions,
    StageSummary,
    finished_stage,
    last_value,
    module_device,
    save_final,
    stage_store,
    tail_mean,
)
from vcm.backbone_training.region import VENTRICLES, region_mask, weighted_l1
from vcm.errors import StageError
from vcm.models.layout import place
from vcm.training.checkpoints import CheckpointStore, signature

__all__ = [
    "LATENTS_FILE",
    "AEOptions",
    "encode_latents",
    "fingerprint",
    "kl_loss",
    "load_or_encode_latents",
    "reconstruction_errors",
    "train_autoencoder",
    "validation_l1",
]

logger = logging.getLogger(__name__)

LATENTS_FILE = "latents.pt"
"""The cache of encoded latents in the work folder."""


@dataclass
class AEOptions(StageOptions):
    """How the autoencoder trains (the ``--ae-*`` options); the network itself is in the definitions."""

    steps: int | None = 1000
    batch_size: int = 4
    lr: float = 5e-4
    warmup: int = 50
    kl_weight: float = 1e-6
    adv_weight: float = 0.0
    adv_start: int = 0
    disc_channels: int = 16
    init_sigma: float = 0.05
    crop: tuple[int, ...] | None = None
    region_weight: float = 0.0
    region_labels: tuple[int, ...] = VENTRICLES
    region_margin: int = 2
    val_every: int = 100

    @property
    def uses_region(self) -> bool:
        """Whether the L1 is weighted near the ventricles (the corpus' label maps are then needed)."""
        return self.region_weight > 0


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over the latent, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()


def reconstruction_errors(
    ae: nn.Module, images: torch.Tensor, batch_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``|x̂ − x|`` of the reconstructions from the posterior mean, batch by batch: (first index, error)."""
    ae.eval()
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(module_device(ae)).float()
            yield i, (ae.decode(ae.encode(x)[0]) - x).abs()


def validation_l1(ae: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Held-out L1 of the reconstruction from the posterior mean."""
    total, n = 0.0, 0
    for _, err in reconstruction_errors(ae, images, batch_size):
        total, n = total + err.sum().item(), n + err.numel()
    return total / max(n, 1)


def _crops(x: torch.Tensor, size: Sequence[int], multiple: int, generator: torch.Generator) -> torch.Tensor:
    """A random crop of ``size`` from every image of ``x`` (B, C, *grid), starting at multiples of ``multiple``."""
    out = []
    for img in x:
        starts = [
            int(torch.randint((g - s) // multiple + 1, (1,), generator=generator)) * multiple
            for g, s in zip(img.shape[1:], size, strict=True)
        ]
        out.append(img[(slice(None), *(slice(a, a + s) for a, s in zip(starts, size, strict=True)))])
    return torch.stack(out)


def _build_autoencoder(definitions: dict[str, Any], opts: AEOptions) -> nn.Module:
    from monai.networks.nets import AutoencoderKL

    torch.manual_seed(opts.seed)
    ae = place(AutoencoderKL(**definitions["autoencoder"]), opts.device)
    if opts.init_sigma > 0:
        # Start with little posterior noise: with the library's init (sigma ~ 1) the decoder first sees
        # mostly noise, and on a CPU budget the autoencoder is still worse than the mean image after
        # hundreds of steps. The KL term moves sigma from here.
        with torch.no_grad():
            ae.quant_conv_log_sigma.conv.bias.fill_(2 * math.log(opts.init_sigma))
    return ae


def _crop_geometry(
    grid: tuple[int, ...], definitions: dict[str, Any], crop: tuple[int, ...] | None
) -> tuple[int, tuple[int, ...] | None]:
    """The autoencoder's downsampling factor and the training crop (``None``: whole images), both checked."""
    factor = 2 ** (len(definitions["autoencoder"]["channels"]) - 1)
    if any(s % factor for s in grid):
        raise StageError(f"image grid {grid} is not divisible by the autoencoder's factor {factor}")
    crop = tuple(min(c, g) for c, g in zip(crop, grid, strict=True)) if crop else None
    if crop is not None and any(c % factor for c in crop):
        raise StageError(f"--ae-crop {crop} is not divisible by the autoencoder's factor {factor}")
    return factor, crop


class _Adversary:
    """The optional patch discriminator and its least-squares loss."""

    def __init__(self, spatial_dims: int, opts: AEOptions) -> None:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        disc = PatchDiscriminator(
            spatial_dims=spatial_dims,
            num_layers_d=3,
            channels=opts.disc_channels,
            in_channels=1,
            out_channels=1,
            norm="INSTANCE",
        )
        self.disc = place(disc, opts.device)
        self.loss = PatchAdversarialLoss(criterion="least_squares")
        self.optimiser = torch.optim.AdamW(self.disc.parameters(), lr=opts.lr)

    def generator_loss(self, recon: torch.Tensor) -> torch.Tensor:
        return self.loss(self.disc(recon)[-1], target_is_real=True, for_discriminator=False)

    def train_discriminator(self, recon: torch.Tensor, x: torch.Tensor) -> float:
        d_fake = self.loss(self.disc(recon.detach())[-1], target_is_real=False, for_discriminator=True)
        d_real = self.loss(self.disc(x)[-1], target_is_real=True, for_discriminator=True)
        d_loss = 0.5 * (d_fake + d_real)
        self.optimiser.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimiser.step()
        return d_loss.item()


@dataclass
class _AutoencoderStep:
    """One training step of the autoencoder (and of the discriminator once the adversarial term is on)."""

    ae: nn.Module
    optimiser: torch.optim.Optimizer
    images: torch.Tensor
    region: torch.Tensor | None  # (N, 1, *grid) 0/1 near the ventricles, with ``opts.region_weight`` > 0
    opts: AEOptions
    factor: int
    crop: tuple[int, ...] | None
    adversary: _Adversary | None
    loop: StageLoop  # the adversarial term starts at one of its steps

    def __call__(self, g: torch.Generator) -> dict[str, float]:
        opts = self.opts
        idx = torch.randint(self.images.shape[0], (opts.batch_size,), generator=g)
        x = self.images[idx].to(opts.device).float()
        if self.region is not None:  # cropped and flipped with the image, as one more channel
            x = torch.cat([x, self.region[idx].to(opts.device)], 1)
        if self.crop is not None:
            x = _crops(x, self.crop, self.factor, g)
        flip = (torch.rand(opts.batch_size, generator=g) < 0.5).to(opts.device)
        x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(FLIP_DIM), x)
        region = None
        if self.region is not None:
            x, region = x[:, :1], x[:, 1:]
        recon, mu, sigma = self.ae(x)
        l1 = F.l1_loss(recon, x)
        kl = kl_loss(mu, sigma)
        rec_loss = l1 if region is None else weighted_l1(recon, x, region, opts.region_weight)
        loss = rec_loss + opts.kl_weight * kl
        out = {"l1": l1.item(), "kl": kl.item()}
        adversary = self.adversary
        adv_on = adversary is not None and self.loop.step >= opts.adv_start
        if adv_on:
            gen_adv = adversary.generator_loss(recon)
            loss = loss + opts.adv_weight * gen_adv
            out["adv"] = gen_adv.item()
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        if adv_on:
            out["disc"] = adversary.train_discriminator(recon, x)
        out["loss"] = loss.item()
        return out


def train_autoencoder(
    corpus: Corpus, definitions: dict[str, Any], work: Path, opts: AEOptions
) -> tuple[nn.Module, StageSummary]:
    """Stage 1: the AutoencoderKL (L1 + KL [+ patch adversarial]); returns the trained network.

    Args:
        corpus: the training images.
        definitions: the backbone definitions without the diffusion U-Net (they sign the checkpoints).
        work: the stage's work folder (checkpoints, ``losses.csv``, ``loss.png``).
        opts: the training options.

    Returns:
        the trained autoencoder (in eval mode) and the stage's summary; a finished stage
        (``checkpoint_final.pt`` of these definitions) is loaded, not retrained.
    """
    store = stage_store(work, definitions)
    ae = _build_autoencoder(definitions, opts)
    done = finished_stage(store, "ae", {"autoencoder": ae})
    if done is not None:
        return ae, done
    region = None
    if opts.uses_region:
        if corpus.labels is None:
            raise StageError(f"{corpus.path}: no /label dataset: --ae-region-weight needs the label maps")
        region = region_mask(corpus.labels[corpus.train], tuple(opts.region_labels), opts.region_margin)
    factor, crop = _crop_geometry(corpus.grid, definitions, opts.crop)
    optimiser = torch.optim.AdamW(ae.parameters(), lr=opts.lr)
    modules: dict[str, nn.Module] = {"autoencoder": ae}
    optimisers: dict[str, torch.optim.Optimizer] = {"autoencoder": optimiser}
    adversary = _Adversary(len(corpus.grid), opts) if opts.adv_weight > 0 else None
    if adversary is not None:
        modules["discriminator"] = adversary.disc
        optimisers["discriminator"] = adversary.optimiser
    loop = StageLoop(
        "ae",
        store,
        modules,
        optimisers,
        Budget(opts.steps, opts.minutes, opts.warmup),
        opts.lr_final,
        ["loss", "l1", "kl", "adv", "disc", "val_l1"],
        opts.seed,
        opts.checkpoint_every,
    )
    train_images = corpus.images[torch.from_numpy(corpus.train)]
    step = _AutoencoderStep(ae, optimiser, train_images, region, opts, factor, crop, adversary, loop)
    val_fn = None
    if len(corpus.val):
        val_images = corpus.images[torch.from_numpy(corpus.val)]

        def val_fn() -> dict[str, float]:
            return {"val_l1": validation_l1(ae, val_images, opts.batch_size)}

    rows = loop.run(step, val_fn, opts.val_every, train_key="l1", val_key="val_l1")
    summary = StageSummary(
        steps=loop.step,
        wall_s=round(loop.elapsed, 1),
        train_loss=tail_mean(rows, "l1"),
        val_loss=last_value(rows, "val_l1"),
        extra={
            "train_kl": tail_mean(rows, "kl"),
            "loss": ("L1" if region is None else "L1 x (1 + region_weight * region)")
            + " + kl_weight * KL"
            + (" + adv" if adversary is not None else ""),
        },
    )
    save_final(store, {"autoencoder": ae}, summary)
    ae.eval()
    return ae, summary


@torch.no_grad()
def encode_latents(ae: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Posterior means of ``images`` followed by those of their left-right flips: (2N, C, *latent grid)."""
    ae.eval()
    out = []
    for flip in (False, True):
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(module_device(ae)).float()
            mu, _ = ae.encode(x.flip(FLIP_DIM) if flip else x)
            out.append(mu.cpu())
    return torch.cat(out)


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names and values): which weights a cache or a checkpoint came from."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_or_encode_latents(
    ae: nn.Module, corpus: Corpus, work: Path, definitions: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The latents of the corpus' splits and their covariates (``train``, ``train_cov``, ``val``, ``val_cov``).

    Cached in ``<work>/latents.pt`` under the checkpoint policy, signed by the definitions, these autoencoder
    weights and this corpus: a cache of other ones is set aside and the latents are encoded again.
    """
    key = {**definitions, "autoencoder_sha256": fingerprint(ae), "corpus": str(corpus.path.resolve())}
    store = CheckpointStore(work, signature(key))
    cached = store.load(LATENTS_FILE)
    if cached is not None:
        return cached["latents"]
    logger.info("encoding %d images and their flips", corpus.images.shape[0])
    out: dict[str, torch.Tensor] = {}
    for name, idx in (("train", corpus.train), ("val", corpus.val)):
        if len(idx) == 0:
            continue
        sel = torch.from_numpy(idx)
        out[name] = encode_latents(ae, corpus.images[sel])
        out[f"{name}_cov"] = corpus.covariates[sel].repeat(2, 1)
    store.save({"latents": out}, name=LATENTS_FILE)
    return out
