"""The evaluation's per-image metrics: LV alignment, skull-dist, SSIM and MS-SSIM.

Alignment and skull-dist follow the cohort QC's definitions (:mod:`vcm.qc`), so that QC and evaluation values
compare. SSIM and MS-SSIM are MONAI's, data range 1, with a Gaussian window; the number of MS-SSIM scales is
chosen so that the coarsest scale still holds the window (:func:`ms_ssim_scales`), and the standard weights
are truncated and renormalised to that many scales (:func:`ms_ssim_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vcm.errors import StageError
from vcm.qc import segmentation_metrics

__all__ = [
    "MS_SSIM_WEIGHTS",
    "alignment_metrics",
    "image_metrics",
    "ms_ssim_scales",
    "ms_ssim_weights",
    "skull_dist",
]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""The standard MS-SSIM scale weights (Wang et al. 2003), MONAI's default."""


def alignment_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: float | Sequence[float] = 1.0
) -> dict[str, float]:
    """DSC, HD95 and ASSD (mm) between two binary masks: the cohort QC's
    :func:`vcm.qc.segmentation_metrics` (MONAI's metrics), so that QC and evaluation values compare.

    Args:
        pred: the mask found in the synthetic image.
        ref: the condition mask.
        spacing_mm: voxel size (isotropic, or one per axis).

    Returns:
        ``dice`` (1 when both masks are empty), ``hd95`` and ``assd`` (NaN when either mask is empty: a mask
        without voxels has no surface to measure from).
    """
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if not (pred.any() or ref.any()):
        return {"dice": 1.0, "hd95": math.nan, "assd": math.nan}
    return segmentation_metrics(pred, ref, spacing_mm)


def ms_ssim_scales(shape: Sequence[int], kernel: int, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """The most MS-SSIM scales (≤ ``max_scales``) whose coarsest grid is still at least ``kernel`` voxels wide.

    Each scale halves the grid (average pooling by 2); MONAI's :func:`~monai.metrics.regression.compute_ms_ssim`
    also insists that ``min(shape) // (scales - 1) ** 2 > kernel - 1``, which is kept too.

    Raises:
        StageError: not even one scale (plain SSIM) fits.
    """
    smallest = min(int(s) for s in shape)
    if smallest < kernel:
        raise StageError(
            f"config key 'evaluation.ssim_kernel': a {kernel}-voxel window does not fit a grid of {tuple(shape)}"
        )
    for scales in range(int(max_scales), 0, -1):
        coarsest = smallest // 2 ** (scales - 1)
        if coarsest >= kernel and smallest // max(1, scales - 1) ** 2 > kernel - 1:
            return scales
    return 1


def ms_ssim_weights(scales: int) -> tuple[float, ...]:
    """The first ``scales`` standard MS-SSIM weights, renormalised to sum to 1."""
    w = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=float)
    return tuple(float(v) for v in w / w.sum())


def image_metrics(
    synth: np.ndarray | torch.Tensor,
    real: np.ndarray | torch.Tensor,
    kernel: int = 7,
    sigma: float = 1.5,
    scales: int | None = None,
) -> dict[str, np.ndarray]:
    """SSIM and MS-SSIM of synthetic against real images (data range 1), one value per image.

    Args:
        synth: (B, *grid) or (B, 1, *grid) images in [0, 1].
        real: the reference images, same shape.
        kernel: Gaussian window size (voxels).
        sigma: Gaussian sigma (voxels).
        scales: MS-SSIM scales (default: :func:`ms_ssim_scales`).

    Returns:
        ``ssim`` and ``ms_ssim``, arrays of shape (B,).
    """
    from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

    x = torch.as_tensor(np.asarray(synth), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(real), dtype=torch.float32)
    if x.dim() == 4:
        x, y = x[:, None], y[:, None]
    dims = x.dim() - 2
    scales = scales or ms_ssim_scales(x.shape[2:], kernel)
    ssim = SSIMMetric(
        spatial_dims=dims, data_range=1.0, win_size=kernel, kernel_sigma=sigma, reduction="none"
    )
    ms = MultiScaleSSIMMetric(
        spatial_dims=dims,
        data_range=1.0,
        kernel_size=kernel,
        kernel_sigma=sigma,
        weights=ms_ssim_weights(scales),
        reduction="none",
    )
    return {"ssim": ssim(x, y).reshape(-1).numpy(), "ms_ssim": ms(x, y).reshape(-1).numpy()}


def skull_dist(synth: np.ndarray, real_skull: np.ndarray) -> float:
    """Paper's skull-dist: MSE between the real skull image and the synthetic image where the real skull image
    is (the condition's support, where it is non-zero), in intensity units; NaN for an empty skull image.

    The same definition as the cohort's QC (``vcm.qc``), so that QC and evaluation values compare.
    """
    real_skull = np.asarray(real_skull, np.float32)
    support = real_skull > 0
    if not support.any():
        return math.nan
    return float(np.mean((np.asarray(synth, np.float32)[support] - real_skull[support]) ** 2))
