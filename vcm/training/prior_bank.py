"""A bank of the frozen backbone's noise predictions, reused over training steps (``training.prior_reuse``).

VCM's loss needs the frozen model's noise prediction ``eps_t`` (the *diffusion prior*) for every noisy latent it
trains on. On a CPU that forward pass is a third to a half of a step (on the demo's 10×14×10 latent it is run
on a 12×16×12 padded grid), and it does not depend on the module being trained. With ``prior_reuse = R > 1``
a run draws its noisy latents from a bank computed once at set-up: for every training subject and flip, ``K``
noisy latents (posterior sample, ``t`` and noise drawn as a step would draw them) with their ``eps_t``, ``K``
chosen so that each is trained on about ``R`` times. A step then draws subjects, flips and bank entries, and
skips the backbone. ``R = 1`` (the paper): no bank, fresh noise every step.

The bank is drawn from its own generator seeded from the run's seed, so a resumed run rebuilds the same bank.
It holds three latent-shaped float32 tensors per entry: ~50 KB each on the demo grid, ~3 MB at BrainLDM's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from vcm.training.batches import TrainData, add_noise, draw_timesteps

__all__ = ["PriorBank", "bank_entries"]

SEED_OFFSET = 7919
"""The bank's generator is seeded with ``training.seed + SEED_OFFSET``: apart from the batches' stream."""


def bank_entries(steps: int, batch_size: int, draws: int, reuse: int, subjects: int, flips: int) -> int:
    """Entries per (subject, flip): enough for ``steps × batch_size × draws`` samples to use each ``reuse``
    times on average (at least one)."""
    return max(1, math.ceil(steps * batch_size * draws / (reuse * subjects * flips)))


@dataclass
class PriorBank:
    """Noisy latents, their time steps and noise, and the backbone's predictions, per (subject, flip).

    Tensors are shaped ``(subjects · flips, entries, ...)``; row ``subject · flips + flip``.
    """

    z_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    eps: torch.Tensor
    flips: int

    @property
    def entries(self) -> int:
        return int(self.t.shape[1])

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        data: TrainData,
        backbone: nn.Module,
        alphas_cumprod: torch.Tensor,
        entries: int,
        flip: bool,
        seed: int,
        timesteps: str = "uniform",
        chunk: int = 32,
        device: torch.device | str = "cpu",
        progress: bool = True,
    ) -> PriorBank:
        """Draw the bank and run the backbone on it (``chunk`` latents per forward pass).

        Args:
            data: the training split (posteriors of the plain and the flipped image, covariates).
            backbone: the frozen backbone (``eps``, ``scale_factor``, ``posterior_weight``).
            alphas_cumprod: the DDPM schedule's cumulative alphas (on ``device``).
            entries: noisy latents per subject and flip.
            flip: whether training flips (two rows per subject) or not (one).
            seed: the run's seed.
            timesteps: the time-step draw (:func:`~vcm.training.batches.draw_timesteps`).
            chunk: latents per backbone pass.
            device: where the backbone runs; the bank is kept on the CPU.
            progress: a tqdm bar.
        """
        generator = torch.Generator().manual_seed(int(seed) + SEED_OFFSET)
        flips = 2 if flip else 1
        n = len(data) * flips
        shape = (n, entries, *data.latent_shape)
        posterior = torch.randn(shape, generator=generator)
        t = draw_timesteps(n * entries, len(alphas_cumprod), generator, timesteps).reshape(n, entries)
        noise = torch.randn(shape, generator=generator)
        subject = torch.arange(n) // flips
        view = torch.arange(n) % flips
        mu, sigma = data.mu[subject, view], data.sigma[subject, view]
        z0 = (
            mu.unsqueeze(1) + backbone.posterior_weight * sigma.unsqueeze(1) * posterior
        ) * backbone.scale_factor
        z_t = add_noise(z0.flatten(0, 1), noise.flatten(0, 1), t.flatten(), alphas_cumprod.cpu())
        cov = data.cov[subject].repeat_interleave(entries, dim=0).unsqueeze(1)
        eps = torch.empty_like(z_t)
        rows = range(0, len(z_t), chunk)
        for start in tqdm(rows, desc="prior bank", unit="pass", disable=not progress):
            part = slice(start, start + chunk)
            out = backbone.eps(z_t[part].to(device), t.flatten()[part].to(device), cov[part].to(device))
            eps[part] = out.float().cpu()
        return cls(z_t.reshape(shape), t, noise, eps.reshape(shape), flips)

    def take(
        self, idx: torch.Tensor, flip: torch.Tensor, entry: torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries ``entry`` (B, K) of subjects ``idx`` (B,) under flips ``flip`` (B,).

        Returns:
            ``z_t``, ``t``, ``noise`` and ``eps``, ``K`` consecutive rows per subject (B · K rows), on ``device``.
        """
        row = (idx * self.flips + flip.long() * (self.flips - 1)).unsqueeze(1).expand_as(entry)
        return tuple(x[row, entry].flatten(0, 1).to(device) for x in (self.z_t, self.t, self.noise, self.eps))
