"""Training batches of a control module: the split in memory and the seeded draw of every random number.

Every random number of a step (subjects, flips, posterior noise, time steps, diffusion noise, the
modality-dropout keep mask) comes from one generator, in a fixed order, for the whole global batch: DDP ranks
take slices of the same draw, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vcm.dataset_store import DatasetFile
from vcm.errors import StageError
from vcm.latents import FLIP_AXIS, LatentsFile
from vcm.models.conditions import condition_tensor
from vcm.models.vcm import sample_keep_mask

if TYPE_CHECKING:
    from vcm.training.prior_bank import PriorBank

__all__ = [
    "TIMESTEP_SAMPLING",
    "Batch",
    "TrainData",
    "add_noise",
    "draw_batch",
    "draw_indices",
    "draw_timesteps",
    "flip_where",
]

TIMESTEP_SAMPLING = ("uniform", "cubic")


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip the samples of (B, C, *grid) ``x`` where ``flip`` (B,) is true, along the left-right axis."""
    if not bool(flip.any()):
        return x
    flipped = torch.flip(x, dims=(2 + FLIP_AXIS,))
    return torch.where(flip.reshape(-1, *([1] * (x.dim() - 1))).to(x.device), flipped, x)


class TrainData:
    """One training split in memory: compact conditions, covariates and the pre-encoded posteriors.

    Conditions stay in their stored dtype (uint8 masks and class maps, float16 images); a batch is
    converted (one-hot, float, flip) when drawn. At BrainLDM scale that is ~5.7 MB per subject and condition.

    Args:
        dataset: ``dataset.h5``.
        latents: ``latents.h5`` (same subjects, same order).
        split: the split's name (e.g. ``train_10``) or explicit indices.
        names: condition names to load.
    """

    def __init__(
        self, dataset: str | Path, latents: str | Path, split: str | Sequence[int], names: Sequence[str]
    ) -> None:
        with DatasetFile(dataset) as data, LatentsFile(latents) as encoded:
            index = data.split(split) if isinstance(split, str) else np.asarray(split, dtype=np.int64)
            if index.size == 0:
                raise StageError(f"{dataset}: split {split!r} is empty")
            index = np.sort(index)  # h5py reads sorted indices
            if len(encoded) != len(data):
                raise StageError(
                    f"{latents} has {len(encoded)} subjects but {dataset} has {len(data)}; rerun encode-latents"
                )
            stored = encoded.subjects()
            if stored is not None and stored != data.subjects():
                raise StageError(f"{latents} and {dataset} list different subjects; rerun encode-latents")
            data.require_conditions(names)
            self.index = index
            self.subjects = data.subjects(index)
            self.n_semantic = data.n_semantic
            self.cond = {n: torch.from_numpy(data.conditions(n, index)) for n in names}
            self.cov = torch.from_numpy(data.covariates(index))
            mu, sigma = encoded.posteriors(index)
            self.mu, self.sigma = torch.from_numpy(mu), torch.from_numpy(sigma)
            self.bundle_sha256 = encoded.bundle_sha256
            self.grid = data.grid_shape
            self.affine = data.affine if data.has_affine else None

    def __len__(self) -> int:
        return len(self.subjects)

    def extend(
        self,
        subjects: Sequence[str],
        conditions: Mapping[str, np.ndarray],
        covariates: np.ndarray,
        mu: np.ndarray,
        sigma: np.ndarray,
    ) -> None:
        """Append subjects that are not rows of ``dataset.h5`` (:mod:`~vcm.training.anatomy_augmentation`):
        conditions (N, C, *grid) in the stored dtypes, scaled covariates (N, 4) and their posteriors as
        :func:`~vcm.latents.encode_dataset` returns them (N, 2, C, *latent grid)."""
        if set(conditions) != set(self.cond):
            raise StageError(
                f"extra subjects need the conditions {sorted(self.cond)}, got {sorted(conditions)}"
            )
        self.subjects = [*self.subjects, *subjects]
        for n, x in conditions.items():
            self.cond[n] = torch.cat(
                [self.cond[n], torch.from_numpy(np.asarray(x, self.cond[n].numpy().dtype))]
            )
        self.cov = torch.cat([self.cov, torch.from_numpy(np.asarray(covariates, np.float32))])
        self.mu = torch.cat([self.mu, torch.from_numpy(np.asarray(mu, np.float32))])
        self.sigma = torch.cat([self.sigma, torch.from_numpy(np.asarray(sigma, np.float32))])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, *latent grid)."""
        return tuple(self.mu.shape[2:])

    def batch(
        self, idx: torch.Tensor, flip: torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conditions, posterior and covariates of the samples ``idx`` (positions in this split).

        Args:
            idx: (B,) positions.
            flip: (B,) bool; flipped samples get the flipped image's posterior and flipped conditions.
            device: where to return them; the compact stored batch is moved first and expanded there.

        Returns:
            ``conditions`` (name -> float (B, C, *grid)), ``mu``, ``sigma`` (B, C, *latent grid) and
            covariates (B, 1, 4).
        """
        view = flip.long()
        mu, sigma = self.mu[idx, view].to(device), self.sigma[idx, view].to(device)
        flip_d = flip.to(device)
        conditions = {
            n: flip_where(condition_tensor(n, x[idx].to(device, non_blocking=True), self.n_semantic), flip_d)
            for n, x in self.cond.items()
        }
        return conditions, mu, sigma, self.cov[idx].unsqueeze(1).to(device)


