"""Evaluation of a trained control module on the validation subjects (paper §4, Tab. 1 and 2).

For every validation subject of ``dataset.h5`` the model generates one image from its conditions
(*controlled*: VCM or ControlNet on the frozen backbone) and the backbone generates one from the same initial
noise and the same covariates without any control (*uncontrolled*, the paper's "BrainLDM" row). Both are
scored against the subject:

* **alignment** (paper: DSC, HD95, ASSD): the condition's LV mask against the LV of the synthetic image's
  segmentation (the cohort QC's backend unless ``evaluation.segmentation`` says otherwise: ``atlas``, the
  offline default, or ``synthseg``), with MONAI's
  :class:`~monai.metrics.DiceMetric`, :class:`~monai.metrics.HausdorffDistanceMetric` (95th percentile) and
  :class:`~monai.metrics.SurfaceDistanceMetric` (symmetric, i.e. ASSD), distances in mm. A segmentation
  without any LV has no surface: its HD95/ASSD are left out of the mean and counted in ``n_empty``;
* **skull-dist** (paper, sets with a skull condition): MSE between the real skull image (``/cond/skull``)
  and the synthetic image inside the skull image's support (the cohort QC's definition);
* **SSIM and MS-SSIM** (MONAI :class:`~monai.metrics.SSIMMetric`, :class:`~monai.metrics.MultiScaleSSIMMetric`)
  of the synthetic image against the subject's real image, data range 1. Small grids constrain the window:
  every MS-SSIM scale halves the grid and the window must still fit the coarsest one. The defaults are a
  Gaussian window of 7 voxels (σ 1.5) and as many of the standard 5 scales as keep the coarsest scale at least
  7 voxels wide (and satisfy MONAI's own size check): on the demo's 40×56×40 grid that is **3 scales**
  (40 → 20 → 10 voxels), at BrainLDM's 160×224×160 all 5 (… → 10). With fewer than 5 scales the standard
  weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) are truncated and renormalised. The window (28 mm at 4 mm
  voxels, 7 mm at 1 mm) is in voxels, so values are comparable only between runs on the same grid;
* **FID 3D** (paper, with MedicalNet features): only when ``evaluation.medicalnet_weights`` names a local
  MedicalNet checkpoint (e.g. ``resnet_10_23dataset.pth`` / ``resnet_50_23dataset.pth`` from the MedicalNet
  release or MONAI's Hugging Face mirror ``TencentMedicalNet/MedicalNet-Resnet10``). vcm never downloads it
  (the compute nodes it is written for have no internet): fetch it on a connected machine and give its path.
  Without the key the column stays empty and the stage says so in one line; a key naming a missing or
  unreadable file stops the stage at once, before any sampling. Features: the global average pool of MONAI's
  3-D ResNet (the network MONAI loads MedicalNet weights into), depth inferred from the checkpoint, on each
  image z-scored over its non-zero voxels. FID of the synthetic set against the real validation images
  (:func:`fid_3d`, exact for few samples and many features); with a few dozen subjects it is dominated by the
  covariance estimate; the paper (appendix C) warns that it
  misleads on medical images anyway: read the anatomical metrics first.

Outputs (``--out results/eval/<set>_n<size>.csv``): the table (per method, mean and sample sd of each metric
over the subjects, FID 3D as one value), ``<stem>_subjects.csv`` (every subject and method) and
``<stem>.json`` (settings, scales, notes). ``python -m vcm eval-tables`` gathers the per-model tables into
``results/eval/table.md`` and ``table.html`` and the TSTR tables into ``results/eval/tstr.csv``.

Cost on the demo (4 validation subjects, one thread of a busy 2-core machine): 3.5-4.5 min per model at
DDIM-50, most of it in the 8 atlas registrations (controlled and uncontrolled per subject); the uncontrolled
half is the same for every model (same noise, covariates and backbone) but is recomputed per model job.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from vcm.config import section_values
from vcm.diffusion import sample_images
from vcm.errors import StageError
from vcm.qc import BACKENDS, segmentation_metrics

__all__ = [
    "MS_SSIM_WEIGHTS",
    "EvalSettings",
    "alignment_metrics",
    "cli",
    "evaluate_model",
    "fid_3d",
    "image_metrics",
    "load_medicalnet",
    "markdown_table",
    "medicalnet_features",
    "ms_ssim_scales",
    "ms_ssim_weights",
    "skull_dist",
    "summarise",
    "tables_cli",
]

logger = logging.getLogger(__name__)

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""The standard MS-SSIM scale weights (Wang et al. 2003), MONAI's default."""

