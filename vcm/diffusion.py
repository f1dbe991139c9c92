"""Noise schedules, the VCM loss (paper eq. 4) and sampling with VCM's modulation (DDIM or DPM-Solver++).

Training (paper §3.2, B.2): DDPM with 1000 steps and a ``scaled_linear_beta`` schedule (linear in √β) from
0.0015 to 0.0205, epsilon prediction, as BrainLDM was trained. Sampling (``cohort.sampler``, :data:`SAMPLERS`)
on the same schedule:

* ``ddim``: MONAI's DDIM scheduler (the paper's, 200 steps);
* ``dpmpp_2m``: DPM-Solver++ 2M, diffusers' ``DPMSolverMultistepScheduler`` (MONAI has no DPM-Solver): a
  second-order multistep solver, one network evaluation per step, that needs far fewer steps than DDIM.

One loop, :func:`sample_latents`, serves both: at every step the frozen backbone predicts ``eps_t``, VCM predicts
``(gamma, beta)`` and the scheduler steps with ``eps_t * (1 + gamma) + beta``. VCM's condition encoders are
time-free, so the loop computes their features once per sample (``cache_features=True``); the authors'
released code reruns them at every step (``cache_features=False``, kept as the reference), which gives the
same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from vcm.models.vcm import VCM, modulate

__all__ = [
    "BETA_END",
    "BETA_START",
    "NUM_TRAIN_TIMESTEPS",
    "SAMPLERS",
    "SCHEDULE",
    "ddim_scheduler",
    "ddpm_scheduler",
    "dpmpp_2m_scheduler",
    "make_scheduler",
    "noise_from_seeds",
    "regularisation_weight",
    "sample_images",
    "sample_latents",
    "sample_mse",
    "vcm_loss",
]

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULE = "scaled_linear_beta"
BETA_START = 0.0015
BETA_END = 0.0205
SAMPLERS = ("ddim", "dpmpp_2m")
"""The samplers ``cohort.sampler`` names (:func:`make_scheduler`)."""

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddpm_scheduler(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    schedule: str = SCHEDULE,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> DDPMScheduler:
    """The training scheduler (``add_noise``): DDPM, BrainLDM's schedule, no clipping."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        schedule=schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=False,
    )


