"""Smooth, volume-targeted ventricle deformations: the anatomy that a covariate cannot give away.

A ventricle grows by pushing the tissue around it outwards, not by a global scale. Each ventricular region
(frontal, body and occipital part of each lateral ventricle, the third ventricle, the temporal horns) gets a
weight; the weighted region masks are smoothed into a potential whose negative gradient is a stationary
velocity field that pushes the ventricle walls outwards. Its exponential (scaling and squaring, MONAI's ``DVF2DDF``) is
a diffeomorphism, so large expansions and shrinkages never fold tissue. One scalar, the field's strength, is
solved by bisection so that the lateral ventricles reach a target volume.

Everything here works in a box around the ventricles on a regular grid; :meth:`VentricleField.displacement`
evaluates the result at any world point (zero outside the box).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.blocks import DVF2DDF, Warp
from scipy import ndimage as ndi

# How far (mm) the potential reaches beyond a ventricle wall: the band of tissue that is displaced.
SMOOTH_MM = 7.0
SQUARINGS = 7


@dataclass
class VentricleField:
    """A displacement field (mm, world axes) on a box grid around the ventricles.

    Attributes:
        ddf_mm: (3, X, Y, Z) backward displacement: a point ``p`` takes its content from ``p + ddf(p)``.
        affine: voxel-to-world affine of the box grid (axis-aligned, positive spacing).
        strength: the solved field strength (0 = identity).
        lv_mm3: the lateral-ventricle volume reached on the box grid.
    """

    ddf_mm: np.ndarray
    affine: np.ndarray
    strength: float
    lv_mm3: float

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """Interpolate the field at world points (3, N); zero outside the box."""
        inv = np.linalg.inv(self.affine)
        vox = inv[:3, :3] @ points + inv[:3, 3:4]
        return np.stack(
            [ndi.map_coordinates(c, vox, order=1, mode="constant", cval=0.0) for c in self.ddf_mm]
        )


def expansion_velocity(weights: np.ndarray, spacing_mm: float, smooth_mm: float = SMOOTH_MM) -> np.ndarray:
    """Unit-peak backward velocity (3, X, Y, Z) in voxels that expands a weighted ventricle map.

    A backward field says where each point takes its content from: pointing into the ventricles (up the
    smoothed potential), it makes the tissue around them take ventricle content, i.e. pushes the walls out.

    Args:
        weights: per-voxel expansion weight (0 outside the ventricles).
        spacing_mm: the grid's voxel size.
        smooth_mm: Gaussian width of the potential.
    """
    potential = ndi.gaussian_filter(weights.astype(np.float64), smooth_mm / spacing_mm)
    velocity = np.stack(np.gradient(potential))
    peak = float(np.sqrt((velocity**2).sum(0)).max())
    if peak == 0:
        raise ValueError("no ventricle voxels in the box: nothing to expand")
    return (velocity / peak).astype(np.float32)


class _Exponential:
    """exp(c * v) for a fixed velocity v, as voxel displacements, with the LV volume it gives."""

    def __init__(self, velocity: np.ndarray, lv: np.ndarray):
        self.v = torch.from_numpy(velocity)[None]
        self.lv = torch.from_numpy(lv.astype(np.float32))[None, None]
        with warnings.catch_warnings():  # "using PyTorch native grid_sample": the intended path
            warnings.simplefilter("ignore", UserWarning)
            self.exp = DVF2DDF(num_steps=SQUARINGS, mode="bilinear", padding_mode="border")
            self.warp = Warp(mode="bilinear", padding_mode="zeros")

    @torch.no_grad()
    def ddf(self, strength: float) -> torch.Tensor:
        return self.exp(self.v * strength)

    @torch.no_grad()
    def volume(self, strength: float) -> float:
        """LV volume in voxels (soft: the warped mask's partial volumes, smooth in ``strength``)."""
        return float(self.warp(self.lv, self.ddf(strength)).sum())


def solve_ventricle_field(
    weights: np.ndarray,
    lv: np.ndarray,
    affine: np.ndarray,
    target_mm3: float,
    max_strength: float = 40.0,
    iterations: int = 12,
    volume_mm3: Callable[[np.ndarray], float] | None = None,
) -> VentricleField:
    """Find the field strength whose deformation brings the lateral ventricles to ``target_mm3``.

    Args:
        weights: (X, Y, Z) expansion weights of the ventricular regions on the box grid.
        lv: (X, Y, Z) lateral-ventricle mask on the same grid.
        affine: the box grid's voxel-to-world affine (axis-aligned, isotropic).
        target_mm3: the wanted lateral-ventricle volume on this grid's anatomy.
        max_strength: bisection bracket [-max_strength / 4, max_strength] (voxels of peak velocity).
        iterations: bisection steps.
        volume_mm3: how to measure the LV volume of a backward displacement (3, X, Y, Z) in voxels of the
            box grid (e.g. the count of a nearest-neighbour warped label map); default the soft volume.

    Returns:
        The field; its ``lv_mm3`` says how close the target was reached (the bracket may not contain it).
    """
    spacing = float(abs(affine[0, 0]))
    voxel_mm3 = spacing**3
    velocity = expansion_velocity(weights, spacing)
    flow = _Exponential(velocity, lv)

    def volume(strength: float) -> float:
        if volume_mm3 is None:
            return flow.volume(strength) * voxel_mm3
        return volume_mm3(flow.ddf(strength)[0].numpy())

    low, high = -max_strength / 4, max_strength
    for _ in range(iterations):
        mid = (low + high) / 2
        if volume(mid) < target_mm3:
            low = mid
        else:
            high = mid
    strength = (low + high) / 2
    ddf = flow.ddf(strength)[0].numpy() * spacing  # voxel -> mm (axis-aligned, positive spacing)
    return VentricleField(ddf.astype(np.float32), affine, strength, volume(strength))


def lattice_displacement(
    rng: np.random.Generator,
    points: np.ndarray,
    lattice_mm: float,
    amplitude_mm: float,
    extent_mm: float = 240.0,
) -> np.ndarray:
    """A smooth random displacement (3, N) at world points: cubic splines through a coarse random lattice.

    The lattice is fixed in world space (centred on the origin), so the same draw gives the same field on any
    grid (a subject's native scan and its template-space render); its spacing sets the shortest wavelength
    (two lattice spacings). :func:`vcm.cohort.sources.smooth_displacement` is the cohort's voxel-grid field
    instead, scaled to a largest displacement.
    """
    n = int(np.ceil(extent_mm / lattice_mm)) + 1
    coeffs = rng.normal(0.0, amplitude_mm, size=(3, n, n, n))
    idx = (points + extent_mm / 2) / lattice_mm
    return np.stack([ndi.map_coordinates(c, idx, order=3, mode="nearest") for c in coeffs])
