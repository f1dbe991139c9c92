"""Stage 3 of the backbone: the covariate-conditioned latent diffusion U-Net and the EMA of its weights.

:func:`train_diffusion` trains MONAI's :class:`~monai.networks.nets.DiffusionModelUNet` on the scaled latents
of the frozen autoencoder with the DDPM epsilon objective and the project's schedule
(:func:`vcm.diffusion.ddpm_scheduler`), calling it exactly as :meth:`vcm.models.backbone.Backbone.eps` does;
an exponential moving average of the weights (:func:`~vcm.training.ema.ema_update`) is validated and shipped.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
from vcm.models.layout import place
from vcm.training.ema import ema_decay_at, ema_update

__all__ = ["LDMOptions", "train_diffusion"]

logger = logging.getLogger(__name__)

VAL_NOISE_SEED = 12345
"""Seed of the held-out loss' fixed noise: evaluations stay comparable from one to the next."""


@dataclass
class LDMOptions(StageOptions):
    """How the latent U-Net trains (the ``--dm-*`` options); the network itself is in the definitions."""

    steps: int | None = 2000
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 100
    ema_decay: float = 0.998
    val_every: int = 200
    val_timesteps: int = 8
    sample_every: int = 0
    sample_ddim_steps: int = 50


def _validation(
    ema_net: nn.Module, latents: dict[str, torch.Tensor], scale: float, opts: LDMOptions
) -> Callable[[], dict[str, float]]:
    """The held-out noise-prediction MSE of the EMA weights, with fixed noise at evenly spread time steps."""
    from vcm.diffusion import NUM_TRAIN_TIMESTEPS, ddpm_scheduler

    scheduler, dev, k = ddpm_scheduler(), opts.device, opts.val_timesteps
    z_val = (latents["val"] * scale).to(dev)
    c_val = latents["val_cov"].unsqueeze(1).to(dev)
    t_val = ((torch.arange(k) + 0.5) * NUM_TRAIN_TIMESTEPS / k).long().to(dev)
    val_noise = torch.randn((k, *z_val.shape), generator=torch.Generator().manual_seed(VAL_NOISE_SEED)).to(
        dev
    )

    def val_fn() -> dict[str, float]:
        total = 0.0
        with torch.no_grad():
            for j in range(k):
                for i in range(0, z_val.shape[0], opts.batch_size):
                    z0, n = z_val[i : i + opts.batch_size], val_noise[j, i : i + opts.batch_size]
                    t = t_val[j].expand(z0.shape[0])
                    pred = ema_net.eps(scheduler.add_noise(z0, n, t), t, c_val[i : i + opts.batch_size])
                    total += F.mse_loss(pred, n, reduction="sum").item()
        return {"val_loss": total / (k * z_val.numel())}

    return val_fn


@dataclass
class _DiffusionStep:
    """One DDPM step of the U-Net on a batch of scaled latents, then the EMA update."""

    net: nn.Module  # the Backbone whose eps is trained
    model: nn.Module
    ema: nn.Module
    optimiser: torch.optim.Optimizer
    z_train: torch.Tensor
    c_train: torch.Tensor
    opts: LDMOptions
    loop: StageLoop  # the EMA warm-up follows its step

    def __post_init__(self) -> None:
        from vcm.diffusion import ddpm_scheduler

        self.scheduler = ddpm_scheduler()

    def __call__(self, g: torch.Generator) -> dict[str, float]:
        from vcm.diffusion import NUM_TRAIN_TIMESTEPS

        opts, dev = self.opts, self.opts.device
        self.net.autoencoder.eval()
        self.ema.eval()
        idx = torch.randint(self.z_train.shape[0], (opts.batch_size,), generator=g).to(dev)
        z0, cov = self.z_train[idx], self.c_train[idx].unsqueeze(1)
        noise = torch.randn(z0.shape, generator=g).to(dev)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (opts.batch_size,), generator=g).to(dev)
        pred = self.net.eps(self.scheduler.add_noise(z0, noise, t), t, cov)
        loss = F.mse_loss(pred, noise)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        step = self.loop.step
        ema_update(self.ema, self.model, ema_decay_at(step, opts.ema_decay))
        return {"loss": loss.item()}


def train_diffusion(
    latents: dict[str, torch.Tensor],
    ae: nn.Module,
    definitions: dict[str, Any],
    work: Path,
    opts: LDMOptions,
    sample_hook: Callable[[nn.Module, int], None] | None = None,
) -> tuple[nn.Module, StageSummary]:
    """Stage 3: the covariate-conditioned diffusion U-Net on scaled latents; returns its EMA copy.

    Args:
        latents: the autoencoder's latents and covariates
            (:func:`~vcm.backbone_training.autoencoder.load_or_encode_latents`).
        ae: the frozen autoencoder.
        definitions: the backbone definitions, ``scale_factor`` included (they sign the checkpoints).
        work: the stage's work folder (checkpoints, ``losses.csv``, ``loss.png``).
        opts: the training options.
        sample_hook: called with the EMA network and the step every ``opts.sample_every`` steps.

    Returns:
        the EMA U-Net and the stage's summary; a finished stage (``checkpoint_final.pt`` of these
        definitions) is loaded, not retrained.
    """
    from monai.networks.nets import DiffusionModelUNet

    from vcm.models.backbone import Backbone

    scale = float(definitions["scale_factor"])
    store = stage_store(work, definitions)
    torch.manual_seed(opts.seed + 1)
    model = place(DiffusionModelUNet(**definitions["diffusion"]), opts.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    done = finished_stage(store, "ldm", {"ema": ema})
    if done is not None:
        return ema, done
    net = Backbone(ae, model, scale_factor=scale, freeze=False)
    ema_net = Backbone(ae, ema, scale_factor=scale, freeze=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    loop = StageLoop(
        "ldm",
        store,
        {"diffusion": model, "ema": ema},
        {"diffusion": optimiser},
        Budget(opts.steps, opts.minutes, opts.warmup),
        opts.lr_final,
        ["loss", "val_loss"],
        opts.seed,
        opts.checkpoint_every,
    )
    z_train, c_train = (latents["train"] * scale).to(opts.device), latents["train_cov"].to(opts.device)
    step = _DiffusionStep(net, model, ema, optimiser, z_train, c_train, opts, loop)
    val_fn = _validation(ema_net, latents, scale, opts) if "val" in latents else None
    hook = (lambda s: sample_hook(ema, s)) if sample_hook is not None else None
    rows = loop.run(step, val_fn, opts.val_every, hook=hook, hook_every=opts.sample_every)
    summary = StageSummary(
        steps=loop.step,
        wall_s=round(loop.elapsed, 1),
        train_loss=tail_mean(rows, "loss", 200),
        val_loss=last_value(rows, "val_loss"),
        extra={
            "loss": "MSE(eps, eps_hat), t ~ U{0..999}",
            "val_loss_of": "EMA weights",
            "ema_decay": opts.ema_decay,
        },
    )
    save_final(store, {"ema": ema, "diffusion": model}, summary)
    return ema, summary
