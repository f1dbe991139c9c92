"""Condition sources: the real subject whose conditions a synthetic subject borrows, or a new anatomy.

A synthetic subject ``i`` takes the label map, conditions and covariates of a real subject of ``dataset.h5``
(visited in seeded balanced rounds: every source once before any twice). With probability
``cohort.new_anatomy_fraction`` it gets a **new anatomy** instead: the source's label map warped by a random
smooth deformation (nearest label), its skull and low-resolution images warped linearly, the LV / brain /
semantic conditions re-derived from the warped labels, and the LV and brain volumes scaled by the warped /
original voxel counts. Everything is a function of ``(cohort.seed, i)`` and the dataset only — and of the
*draw*, when a retry after a failed QC redraws the plan (``cohort.retry_new_anatomy``).

:func:`smooth_displacement` is the cohort's voxel-grid field, scaled to a largest displacement;
:func:`vcm.anatomy.lattice_displacement` is the world-fixed field of the ventricle edits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from vcm.cohort.design import COVARIATES, Design
from vcm.cohort.plan import CohortSettings, anatomy_rng, match_rng, source_order, subject_id
from vcm.dataset_store import DatasetFile
from vcm.errors import StageError
from vcm.labels import brain_mask, mask_of, semantic_map

__all__ = [
    "DatasetSource",
    "SubjectPlan",
    "choose_source",
    "plan_subject",
    "ranges_path",
    "smooth_displacement",
    "warp",
    "warp_conditions",
    "warped_covariates",
]


# --- the real subjects -------------------------------------------------------------------------------------


class DatasetSource:
    """Read access to the real subjects of ``dataset.h5`` that lend conditions.

    Args:
        dataset: ``dataset.h5``.
        cfg: the validated config (``conditions``).
    """

    def __init__(self, dataset: str | Path, cfg: Mapping[str, Any]) -> None:
        self.path = Path(dataset)
        self.file = DatasetFile(dataset)
        try:
            self.file.require("subjects", "label", "cond", "covariates")
            self.affine = self.file.affine
        except StageError:
            self.file.close()
            raise
        self.subjects = self.file.subjects()
        self.names = self.file.condition_names()
        self.grid = self.file.grid_shape
        self.spacing = float(np.abs(self.affine[:3, :3]).max(axis=0).mean())
        self.n_semantic = self.file.n_semantic
        self.image_dtype = self.file.image_dtype
        self.lv_labels = tuple(cfg["conditions"]["lv_labels"])
        self.has_raw = self.file.has_raw_covariates
        self.ranges_file = cfg["conditions"]["covariate_ranges"]
        self.config_sha256 = self.file.config_sha256  # which build of the dataset
        self._lv_mm3: np.ndarray | None = None  # every subject's raw LV volume, read once (source matching)

    def close(self) -> None:
        self.file.close()

    def has_split(self, name: str) -> bool:
        return self.file.has_split(name)

    def split(self, name: str) -> np.ndarray:
        return self.file.split(name)

    def source_indices(self, sources: Sequence[str], train_split: str) -> np.ndarray:
        parts = []
        for s in sources:
            parts.append(
                np.arange(len(self.subjects))
                if s == "all"
                else self.split(train_split if s == "train" else "val")
            )
        out = np.unique(np.concatenate(parts))
        if out.size == 0:
            raise StageError(f"{self.path}: cohort.sources {list(sources)} select no subjects")
        return out

    def dtype(self, name: str) -> np.dtype:
        return self.file.condition_dtype(name)

    def semantic_class_names(self) -> Any:
        """The ``classes`` attribute of ``/cond/semantics`` (``[]`` when absent)."""
        return self.file.semantic_classes() or []

    def require_raw(self, purpose: str) -> None:
        """Raise a one-line :class:`StageError` naming ``purpose`` when ``dataset.h5`` has no raw covariates (it
        predates them)."""
        if not self.has_raw:
            raise StageError(f"{self.path}: no /covariates_raw to {purpose} (rebuild dataset.h5)")

    def lv_volumes(self, indices: np.ndarray) -> np.ndarray:
        """Native LV volumes (mm³) of real subjects ``indices`` (``/covariates_raw``, read once)."""
        self.require_raw("steer subjects to cohort.design")
        if self._lv_mm3 is None:
            self._lv_mm3 = self.file.covariates_raw(np.arange(len(self.subjects)))[:, 2]
        return self._lv_mm3[np.asarray(indices, dtype=np.intp)]

    def read(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Label map, conditions (stored dtypes), scaled and raw covariates of real subject ``index``."""
        label = np.asarray(self.file.labels(index), dtype=np.uint16)
        conds = {n: self.file.conditions(n, index)[0] for n in self.names}
        cov = self.file.covariates(index)
        raw = self.file.covariates_raw(index) if self.has_raw else np.full(4, np.nan)
        return label, conds, cov, raw


