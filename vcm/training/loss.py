"""The training objective of a control module: eq. 4 for VCM, the noise MSE for the ControlNet baseline.

Shared by the training loop (:mod:`vcm.training.loop`) and the step benchmark (:mod:`vcm.bench`), so that the
benchmark times the step training takes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vcm.diffusion import sample_mse, vcm_loss
from vcm.models.vcm import VCM, modulate

__all__ = ["lv_region_weight", "training_loss"]


def lv_region_weight(
    lv: torch.Tensor, latent_grid: tuple[int, ...], strength: float, draws: int = 1
) -> torch.Tensor:
    """Per-latent-voxel loss weights ``1 + strength · r``, where ``r`` is the LV mask's coverage of each latent
    voxel dilated by one latent voxel (the ventricles and their walls).

    The ventricles fill well under 1 % of the latent grid (0.6 % on the demo), so in a plain mean their error
    hardly counts; they are what users ask the module to control, and short trainings learn them faster when
    they count more (``training.lv_weight``).

    Args:
        lv: the ``lv`` condition (B, 1, *image grid), values in [0, 1].
        latent_grid: the latent's spatial shape.
        strength: the extra weight at full coverage (0: uniform weights).
        draws: latent rows per condition row; the weights are repeated to match.

    Returns:
        (B · draws, 1, *latent_grid) float32 weights ≥ 1.
    """
    coverage = F.adaptive_avg_pool3d(lv.float(), latent_grid)
    region = F.max_pool3d(coverage, kernel_size=3, stride=1, padding=1)
    weight = 1.0 + strength * region
    return weight.repeat_interleave(draws, dim=0) if draws != 1 else weight


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
    lv_weight: float = 0.0,
    eps_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of one batch: eq. 4 for VCM, the noise MSE for ControlNet.

    Args:
        net: what to call (``model`` or its DDP wrapper).
        model: the unwrapped :class:`~vcm.models.vcm.VCM` or
            :class:`~vcm.models.controlnet.ControlNetControl`.
        backbone: the frozen backbone.
        z_t: noisy latents; ``t`` their time steps; ``noise`` the noise that was added.
        cov: covariates (B, 1, 4).
        conditions: name -> float condition batch at image resolution.
        keep: (B, n_groups) modality keep mask or ``None``.
        drop: ``latent`` (zero a branch's features), ``input`` (zero its conditions) or ``none``.
        l1_scale: multiplies eq. 4's λ.
        draws: latent rows per condition row (:func:`~vcm.training.batches.draw_batch`); VCM encodes each
            condition once.
        weighting: ``none`` (eq. 4) or ``backbone``: each sample's error relative to the backbone's
            (:func:`~vcm.diffusion.vcm_loss`'s ``reference``; VCM only).
        lv_weight: extra weight of the error in the LV region (:func:`lv_region_weight`) where the
            conditions hold ``lv``; 0 or no ``lv``: every latent voxel counts the same (the paper).
        eps_t: the backbone's predictions on ``z_t`` when they are already known (a
            :class:`~vcm.training.prior_bank.PriorBank`); VCM then skips the backbone's forward pass.
    """
    keep = keep if drop != "none" else None
    weight = None
    if lv_weight and "lv" in conditions:  # a set without an lv condition trains unweighted
        weight = lv_region_weight(conditions["lv"], tuple(z_t.shape[2:]), lv_weight, draws)
    if isinstance(model, VCM):
        if eps_t is None:
            with torch.no_grad():
                eps_t = backbone.eps(z_t, t, cov)
        if drop == "input" and keep is not None:
            conditions, keep = model.drop_inputs(conditions, keep), None
        gamma, beta = net(z_t, eps_t, t, conditions, keep, draws)
        reference = eps_t if weighting == "backbone" else None
        return vcm_loss(noise, modulate(eps_t, gamma, beta), gamma, beta, l1_scale, reference, weight)
    cond = model.condition_input(conditions, keep)  # ControlNet: one input, so dropping is at the input
    if draws != 1:
        cond = cond.repeat_interleave(draws, dim=0)
    eps = net(backbone, z_t, t, cov, cond)
    if weight is None:
        return F.mse_loss(eps.float(), noise.float())
    return sample_mse(eps, noise, weight).mean()
