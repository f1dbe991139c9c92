"""Quality control of synthetic subjects: does the image follow its conditions, and does it look like real data?

Every synthetic image is checked against the conditions it was generated from:

* **alignment** (paper §4): the image is re-segmented with the configured backend
  (:mod:`vcm.evaluation.segmenters`: ``segmenter``, the default: a U-Net trained on the real training
  subjects, independent of the condition masks and ~0.1 s a volume; ``atlas``; ``synthseg``) and the
  lateral-ventricle mask of that segmentation is compared with the condition's LV mask: Dice, HD95 and
  ASSD in mm (MONAI metrics, spacing = the grid's);
* **skull-dist** where the condition set uses a skull image: the mean squared difference between the
  condition skull image and the synthetic image inside the condition's skull support (where the skull
  image is non-zero), in image intensity units ([0, 1]);
* **intensity statistics per structure** (MONAI MAISI's practice): the median intensity inside each of the
  8 semantic classes of the subject's label map should lie within ``[p0.5, p99.5]`` of the same medians over
  the real training subjects (:func:`reference_ranges`). With a few dozen real subjects p0.5-p99.5 is nearly
  their min-max, which real subjects themselves often miss, so each range is widened by
  ``qc.intensity_margin`` of its width on both sides and ``qc.intensity_outliers_max`` structures may miss.

A sample passes when every configured check passes (:class:`QCSettings`). Metrics that cannot be computed
are NaN: HD95/ASSD when exactly one of the two masks is empty (Dice is then 0), skull-dist without a skull
condition, a structure's median when the structure is absent.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vcm.config import section_values
from vcm.dataset_store import DatasetFile
from vcm.errors import StageError
from vcm.evaluation.segmenters import BACKENDS
from vcm.labels import SEMANTIC_CLASSES, brain_mask, mask_of

__all__ = [
    "QCResult",
    "QCSettings",
    "evaluate",
    "reference_ranges",
    "segmentation_metrics",
    "skull_dist",
    "structure_medians",
    "volume_check",
]

logger = logging.getLogger(__name__)

SEGMENTATION_METRICS = ("dice", "hd95", "assd")
CLASS_NAMES: tuple[str, ...] = tuple(SEMANTIC_CLASSES)


@dataclass
class QCSettings:
    """QC thresholds, from the config's ``qc`` section (the field defaults are the schema's).

    Args:
        dice_min: minimum LV Dice between the re-segmentation and the condition mask.
        max_tries: samples generated per subject at most (the first try included).
        hd95_max_mm: maximum LV HD95 (``None``: recorded, not checked).
        assd_max_mm: maximum LV ASSD (``None``: recorded, not checked).
        skull_dist_max: maximum skull-dist where a skull condition is used (``None``: not checked).
        intensity_outliers_max: structures whose median may lie outside the real range (``None``: the
            intensity statistics are recorded, not checked).
        intensity_margin: widen each real range by this fraction of its width on both sides. MAISI's exact
            rule (margin 0, no outlier) fails 42 % of the demo's *real* subjects against the other 19 training
            subjects (leave-one-out; 58 % with 10); these defaults fail none of them, and still catch an image
            with two structures off.
        intensity_percentiles: the real range's percentiles (MAISI: 0.5, 99.5).
        backend: re-segmentation backend: ``segmenter`` (the QC U-Net trained on the real training subjects,
            :mod:`vcm.models.segmenter`), ``atlas`` or ``synthseg``.
        target_tolerance: largest relative miss of the re-segmented LV volume against the subject's
            ``cohort.design`` target (checked only where ``lv_volume`` has one; :func:`volume_check`).
    """

    dice_min: float = 0.7
    max_tries: int = 3
    hd95_max_mm: float | None = None
    assd_max_mm: float | None = None
    skull_dist_max: float | None = None
    intensity_outliers_max: int | None = 1
    intensity_margin: float = 0.25
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    backend: str = "segmenter"
    target_tolerance: float = 0.15

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> QCSettings:
        """Read ``cfg["qc"]`` of a validated config (``qc.segmenter`` is :mod:`vcm.train_segmenter`'s)."""
        names = [f.name for f in fields(cls)]
        out = cls(**section_values(cfg, "qc", names, read_elsewhere=("segmenter", "privacy")))
        out.intensity_percentiles = tuple(float(p) for p in out.intensity_percentiles)  # type: ignore[assignment]
        if out.max_tries < 1:
            raise StageError(f"config key 'qc.max_tries': expected >= 1, got {out.max_tries}")
        if out.backend not in BACKENDS:
            raise StageError(f"config key 'qc.backend': expected {', '.join(BACKENDS)}, got {out.backend!r}")
        return out


@dataclass
class QCResult:
    """The QC of one sample: its metrics, whether it passed and, if not, why."""

    metrics: dict[str, float]
    passed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return len(self.reasons)


# --- metrics -----------------------------------------------------------------------------------------------


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None, None].float()
    return torch.cat([1 - t, t], dim=1)


