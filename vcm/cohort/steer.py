"""Steered anatomy: a source label map deformed so that its LV (and brain) volume reach a design target.

* **LV volume**: a smooth diffeomorphic ventricle expansion or shrinkage that pushes the surrounding tissue
  (:func:`vcm.anatomy.solve_ventricle_field`, MONAI's ``DVF2DDF`` scaling and squaring), solved on a box around
  the label map's own lateral ventricles (weights 1 on their voxels, ``conditions.lv_labels``) at the grid's
  spacing. Its one strength is bisected on what is kept: the LV voxel count of the nearest-neighbour warped
  label map (not the solver's default soft volume, which a coarse grid's rounding misses by up to 20 %).
* **brain volume**: the head is scaled about the brain's centre (a global scale of the whole label map and its
  images: the brain's shape is kept, the ventricles are steered after it).

Volumes follow the cohort's convention (:func:`vcm.cohort.sources.new_anatomy`): a label map on the template
grid stands for the source's native volumes, so a target in native mm³ becomes a voxel count by the source's
native volume per voxel, and the steered map's native volume is the source's times the counted ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from vcm.anatomy import SMOOTH_MM, solve_ventricle_field
from vcm.cohort.sources import warp  # the cohort's one resampler (nearest label here)
from vcm.labels import brain_mask, mask_of

__all__ = ["Steered", "steer_label", "ventricle_displacement"]

ITERATIONS = 16  # bisection steps of the field strength (resolution 50 / 2**16 voxels of peak velocity)
MARGIN_MM = 6 * SMOOTH_MM  # box margin around the ventricles: the potential is ~0 beyond it


@dataclass
class Steered:
    """A steered label map and the backward displacement (3, X, Y, Z) in voxels that made it from the input:
    a voxel ``p`` takes its content from ``p + displacement(p)`` (for the images beside the label map)."""

    label: np.ndarray
    displacement: np.ndarray


def scale_displacement(shape: Sequence[int], centre: np.ndarray, factor: float) -> np.ndarray:
    """The backward field of a scaling by ``factor`` about ``centre`` (voxels): ``p`` takes ``c + (p - c)/f``."""
    grid = np.indices(tuple(shape), dtype=np.float32)
    return ((grid - centre.reshape(3, 1, 1, 1)) * (1.0 / factor - 1.0)).astype(np.float32)


def ventricle_displacement(
    label: np.ndarray, lv_labels: Sequence[int], spacing_mm: float, target_voxels: float
) -> np.ndarray:
    """The backward displacement (voxels) that brings the label map's LV to ``target_voxels`` voxels.

    Returns:
        the field (zero outside a box of :data:`MARGIN_MM` around the ventricles); a target out of the
        solver's bracket gives the nearest volume it reaches.
    """
    lv = mask_of(label, tuple(lv_labels))
    if not lv.any():
        raise ValueError("no lateral-ventricle voxels to steer")
    margin = int(np.ceil(MARGIN_MM / spacing_mm))
    where = np.argwhere(lv)
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + margin + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    weights = lv[box].astype(np.float32)
    sub = label[box]
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])

    def count(ddf_voxels: np.ndarray) -> float:  # LV voxels of the nearest-neighbour warped label map
        return float(mask_of(warp(sub, ddf_voxels, 0), tuple(lv_labels)).sum())

    field = solve_ventricle_field(
        weights, weights, affine, target_voxels, iterations=ITERATIONS, volume_mm3=count
    )
    full = np.zeros((3, *label.shape), np.float32)
    full[(slice(None), *box)] = field.ddf_mm / spacing_mm
    return full


def steer_label(
    label: np.ndarray,
    lv_labels: Sequence[int],
    spacing_mm: float,
    lv_voxels: float | None = None,
    brain_voxels: float | None = None,
) -> Steered:
    """Deform a label map to a brain voxel count (a head scale) and then an LV voxel count (a ventricle push).

    Args:
        label: FreeSurfer label map on an isotropic grid.
        lv_labels: the lateral ventricles' labels.
        spacing_mm: the grid's voxel size.
        lv_voxels: the wanted LV voxel count (``None``: the LV is left as the scale makes it).
        brain_voxels: the wanted brain voxel count (``None``: no scaling).

    Returns:
        the steered label map and the composed backward displacement.
    """
    disp = np.zeros((3, *label.shape), np.float32)
    if brain_voxels is not None:
        brain = brain_mask(label)
        factor = float((brain_voxels / max(int(brain.sum()), 1)) ** (1 / 3))
        centre = np.asarray(ndi.center_of_mass(brain), np.float32)
        disp = scale_displacement(label.shape, centre, factor)
        label = warp(label, disp, 0)
    if lv_voxels is not None:
        d_lv = ventricle_displacement(label, lv_labels, spacing_mm, lv_voxels)
        label = warp(label, d_lv, 0)
        if brain_voxels is not None:  # p -> q = p + d_lv(p) -> q + d_scale(q), d_scale linear in q
            disp = d_lv + disp + d_lv * (1.0 / factor - 1.0)
        else:
            disp = d_lv
    return Steered(label, disp.astype(np.float32))
