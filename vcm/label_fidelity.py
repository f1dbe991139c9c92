"""How faithfully can labels be recovered? Two reference measurements for the demo's figures.

* :func:`autoencoder_ceiling`: the backbone's autoencoder reconstructs each real validation image (posterior
  mean, decoded); the QC segmenter's LV on the reconstruction against the real LV mask is the ceiling of any
  control through this autoencoder (the real image's own Dice is the segmenter's ceiling).
* :func:`atlas_dice`: the offline ``atlas`` segmentation backend on the registered validation images against
  their true labels, so users know what the offline backend costs compared with SynthSeg-like labels.

Both read ``dataset.h5``'s validation split and report the mean with its bootstrap 95 % interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vcm.dataset_store import DatasetFile
from vcm.labels import LATERAL_VENTRICLES, mask_dice, mask_of
from vcm.stats import bootstrap_ci


def _summary(values: list[float]) -> dict[str, Any]:
    low, high = bootstrap_ci(np.asarray(values))
    return {"mean": float(np.mean(values)), "ci95": [low, high], "n": len(values), "values": values}


def _validation(
    dataset: str | Path, n: int | None
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray]:
    with DatasetFile(dataset) as data:
        val = data.split("val")[:n]
        subjects = data.subjects(val)
        images = np.asarray(data.images(val)[:, 0], dtype=np.float32)
        labels = data.labels(val)
        affine = data.affine
    return val, subjects, images, labels, affine


@torch.no_grad()
def autoencoder_ceiling(
    dataset: str | Path,
    bundle: str | Path,
    segmenter: str | Path,
    n: int | None = None,
    lv_labels: tuple[int, ...] = LATERAL_VENTRICLES,
) -> dict[str, Any]:
    """QC-segmenter LV Dice of the real images and of their autoencoder reconstructions (validation split).

    Each summary also lists ``volume_ratios``: the segmented LV volume over the true one, per image (what QC's
    check of a design's LV target measures against the target).
    """
    from vcm.models.backbone import load_bundle
    from vcm.models.segmenter import load_segmenter

    _, subjects, images, labels, affine = _validation(dataset, n)
    backbone = load_bundle(bundle)
    seg = load_segmenter(segmenter, affine)
    dice: dict[str, list[float]] = {"real": [], "reconstruction": []}
    ratios: dict[str, list[float]] = {"real": [], "reconstruction": []}
    for image, label in zip(images, labels, strict=True):
        truth = mask_of(label, lv_labels)
        mu, _ = backbone.encode(torch.from_numpy(image)[None, None])
        rec = backbone.decode(mu * backbone.scale_factor)[0, 0].float().numpy()
        for key, img in (("real", image), ("reconstruction", rec)):
            found = mask_of(seg(img), lv_labels)
            dice[key].append(mask_dice(found, truth))
            ratios[key].append(float(found.sum() / max(int(truth.sum()), 1)))
    return {"subjects": subjects} | {k: _summary(dice[k]) | {"volume_ratios": ratios[k]} for k in dice}


def atlas_dice(
    dataset: str | Path,
    prep_dir: str | Path,
    template_dir: str | Path,
    n: int | None = 8,
    lv_labels: tuple[int, ...] = LATERAL_VENTRICLES,
) -> dict[str, Any]:
    """LV Dice of the atlas backend (SyN of the template's labels) against the true labels, validation split."""
    from vcm.grid import Grid
    from vcm.prep.segmentation import segment_atlas

    _, subjects, _, labels, affine = _validation(dataset, n)
    grid = Grid.from_affine(labels.shape[1:], affine)
    dice = []
    for subject, label in zip(subjects, labels, strict=True):
        atlas = segment_atlas(Path(prep_dir) / subject / "t1.nii.gz", template_dir, grid)
        dice.append(mask_dice(mask_of(atlas, lv_labels), mask_of(label, lv_labels)))
    return {"subjects": subjects, "atlas_lv_dice": _summary(dice)}