@dataclass
class Batch:
    """One rank's share of a training batch, on the training device."""

    z_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    cov: torch.Tensor
    conditions: dict[str, torch.Tensor]
    keep: torch.Tensor | None
    flip: torch.Tensor
    draws: int = 1
    eps_t: torch.Tensor | None = None  # the backbone's predictions, when they come from a prior bank


def draw_batch(
    data: TrainData,
    batch_size: int,
    generator: torch.Generator,
    alphas_cumprod: torch.Tensor,
    scale_factor: float,
    flip: bool = True,
    keep_probs: Mapping[tuple[int, ...], float] | None = None,
    n_groups: int = 1,
    part: slice = slice(None),
    device: torch.device | str = "cpu",
    posterior_weight: float = 1.0,
    timesteps: str = "uniform",
    draws: int = 1,
    bank: PriorBank | None = None,
) -> Batch:
    """Draw a global training batch from ``generator`` and return the samples ``part`` of it.

    Every random number of a step comes from ``generator`` in a fixed order, for the whole global batch: DDP
    ranks (each taking its slice) see exactly the samples of a 1-process run, and a resumed run those of an
    uninterrupted one.

    Args:
        data: the training split.
        batch_size: global batch size.
        generator: the training's CPU generator.
        alphas_cumprod: the DDPM schedule's cumulative alphas (on ``device``).
        scale_factor: diffusion latent = autoencoder latent × ``scale_factor``.
        flip: left-right flip augmentation (p = 0.5 per sample).
        keep_probs: modality-dropout subset probabilities; ``None`` keeps every group.
        n_groups: condition groups.
        part: this rank's slice of the global batch.
        device: training device.
        posterior_weight: 1 samples the posterior, ``mu + sigma * n``; 0 takes its mean, for a backbone
            whose U-Net was trained on means (:attr:`~vcm.models.backbone.Backbone.posterior_weight`). The
            noise ``n`` is drawn either way, so the random stream does not depend on it.
        timesteps: ``uniform`` or ``cubic`` (:func:`draw_timesteps`).
        draws: ``(t, noise)`` pairs per subject: the latent tensors hold ``draws`` consecutive rows per subject,
            the conditions, flips and keep mask one row per subject.
        bank: take the noisy latents and the backbone's predictions from this
            :class:`~vcm.training.prior_bank.PriorBank` (entries drawn after the flips) instead of fresh noise.
    """
    b, k = batch_size, int(draws)
    idx = draw_indices(len(data), b, generator)
    flips = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    rows = slice(None if part.start is None else part.start * k, None if part.stop is None else part.stop * k)
    shape = (b * k, *data.latent_shape)
    if bank is None:
        posterior = torch.randn(shape, generator=generator)
        t = draw_timesteps(b * k, len(alphas_cumprod), generator, timesteps)
        noise = torch.randn(shape, generator=generator)
    else:
        entry = torch.randint(0, bank.entries, (b, k), generator=generator)
    keep = sample_keep_mask(b, n_groups, keep_probs, generator=generator) if keep_probs is not None else None
    keep = keep[part].to(device) if keep is not None else None
    conditions, mu, sigma, cov = data.batch(idx[part], flips[part], device)
    cov = cov.repeat_interleave(k, dim=0)
    if bank is not None:  # the bank holds the noisy latents: the posterior is not needed
        z_t, t, noise, eps = bank.take(idx[part], flips[part], entry[part], device)
        return Batch(z_t, t, noise, cov, conditions, keep, flips[part], k, eps)
    mu, sigma = (x.repeat_interleave(k, dim=0) for x in (mu, sigma))
    t, noise = t[rows].to(device), noise[rows].to(device)
    z0 = (mu + posterior_weight * sigma * posterior[rows].to(device)) * scale_factor
    z_t = add_noise(z0, noise, t, alphas_cumprod)
    return Batch(z_t, t, noise, cov, conditions, keep, flips[part], k)


def add_noise(
    z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """``z_t = sqrt(a_t)·z0 + sqrt(1 - a_t)·noise`` per sample (DDPMScheduler.add_noise, with the schedule's
    ``alphas_cumprod`` already on the latents' device)."""
    a = alphas_cumprod[t].reshape(-1, *([1] * (z0.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def draw_timesteps(
    n: int, num_train_timesteps: int, generator: torch.Generator, kind: str = "uniform"
) -> torch.Tensor:
    """``n`` training time steps in ``[0, num_train_timesteps)``.

    ``uniform`` is the paper's draw. ``cubic`` maps ``u ~ U(0, 1)`` to ``(1 - u³)·T``: half the draws land above
    ``0.87·T``. The loss of ε-prediction is smallest there, yet those steps decide where the structures go, so a
    short training learns the conditions sooner (T2I-Adapter, Mou et al. 2023, §3.4).
    """
    if kind == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    if kind == "cubic":
        u = torch.rand(n, generator=generator)
        return ((1 - u**3) * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    raise ValueError(f"timesteps must be one of {TIMESTEP_SAMPLING}, got {kind!r}")


def draw_indices(n: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A batch of positions in ``range(n)``, balanced: each position once before any twice."""
    perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(batch / n))]
    return torch.cat(perms)[:batch]
