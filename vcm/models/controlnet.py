"""The ControlNet baseline the paper compares VCM with, on a frozen backbone."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vcm.models.vcm import crop_to_shape, pad_to_multiple

__all__ = ["ControlNetControl"]


class ControlNetControl(nn.Module):
    """The ControlNet baseline: MONAI's 3D :class:`~monai.networks.nets.ControlNet` for a frozen backbone.

    The ControlNet copies the frozen U-Net's encoder architecture (initialise it from the backbone with
    :meth:`init_from`) and takes the same input, ``cat[z_t, cov broadcast]``; the conditions of every group
    are concatenated along channels into its conditioning embedding, which downsamples them to the latent
    grid by the autoencoder's factor (``levels`` stride-2 convs). Its residuals are added to the frozen
    U-Net's skip connections and middle block.

    Args:
        diffusion: the backbone's diffusion U-Net definition (``Backbone.definitions["diffusion"]``).
        condition_groups: the condition set's groups of ``(name, channels)``.
        levels: ``log2`` of the autoencoder's downsampling factor.
        conditioning_channels: channels of the conditioning embedding, ``levels + 1`` entries; default
            MONAI's ``(16, 32, 96, 256)`` cut to length.
    """

    def __init__(
        self,
        diffusion: Mapping[str, Any],
        condition_groups: Sequence[Sequence[Sequence[Any]]],
        levels: int,
        conditioning_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        from monai.networks.nets import ControlNet

        from vcm.models.vcm import parse_condition_groups

        self.groups = parse_condition_groups(condition_groups)
        conditioning_channels = list(conditioning_channels or (16, 32, 96, 256, 512)[: levels + 1])
        if len(conditioning_channels) != levels + 1:
            raise ValueError(f"conditioning_channels needs {levels + 1} entries (levels={levels})")
        self.config: dict[str, Any] = {
            "diffusion": dict(diffusion),
            "condition_groups": [[[n, c] for n, c in g] for g in self.groups],
            "levels": levels,
            "conditioning_channels": conditioning_channels,
        }
        """JSON-serialisable constructor arguments."""
        accepted = set(inspect.signature(ControlNet.__init__).parameters)
        kwargs = {k: v for k, v in diffusion.items() if k in accepted}
        self.controlnet = ControlNet(
            **kwargs,
            conditioning_embedding_in_channels=sum(c for g in self.groups for _, c in g),
            conditioning_embedding_num_channels=tuple(conditioning_channels),
        )
        self.factor = 2**levels

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def init_from(self, unet: nn.Module) -> int:
        """Copy the frozen U-Net's matching weights (conv-in, time embedding, encoder, middle block).

        Returns:
            the number of tensors copied.
        """
        own = self.controlnet.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
        self.controlnet.load_state_dict(copied, strict=False)
        return len(copied)

    def condition_input(
        self, conditions: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Concatenate the groups' conditions; zero the groups dropped by ``keep`` (B, n_groups)."""
        parts = []
        for g, group in enumerate(self.groups):
            for name, _ in group:
                x = conditions[name].float()
                if keep is not None:
                    x = x * keep[:, g].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
                parts.append(x)
        return torch.cat(parts, dim=1)

    def forward(
        self,
        backbone: nn.Module,
        z_t: torch.Tensor,
        t: torch.Tensor,
        cov: torch.Tensor,
        cond: torch.Tensor,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """The frozen U-Net's noise prediction with this ControlNet's residuals (grads flow to the ControlNet),
        multiplied by ``scale`` (MONAI's ``conditioning_scale``; ``cohort.control_scale`` when sampling)."""
        b, spatial = z_t.shape[0], z_t.shape[2:]
        cov = cov.to(device=z_t.device, dtype=z_t.dtype).reshape(b, 1, -1)
        cov_map = cov.reshape(b, -1, *([1] * len(spatial))).expand(b, cov.shape[-1], *spatial)
        unet = backbone.diffusion
        x, pads = pad_to_multiple(torch.cat([z_t, cov_map], dim=1), 2 ** (len(unet.block_out_channels) - 1))
        if any(pads):  # pad the conditions by the same latent margin, in image voxels
            cond = F.pad(cond, [p * self.factor for p in pads])
        t = t.long()
        down, mid = self.controlnet(
            x, timesteps=t, controlnet_cond=cond.to(x.dtype), conditioning_scale=scale, context=cov
        )
        eps = unet(
            x,
            timesteps=t,
            context=cov,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )
        return crop_to_shape(eps, pads)