def ddim_scheduler(
    num_inference_steps: int = 200,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    schedule: str = SCHEDULE,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> DDIMScheduler:
    """The sampling scheduler: DDIM on BrainLDM's schedule, no clipping, ``num_inference_steps`` steps set."""
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        schedule=schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=False,
    )
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def dpmpp_2m_scheduler(
    num_inference_steps: int,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> Any:
    """DPM-Solver++ 2M on BrainLDM's schedule: diffusers' ``DPMSolverMultistepScheduler``, its steps set.

    diffusers' ``scaled_linear`` is MONAI's ``scaled_linear_beta`` (the same float32 ``alphas_cumprod``,
    tested); epsilon prediction, no thresholding, time steps spread evenly from 999 (``linspace``), and the
    last step lands on the clean latent (``final_sigmas_type="zero"``, first order there). One network
    evaluation per step: the second-order update reuses the previous step's prediction.
    """
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule="scaled_linear",
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        thresholding=False,
        timestep_spacing="linspace",
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def make_scheduler(kind: str, steps: int) -> Any:
    """The sampling scheduler ``kind`` (one of :data:`SAMPLERS`) with ``steps`` steps set.

    Raises:
        ValueError: an unknown sampler.
    """
    if kind == "ddim":
        return ddim_scheduler(steps)
    if kind == "dpmpp_2m":
        return dpmpp_2m_scheduler(steps)
    raise ValueError(f"unknown sampler {kind!r}: expected one of {', '.join(SAMPLERS)}")


def regularisation_weight(latent_shape: Sequence[int]) -> float:
    """λ of eq. 4: ``1 / (b·c·h·w·d)`` of the latent batch (paper: λ⁻¹ = 16·3·20·28·20).

    The authors' released code computes this product wrongly; this is the value the paper states.
    """
    return 1.0 / math.prod(int(s) for s in latent_shape)


def sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of each sample (B,), in float32; with ``weight`` (broadcastable to ``pred``) the
    weighted mean over each sample's voxels."""
    dims = tuple(range(1, pred.dim()))
    squared = (pred.float() - target.float()).square()
    if weight is None:
        return squared.mean(dims)
    w = weight.float().expand_as(squared)
    return (squared * w).sum(dims) / w.sum(dims)


def vcm_loss(
    eps: torch.Tensor,
    eps_mod: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    l1_scale: float = 1.0,
    reference: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 4: ``MSE(eps, eps') + λ(‖γ‖₁ + ‖β‖₁)`` with ``λ = l1_scale / (b·c·h·w·d)`` of the latent batch.

    With ``l1_scale = 1`` (the paper as written) the L1 term is the mean of ``|γ| + |β|``, on the MSE's own
    scale: its gradient per element (``1/N``) outweighs the MSE's (``2·residual/N``) wherever the expected
    residual the conditions could explain is below 0.5, so γ and β stay exactly zero there.

    Args:
        eps: the noise that was added (B, C, *latent grid).
        eps_mod: the modulated prediction ``eps_t * (1 + gamma) + beta``.
        gamma: VCM's scale, same shape.
        beta: VCM's shift, same shape.
        l1_scale: multiplies λ (``training.l1_scale``).
        reference: the frozen backbone's own prediction ``eps_t``. When given, each sample's MSE is divided by
            the backbone's MSE on it (a constant, no gradient): the loss is the mean *relative* error, 1 at
            VCM's identity initialisation, and every noise level weighs the same (``training.loss_weighting:
            backbone``). Plain ε-MSE is ~25× smaller at t = 950 than at t = 50 here, so the noisy steps that
            lay out the anatomy barely count in a short training.
        weight: per-voxel weights of the squared error, broadcastable to ``eps`` (e.g. (B, 1, *latent grid));
            each sample's error is then the weighted mean over its voxels (the backbone's reference too).

    Returns:
        a scalar, computed in float32.
    """
    lam = l1_scale * regularisation_weight(eps.shape)
    if reference is None:
        mse = (
            F.mse_loss(eps_mod.float(), eps.float())
            if weight is None
            else sample_mse(eps_mod, eps, weight).mean()
        )
    else:
        base = sample_mse(reference, eps, weight).detach()
        mse = (sample_mse(eps_mod, eps, weight) / base.clamp_min(torch.finfo(torch.float32).tiny)).mean()
    return mse + lam * (gamma.float().abs().sum() + beta.float().abs().sum())


def noise_from_seeds(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial latent noise, one sample per seed, each drawn from its own CPU generator.

    A subject's noise depends only on its seed, never on the batch it is generated in.

    Args:
        seeds: one seed per sample.
        shape: latent shape of one sample (C, *latent grid).
    """
    noise = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds
    ]
    return torch.stack(noise).to(device)