def segmentation_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float]
) -> dict[str, float]:
    """Dice, HD95 (mm) and ASSD (mm) of a binary mask against a reference (MONAI metrics).

    Args:
        pred: binary mask of the re-segmentation.
        ref: binary reference (condition) mask, same shape.
        spacing: voxel size in mm (scalar or per axis).

    Returns:
        ``{"dice", "hd95", "assd"}``; both masks empty gives (1, 0, 0); exactly one empty gives (0, NaN, NaN).
    """
    from monai.metrics import DiceMetric, compute_average_surface_distance, compute_hausdorff_distance

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    if not pred.any() and not ref.any():
        return {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    if not pred.any() or not ref.any():
        return {"dice": 0.0, "hd95": math.nan, "assd": math.nan}
    y_pred, y = _one_hot(pred), _one_hot(ref)
    spacing = [float(spacing)] * pred.ndim if np.isscalar(spacing) else [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI's deprecation notes on its own internals
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=False, reduction="none")(y_pred, y)
        hd95 = compute_hausdorff_distance(y_pred, y, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(y_pred, y, symmetric=True, spacing=spacing)
    return {"dice": float(dice.item()), "hd95": float(hd95.item()), "assd": float(assd.item())}


def skull_dist(image: np.ndarray, skull: np.ndarray) -> float:
    """Mean squared difference between the condition skull image and ``image`` inside the skull's support.

    Returns:
        NaN when the skull image is all zero.
    """
    support = np.asarray(skull) > 0
    if not support.any():
        return math.nan
    diff = np.asarray(image, np.float64)[support] - np.asarray(skull, np.float64)[support]
    return float(np.mean(diff**2))


def structure_medians(
    image: np.ndarray, semantics: np.ndarray, n_classes: int = len(CLASS_NAMES)
) -> np.ndarray:
    """Median intensity of ``image`` inside each semantic class 1..``n_classes`` (NaN where absent)."""
    image = np.asarray(image, np.float32)
    semantics = np.asarray(semantics)
    out = np.full(n_classes, np.nan, dtype=np.float64)
    for c in range(1, n_classes + 1):
        values = image[semantics == c]
        if values.size:
            out[c - 1] = float(np.median(values))
    return out


def reference_ranges(
    dataset: str | Path, index: Sequence[int], percentiles: Sequence[float] = (0.5, 99.5)
) -> dict[str, np.ndarray]:
    """Per-structure ranges of the real images' median intensities (MAISI's practice).

    Args:
        dataset: ``dataset.h5`` (``/image``, ``/cond/semantics``).
        index: the real subjects to measure (the model's training split).
        percentiles: lower and upper percentile over the subjects' medians.

    Returns:
        ``{"classes": names, "low": (K,), "high": (K,), "medians": (n_subjects, K)}``.
    """
    index = np.sort(np.asarray(index, dtype=np.int64))
    if index.size == 0:
        raise StageError(f"{dataset}: no real subjects to measure intensity ranges on")
    with DatasetFile(dataset) as data:
        classes = data.semantic_classes()
        names = classes[1:] if classes is not None else list(CLASS_NAMES)
        medians = np.stack(
            [
                structure_medians(data.images(int(i))[0], data.conditions("semantics", int(i))[0], len(names))
                for i in index
            ]
        )
    with warnings.catch_warnings():  # a class absent from every subject: an all-NaN column
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = (
            np.nanpercentile(medians, percentiles[0], axis=0),
            np.nanpercentile(medians, percentiles[1], axis=0),
        )
    return {"classes": np.asarray(names), "low": low, "high": high, "medians": medians}


def evaluate(
    image: np.ndarray,
    seg: np.ndarray,
    lv: np.ndarray,
    semantics: np.ndarray,
    settings: QCSettings,
    spacing: float,
    ranges: Mapping[str, np.ndarray] | None = None,
    skull: np.ndarray | None = None,
    lv_labels: Sequence[int] = (4, 43),
) -> QCResult:
    """QC of one synthetic image.

    Args:
        image: the synthetic image (grid, intensities in [0, 1]).
        seg: its re-segmentation (FreeSurfer IDs, same grid).
        lv: the condition LV mask.
        semantics: the subject's semantic class map (from its label map).
        settings: thresholds.
        spacing: grid spacing in mm.
        ranges: :func:`reference_ranges`; ``None`` skips the intensity statistics.
        skull: the condition skull image, where the condition set uses one.
        lv_labels: FreeSurfer IDs of the LV in ``seg``.

    Returns:
        metrics ``dice``, ``hd95``, ``assd``, ``skull_dist``, ``intensity_outliers`` and
        ``median_<class>`` per semantic class; ``passed``; the failed checks as short reasons.
    """
    metrics = segmentation_metrics(mask_of(seg, tuple(lv_labels)), lv, spacing)
    reasons = []
    if not metrics["dice"] >= settings.dice_min:
        reasons.append(f"dice {metrics['dice']:.3f} < {settings.dice_min:g}")
    for key, limit in (("hd95", settings.hd95_max_mm), ("assd", settings.assd_max_mm)):
        if limit is not None and not metrics[key] <= limit:  # NaN fails
            reasons.append(f"{key} {metrics[key]:.2f} mm > {limit:g}")
    metrics["skull_dist"] = skull_dist(image, skull) if skull is not None else math.nan
    if skull is not None and settings.skull_dist_max is not None:
        if not metrics["skull_dist"] <= settings.skull_dist_max:
            reasons.append(f"skull_dist {metrics['skull_dist']:.4f} > {settings.skull_dist_max:g}")
    if ranges is not None:
        names = [str(n) for n in ranges["classes"]]
        medians = structure_medians(image, semantics, len(names))
        width = ranges["high"] - ranges["low"]
        low = ranges["low"] - settings.intensity_margin * width
        high = ranges["high"] + settings.intensity_margin * width
        known = np.isfinite(medians) & np.isfinite(low)
        outside = known & ((medians < low) | (medians > high))
        for name, value in zip(names, medians, strict=True):
            metrics[f"median_{name}"] = float(value)
        metrics["intensity_outliers"] = float(outside.sum())
        if settings.intensity_outliers_max is not None and outside.sum() > settings.intensity_outliers_max:
            reasons.append("intensity outside the real range: " + ", ".join(np.asarray(names)[outside]))
    return QCResult(metrics, not reasons, reasons)


def volume_check(
    seg: np.ndarray,
    label: np.ndarray,
    label_mm3: Sequence[float],
    lv_labels: Sequence[int],
    lv_target_mm3: float | None,
    tolerance: float,
) -> tuple[dict[str, float], list[str]]:
    """The re-segmented image's LV and brain volumes, and whether its LV reaches the design target.

    Volumes follow the cohort's convention: the label map's native volumes (``label_mm3``: LV, brain) times
    the voxel-count ratio of the re-segmentation to the label map.

    Args:
        seg: the re-segmentation (FreeSurfer IDs).
        label: the label map the image was conditioned on (same grid).
        label_mm3: the label map's native LV and brain volumes.
        lv_labels: FreeSurfer IDs of the lateral ventricles.
        lv_target_mm3: the subject's design target (``None``: no target, nothing checked).
        tolerance: the largest relative miss, ``|image / target - 1|``.

    Returns:
        metrics ``image_lv_volume``, ``image_brain_volume`` (mm³) and ``lv_volume_error`` (image / target - 1,
        NaN without a target); the failed check as a short reason.
    """
    out = {}
    for name, fn, value in (
        ("lv", lambda lab: mask_of(lab, tuple(lv_labels)), label_mm3[0]),
        ("brain", brain_mask, label_mm3[1]),
    ):
        before = int(fn(label).sum())
        out[f"image_{name}_volume"] = float(value) * int(fn(seg).sum()) / before if before else math.nan
    out["lv_volume_error"] = math.nan
    reasons = []
    if lv_target_mm3 is not None:
        out["lv_volume_error"] = out["image_lv_volume"] / float(lv_target_mm3) - 1.0
        if not abs(out["lv_volume_error"]) <= tolerance:
            reasons.append(f"LV volume {out['lv_volume_error']:+.0%} off its target (> {tolerance:.0%})")
    return out, reasons
