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
rewrites ``vcm.pt`` and the previews. Checkpoints hold only tensors and plain Python types and load with
``torch.load(weights_only=True)``. Under ``torchrun --nproc_per_node N`` the stage trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); ``training.batch_size`` is the global batch; rank 0
writes every file.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vcm.diffusion import ddpm_scheduler, noise_from_seeds, sample_images, vcm_loss
from vcm.errors import StageError
from vcm.grid import Grid
from vcm.labels import mask_dice, mask_of
from vcm.latents import FLIP_AXIS, bundle_sha256
from vcm.models.build import MODEL_FILE, build_model, load_model
from vcm.models.conditions import condition_groups, condition_tensor, semantic_classes
from vcm.models.controlnet import ControlNetControl
from vcm.models.vcm import (
    VCM,
    modulate,
    sample_keep_mask,
    subset_probabilities,
)

__all__ = [
    "Settings",
    "TrainData",
    "cli",
    "lr_factor",
    "preview",
    "preview_cli",
    "train",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "checkpoint_latest.pt"
FINAL = "checkpoint_final.pt"
FORMAT_VERSION = 1


# --- settings ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Training settings, from the config's ``training`` section (keys absent there take these defaults).

    Args:
        method: ``vcm`` or ``controlnet``.
        steps: optimisation steps (upper bound when ``minutes`` is set).
        batch_size: global batch (split over DDP ranks).
        lr: peak AdamW learning rate; annealed to ``lr * min_lr_ratio``.
        checkpoint_every: steps between ``checkpoint_latest.pt`` writes.
        seed: seeds the networks' init and every random draw of training.
        minutes: wall-clock budget of the training loop (summed over resumes): training stops when it is
            spent (or after ``steps``), and the warm-up (5 % of it) and the cosine annealing follow the elapsed
            fraction of it, so the schedule completes whatever the speed.
        warmup_steps: linear warm-up when training by steps; default 5 % of ``steps``, at most 100.
        min_lr_ratio: final lr / peak lr (paper: 5e-6 / 5e-5).
        weight_decay: AdamW weight decay.
        flip: left-right flip augmentation with the pre-encoded flipped latent.
        modality_dropout: ``latent`` (paper), ``input`` (ablation) or ``none``.
        p_all: probability of keeping every group (paper: 0.4 for two groups).
        l1_scale: multiplies eq. 4's λ = 1 / (b·c·h·w·d) (1: the paper as written).
        timesteps: how training draws ``t``: ``uniform`` (the paper) or ``cubic``, ``t = (1 - u³)·T``, which
            favours the noisy early sampling steps where the anatomy is laid down (T2I-Adapter's choice for
            structural conditions; see :func:`draw_timesteps`).
        noise_draws: ``(t, noise)`` pairs per subject and step (paper: 1). VCM's time-free encoder runs once
            per subject, and it costs ~80 % of a demo step on CPU, so K draws give K times the samples for far
            less than K times the time, and a less noisy gradient.
        loss_weighting: ``none`` (eq. 4) or ``backbone``: each sample's MSE divided by the frozen backbone's
            MSE on it, so that every noise level counts the same (VCM only; see :func:`~vcm.diffusion.vcm_loss`).
        vcm: overrides of :class:`~vcm.models.vcm.VCM` arguments (e.g. channel widths for the demo grid).
        controlnet: overrides of :class:`ControlNetControl` arguments.
        preview_subjects: validation subjects previewed at the end of training (0: no preview).
        preview_ddim_steps: DDIM steps of the previews; default ``cohort.ddim_steps``.
        preview_seed: base seed of the previews' noise.
    """

    method: str = "vcm"
    steps: int = 2000
    batch_size: int = 2
    lr: float = 5e-5
    checkpoint_every: int = 100
    seed: int = 0
    minutes: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    flip: bool = True
    modality_dropout: str = "latent"
    p_all: float = 0.4
    l1_scale: float = 1.0
    timesteps: str = "uniform"
    noise_draws: int = 1
    loss_weighting: str = "none"
    vcm: dict[str, Any] = field(default_factory=dict)
    controlnet: dict[str, Any] = field(default_factory=dict)
    preview_subjects: int = 2
    preview_ddim_steps: int | None = None
    preview_seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> Settings:
        """Read ``cfg["training"]`` (and ``cohort.ddim_steps`` for the previews); ``overrides`` win."""
        section = dict(cfg.get("training", {}))
        preview = section.pop("preview", None) or {}
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in section.items() if k in known}
        for key, name in (("subjects", "preview_subjects"), ("ddim_steps", "preview_ddim_steps")):
            if key in preview:
                values[name] = preview[key]
        if "seed" in preview:
            values["preview_seed"] = preview["seed"]
        if values.get("preview_ddim_steps") is None:
            values["preview_ddim_steps"] = cfg.get("cohort", {}).get("ddim_steps", 200)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("minutes") == 0:  # an override of 0 removes the time budget
            values["minutes"] = None
        out = cls(**values)
        for key, allowed in (
            ("method", ("vcm", "controlnet")),
            ("modality_dropout", ("latent", "input", "none")),
            ("loss_weighting", ("none", "backbone")),
            ("timesteps", TIMESTEP_SAMPLING),
        ):
            if getattr(out, key) not in allowed:
                expected = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
                raise StageError(
                    f"config key 'training.{key}': expected {expected}, got {getattr(out, key)!r}"
                )
        return out

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return max(1, min(100, math.ceil(0.05 * self.steps)))


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``: linear warm-up over ``warmup`` steps,
    then cosine annealing to ``min_ratio`` at the last step."""
    warmup = max(0, min(warmup, total - 1))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return _cosine((step - warmup) / max(1, total - 1 - warmup), min_ratio)


def lr_factor_time(fraction: float, warmup: float = 0.05, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``fraction`` of a wall-clock budget: linear warm-up over the first
    ``warmup`` of it, then cosine annealing that reaches ``min_ratio`` when the budget is spent, however
    the speed varies on the way (shared CPUs)."""
    if fraction < warmup:
        return max(fraction / warmup, 0.01)
    return _cosine((fraction - warmup) / (1.0 - warmup), min_ratio)


# --- conditions --------------------------------------------------------------------------------------------


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip the samples of (B, C, *grid) ``x`` where ``flip`` (B,) is true, along the left-right axis."""
    if not bool(flip.any()):
        return x
    flipped = torch.flip(x, dims=(2 + FLIP_AXIS,))
    return torch.where(flip.reshape(-1, *([1] * (x.dim() - 1))).to(x.device), flipped, x)


# --- data --------------------------------------------------------------------------------------------------


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
        for path in (dataset, latents):
            if not Path(path).is_file():
                raise StageError(f"file not found: {path}")
        with h5py.File(dataset, "r") as h5, h5py.File(latents, "r") as lh5:
            if isinstance(split, str):
                if f"splits/{split}" not in h5:
                    have = ", ".join(sorted(h5["splits"])) if "splits" in h5 else "none"
                    raise StageError(f"{dataset}: no split '{split}' (have: {have})")
                index = np.asarray(h5[f"splits/{split}"][:], dtype=np.int64)
            else:
                index = np.asarray(split, dtype=np.int64)
            if index.size == 0:
                raise StageError(f"{dataset}: split {split!r} is empty")
            order = np.argsort(index)
            index = index[order]  # h5py reads sorted indices
            for key in ("mu", "sigma"):
                if key not in lh5:
                    raise StageError(f"{latents}: no /{key} dataset (rerun encode-latents)")
            if lh5["mu"].shape[0] != h5["image"].shape[0]:
                raise StageError(
                    f"{latents} has {lh5['mu'].shape[0]} subjects but {dataset} has {h5['image'].shape[0]}; "
                    "rerun encode-latents"
                )
            if "subjects" in lh5 and "subjects" in h5 and list(lh5["subjects"][:]) != list(h5["subjects"][:]):
                raise StageError(f"{latents} and {dataset} list different subjects; rerun encode-latents")
            missing = [n for n in names if f"cond/{n}" not in h5]
            if missing:
                raise StageError(f"{dataset}: no condition {missing[0]!r} (have: {', '.join(h5['cond'])})")
            self.index = index
            self.subjects = [s.decode() if isinstance(s, bytes) else str(s) for s in h5["subjects"][index]]
            self.n_semantic = semantic_classes(h5)
            self.cond = {n: torch.from_numpy(h5[f"cond/{n}"][index]) for n in names}
            self.cov = torch.from_numpy(np.asarray(h5["covariates"][index], dtype=np.float32))
            self.mu = torch.from_numpy(np.asarray(lh5["mu"][index], dtype=np.float32))
            self.sigma = torch.from_numpy(np.asarray(lh5["sigma"][index], dtype=np.float32))
            self.bundle_sha256 = str(lh5.attrs.get("bundle_sha256", ""))
            self.grid = tuple(int(s) for s in h5["image"].shape[2:])
            self.affine = (
                np.asarray(h5.attrs["grid_affine"], dtype=float) if "grid_affine" in h5.attrs else None
            )

    def __len__(self) -> int:
        return len(self.index)

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
    """
    b, k = batch_size, int(draws)
    idx = draw_indices(len(data), b, generator)
    flips = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    shape = (b * k, *data.latent_shape)
    posterior = torch.randn(shape, generator=generator)
    t = draw_timesteps(b * k, len(alphas_cumprod), generator, timesteps)
    noise = torch.randn(shape, generator=generator)
    keep = sample_keep_mask(b, n_groups, keep_probs, generator=generator) if keep_probs is not None else None
    conditions, mu, sigma, cov = data.batch(idx[part], flips[part], device)
    rows = slice(None if part.start is None else part.start * k, None if part.stop is None else part.stop * k)
    t, noise = t[rows].to(device), noise[rows].to(device)
    mu, sigma, cov = (x.repeat_interleave(k, dim=0) for x in (mu, sigma, cov))
    z0 = (mu + posterior_weight * sigma * posterior[rows].to(device)) * scale_factor
    z_t = add_noise(z0, noise, t, alphas_cumprod)
    keep = keep[part].to(device) if keep is not None else None
    return Batch(z_t, t, noise, cov, conditions, keep, flips[part], k)


def add_noise(
    z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """``z_t = sqrt(a_t)·z0 + sqrt(1 - a_t)·noise`` per sample (DDPMScheduler.add_noise, with the schedule's
    ``alphas_cumprod`` already on the latents' device)."""
    a = alphas_cumprod[t].reshape(-1, *([1] * (z0.dim() - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


TIMESTEP_SAMPLING = ("uniform", "cubic")


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


# --- checkpoints -------------------------------------------------------------------------------------------


def _signature(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint, or ``None`` (with a warning) when the file is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file from a killed job: start over rather than fail
        logger.warning("ignoring unreadable checkpoint %s (%s)", path, type(err).__name__)
        return None


def _save(obj: Any, path: Path) -> None:
    from vcm.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --- distributed -------------------------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA); pick the device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")


class _Interrupt:
    """SIGTERM / SIGUSR1 (SLURM's pre-emption and time-limit signals) ask the loop to checkpoint and stop."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# --- training ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` did."""

    model: nn.Module
    step: int
    total_steps: int
    history: dict[str, list[float]]
    seconds: float
    resumed_from: int
    model_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def training_loss(
    net: nn.Module,
    model: nn.Module,
    backbone: nn.Module,
    z_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    cov: torch.Tensor,
    conditions: Mapping[str, torch.Tensor],
    keep: torch.Tensor | None = None,
    drop: str = "latent",
    l1_scale: float = 1.0,
    draws: int = 1,
    weighting: str = "none",
) -> torch.Tensor:
    """The loss of one batch: eq. 4 for VCM, the noise MSE for ControlNet.

    Args:
        net: what to call (``model`` or its DDP wrapper).
        model: the unwrapped :class:`~vcm.models.vcm.VCM` or :class:`ControlNetControl`.
        backbone: the frozen backbone.
        z_t: noisy latents; ``t`` their time steps; ``noise`` the noise that was added.
        cov: covariates (B, 1, 4).
        conditions: name -> float condition batch at image resolution.
        keep: (B, n_groups) modality keep mask or ``None``.
        drop: ``latent`` (zero a branch's features), ``input`` (zero its conditions) or ``none``.
        l1_scale: multiplies eq. 4's λ.
        draws: latent rows per condition row (:func:`draw_batch`); VCM encodes each condition once.
        weighting: ``none`` (eq. 4) or ``backbone``: each sample's error relative to the backbone's
            (:func:`~vcm.diffusion.vcm_loss`'s ``reference``; VCM only).
    """
    keep = keep if drop != "none" else None
    if isinstance(model, VCM):
        with torch.no_grad():
            eps_t = backbone.eps(z_t, t, cov)
        if drop == "input" and keep is not None:
            conditions, keep = model.drop_inputs(conditions, keep), None
        gamma, beta = net(z_t, eps_t, t, conditions, keep, draws)
        reference = eps_t if weighting == "backbone" else None
        return vcm_loss(noise, modulate(eps_t, gamma, beta), gamma, beta, l1_scale, reference)
    cond = model.condition_input(conditions, keep)  # ControlNet: one input, so dropping is at the input
    if draws != 1:
        cond = cond.repeat_interleave(draws, dim=0)
    eps = net(backbone, z_t, t, cov, cond)
    return F.mse_loss(eps.float(), noise.float())


def _write_loss(out_dir: Path, history: Mapping[str, list[float]], title: str) -> None:
    from vcm.io import atomic_path

    with atomic_path(out_dir / "loss.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr", "elapsed_s"])
        for row in zip(history["step"], history["loss"], history["lr"], history["elapsed_s"], strict=True):
            writer.writerow([int(row[0]), f"{row[1]:.6g}", f"{row[2]:.6g}", f"{row[3]:.2f}"])
    if not history["step"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss = np.asarray(history["step"]), np.asarray(history["loss"])
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_dir / "loss.png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def train(
    cfg: Mapping[str, Any],
    dataset: str | Path,
    latents: str | Path,
    bundle: str | Path,
    condset: str,
    size: int,
    out_dir: str | Path,
    device: torch.device | str | None = None,
    stop_after: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    write_model: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train one control module (``training.method``) for a condition set on ``/splits/train_<size>``.

    Resumes from ``out_dir/checkpoints`` when a checkpoint of the same run exists. Call inside an initialised
    process group to train with DDP (every rank calls it; rank 0 writes).

    Args:
        cfg: the validated config.
        dataset: ``dataset.h5``.
        latents: ``latents.h5`` from the same dataset and bundle.
        bundle: the backbone bundle folder.
        condset: a key of ``condition_sets``.
        size: training size (``/splits/train_<size>``).
        out_dir: output folder.
        device: default CUDA when available.
        stop_after: stop after this many steps in this call (checkpointing), as a pre-emption would; rerun
            to resume.
        fresh: ignore existing checkpoints.
        progress: tqdm bar (rank 0).
        write_model: write ``vcm.pt``, ``loss.csv`` and ``loss.png`` at the end.
        overrides: :class:`Settings` fields that win over the config (e.g. ``steps``, ``batch_size``).

    Returns:
        a :class:`TrainResult`; ``model`` is the trained, unwrapped module.
    """
    from vcm.config import dump_config
    from vcm.io import provenance
    from vcm.models.backbone import load_bundle

    settings = Settings.from_config(cfg, **overrides)
    rank, world = _dist()
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if settings.batch_size % world:
        raise StageError(
            f"training.batch_size {settings.batch_size} is not divisible by the {world} processes"
        )
    local = settings.batch_size // world
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    with h5py.File(dataset, "r") as h5:
        groups = condition_groups(cfg, condset, semantic_classes(h5) if "cond/semantics" in h5 else 8)
    names = [n for g in groups for n, _ in g]
    data = TrainData(dataset, latents, f"train_{size}", names)
    bundle_sha = bundle_sha256(bundle)
    if data.bundle_sha256 and data.bundle_sha256 != bundle_sha:
        raise StageError(
            f"{latents} was encoded with another backbone bundle than {bundle}; rerun encode-latents"
        )
    backbone = load_bundle(bundle, scale_factor=cfg["backbone"]["scale_factor"], device=device)
    if data.latent_shape[0] != backbone.latent_channels:
        raise StageError(
            f"{latents}: {data.latent_shape[0]} latent channels, the backbone has {backbone.latent_channels}"
        )

    torch.manual_seed(settings.seed)
    overrides_model = settings.vcm if settings.method == "vcm" else settings.controlnet
    model = build_model(settings.method, groups, backbone, overrides_model).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    scheduler = ddpm_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    n_groups = len(groups)
    keep_probs = subset_probabilities(n_groups, settings.p_all)
    drop = settings.modality_dropout if n_groups > 1 else "none"

    signature = _signature(
        {
            "settings": {
                k: v
                for k, v in asdict(settings).items()
                if not k.startswith("preview") and k not in ("minutes", "checkpoint_every")
            },
            "groups": groups,
            "bundle": bundle_sha,
            "scale_factor": backbone.scale_factor,
            "latent_sampling": backbone.latent_sampling,
            "split": data.index.tolist(),
            "model": getattr(model, "config", None),
        }  # not the process count: every rank draws the global batch, so a run may resume on more or fewer
    )
    history: dict[str, list[float]] = {"step": [], "loss": [], "lr": [], "elapsed_s": []}
    step, total, elapsed0, resumed_from = 0, settings.steps if settings.minutes is None else None, 0.0, 0
    warmup = settings.warmup
    ckpt = None
    if not fresh:
        for name in (FINAL, LATEST):
            if (ckpt_dir / name).is_file():
                ckpt = load_checkpoint(ckpt_dir / name)
                if ckpt is not None and ckpt.get("signature") != signature:
                    if rank == 0:
                        logger.warning(
                            "%s belongs to another configuration: training from scratch", ckpt_dir / name
                        )
                    ckpt = None
                if ckpt is not None:
                    break
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], generator)
        step = resumed_from = int(ckpt["step"])
        total = int(ckpt["scheduler"]["total_steps"]) if ckpt["scheduler"]["total_steps"] else total
        warmup = int(ckpt["scheduler"]["warmup_steps"])
        history = {k: list(v) for k, v in ckpt["history"].items()}
        elapsed0 = float(ckpt.get("elapsed_s", 0.0))
        if rank == 0:
            logger.info("resuming from %s at step %d", ckpt_dir, step)

    ddp_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    config_text = dump_config(dict(cfg))

    def checkpoint_obj(at: int, tot: int | None) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "method": settings.method,
            "step": at,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": {
                "total_steps": tot,
                "warmup_steps": warmup,
                "minutes": settings.minutes,
                "min_lr_ratio": settings.min_lr_ratio,
                "base_lr": settings.lr,
            },
            "rng": _rng_state(generator),
            "config": json.loads(json.dumps(dict(cfg), default=str)),
            "model_config": getattr(model, "config", {}),
            "signature": signature,
            "history": history,
            "elapsed_s": elapsed0 + (time.perf_counter() - start),
        }

    start = time.perf_counter()
    budget = 60.0 * settings.minutes if settings.minutes else None
    fraction = elapsed0 / budget if budget else 0.0  # of the time budget, as rank 0 measured it
    done_here = 0
    # NCCL reduces CUDA tensors only; gloo CPU ones
    comm = device if world > 1 and dist.get_backend() == "nccl" else torch.device("cpu")
    bar = tqdm(
        total=total or settings.steps,
        initial=step,
        desc=f"train {settings.method} {condset} n{size}",
        unit="step",
        disable=not (progress and rank == 0),
    )
    stopped = "completed"
    with _Interrupt() as interrupt:
        while step < (total or settings.steps):
            batch = draw_batch(
                data,
                settings.batch_size,
                generator,
                alphas,
                backbone.scale_factor,
                settings.flip,
                keep_probs if drop != "none" else None,
                n_groups,
                slice(rank * local, (rank + 1) * local),
                device,
                backbone.posterior_weight,
                settings.timesteps,
                settings.noise_draws,
            )
            if budget is None:
                factor = lr_factor(step, total, warmup, settings.min_lr_ratio)
            else:
                factor = lr_factor_time(max(fraction, step / settings.steps), 0.05, settings.min_lr_ratio)
            lr = settings.lr * factor
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                loss = training_loss(
                    ddp_model,
                    model,
                    backbone,
                    batch.z_t,
                    batch.t,
                    batch.noise,
                    batch.cov,
                    batch.conditions,
                    batch.keep,
                    drop,
                    settings.l1_scale,
                    batch.draws,
                    settings.loss_weighting,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            done_here += 1

            # one collective per step: the mean loss, the stop request and rank 0's clock, so that every rank
            # uses the same learning rate and stops at the same step
            elapsed = elapsed0 + time.perf_counter() - start
            flags = torch.stack(
                [
                    loss.detach().float().reshape(()),
                    torch.tensor(float(interrupt.flag), device=loss.device),
                    torch.tensor(elapsed if rank == 0 else 0.0, device=loss.device),
                ]
            ).to(comm)
            if world > 1:
                dist.all_reduce(flags)
                flags[0] /= world
            flags = flags.cpu()
            history["step"].append(step)
            history["loss"].append(float(flags[0]))
            history["lr"].append(lr)
            history["elapsed_s"].append(float(flags[2]))
            bar.update(1)
            bar.set_postfix(loss=f"{flags[0]:.4f}", lr=f"{lr:.2e}", refresh=False)
            if budget is not None:
                fraction = float(flags[2]) / budget
                if fraction >= 1.0 and step < settings.steps:
                    stopped, total = "time budget", step  # this is the final step
            limit = total or settings.steps
            if rank == 0 and step < limit and step % settings.checkpoint_every == 0:
                _save(checkpoint_obj(step, total), ckpt_dir / LATEST)
                if write_model:
                    _write_loss(out_dir, history, f"{settings.method} {condset} n{size}")
            if flags[1] > 0 or (stop_after is not None and done_here >= stop_after and step < limit):
                if rank == 0:
                    _save(checkpoint_obj(step, total), ckpt_dir / LATEST)
                bar.close()
                if flags[1] > 0:
                    raise StageError(f"interrupted at step {step}; checkpoint written, rerun to resume")
                return TrainResult(model, step, limit, history, float(flags[2]), resumed_from)
    total = total or step
    bar.close()
    seconds = elapsed0 + time.perf_counter() - start
    if world > 1:
        dist.barrier()
    result = TrainResult(model, step, int(total), history, seconds, resumed_from, extra={"stopped": stopped})
    if rank != 0:
        return result
    if done_here:
        _save(checkpoint_obj(step, total), ckpt_dir / FINAL)
    if write_model:
        _write_loss(out_dir, history, f"{settings.method} {condset} n{size}")
        final_loss = (
            float(np.mean(history["loss"][-max(1, len(history["loss"]) // 10) :]))
            if history["loss"]
            else None
        )
        meta = {
            "format": FORMAT_VERSION,
            "method": settings.method,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_config": model.config,
            "condition_set": condset,
            "condition_groups": [[[n, c] for n, c in g] for g in groups],
            "training_size": int(size),
            "subjects": data.subjects,
            "backbone_sha256": bundle_sha,
            "scale_factor": backbone.scale_factor,
            "steps": int(step),
            "batch_size": settings.batch_size,
            "processes": world,
            "train_seconds": float(seconds),
            "final_loss": final_loss,
            "settings": json.loads(json.dumps(asdict(settings))),
            "provenance": provenance(
                config_text,
                bundle_sha256=bundle_sha,
                latents=str(latents),
                dataset=str(dataset),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            ),
        }
        result.model_path = out_dir / MODEL_FILE
        _save(meta, result.model_path)
    return result


# --- previews ----------------------------------------------------------------------------------------------


def _montage(path: Path, rows: list[dict[str, Any]]) -> None:
    """Real | AE reconstruction | controlled | uncontrolled, axial and coronal through the LV mask's centre, LV
    contour in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vcm.io import atomic_path

    cols = ("real", "reconstruction", "controlled", "uncontrolled")
    fig, axes = plt.subplots(2 * len(rows), 4, figsize=(10, 3.2 * 2 * len(rows) * 0.62), squeeze=False)
    for r, row in enumerate(rows):
        lv = row["lv"]
        centre = [
            int(round(c.mean())) if c.size else s // 2 for c, s in zip(np.nonzero(lv), lv.shape, strict=True)
        ]
        for c, name in enumerate(cols):
            vol = row[name]
            for p, (view, sl) in enumerate(
                (
                    ("axial", (slice(None), slice(None), centre[2])),
                    ("coronal", (slice(None), centre[1], slice(None))),
                )
            ):
                ax = axes[2 * r + p, c]
                ax.imshow(vol[sl].T, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                mask = lv[sl].T.astype(float)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors="r", linewidths=0.8)
                ax.set_axis_off()
                title = f"{row['subject']} {name}" if p == 0 else view
                dice = row.get(f"dice_{name}")
                if p == 0 and dice is not None:
                    title += f"\nLV Dice {dice:.2f}"
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


NOISE_ERROR_STEPS = (50, 200, 400, 600, 800, 950)


@torch.no_grad()
def noise_error(
    model: nn.Module,
    method: str,
    backbone: nn.Module,
    z0: torch.Tensor,
    conditions: Mapping[str, torch.Tensor],
    cov: torch.Tensor,
    timesteps: Sequence[int] = NOISE_ERROR_STEPS,
    repeats: int = 4,
    seed: int = 0,
) -> list[dict[str, float]]:
    """The training objective on held-out subjects, per noise level: the noise-prediction MSE of the controlled
    model and of the backbone alone, on the same noisy latents, and their ratio (< 1: the conditions help).

    A far less noisy measure of what a short training learned than the Dice of a few samples; the large ``t``
    are the steps that lay out the anatomy.

    Args:
        model: the control module; ``method`` its kind (``vcm`` or ``controlnet``).
        backbone: the frozen backbone.
        z0: clean diffusion latents (B, C, *latent grid), i.e. scaled autoencoder latents.
        conditions: name -> float condition batch (B, ...); ``cov`` (B, 1, n_covariates).
        timesteps: the DDPM steps to measure at.
        repeats: noise draws per step.
        seed: the draws' generator seed.
    """
    g = torch.Generator().manual_seed(seed)
    alphas = ddpm_scheduler().alphas_cumprod.to(z0.device)
    features = model.encode(conditions) if method == "vcm" else None
    cond = model.condition_input(conditions) if method != "vcm" else None
    rows = []
    for step in timesteps:
        t = torch.full((z0.shape[0],), int(step), device=z0.device)
        own = base = 0.0
        for _ in range(repeats):
            noise = torch.randn(z0.shape, generator=g).to(z0.device)
            z_t = add_noise(z0, noise, t, alphas)
            eps_t = backbone.eps(z_t, t, cov)
            if method == "vcm":
                eps = modulate(eps_t, *model.forward_from_features(z_t, eps_t, t, features))
            else:
                eps = model(backbone, z_t, t, cov, cond)
            own += F.mse_loss(eps.float(), noise).item() / repeats
            base += F.mse_loss(eps_t.float(), noise).item() / repeats
        rows.append({"t": int(step), "controlled": own, "backbone": base, "ratio": own / base})
    return rows


@torch.no_grad()
def preview(
    model: nn.Module,
    meta: Mapping[str, Any],
    backbone: nn.Module,
    dataset: str | Path,
    out_dir: str | Path,
    n_subjects: int = 2,
    ddim_steps: int = 200,
    seed: int = 0,
    template_dir: str | Path | None = None,
    lv_labels: Sequence[int] = (4, 43),
    device: torch.device | str = "cpu",
    progress: bool = True,
    segmenter_path: str | Path | None = None,
) -> dict[str, Any]:
    """Controlled vs uncontrolled DDIM previews of a few validation subjects, from the same noise.

    Writes ``<out_dir>/<subject>_{controlled,uncontrolled,real,lv}.nii.gz`` (grid affine),
    ``preview.png`` (LV-mask contour on the images) and ``preview_metrics.json``: the LV Dice of each
    generated image's segmentation against the condition mask (the QC segmenter when ``segmenter_path`` is
    given, else the atlas, :func:`~vcm.prep.segmentation.segment_atlas`, when ``template_dir`` is), and of the
    autoencoder's reconstruction of the real image: the ceiling
    any control can reach through this autoencoder. VCM's condition features are computed once per sample.

    Args:
        model: the trained control module (VCM or :class:`ControlNetControl`).
        meta: ``vcm.pt`` metadata (``method``, ``condition_set``).
        backbone: the frozen backbone the model was trained on.
        dataset: ``dataset.h5`` (``/splits/val``, conditions, covariates, ``grid_affine``).
        out_dir: the preview folder.
        n_subjects: first validation subjects to preview.
        ddim_steps: DDIM steps.
        seed: subject ``i`` of the dataset gets the noise of seed ``seed * 1_000_003 + i``.
        template_dir: the template (``t1_head.nii.gz``, ``labels.nii.gz``) for the atlas Dice.
        segmenter_path: the QC segmenter (``segmenter.pt``) for the Dice; with neither, no Dice.
        lv_labels: FreeSurfer labels of the LV in the atlas segmentation.
        device: where to sample.
        progress: tqdm bar.

    Returns:
        the metrics written to ``preview_metrics.json``.
    """
    from vcm.io import save_nifti, write_json

    start = time.perf_counter()
    out_dir = Path(out_dir)
    groups = [[(n, int(c)) for n, c in g] for g in meta["condition_groups"]]
    names = [n for g in groups for n, _ in g]
    model = model.to(device).eval()
    with h5py.File(dataset, "r") as h5:
        val = np.sort(np.asarray(h5["splits/val"][:], dtype=np.int64))[:n_subjects]
        if val.size == 0:
            raise StageError(f"{dataset}: /splits/val is empty: nothing to preview")
        n_sem = semantic_classes(h5)
        subjects = [s.decode() if isinstance(s, bytes) else str(s) for s in h5["subjects"][val]]
        conditions = {
            n: condition_tensor(n, torch.from_numpy(h5[f"cond/{n}"][val]), n_sem).to(device) for n in names
        }
        lv = h5["cond/lv"][val][:, 0] > 0 if "cond/lv" in h5 else None
        real = np.asarray(h5["image"][val][:, 0], dtype=np.float32)
        cov = torch.from_numpy(np.asarray(h5["covariates"][val], dtype=np.float32)).unsqueeze(1).to(device)
        affine = np.asarray(h5.attrs["grid_affine"], dtype=float)
    factor = backbone.downsample_factor
    latent = (backbone.latent_channels, *(s // factor for s in real.shape[1:]))
    noise = noise_from_seeds([seed * 1_000_003 + int(i) for i in val], latent, device=device)

    total = 2 * ddim_steps
    bar = tqdm(total=total, desc="preview DDIM", unit="step", disable=not progress)
    tick = lambda i, n: bar.update(1)  # noqa: E731
    images = {
        name: sample_images(control, meta["method"], backbone, conditions, cov, noise, ddim_steps, tick)
        for name, control in (("controlled", model), ("uncontrolled", None))
    }
    bar.close()
    # the posterior mean, decoded: what the autoencoder keeps of the real anatomy
    mu, _ = backbone.encode(torch.from_numpy(real[:, None]).to(device))
    images["reconstruction"] = backbone.decode(mu * backbone.scale_factor)[:, 0].float().cpu().numpy()
    sample_s = time.perf_counter() - start
    errors = noise_error(
        model, meta["method"], backbone, mu * backbone.scale_factor, conditions, cov, seed=seed
    )
    dice_method = "segmenter" if segmenter_path else "atlas" if template_dir is not None else None
    if dice_method is not None:
        from vcm.evaluation.segmenters import make_segmenter
        from vcm.qc import QCSettings

        grid = Grid.from_affine(real.shape[1:], affine)
        segment = make_segmenter({}, QCSettings(backend=dice_method), template_dir, grid, segmenter_path)
    rows, per_subject = [], []
    for i, (subject, index) in enumerate(zip(subjects, val, strict=True)):
        row: dict[str, Any] = {
            "subject": subject,
            "real": real[i],
            "lv": lv[i] if lv is not None else np.zeros(real.shape[1:], bool),
        }
        record: dict[str, Any] = {
            "subject": subject,
            "index": int(index),
            "seed": seed * 1_000_003 + int(index),
        }
        save_nifti(out_dir / f"{subject}_real.nii.gz", real[i], affine, np.float32)
        if lv is not None:
            save_nifti(out_dir / f"{subject}_lv.nii.gz", lv[i], affine, np.uint8)
        for name in ("controlled", "uncontrolled", "reconstruction"):
            path = out_dir / f"{subject}_{name}.nii.gz"
            save_nifti(path, images[name][i], affine, np.float32)
            row[name] = images[name][i]
            if dice_method is not None and lv is not None:
                labels = segment(images[name][i], path)
                record[f"dice_{name}"] = row[f"dice_{name}"] = mask_dice(
                    mask_of(labels, tuple(lv_labels)), lv[i]
                )
        rows.append(row)
        per_subject.append(record)
    _montage(out_dir / "preview.png", rows)

    def mean(key: str) -> float | None:
        values = [r[key] for r in per_subject if key in r]
        return float(np.mean(values)) if values else None

    metrics = {
        "method": meta["method"],
        "condition_set": meta.get("condition_set"),
        "ddim_steps": int(ddim_steps),
        "subjects": per_subject,
        "lv_dice_controlled": mean("dice_controlled"),
        "lv_dice_uncontrolled": mean("dice_uncontrolled"),
        "lv_dice_reconstruction": mean("dice_reconstruction"),
        "dice_method": dice_method,
        "noise_error": errors,
        "sampling_seconds": round(sample_s, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(out_dir / "preview_metrics.json", metrics)
    return metrics


# --- command line ------------------------------------------------------------------------------------------


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--bundle", required=True, help="backbone bundle folder")
    parser.add_argument("--template-dir", default=None, help="template for the previews' LV Dice (atlas)")
    parser.add_argument("--segmenter", default=None, help="QC segmenter.pt for the previews' LV Dice")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def cli(argv: list[str]) -> int:
    """``python -m vcm train-vcm``: train one model (``training.method``) for a condition set and size."""
    from vcm.config import load_config
    from vcm.models.backbone import load_bundle

    parser = argparse.ArgumentParser(prog="python -m vcm train-vcm", description=__doc__.splitlines()[0])
    _common_args(parser)
    parser.add_argument("--latents", required=True, help="latents.h5")
    parser.add_argument("--condition-set", required=True)
    parser.add_argument("--size", type=int, required=True, help="training size: uses /splits/train_<size>")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--steps", type=int, default=None, help="override training.steps")
    parser.add_argument("--batch-size", type=int, default=None, help="override training.batch_size")
    parser.add_argument(
        "--minutes", type=float, default=None, help="override training.minutes (0: no time budget)"
    )
    parser.add_argument(
        "--method", choices=("vcm", "controlnet"), default=None, help="override training.method"
    )
    parser.add_argument(
        "--modality-dropout",
        choices=("latent", "input", "none"),
        default=None,
        help="override training.modality_dropout (input: the ablation)",
    )
    parser.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after N steps")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-preview", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    device = torch.device(args.device) if args.device else init_distributed()
    if args.device:
        init_distributed()
    try:
        result = train(
            cfg,
            args.dataset,
            args.latents,
            args.bundle,
            args.condition_set,
            args.size,
            args.out_dir,
            device=device,
            stop_after=args.stop_after,
            fresh=args.fresh,
            steps=args.steps,
            batch_size=args.batch_size,
            minutes=args.minutes,
            method=args.method,
            modality_dropout=args.modality_dropout,
        )
        rank, _ = _dist()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    if result.model_path is None:  # stopped early on request
        print(f"{args.out_dir}: stopped at step {result.step} of {result.total_steps}; rerun to resume")
        return 0
    rate = (result.step - result.resumed_from) / max(result.seconds, 1e-9)
    print(
        f"{result.model_path}: {result.step} steps ({result.extra.get('stopped')}), "
        f"final loss {result.history['loss'][-1] if result.history['loss'] else float('nan'):.4f}, "
        f"{result.seconds:.0f} s ({rate:.2f} steps/s over the whole run)"
    )
    settings = Settings.from_config(cfg)
    if not args.no_preview and settings.preview_subjects > 0:
        backbone = load_bundle(args.bundle, scale_factor=cfg["backbone"]["scale_factor"], device=device)
        meta = torch.load(result.model_path, map_location="cpu", weights_only=True)
        meta.pop("model")
        metrics = preview(
            result.model,
            meta,
            backbone,
            args.dataset,
            Path(args.out_dir) / "preview",
            n_subjects=settings.preview_subjects,
            ddim_steps=settings.preview_ddim_steps,
            seed=settings.preview_seed,
            template_dir=args.template_dir,
            lv_labels=cfg.get("conditions", {}).get("lv_labels", (4, 43)),
            device=device,
            segmenter_path=args.segmenter,
        )
        _print_preview(Path(args.out_dir) / "preview", metrics)
    else:
        _write_no_preview(Path(args.out_dir) / "preview")
    return 0


def _write_no_preview(folder: Path) -> None:
    """Previews switched off: still write the files the workflow declares, saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vcm.io import atomic_path, write_json

    write_json(
        folder / "preview_metrics.json",
        {"subjects": 0, "note": "previews disabled (training.preview.subjects: 0)"},
    )
    fig = plt.figure(figsize=(4, 1))
    fig.text(0.5, 0.5, "previews disabled (training.preview.subjects: 0)", ha="center", va="center")
    with atomic_path(folder / "preview.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _print_preview(folder: Path, metrics: Mapping[str, Any]) -> None:
    dc, du = metrics["lv_dice_controlled"], metrics["lv_dice_uncontrolled"]
    dice = (
        f"LV Dice controlled {dc:.3f} vs uncontrolled {du:.3f} "
        f"(autoencoder reconstruction of the real image: {metrics['lv_dice_reconstruction']:.3f})"
        if dc is not None
        else "no Dice (no template)"
    )
    print(f"{folder}: {len(metrics['subjects'])} subjects at DDIM-{metrics['ddim_steps']}, {dice}")
    if metrics.get("noise_error"):
        ratios = ", ".join(f"t={r['t']} {r['ratio']:.3f}" for r in metrics["noise_error"])
        print(
            f"  held-out noise-prediction error, controlled / backbone alone (< 1: the conditions help): {ratios}"
        )


def preview_cli(argv: list[str]) -> int:
    """``python -m vcm preview``: controlled vs uncontrolled previews of a trained model."""
    from vcm.config import load_config
    from vcm.models.backbone import load_bundle

    parser = argparse.ArgumentParser(
        prog="python -m vcm preview", description=preview.__doc__.splitlines()[0]
    )
    _common_args(parser)
    parser.add_argument("--model", required=True, help="vcm.pt")
    parser.add_argument("--out-dir", required=True, help="preview folder")
    parser.add_argument(
        "--subjects", type=int, default=None, help="validation subjects (default training.preview)"
    )
    parser.add_argument(
        "--ddim-steps", type=int, default=None, help="default training.preview / cohort.ddim_steps"
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    settings = Settings.from_config(cfg)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_model(args.model, device)
    sha = bundle_sha256(args.bundle)
    if meta.get("backbone_sha256") and meta["backbone_sha256"] != sha:
        raise StageError(f"{args.model} was trained on another backbone bundle than {args.bundle}")
    backbone = load_bundle(args.bundle, scale_factor=meta.get("scale_factor"), device=device)
    metrics = preview(
        model,
        meta,
        backbone,
        args.dataset,
        args.out_dir,
        n_subjects=args.subjects or settings.preview_subjects or 2,
        ddim_steps=args.ddim_steps or settings.preview_ddim_steps,
        seed=settings.preview_seed if args.seed is None else args.seed,
        template_dir=args.template_dir,
        lv_labels=cfg.get("conditions", {}).get("lv_labels", (4, 43)),
        device=device,
        segmenter_path=args.segmenter,
    )
    _print_preview(Path(args.out_dir), metrics)
    return 0
