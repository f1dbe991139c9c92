"""The training objective of a control module: eq. 4 for VCM, the noise MSE for the ControlNet baseline.

Shared by the training loop (:mod:`vcm.training.loop`) and the step benchmark (:mod:`vcm.bench`), so that the
benchmark times the step training takes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vcm.diffusion import vcm_loss
from vcm.models.vcm import VCM, modulate

__all__ = ["training_loss"]


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