METRICS = ("dice", "hd95", "assd", "skull_dist", "ssim", "ms_ssim")
LABELS = {
    "dice": "DSC ↑",
    "hd95": "HD95 (mm) ↓",
    "assd": "ASSD (mm) ↓",
    "skull_dist": "skull-dist ↓",
    "ssim": "SSIM ↑",
    "ms_ssim": "MS-SSIM ↑",
    "fid3d": "FID 3D ↓",
}
METHOD_NAMES = {"vcm": "VCM", "controlnet": "ControlNet", "uncontrolled": "backbone (uncontrolled)"}


# --- settings ----------------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """Evaluation settings, from the config's ``evaluation`` section (absent keys take these defaults).

    Args:
        subjects: evaluate the first N validation subjects (``None``: all of them).
        ddim_steps: DDIM steps (default ``cohort.ddim_steps``).
        seed: validation subject ``i`` of ``dataset.h5`` starts from the noise of seed ``seed * 1_000_003 + i``
            (the previews' scheme: the same subject gets the same noise in previews and evaluation).
        batch_size: subjects sampled together.
        segmentation: segmenter of the synthetic images, ``segmenter`` (the QC U-Net), ``atlas`` or
            ``synthseg``; ``None`` uses the cohort QC's (``qc.backend``).
        ssim_kernel: SSIM window, voxels (Gaussian).
        ssim_sigma: SSIM Gaussian sigma, voxels.
        ms_ssim_scales: MS-SSIM scales; ``None`` picks the most (up to 5) that the grid allows.
        medicalnet_weights: local MedicalNet checkpoint for FID 3D; ``None`` skips FID 3D.
    """

    subjects: int | None = None
    ddim_steps: int | None = None
    seed: int = 0
    batch_size: int = 4
    segmentation: str | None = None
    ssim_kernel: int = 7
    ssim_sigma: float = 1.5
    ms_ssim_scales: int | None = None
    medicalnet_weights: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> EvalSettings:
        """Read ``cfg["evaluation"]`` (and ``cohort.ddim_steps``); ``overrides`` that are not ``None`` win."""
        values = section_values(cfg, "evaluation", set(cls.__dataclass_fields__), overrides)
        if values.get("ddim_steps") is None:
            values["ddim_steps"] = int(cfg.get("cohort", {}).get("ddim_steps", 200))
        out = cls(**values)
        if out.segmentation is None:
            out.segmentation = cfg.get("qc", {}).get("backend") or "segmenter"
        if out.segmentation not in BACKENDS:
            raise StageError(
                f"config key 'evaluation.segmentation': expected {', '.join(BACKENDS)}, got {out.segmentation!r}"
            )
        if out.ssim_kernel < 1 or out.ssim_kernel % 2 == 0:
            raise StageError(
                f"config key 'evaluation.ssim_kernel': expected an odd size >= 1, got {out.ssim_kernel}"
            )
        return out


# --- metrics -----------------------------------------------------------------------------------------------


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


# --- FID 3D with MedicalNet features ----------------------------------------------------------------------

_RESNET_LAYERS = {  # blocks per stage -> (depth, block)
    ((1, 1, 1, 1), "basic"): 10,
    ((2, 2, 2, 2), "basic"): 18,
    ((3, 4, 6, 3), "basic"): 34,
    ((3, 4, 6, 3), "bottleneck"): 50,
    ((3, 4, 23, 3), "bottleneck"): 101,
    ((3, 8, 36, 3), "bottleneck"): 152,
    ((3, 24, 36, 3), "bottleneck"): 200,
}


def load_medicalnet(path: str | Path) -> nn.Module:
    """A MedicalNet feature extractor (MONAI 3-D ResNet, no classifier) from a local checkpoint.

    Accepts the MedicalNet release format (``{"state_dict": {"module.conv1.weight": ...}}``) or a plain state
    dict; the depth (10, 18, 34, 50, ...) is read from the keys.

    Raises:
        StageError: the file is missing or is not a MedicalNet ResNet checkpoint (one line).
    """
    from monai.networks.nets import ResNet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    path = Path(path)
    hint = (
        "MedicalNet weights cannot be downloaded by vcm: fetch e.g. resnet_10_23dataset.pth on a connected "
        "machine and give its path, or remove the key to skip FID 3D"
    )
    if not path.is_file():
        raise StageError(f"config key 'evaluation.medicalnet_weights': file not found: {path} ({hint})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
        if not isinstance(state, Mapping):
            raise ValueError("no state dict")
        state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
        block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
        blocks = tuple(
            len({k.split(".")[1] for k in state if k.startswith(f"layer{n}.")}) for n in range(1, 5)
        )
        depth = _RESNET_LAYERS.get((blocks, block))
        if depth is None:
            raise ValueError(f"unknown ResNet layout {blocks} ({block})")
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        net = ResNet(
            block,
            list(blocks),
            [64, 128, 256, 512],
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_stride=2,  # MedicalNet's first conv strides 2 along every axis
            shortcut_type=shortcut,
            bias_downsample=bias_downsample,
            feed_forward=False,
        )
        own = net.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"missing {missing[0]}")
        net.load_state_dict({k: state[k] for k in own})  # MedicalNet's segmentation head is not needed
    except StageError:
        raise
    except Exception as err:  # torch.load and load_state_dict raise many types for a foreign file
        text = str(err).strip().splitlines()
        raise StageError(
            f"config key 'evaluation.medicalnet_weights': {path} is not a MedicalNet ResNet checkpoint "
            f"({type(err).__name__}: {text[0] if text else ''})"
        ) from None
    net.depth = depth  # type: ignore[attr-defined]
    return net.eval()


@torch.no_grad()
def medicalnet_features(
    net: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 2
) -> torch.Tensor:
    """(N, 512 or 2048) features of (N, *grid) images, each z-scored over its non-zero voxels (MedicalNet's
    input normalisation)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() == 4:
        x = x[:, None]
    out = []
    for i in range(0, len(x), batch_size):
        b = x[i : i + batch_size].clone()
        for j in range(len(b)):
            voxels = b[j][b[j] > 0]
            if voxels.numel() > 1:
                b[j] = (b[j] - voxels.mean()) / voxels.std().clamp_min(1e-6)
        out.append(net(b).float())
    return torch.cat(out)


def fid_3d(features_synth: torch.Tensor, features_real: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (N, F), exact and fast when N ≪ F.

    ``|mu1 - mu2|² + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``, where ``tr sqrt(S1 S2)`` is the sum of the singular
    values of ``A1ᵀ A2 / sqrt((n1 - 1)(n2 - 1))`` (``Ai`` the centred features): the non-zero eigenvalues of
    ``S1 S2`` are those of that small matrix times its transpose. The same value as MONAI's
    :class:`~monai.metrics.FIDMetric` without its F×F matrix square root, which for a few dozen subjects and
    512 features is rank-deficient, slow and prone to complex round-off. NaN with fewer than 2 samples a set.
    """
    x = torch.as_tensor(features_synth, dtype=torch.float64)
    y = torch.as_tensor(features_real, dtype=torch.float64)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    ax, ay = x - x.mean(0), y - y.mean(0)
    nx, ny = len(x) - 1, len(y) - 1
    cross = torch.linalg.svdvals(ax @ ay.T).sum() / math.sqrt(nx * ny)
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (ax**2).sum() / nx + (ay**2).sum() / ny - 2 * cross)


# --- sampling and segmentation -----------------------------------------------------------------------------


def make_segmenter(
    cfg: Mapping[str, Any],
    backend: str,
    template_dir: str | Path | None,
    affine: np.ndarray,
    shape: Sequence[int],
    segmenter_path: str | Path | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """``segment(image) -> FreeSurfer labels`` for synthetic images on the grid: the cohort QC's backends
    (:func:`vcm.qc.make_segmenter`: ``atlas`` warps the template's labels onto the image, ``synthseg`` runs
    the configured command and resamples its labels onto the grid), on an image written as NIfTI."""
    import dataclasses

    from vcm.grid import Grid
    from vcm.io import save_nifti
    from vcm.qc import QCSettings
    from vcm.qc import make_segmenter as qc_segmenter

    settings = dataclasses.replace(QCSettings.from_config(cfg), backend=backend)
    segmenter = qc_segmenter(cfg, settings, template_dir, Grid.from_affine(shape, affine), segmenter_path)

    def segment(image: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="vcm_eval_") as tmp:
            path = Path(tmp) / "synthetic.nii.gz"
            save_nifti(path, image, affine, np.float32)
            return segmenter(image, path)

    return segment


# --- the evaluation ----------------------------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarise(
    per_subject: pd.DataFrame, fid: Mapping[str, float] | None = None, seed: int = 0
) -> pd.DataFrame:
    """Mean, sample sd and bootstrap 95 % interval of every metric per method, and the paired difference.

    Args:
        per_subject: one row per subject and method (``method``, ``subject`` and the metric columns).
        fid: FID 3D per method (one value each, not a mean).
        seed: the bootstrap's seed.

    Returns:
        one row per method (the controlled method, then ``uncontrolled``): ``method``, ``n`` and, per metric,
        ``<metric>_mean``, ``<metric>_sd``, ``<metric>_ci_low``, ``<metric>_ci_high``; ``n_empty``
        (segmentations without an LV: no HD95/ASSD) and ``fid3d``. With two methods a last row ``difference``
        holds, per metric, the mean over subjects of controlled - uncontrolled and its interval (paired).
    """
    from vcm.stats import bootstrap_ci, paired_difference

    def stats(metric: str, mean: float, sd: float, low: float, high: float) -> dict[str, float]:
        return {
            f"{metric}_mean": mean,
            f"{metric}_sd": sd,
            f"{metric}_ci_low": low,
            f"{metric}_ci_high": high,
        }

    rows = []
    for method, group in per_subject.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "n": len(group)}
        for metric in METRICS:
            if metric in group and group[metric].notna().any():
                mean, sd, _ = _mean_sd(group[metric].tolist())
                row.update(stats(metric, mean, sd, *bootstrap_ci(group[metric].to_numpy(float), seed=seed)))
            else:
                row.update(stats(metric, *(math.nan,) * 4))
        row["n_empty"] = int((group["seg_lv_voxels"] == 0).sum()) if "seg_lv_voxels" in group else 0
        row["fid3d"] = (fid or {}).get(method, math.nan)
        rows.append(row)
    methods = list(dict.fromkeys(per_subject["method"]))
    if len(methods) == 2 and "subject" in per_subject:
        both = per_subject.groupby("subject")["method"].nunique() == 2
        paired = per_subject[per_subject["subject"].isin(both[both].index)]
        order = paired.loc[paired["method"] == methods[0], "subject"]  # the bootstrap resamples in this order
        row = {"method": "difference", "n": int(both.sum()), "n_empty": 0, "fid3d": math.nan}
        for metric in METRICS:
            if metric not in paired:
                row.update(stats(metric, *(math.nan,) * 4))
                continue
            wide = paired.pivot(index="subject", columns="method", values=metric).loc[order]
            mean, low, high = paired_difference(
                wide[methods[0]].to_numpy(float), wide[methods[1]].to_numpy(float), seed=seed
            )
            row.update(stats(metric, mean, math.nan, low, high))
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_model(
    cfg: Mapping[str, Any],
    dataset: str | Path,
    model_path: str | Path,
    bundle: str | Path,
    out: str | Path,
    template_dir: str | Path | None = None,
    settings: EvalSettings | None = None,
    device: torch.device | str = "cpu",
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: bool = True,
    segmenter_path: str | Path | None = None,
) -> pd.DataFrame:
    """Controlled vs uncontrolled on the validation subjects; writes the table, the per-subject rows and a JSON.

    Args:
        cfg: the validated config (``evaluation``, ``cohort.ddim_steps``, ``conditions``, ``segmentation``).
        dataset: ``dataset.h5``.
        model_path: the model's ``vcm.pt``.
        bundle: the backbone bundle the model was trained on.
        out: the table CSV; ``<stem>_subjects.csv`` and ``<stem>.json`` go beside it.
        template_dir: the template (atlas segmentation).
        settings: defaults to :meth:`EvalSettings.from_config`.
        device: where to sample.
        segment: ``segment(image) -> FreeSurfer labels``; default :func:`make_segmenter` of the settings.
        progress: tqdm bars.

    Returns:
        the table written to ``out``.
    """
    from vcm.diffusion import noise_from_seeds
    from vcm.io import atomic_path, provenance, sha256_file, write_json
    from vcm.labels import mask_of
    from vcm.latents import bundle_sha256
    from vcm.models.backbone import load_bundle
    from vcm.models.build import load_model
    from vcm.models.conditions import condition_tensor, semantic_classes

    start = time.perf_counter()
    settings = settings or EvalSettings.from_config(cfg)
    out = Path(out)
    notes: list[str] = []
    medicalnet = load_medicalnet(settings.medicalnet_weights) if settings.medicalnet_weights else None
    if medicalnet is None:
        notes.append("FID 3D skipped: evaluation.medicalnet_weights not set (a local MedicalNet checkpoint)")
    model, meta = load_model(model_path, device)
    if meta.get("backbone_sha256") and meta["backbone_sha256"] != bundle_sha256(bundle):
        raise StageError(f"{model_path} was trained on another backbone bundle than {bundle}")
    backbone = load_bundle(bundle, scale_factor=meta.get("scale_factor"), device=device)
    groups = [[(n, int(c)) for n, c in g] for g in meta["condition_groups"]]
    names = [n for g in groups for n, _ in g]
    lv_labels = tuple(cfg.get("conditions", {}).get("lv_labels", (4, 43)))
    if not Path(dataset).is_file():
        raise StageError(f"file not found: {dataset}")
    with h5py.File(dataset, "r") as h5:
        if "splits/val" not in h5:
            raise StageError(f"{dataset}: no /splits/val")
        val = np.sort(np.asarray(h5["splits/val"][:], dtype=np.int64))[: settings.subjects]
        if val.size == 0:
            raise StageError(f"{dataset}: /splits/val is empty: nothing to evaluate")
        missing = [n for n in names if f"cond/{n}" not in h5]
        if missing:
            raise StageError(f"{dataset}: no condition {missing[0]!r} for {model_path}")
        n_sem = semantic_classes(h5)
        subjects = [s.decode() if isinstance(s, bytes) else str(s) for s in h5["subjects"][val]]
        stored = {n: torch.from_numpy(h5[f"cond/{n}"][val]) for n in names}
        real = np.asarray(h5["image"][val][:, 0], dtype=np.float32)
        # the condition's LV mask; from the label map where the file has no LV condition
        lv = (
            h5["cond/lv"][val][:, 0] > 0
            if "cond/lv" in h5
            else mask_of(np.asarray(h5["label"][val]), lv_labels)
        )
        skull = np.asarray(h5["cond/skull"][val][:, 0], np.float32) if "skull" in names else None
        cov_all = torch.from_numpy(np.asarray(h5["covariates"][val], dtype=np.float32)).unsqueeze(1)
        affine = np.asarray(h5.attrs["grid_affine"], dtype=float)
    spacing = float(np.sqrt((affine[:3, :3] ** 2).sum(0)).mean())
    grid = real.shape[1:]
    scales = settings.ms_ssim_scales or ms_ssim_scales(grid, settings.ssim_kernel)
    if segment is None:
        segment = make_segmenter(cfg, settings.segmentation, template_dir, affine, grid, segmenter_path)
    factor = backbone.downsample_factor
    latent = (backbone.latent_channels, *(s // factor for s in grid))
    seeds = [settings.seed * 1_000_003 + int(i) for i in val]
    method = meta["method"]

    records: list[dict[str, Any]] = []
    # MedicalNet features per batch: keeping the images would cost 2 x N volumes of memory
    features: dict[str, list[torch.Tensor]] = {method: [], "uncontrolled": []}
    bs = max(1, int(settings.batch_size))
    bar = tqdm(
        total=2 * len(val) * settings.ddim_steps, desc="evaluate DDIM", unit="step", disable=not progress
    )
    for lo in range(0, len(val), bs):
        sl = slice(lo, lo + bs)
        noise = noise_from_seeds(seeds[sl], latent, device=device)
        cov = cov_all[sl].to(device)
        conditions = {n: condition_tensor(n, x[sl], n_sem).to(device) for n, x in stored.items()}
        tick = lambda i, n: bar.update(1)  # noqa: E731
        batch = {
            method: sample_images(model, method, backbone, conditions, cov, noise, settings.ddim_steps, tick),
            "uncontrolled": sample_images(
                None, method, backbone, conditions, cov, noise, settings.ddim_steps, tick
            ),
        }
        for name, imgs in batch.items():
            sim = image_metrics(imgs, real[sl], settings.ssim_kernel, settings.ssim_sigma, scales)
            for j, img in enumerate(imgs):
                k = lo + j
                seg_lv = mask_of(segment(img), lv_labels)
                rec: dict[str, Any] = {
                    "subject": subjects[k],
                    "index": int(val[k]),
                    "seed": seeds[k],
                    "method": name,
                    **alignment_metrics(seg_lv, lv[k], spacing),
                    "skull_dist": skull_dist(img, skull[k]) if skull is not None else math.nan,
                    "ssim": float(sim["ssim"][j]),
                    "ms_ssim": float(sim["ms_ssim"][j]),
                    "seg_lv_voxels": int(seg_lv.sum()),
                    "cond_lv_voxels": int(lv[k].sum()),
                }
                records.append(rec)
            if medicalnet is not None:
                features[name].append(medicalnet_features(medicalnet, imgs))
    bar.close()

    fid: dict[str, float] = {}
    if medicalnet is not None:
        real_features = medicalnet_features(medicalnet, real)
        fid = {name: fid_3d(torch.cat(f), real_features) for name, f in features.items()}
        if len(val) < 2:
            notes.append("FID 3D undefined with fewer than 2 subjects")
    per_subject = pd.DataFrame(records)
    per_subject["method"] = pd.Categorical(per_subject["method"], [method, "uncontrolled"])
    per_subject = per_subject.sort_values(["method", "index"], kind="stable")
    per_subject["method"] = per_subject["method"].astype(str)
    table = summarise(per_subject, fid, settings.seed)
    table.insert(0, "condition_set", meta.get("condition_set"))
    table.insert(1, "training_size", meta.get("training_size"))
    table.insert(2, "model", method)
    control = {"uncontrolled": "uncontrolled", "difference": "controlled - uncontrolled (paired)"}
    table.insert(4, "control", [control.get(m, "controlled") for m in table["method"]])
    table["segmentation"] = settings.segmentation
    if skull is None:
        notes.append("skull-dist: no skull condition in this set")
    if (per_subject["seg_lv_voxels"] == 0).any():
        notes.append("segmentations without LV have no HD95/ASSD (counted in n_empty)")

    stem = out.name.removesuffix(".csv")
    with atomic_path(out.with_name(f"{stem}_subjects.csv")) as tmp:
        per_subject.to_csv(tmp, index=False, float_format="%.6g")
    info = {
        "model": str(model_path),
        "model_sha256": sha256_file(model_path),
        "condition_set": meta.get("condition_set"),
        "training_size": meta.get("training_size"),
        "method": method,
        "subjects": subjects,
        "settings": asdict(settings),
        "ms_ssim_scales": scales,
        "ms_ssim_weights": ms_ssim_weights(scales),
        "ssim_kernel": settings.ssim_kernel,
        "spacing_mm": spacing,
        "segmentation": settings.segmentation,
        "medicalnet_depth": getattr(medicalnet, "depth", None),
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 2),
        "provenance": provenance(None, dataset=str(dataset), bundle=str(bundle), device=str(device)),
    }
    write_json(out.with_name(f"{stem}.json"), info)
    with atomic_path(out) as tmp:  # the declared output last: its presence means the set is complete
        table.to_csv(tmp, index=False, float_format="%.6g")
    return table


# --- tables ------------------------------------------------------------------------------------------------


def _fmt(mean: float, sd: float | None = None, digits: int = 3) -> str:
    if mean is None or not np.isfinite(mean):
        return "–"
    if sd is None or not np.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _fmt_ci(mean: float, low: float | None, high: float | None, digits: int = 3) -> str:
    """``mean [low, high]``; a signed mean for differences."""
    if mean is None or not np.isfinite(mean):
        return "–"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def display_table(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The paper-style table of several per-model tables: one row per model and method, ``mean [95 % interval]`` cells;
    metric columns that are empty everywhere are dropped."""
    if not tables:
        return pd.DataFrame()
    df = pd.concat(tables, ignore_index=True)
    rows = []
    for _, r in df.iterrows():
        row = {
            "condition set": r["condition_set"],
            "# train": int(r["training_size"]) if pd.notna(r["training_size"]) else "",
            "method": METHOD_NAMES.get(r["method"], r["method"])
            if r["method"] != "difference"
            else "Δ controlled − uncontrolled",
            "n": int(r["n"]),
        }
        for metric in METRICS:
            digits = 2 if metric in ("hd95", "assd") else 4 if metric == "skull_dist" else 3
            row[LABELS[metric]] = _fmt_ci(
                r.get(f"{metric}_mean"), r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high"), digits
            )
        row[LABELS["fid3d"]] = _fmt(r.get("fid3d"), None, 2)
        rows.append(row)
    out = pd.DataFrame(rows)
    if "segmentation" in df:
        out.insert(3, "segmenter", df["segmentation"].fillna("").tolist())
    empty = [c for c in out.columns if (out[c] == "–").all()]
    return out.drop(columns=empty)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    if df.empty:
        return "_no rows_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.tolist()) + " |")
    return "\n".join(lines) + "\n"


def tstr_display(tstr: pd.DataFrame) -> pd.DataFrame:
    """The TSTR table for people: where the network was trained, on how many subjects, its real-val Dice."""
    if tstr.empty:
        return tstr
    return pd.DataFrame(
        {
            "trained on": tstr["train_data"],
            "source": tstr["source"],
            "# train": tstr["n_train"],
            "labels": tstr["labels"],
            "steps": tstr["steps"],
            "Dice on real val ↑ [95% CI]": [
                _fmt_ci(m, lo, hi)
                for m, lo, hi in zip(
                    tstr["dice_mean"],
                    tstr.get("dice_ci_low", tstr["dice_mean"] * np.nan),
                    tstr.get("dice_ci_high", tstr["dice_mean"] * np.nan),
                    strict=True,
                )
            ],
        }
    )


def write_tables(
    eval_csvs: Sequence[str | Path],
    tstr_csvs: Sequence[str | Path],
    md: str | Path,
    html: str | Path | None = None,
    tstr_out: str | Path | None = None,
) -> str:
    """Gather per-model evaluation tables and per-cohort TSTR tables into ``table.md`` (+ HTML, ``tstr.csv``).

    The real-data TSTR rows are identical in every per-cohort table (same network, data, seed and budget):
    they are kept once.
    """
    from vcm.io import atomic_path, write_text

    tables = [pd.read_csv(p) for p in eval_csvs]
    evaluation = display_table(tables)
    tstr = pd.concat([pd.read_csv(p) for p in tstr_csvs], ignore_index=True) if tstr_csvs else pd.DataFrame()
    if not tstr.empty:  # the real rows of every cohort's table are the same network: keep one
        tstr = tstr.drop_duplicates(subset=["train_data", "source", "labels", "steps"]).reset_index(drop=True)
    text = "# Evaluation\n\n"
    text += (
        "Controlled (the trained module) vs uncontrolled (the backbone alone, same noise and covariates), "
    )
    text += (
        "mean [bootstrap 95 % interval] over the validation subjects; the Δ row is the paired difference.\n\n"
    )
    text += markdown_table(evaluation)
    if not tstr.empty:
        text += "\n## Train on synthetic, test on real (TSTR)\n\n" + markdown_table(tstr_display(tstr))
    write_text(md, text)
    if html is not None:
        style = "<style>table{border-collapse:collapse;font-family:sans-serif;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}</style>"
        body = f"<h3>Evaluation: controlled vs uncontrolled (mean [bootstrap 95 % interval] over the validation subjects; Δ = paired difference)</h3>{evaluation.to_html(index=False, border=0)}"
        if not tstr.empty:
            body += f"<h3>Train on synthetic, test on real (TSTR)</h3>{tstr_display(tstr).to_html(index=False, border=0)}"
        write_text(
            html,
            f"<!DOCTYPE html><html><head><meta charset='utf-8'>{style}</head><body>{body}</body></html>\n",
        )
    if tstr_out is not None:
        with atomic_path(tstr_out) as tmp:
            tstr.to_csv(tmp, index=False, float_format="%.6g")
    return text


# --- command line ------------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    """``python -m vcm evaluate``: the paper's table for one trained model."""
    from vcm.config import load_config

    parser = argparse.ArgumentParser(prog="python -m vcm evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--model", required=True, help="vcm.pt")
    parser.add_argument("--bundle", required=True, help="backbone bundle folder")
    parser.add_argument("--template-dir", default=None, help="template (atlas segmentation of the images)")
    parser.add_argument("--segmenter", default=None, help="segmenter.pt (segmenter backend)")
    parser.add_argument("--out", required=True, help="results/eval/<set>_n<size>.csv")
    parser.add_argument("--subjects", type=int, default=None, help="first N validation subjects")
    parser.add_argument("--ddim-steps", type=int, default=None, help="default evaluation/cohort.ddim_steps")
    parser.add_argument("--medicalnet-weights", default=None, help="local MedicalNet checkpoint (FID 3D)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    settings = EvalSettings.from_config(
        cfg, subjects=args.subjects, ddim_steps=args.ddim_steps, medicalnet_weights=args.medicalnet_weights
    )
    if settings.medicalnet_weights is None:
        print(
            "FID 3D: skipped (evaluation.medicalnet_weights not set; MedicalNet weights are never downloaded)"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    table = evaluate_model(
        cfg,
        args.dataset,
        args.model,
        args.bundle,
        args.out,
        args.template_dir,
        settings,
        device,
        segmenter_path=args.segmenter,
    )
    print(markdown_table(display_table([table])), end="")
    print(f"{args.out}: {int(table['n'].iloc[0])} validation subjects at DDIM-{settings.ddim_steps}")
    return 0


def tables_cli(argv: list[str]) -> int:
    """``python -m vcm eval-tables``: gather evaluation and TSTR tables into table.md / table.html / tstr.csv."""
    parser = argparse.ArgumentParser(prog="python -m vcm eval-tables", description=tables_cli.__doc__)
    parser.add_argument("--eval", nargs="*", default=[], help="per-model evaluation CSVs")
    parser.add_argument("--tstr", nargs="*", default=[], help="per-cohort TSTR CSVs")
    parser.add_argument("--md", required=True, help="results/eval/table.md")
    parser.add_argument("--html", default=None, help="results/eval/table.html (for the report)")
    parser.add_argument("--tstr-out", default=None, help="results/eval/tstr.csv")
    args = parser.parse_args(argv)
    for path in [*args.eval, *args.tstr]:
        if not Path(path).is_file():
            raise StageError(f"file not found: {path}")
    print(write_tables(args.eval, args.tstr, args.md, args.html, args.tstr_out), end="")
    return 0