# --- new anatomies -----------------------------------------------------------------------------------------


def smooth_displacement(
    shape: Sequence[int], spacing_mm: float, max_mm: float, smoothness_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """A random smooth displacement field (3, *shape) in voxels, largest displacement ``max_mm``.

    Gaussian random vectors on a control grid ``smoothness_mm`` apart, interpolated with cubic B-splines.
    """
    shape = tuple(int(s) for s in shape)
    step = smoothness_mm / spacing_mm  # control-point spacing in voxels
    coarse = [int(math.ceil((s - 1) / step)) + 3 for s in shape]  # one spare point on each side
    control = rng.standard_normal((3, *coarse))
    coords = np.stack(np.meshgrid(*[np.arange(s) / step + 1.0 for s in shape], indexing="ij"))
    field = np.stack([ndi.map_coordinates(c, coords, order=3, mode="nearest") for c in control])
    largest = float(np.sqrt((field**2).sum(axis=0)).max())
    return (field * (max_mm / spacing_mm / max(largest, 1e-12))).astype(np.float32)


def warp(volume: np.ndarray, displacement: np.ndarray, order: int) -> np.ndarray:
    """``volume(x + d(x))``: nearest (``order=0``, labels) or linear (``order=1``, images) resampling."""
    coords = np.indices(volume.shape, dtype=np.float32) + displacement
    out = ndi.map_coordinates(volume, coords, order=order, mode="nearest", prefilter=False)
    return out.astype(volume.dtype, copy=False)


def warp_conditions(
    conds: Mapping[str, np.ndarray], warped: np.ndarray, disp: np.ndarray, lv_labels: Sequence[int]
) -> dict[str, np.ndarray]:
    """The conditions of the warped label map: masks re-derived from it, other maps warped alike."""
    out = {}
    for name, x in conds.items():
        if name == "lv":
            out[name] = mask_of(warped, lv_labels).astype(x.dtype)
        elif name == "brain":
            out[name] = brain_mask(warped).astype(x.dtype)
        elif name == "semantics":
            out[name] = semantic_map(warped).astype(x.dtype)
        elif np.issubdtype(x.dtype, np.integer):
            out[name] = warp(x, disp, 0)
        else:  # skull, low-res images: linear, rounded to the stored dtype (what the model will see)
            out[name] = warp(x.astype(np.float32), disp, 1).astype(x.dtype)
    return out


def warped_covariates(
    raw: np.ndarray, label: np.ndarray, warped: np.ndarray, data: DatasetSource
) -> tuple[np.ndarray, np.ndarray]:
    """Scaled and raw covariates of a new anatomy: LV and brain volumes scaled by the voxel counts."""
    data.require_raw("recompute a new anatomy's volumes")
    raw = raw.copy()
    for k, fn in ((2, lambda lab: mask_of(lab, data.lv_labels)), (3, brain_mask)):
        before, after = int(fn(label).sum()), int(fn(warped).sum())
        raw[k] = raw[k] * after / before if before else after * data.spacing**3
    return _scaled(raw, data), raw


def _scaled(raw: np.ndarray, data: DatasetSource) -> np.ndarray:
    """The backbone's min-max scaled covariates of raw ones (sex, years, mm³, mm³)."""
    from vcm.prep.conditions import load_ranges, scale_covariates

    ranges = load_ranges(ranges_path(data.ranges_file))
    scaled, _ = scale_covariates(dict(zip(COVARIATES, raw.tolist(), strict=True)), ranges)
    return np.asarray(scaled, dtype=np.float32)


def ranges_path(path: str | None) -> Path:
    """``conditions.covariate_ranges``, relative to the working folder or else to the repository."""
    from vcm.config import REPO_ROOT

    p = Path(path or "resources/covariate_ranges.yaml")
    return p if p.is_file() or p.is_absolute() else REPO_ROOT / p


# --- one subject's plan ------------------------------------------------------------------------------------


@dataclass
class SubjectPlan:
    """Everything a synthetic subject is made from (a function of the config, the dataset and its index)."""

    index: int
    source_index: int
    source_subject: str
    new_anatomy: bool
    label: np.ndarray
    conditions: dict[str, np.ndarray]
    covariates: np.ndarray
    covariates_raw: np.ndarray
    # cohort.design: the targets (raw units; the source's value where a covariate has none) and which
    # covariates have one; covariates_raw holds the label map's values
    targets: np.ndarray | None = None
    designed: tuple[bool, ...] = (False, False, False, False)
    draw: int = 0  # 0: the first plan; k: redrawn after k failed QC attempts (cohort.retry_new_anatomy)

    @property
    def subject(self) -> str:
        return subject_id(self.index)


def plan_subject(
    index: int,
    settings: CohortSettings,
    data: DatasetSource,
    sources: np.ndarray,
    design: Design | None = None,
    draw: int = 0,
) -> SubjectPlan:
    """The condition source of synthetic subject ``index`` (deterministic in ``(settings.seed, index, draw)``),
    steered to its ``cohort.design`` targets (:func:`_steer`) when the design sets any.

    ``draw`` > 0 redraws the source and the new anatomy (their own streams, :func:`~vcm.cohort.plan.anatomy_rng`),
    never the design targets, which depend on ``index`` alone.
    """
    src = choose_source(index, settings, data, sources, design, draw)
    rng = anatomy_rng(settings.seed, index, draw)
    new = bool(rng.random() < settings.new_anatomy_fraction)
    label, conds, cov, raw = data.read(src)
    if new:
        disp = smooth_displacement(
            label.shape, data.spacing, settings.deform_max_mm, settings.deform_smoothness_mm, rng
        )
        warped = warp(label, disp, 0)
        conds = warp_conditions(conds, warped, disp, data.lv_labels)
        cov, raw = warped_covariates(raw, label, warped, data)
        label = warped
    plan = SubjectPlan(index, src, data.subjects[src], new, label, conds, cov, raw, draw=draw)
    if design is not None and design.any:
        _steer(plan, design, settings.seed, data)
    return plan


def choose_source(
    index: int,
    settings: CohortSettings,
    data: DatasetSource,
    sources: np.ndarray,
    design: Design | None = None,
    draw: int = 0,
) -> int:
    """The real subject that lends subject ``index`` (its plan's ``draw``) its label map and conditions.

    With ``cohort.match_lv_ratio`` and an LV-volume target, a seeded draw among the sources whose LV volume is
    within that factor of the target (the nearest source when none is): the further steering pushes a
    ventricle, the further its sample's ventricles fall from the target (demo, session 30: the first
    attempt's LV-volume error against log(target / source LV), Spearman -0.75). Otherwise balanced rounds:
    every source once per round, in a seeded order; a redraw (``draw`` > 0) then takes any source, seeded.
    """
    ratio = settings.match_lv_ratio
    target = None
    if ratio is not None and design is not None:
        target = design.target("lv_volume", settings.seed, index)
    if target is not None:
        lv = data.lv_volumes(sources)
        known = np.flatnonzero(lv > 0)
        if known.size:
            push = np.abs(np.log(target / lv[known]))
            near = known[push <= np.log(ratio) + 1e-12]
            if near.size == 0:
                near = known[[int(np.argmin(push))]]
            return int(sources[near[match_rng(settings.seed, index, draw).integers(near.size)]])
    n = len(sources)
    if draw:
        return int(sources[match_rng(settings.seed, index, draw).integers(n)])
    rnd, pos = divmod(index, n)
    return int(sources[source_order(settings.seed, rnd, n)[pos]])


def _steer(plan: SubjectPlan, design: Design, seed: int, data: DatasetSource) -> None:
    """Draw the subject's targets; deform its label map to the volume targets (after a new anatomy's warp,
    :mod:`vcm.cohort.steer`), re-derive its conditions; covariates = the targets' sex and age and the steered
    label map's volumes (the source's native volumes times the voxel-count ratios)."""
    from vcm.cohort.steer import steer_label

    data.require_raw("steer subjects to cohort.design")
    raw = plan.covariates_raw
    targets = design.draw(seed, plan.index, dict(zip(COVARIATES, raw.tolist(), strict=True)))
    lv, brain = mask_of(plan.label, data.lv_labels).sum(), brain_mask(plan.label).sum()
    wanted = {}  # voxel counts: native mm³ over the source's native mm³ per voxel
    for key, count, k in (("lv_volume", lv, 2), ("brain_volume", brain, 3)):
        if design.designed(key) and count and raw[k] > 0:
            wanted[key] = targets[key] / (raw[k] / count)
    if wanted:
        steered = steer_label(
            plan.label, data.lv_labels, data.spacing, wanted.get("lv_volume"), wanted.get("brain_volume")
        )
        plan.conditions = warp_conditions(
            plan.conditions, steered.label, steered.displacement, data.lv_labels
        )
        _, raw = warped_covariates(raw, plan.label, steered.label, data)
        plan.label = steered.label
    raw = raw.copy()
    raw[0], raw[1] = targets["sex"], targets["age"]
    plan.covariates, plan.covariates_raw = _scaled(raw, data), raw
    plan.targets = np.array([targets[k] for k in COVARIATES], dtype=np.float64)
    plan.designed = tuple(design.designed(k) for k in COVARIATES)
