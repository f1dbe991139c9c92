"""Batched sampling (DDIM or DPM-Solver++) of a synthetic cohort with a trained control module on the backbone.

VCM's time-free condition features are computed once per sample, bf16 autocast runs on CUDA only, and the
full-resolution passes (condition encoder, decoder) run in chunks of ``cohort.decode_chunk`` samples so that
a 24 GB GPU suffices at the BrainLDM grid. Every sampling batch is padded to exactly ``cohort.batch_size`` samples
and every chunk to exactly ``cohort.decode_chunk`` (padding rows are zeros and are discarded): a sample's
values then do not depend on which other samples share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vcm.diffusion import make_scheduler, noise_from_seeds, sample_latents
from vcm.models.conditions import condition_tensor

__all__ = ["CohortSampler", "in_chunks"]


class _Features:
    """Stands in for VCM in :func:`~vcm.diffusion.sample_latents`: precomputed (chunked) features, VCM's head."""

    def __init__(self, vcm: nn.Module, features: torch.Tensor | None) -> None:
        self.vcm, self.features = vcm, features

    def encode(self, conditions: Any, keep: Any = None) -> torch.Tensor | None:
        return self.features

    def forward_from_features(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vcm.forward_from_features(*args)


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` over fixed-size chunks of ``x`` (the last one zero-padded to ``chunk``, its padding dropped).

    Fixed sizes keep every sample's result independent of how many samples there are.
    """
    outs = []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        n = part.shape[0]
        if n < chunk:
            part = torch.cat([part, part.new_zeros((chunk - n, *part.shape[1:]))])
        outs.append(fn(part)[:n])
    return torch.cat(outs)


class CohortSampler:
    """Batched sampling with a trained control module on the frozen backbone, then chunked decoding.

    Every sampling batch holds exactly ``batch_size`` samples and every full-resolution pass exactly ``chunk``
    (zero padding, discarded), so that a sample's result never depends on its batch-mates or their number.

    Args:
        model: the control module (:class:`~vcm.models.vcm.VCM` or :class:`~vcm.models.controlnet.ControlNetControl`);
            ``None`` samples the backbone alone.
        method: ``vcm`` or ``controlnet`` (``vcm.pt`` metadata).
        backbone: the frozen :class:`~vcm.models.backbone.Backbone`.
        grid: the image grid.
        sampler: ``ddim`` or ``dpmpp_2m`` (:data:`~vcm.diffusion.SAMPLERS`).
        steps: sampling steps (network evaluations).
        batch_size: every batch is padded to this many samples.
        chunk: samples per full-resolution pass (condition encoder, decoder).
        n_semantic: semantic classes (one-hot channels).
        device: where to sample; bf16 autocast on CUDA only.
        control_scale: multiplies the control at every step (``cohort.control_scale``; 1: as trained).
    """

    def __init__(
        self,
        model: nn.Module | None,
        method: str,
        backbone: nn.Module,
        grid: Sequence[int],
        sampler: str,
        steps: int,
        batch_size: int,
        chunk: int = 1,
        n_semantic: int = 8,
        device: torch.device | str = "cpu",
        control_scale: float = 1.0,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval() if model is not None else None
        self.method = method
        self.backbone = backbone.to(self.device).eval()
        self.grid = tuple(int(s) for s in grid)
        self.sampler = sampler
        self.steps = int(steps)
        self.control_scale = float(control_scale)
        self.batch_size = int(batch_size)
        self.chunk = int(chunk)
        self.n_semantic = n_semantic
        groups = getattr(model, "groups", ()) if model is not None else ()
        self.names: tuple[str, ...] = tuple(n for g in groups for n, _ in g)
        self.latent_shape = backbone.latent_shape(self.grid)

    @property
    def autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _pad(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.batch_size
        n = x.shape[0]
        return x if n == size else torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])

    def condition_batch(self, conditions: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Network inputs (float, one-hot semantics; on CPU) of the samples' stored condition volumes."""
        out = {}
        for name in self.names:
            x = torch.from_numpy(np.stack([np.asarray(c[name]) for c in conditions])[:, None])
            out[name] = condition_tensor(name, x, self.n_semantic)
        return out

    def features(self, cond: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """VCM's time-free features of the samples, ``chunk`` samples per encoder pass."""
        n = next(iter(cond.values())).shape[0]
        parts = []
        for start in range(0, n, self.chunk):
            part = {
                k: self._pad(v[start : start + self.chunk], self.chunk).to(self.device)
                for k, v in cond.items()
            }
            parts.append(self.model.encode(part)[: min(self.chunk, n - start)])
        return torch.cat(parts)

    @torch.no_grad()
    def latents(
        self,
        conditions: Sequence[Mapping[str, np.ndarray]],
        covariates: np.ndarray,
        seeds: Sequence[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Denoised diffusion latents of up to ``batch_size`` samples.

        Args:
            conditions: per sample, name -> condition volume (stored dtype, no channel axis).
            covariates: (n, 4) scaled covariates.
            seeds: per sample, the initial-noise seed.
            progress: called as ``progress(step, total)`` after every sampling step.
        """
        n = len(seeds)
        if not 0 < n <= self.batch_size or len(conditions) != n or len(covariates) != n:
            raise ValueError(f"expected 1..{self.batch_size} samples with conditions, covariates and seeds")
        noise = self._pad(noise_from_seeds(seeds, self.latent_shape)).to(self.device)
        cov = self._pad(torch.as_tensor(np.asarray(covariates, np.float32)).reshape(n, 1, -1)).to(self.device)
        scheduler = make_scheduler(self.sampler, self.steps)

        def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.backbone.eps(z, t, cov)

        with self.autocast:
            if self.model is None:  # the backbone alone
                return sample_latents(eps_fn, noise, scheduler, progress=progress)[:n]
            cond = self.condition_batch(conditions)
            if self.method == "vcm":
                # padding rows get zero features: their results are discarded, so they need no encoder pass
                feats = _Features(self.model, self._pad(self.features(cond)))
                return sample_latents(
                    eps_fn, noise, scheduler, feats, {}, progress=progress, control_scale=self.control_scale
                )[:n]
            cn_cond = self._pad(self.model.condition_input(cond)).to(self.device)
            return sample_latents(
                lambda z, t: self.model(self.backbone, z, t, cov, cn_cond, self.control_scale),
                noise,
                scheduler,
                progress=progress,
            )[:n]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Images (n, *grid) in [0, 1], float32, decoded ``chunk`` samples at a time."""
        with self.autocast:
            x = in_chunks(lambda part: self.backbone.decode(part).float().clamp(0, 1), z, self.chunk)
        return x[:, 0].cpu().numpy().astype(np.float32)

    def sample(
        self,
        conditions: Sequence[Mapping[str, np.ndarray]],
        covariates: np.ndarray,
        seeds: Sequence[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Images of up to ``batch_size`` samples: :meth:`latents` then :meth:`decode`."""
        return self.decode(self.latents(conditions, covariates, seeds, progress))