def _step(
    scheduler: Any,
    eps: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    eta: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One scheduler step from ``z`` at ``t`` with the (modulated) prediction ``eps``."""
    if isinstance(scheduler, DDIMScheduler):
        return scheduler.step(eps, int(t), z, eta=eta, generator=generator)[0]
    if eta:
        raise ValueError(f"eta = {eta}: only DDIM samples stochastically here")
    # diffusers casts its result to the prediction's dtype: keep z in its own (bf16 predictions under autocast)
    return scheduler.step(eps.to(z.dtype), t, z, return_dict=False)[0]


@torch.no_grad()
def sample_latents(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    scheduler: Any,
    vcm: VCM | None = None,
    conditions: Mapping[str, torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
    cache_features: bool = True,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    control_scale: float = 1.0,
) -> torch.Tensor:
    """Sampling of diffusion latents (DDIM or DPM-Solver++), modulated by VCM at every network evaluation.

    Args:
        eps_fn: the frozen backbone's noise prediction ``eps_fn(z_t, t)`` with ``t`` of shape (B,), e.g.
            ``lambda z, t: backbone.eps(z, t, cov)``.
        noise: initial latent noise (B, C, *latent grid), e.g. from :func:`noise_from_seeds`.
        scheduler: a scheduler with its time steps set (:func:`make_scheduler`). A multistep solver's history
            is reset first, so one scheduler serves several runs.
        vcm: the trained VCM; ``None`` samples the unmodulated backbone.
        conditions: name -> condition tensor at image resolution (groups not given get zero features).
        keep: optional (B, n_groups) mask of the condition groups to use.
        cache_features: compute VCM's time-free features once (True) or at every step (False, reference).
        eta: DDIM stochasticity; 0 is deterministic given the noise. With ``eta > 0`` the step noise comes
            from ``generator`` and depends on the batch composition. DDIM only.
        generator: random generator for ``eta > 0``.
        progress: called as ``progress(step, total)`` after every step.
        control_scale: multiplies VCM's correction of the prior (:func:`~vcm.models.vcm.modulate`); 1 as trained.

    Returns:
        the denoised diffusion latent z_0 (same shape as ``noise``).

    Raises:
        ValueError: ``eta > 0`` with a scheduler other than DDIM.
    """
    if not isinstance(scheduler, DDIMScheduler):
        scheduler.set_timesteps(len(scheduler.timesteps))
    conditions = {} if conditions is None else conditions
    features = vcm.encode(conditions, keep) if (vcm is not None and cache_features) else None
    z = noise
    total = len(scheduler.timesteps)
    # the labels name each part of a step in a torch.profiler trace (`vcm.bench sample --profile`)
    record = torch.profiler.record_function
    for i, t in enumerate(scheduler.timesteps):
        t_batch = torch.full((z.shape[0],), int(t), dtype=torch.long, device=z.device)
        with record("backbone"):
            eps_t = eps_fn(z, t_batch)
        if vcm is not None:
            with record("vcm"):
                if cache_features:
                    gamma, beta = vcm.forward_from_features(z, eps_t, t_batch, features)
                else:
                    gamma, beta = vcm(z, eps_t, t_batch, conditions, keep)
                eps_t = modulate(eps_t, gamma, beta, control_scale)
        with record("scheduler"):
            z = _step(scheduler, eps_t, t, z, eta, generator)
        if progress is not None:
            progress(i + 1, total)
    return z


@torch.no_grad()
def sample_images(
    model: torch.nn.Module | None,
    method: str,
    backbone: torch.nn.Module,
    conditions: Mapping[str, torch.Tensor],
    cov: torch.Tensor,
    noise: torch.Tensor,
    sampler: str,
    steps: int,
    progress: Callable[[int, int], None] | None = None,
    control_scale: float = 1.0,
) -> np.ndarray:
    """Images (B, *grid) in [0, 1] from ``noise`` by :func:`sample_latents` with ``sampler`` (one of
    :data:`SAMPLERS`) at ``steps`` steps: controlled by ``model`` (``method`` ``vcm``: VCM's features computed
    once; otherwise a ControlNet-style module called as ``model(backbone, z, t, cov,
    model.condition_input(conditions), control_scale)``), or uncontrolled (``model=None``), the control
    multiplied by ``control_scale`` (``cohort.control_scale``). bfloat16 autocast on CUDA."""

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return backbone.eps(z, t, cov)

    scheduler = make_scheduler(sampler, steps)
    on_cuda = noise.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        if model is None:
            z = sample_latents(eps_fn, noise, scheduler, progress=progress)
        elif method == "vcm":
            z = sample_latents(
                eps_fn, noise, scheduler, model, conditions, progress=progress, control_scale=control_scale
            )
        else:
            cond = model.condition_input(conditions)
            z = sample_latents(
                lambda z, t: model(backbone, z, t, cov, cond, control_scale),
                noise,
                scheduler,
                progress=progress,
            )
        # decode one at a time: the decoder's activations dominate memory at full resolution
        return np.stack(
            [backbone.decode(z[i : i + 1]).float().clamp(0, 1)[0, 0].cpu().numpy() for i in range(len(z))]
        )
