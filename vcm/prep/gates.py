"""Quality gates of preparation: the checks that turn a subject unfit for ``dataset.h5`` into an exclusion.

A volume that reads cleanly can still be no head: a 4×4×4-voxel crop or a block of noise passes every file
check, registers to *something* and segments into *something*. Each gate below names one measurable property
of a usable subject; its threshold is a ``data.gates`` key (``null``: recorded, not checked):

* ``check_inputs``: the field of view (mm along every axis) and the voxel count of the native T1;
* ``register``: the registered T1's correlation with the template inside the template's brain mask, and the
  determinant of the affine (the subject's head against the template's: a wrong voxel size in the header
  scales it by the cube of the error);
* ``segment``: LV and brain volumes (mL, native space), and every structure the condition sets are made of
  present on the grid.

A gate returns :class:`Failure` records (gate key and a one-line reason naming the threshold's config key);
:mod:`vcm.prep.exclusion` records them as the subject's exclusion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from vcm.config import section_values
from vcm.labels import SEMANTIC_CLASSES, brain_mask, mask_of

__all__ = [
    "Failure",
    "GateSettings",
    "input_failures",
    "registration_failures",
    "required_structures",
    "segmentation_failures",
]

SECTION = "data.gates"
RANGES = ("affine_determinant", "lv_ml", "brain_ml")


@dataclass(frozen=True)
class Failure:
    """One failed gate: its key (``field_of_view``, ``template_similarity`` ...) and why, in one line."""

    gate: str
    reason: str


@dataclass
class GateSettings:
    """The gates' thresholds, from the config's ``data.gates`` (the field defaults are the schema's).

    Args:
        min_fov_mm: smallest field of view along any axis of the native T1 (mm).
        min_voxels: fewest voxels of the native T1.
        min_template_ncc: lowest correlation of the registered T1 with the template inside the template's brain
            mask. The demo's 40 subjects: 0.45-0.66; a noise volume 0.05, a 4×4×4 volume -0.03, a head whose
            header's voxel size is 3 times too large 0.08 (ANTs does not recover the scale).
        affine_determinant: [low, high] determinant of the registration's affine (volume scaling; the demo:
            0.60-1.02).
        lv_ml: [low, high] lateral-ventricle volume (mL, native).
        brain_ml: [low, high] brain volume (mL, native).
        min_structure_voxels: fewest grid voxels for a structure the condition sets need to count as present.
    """

    min_fov_mm: float | None = 100.0
    min_voxels: int | None = 32768
    min_template_ncc: float | None = 0.25
    affine_determinant: tuple[float, float] | None = (0.4, 2.5)
    lv_ml: tuple[float, float] | None = (1.0, 250.0)
    brain_ml: tuple[float, float] | None = (600.0, 2200.0)
    min_structure_voxels: int | None = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> GateSettings:
        """Read ``cfg["data"]["gates"]`` of a validated config (which has checked that low <= high)."""
        out = cls(**section_values(cfg, SECTION, [f.name for f in fields(cls)]))
        for name in RANGES:
            value = getattr(out, name)
            if value is not None:
                setattr(out, name, (float(value[0]), float(value[1])))
        return out


def input_failures(shape: Sequence[int], zooms: Sequence[float], settings: GateSettings) -> list[Failure]:
    """The ``check_inputs`` gates of a native volume: field of view and voxel count.

    Args:
        shape: the volume's 3-D shape.
        zooms: its voxel size (mm) along each axis.
        settings: the thresholds.
    """
    out = []
    fov = [float(n) * float(z) for n, z in zip(shape[:3], zooms[:3], strict=True)]
    if settings.min_fov_mm is not None and min(fov) < settings.min_fov_mm:
        text = " × ".join(f"{f:g}" for f in fov)
        out.append(
            Failure(
                "field_of_view",
                f"field of view {text} mm, under data.gates.min_fov_mm = {settings.min_fov_mm:g} mm",
            )
        )
    voxels = int(np.prod(shape[:3]))
    if settings.min_voxels is not None and voxels < settings.min_voxels:
        out.append(
            Failure("voxel_count", f"{voxels} voxels, under data.gates.min_voxels = {settings.min_voxels}")
        )
    return out


def registration_failures(ncc: float, determinant: float, settings: GateSettings) -> list[Failure]:
    """The ``register`` gates: similarity to the template and the affine's volume scaling.

    Args:
        ncc: correlation of the registered T1 with the template inside the template's brain (NaN fails).
        determinant: |det| of the affine part of the template-to-native transform.
        settings: the thresholds.
    """
    out = []
    if settings.min_template_ncc is not None and not ncc >= settings.min_template_ncc:
        out.append(
            Failure(
                "template_similarity",
                f"correlation with the template {ncc:.3f}, under data.gates.min_template_ncc = "
                f"{settings.min_template_ncc:g}",
            )
        )
    low_high = settings.affine_determinant
    if low_high is not None and not low_high[0] <= determinant <= low_high[1]:
        out.append(
            Failure(
                "affine_determinant",
                f"affine determinant {determinant:.3g} (×{np.cbrt(determinant):.2f} per axis), outside "
                f"data.gates.affine_determinant [{low_high[0]:g}, {low_high[1]:g}]",
            )
        )
    return out


def required_structures(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """The structures the configured condition sets are made of, each as the FreeSurfer IDs that make it
    (``None``: the brain mask, every label but background and CSF).

    ``lv`` needs the lateral ventricles (``conditions.lv_labels``); ``brain`` and ``skull`` (the head outside
    the brain) a brain; ``semantics`` each of the paper's eight classes. Images (``lowres_*``, ``t2``) need none.
    """
    names = {name for groups in cfg["condition_sets"].values() for group in groups for name in group}
    out: dict[str, tuple[int, ...] | None] = {}
    if "lv" in names:
        out["lateral ventricles"] = tuple(int(i) for i in cfg["conditions"]["lv_labels"])
    if names & {"brain", "skull"}:
        out["brain"] = None
    if "semantics" in names:
        out.update({name.replace("_", " "): ids for name, ids in SEMANTIC_CLASSES.items()})
    return out


def segmentation_failures(
    volumes: Mapping[str, Any],
    labels: np.ndarray,
    structures: Mapping[str, Sequence[int] | None],
    settings: GateSettings,
) -> list[Failure]:
    """The ``segment`` gates: LV and brain volumes in range, and every needed structure present.

    Args:
        volumes: ``volumes.json`` of the segmentation (``lv_mm3``, ``brain_mm3``: native mm³).
        labels: the label map on the grid (FreeSurfer IDs).
        structures: the needed structures (:func:`required_structures`).
        settings: the thresholds.
    """
    out = []
    for gate, key, what in (("lv_volume", "lv_ml", "LV"), ("brain_volume", "brain_ml", "brain")):
        low_high = getattr(settings, key)
        ml = float(volumes[f"{what.lower()}_mm3"]) / 1000.0
        if low_high is not None and not low_high[0] <= ml <= low_high[1]:
            out.append(
                Failure(
                    gate,
                    f"{what} volume {ml:.1f} mL, outside data.gates.{key} [{low_high[0]:g}, {low_high[1]:g}]",
                )
            )
    if settings.min_structure_voxels is not None:
        missing = [
            name
            for name, ids in structures.items()
            if (brain_mask(labels) if ids is None else mask_of(labels, list(ids))).sum()
            < settings.min_structure_voxels
        ]
        if missing:
            out.append(
                Failure(
                    "structures",
                    f"missing {', '.join(missing)} (under data.gates.min_structure_voxels = "
                    f"{settings.min_structure_voxels} voxels on the grid), which the condition sets need",
                )
            )
    return out
