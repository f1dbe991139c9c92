"""The reconstruction loss that counts the voxels near the ventricles more.

Every control figure of the project is measured on the lateral ventricles, a few per cent of the image; a
plain L1 lets the autoencoder blur them. Stage 1 (``--ae-region-weight``) and stage 4 (``--dec-region-weight``)
can weigh the L1 error

    w = 1 + weight · [ventricles dilated by margin voxels],   loss = Σ w·|x̂ − x| / Σ w,

with the region from the corpus' label maps (``/label``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vcm.labels import SEMANTIC_CLASSES

__all__ = ["VENTRICLES", "region_mask", "weighted_l1"]

VENTRICLES: tuple[int, ...] = tuple(SEMANTIC_CLASSES["ventricles"])
"""The default region: every ventricle's FreeSurfer ID (lateral, inferior lateral, third, fourth)."""


def region_mask(labels: np.ndarray, ids: tuple[int, ...], margin: int) -> torch.Tensor:
    """``labels`` (N, *grid) in ``ids``, dilated by ``margin`` voxels (a cube): (N, 1, *grid) float32 of 0/1."""
    mask = torch.from_numpy(np.isin(labels, ids)).float()[:, None]
    if margin > 0:
        pool = {2: F.max_pool2d, 3: F.max_pool3d}[mask.dim() - 2]
        mask = pool(mask, 2 * margin + 1, stride=1, padding=margin)
    return mask


def weighted_l1(recon: torch.Tensor, x: torch.Tensor, region: torch.Tensor, weight: float) -> torch.Tensor:
    """The L1 error with the voxels of ``region`` counted ``1 + weight`` times, normalised by the weights."""
    w = 1.0 + weight * region
    return ((recon - x).abs() * w).sum() / w.sum()
