"""The voxel grid every stage after registration works on (the backbone's input grid).

A grid is a shape, an isotropic spacing and a centre in template (MNI) world coordinates. Axes follow the
BrainLDM bundle's orientation (LAS: the first axis runs right-to-left, as its saver affine diag(-1, 1, 1)).
The bundle's saver origin (96.48, -141.48, -156.55) is not an MNI coordinate (it would put the brain
outside the field of view), so vcm centres the grid on the template brain instead and writes the true
template-space affine: every NIfTI it writes overlays the MNI template in any viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vcm.antspy import import_ants

# Centre of the MNI152 2009a brain mask's bounding box in x and y; z raised 5 mm so the skull above
# the vertex fits in the 160 mm field of view (brain spans z = -72..82 mm).
MNI_BRAIN_CENTER_MM = (0.0, -17.0, 10.0)

PRESETS: dict[str, dict[str, Any]] = {
    # BrainLDM: 160 x 224 x 160 at 1 mm, latent 20 x 28 x 20 (AE factor 8).
    "brainldm": {"shape": [160, 224, 160], "spacing_mm": 1.0},
    # Same field of view at 4 mm: the CPU demo (factor-4 AE, latent 10 x 14 x 10).
    "demo": {"shape": [40, 56, 40], "spacing_mm": 4.0},
}


@dataclass(frozen=True)
class Grid:
    """An isotropic LAS voxel grid.

    Args:
        shape: number of voxels along each axis.
        spacing_mm: voxel size in millimetres.
        center_mm: template world coordinate (RAS mm) of the grid's centre.
    """

    shape: tuple[int, int, int]
    spacing_mm: float
    center_mm: tuple[float, float, float] = MNI_BRAIN_CENTER_MM

    @classmethod
    def from_config(cls, spec: str | dict[str, Any]) -> Grid:
        """Build a grid from the config's ``grid`` value: a preset name or a mapping."""
        if isinstance(spec, str):
            spec = PRESETS[spec]
        center = tuple(float(c) for c in spec.get("center_mm", MNI_BRAIN_CENTER_MM))
        return cls(tuple(int(s) for s in spec["shape"]), float(spec["spacing_mm"]), center)  # type: ignore[arg-type]

    @classmethod
    def from_affine(cls, shape: tuple[int, ...] | list[int], affine: np.ndarray) -> Grid:
        """The grid of a volume of ``shape`` whose voxel-to-world affine is one of this class's (LAS)."""
        spacing = float(abs(affine[1, 1]))
        centre = affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2) + affine[:3, 3]
        return cls(tuple(int(s) for s in shape), spacing, tuple(float(c) for c in centre))  # type: ignore[arg-type]

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world (RAS mm) affine, LAS axis order."""
        s = self.spacing_mm
        aff = np.diag([-s, s, s, 1.0])
        half = (np.asarray(self.shape, dtype=float) - 1) / 2
        aff[:3, 3] = np.asarray(self.center_mm) - aff[:3, :3] @ half
        return aff

    @property
    def voxel_volume_mm3(self) -> float:
        return self.spacing_mm**3

    def world_coords(self) -> np.ndarray:
        """World coordinates (RAS mm) of every voxel, shape (3, *shape)."""
        idx = np.indices(self.shape, dtype=float).reshape(3, -1)
        return (self.affine[:3, :3] @ idx + self.affine[:3, 3:4]).reshape(3, *self.shape)

    def reference_image(self):  # -> ants.ANTsImage
        """An empty ANTs image on this grid (the 'fixed' space for resampling)."""
        import nibabel as nib

        ants = import_ants()

        return ants.from_nibabel_nifti(nib.Nifti1Image(np.zeros(self.shape, np.float32), self.affine))
