"""An exponential moving average of a network's weights: what a diffusion trainer ships instead of its last step.

The last step's weights carry the noise of the last few mini-batches; the average over the last few hundred
steps does not (Ho et al. 2020 sample with it; so does BrainLDM). The backbone's U-Net
(:mod:`vcm.backbone_training.diffusion`) and, with ``training.ema_decay``, the control module
(:mod:`vcm.training.loop`) average their weights with :func:`ema_update`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_decay_at", "ema_update"]


def ema_decay_at(step: int, decay: float) -> float:
    """The decay of step ``step`` (0-based): ``decay``, lower early (``(1 + step) / (10 + step)``) so that the
    average forgets the random initial weights quickly."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move ``ema``'s parameters towards ``model``'s by ``1 - decay``; copy the buffers."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)
