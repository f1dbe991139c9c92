"""Anatomy augmentation of a control module's training split: real subjects again, with larger ventricles.

A cohort design asks for lateral ventricles larger than most real training subjects have (the demo's: a
median 1.5× the training split's), and a module that has only seen the real split fills large ventricle masks
short (docs/benchmarks.md, session 22: −16 % at design targets over 45 mL). The cohort's ventricle push
(:func:`vcm.cohort.steer.steer_label`, a smooth diffeomorphic expansion that displaces the surrounding tissue)
applied to a real subject's label map *and its image* makes a training pair with the larger ventricles: the
image warped by the same backward field, the conditions re-derived from the pushed label map (masks) or warped
alike (images), the LV-volume covariate scaled by the voxel-count ratio. The frozen autoencoder encodes the
warped image and its flip like any other (:func:`vcm.latents.encode_dataset`), so the pairs join the split in
memory (:meth:`vcm.training.batches.TrainData.extend`) and nothing new is written to disk.
On the demo it moved the cohort's LV volumes toward their targets and flagged fewer possible copies, but
passed no more subjects and cost the samples SSIM (docs/benchmarks.md, session 23): the demo leaves it off.

Each copy's volume factor is drawn log-uniformly from ``lv_factor`` by a stream seeded with
``(training.seed, dataset row, copy)``: a subject's copies do not depend on the split or the run's other draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vcm.errors import StageError
from vcm.labels import mask_of

__all__ = ["AnatomyAugmentation", "AugmentedSubjects", "augment_subjects"]


@dataclass
class AnatomyAugmentation:
    """``training.anatomy_augmentation``.

    Args:
        copies: pushed copies per real training subject (0: off, the paper).
        lv_factor: the range of the LV-volume factor of a copy, drawn log-uniformly.
    """

    copies: int = 0
    lv_factor: tuple[float, float] = (1.25, 2.5)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> AnatomyAugmentation:
        section = dict(section or {})
        unknown = set(section) - {"copies", "lv_factor"}
        if unknown:
            raise StageError(f"config key 'training.anatomy_augmentation': unknown keys {sorted(unknown)}")
        out = cls(int(section.get("copies", 0)), tuple(section.get("lv_factor", cls.lv_factor)))
        low, high = out.lv_factor if len(out.lv_factor) == 2 else (0.0, 0.0)
        if out.copies < 0 or not 0 < low <= high:
            raise StageError(
                "config key 'training.anatomy_augmentation': copies >= 0 and lv_factor [low, high] with"
                f" 0 < low <= high, got {section}"
            )
        return out


@dataclass
class AugmentedSubjects:
    """The pushed copies, ready for :meth:`~vcm.training.batches.TrainData.extend`.

    ``images`` (N, 1, *grid) float32; ``conditions`` name -> (N, 1, *grid) in the stored dtype; ``covariates``
    (N, 4) scaled; ``subjects`` ``<source>~lv<k>``; ``lv_ratio`` the copies' LV volume over their source's.
    """

    images: np.ndarray
    conditions: dict[str, np.ndarray]
    covariates: np.ndarray
    subjects: list[str]
    lv_ratio: np.ndarray


def augment_subjects(
    dataset: str | Path,
    rows: Sequence[int],
    names: Sequence[str],
    cfg: Mapping[str, Any],
    settings: AnatomyAugmentation,
    seed: int,
    progress: bool = True,
) -> AugmentedSubjects:
    """``settings.copies`` ventricle-pushed copies of each real subject ``rows`` of ``dataset.h5``.

    Args:
        dataset: ``dataset.h5`` (with ``/covariates_raw``).
        rows: the training split's rows.
        names: the conditions to return (those of the condition set).
        cfg: the validated config (``conditions``).
        settings: copies and factor range.
        seed: ``training.seed``.
        progress: show a tqdm bar.
    """
    from vcm.cohort.sources import DatasetSource, warp, warp_conditions, warped_covariates
    from vcm.cohort.steer import steer_label

    src = DatasetSource(dataset, cfg)
    try:
        src.require_raw("augment the anatomy")
        low, high = (math.log(f) for f in settings.lv_factor)
        images, covs, subjects, ratios = [], [], [], []
        conds: dict[str, list[np.ndarray]] = {n: [] for n in names}
        work = [(int(r), k) for r in rows for k in range(settings.copies)]
        for row, k in tqdm(work, desc="anatomy augmentation", unit="copy", disable=not progress):
            label, source_conds, _, raw = src.read(row)
            factor = math.exp(np.random.default_rng([seed, row, k]).uniform(low, high))
            lv = int(mask_of(label, src.lv_labels).sum())
            if lv == 0:
                raise StageError(f"{dataset}: {src.subjects[row]} has no lateral-ventricle voxels to push")
            steered = steer_label(label, src.lv_labels, src.spacing, lv * factor)
            image = np.asarray(src.file.images(row)[0], dtype=np.float32)
            images.append(warp(image, steered.displacement, 1)[None])
            warped = warp_conditions(source_conds, steered.label, steered.displacement, src.lv_labels)
            for n in names:
                conds[n].append(warped[n][None])
            cov, new_raw = warped_covariates(raw, label, steered.label, src)
            covs.append(cov)
            ratios.append(new_raw[2] / raw[2])
            subjects.append(f"{src.subjects[row]}~lv{k}")
    finally:
        src.close()
    if not images:
        raise StageError("anatomy augmentation: no training subjects or no copies")
    return AugmentedSubjects(
        np.stack(images),
        {n: np.stack(x) for n, x in conds.items()},
        np.stack(covs).astype(np.float32),
        subjects,
        np.asarray(ratios, dtype=np.float64),
    )
