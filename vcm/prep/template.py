"""The registration template and its label atlas, derived offline from nilearn's MNI152 2009a files.

nilearn's wheel ships the skull-stripped MNI152 2009a T1 with grey- and white-matter probability maps,
but no CSF or subcortical atlas. The atlas here is therefore derived, and approximate:

* tissue: CSF where P(GM) + P(WM) < 0.5 inside the brain mask; cortex (3/42) where GM > WM; white matter
  (2/41) elsewhere; left/right by the sign of the MNI x coordinate;
* lateral ventricles (4/43): the CSF components deeper than 10 mm from the brain surface inside a box
  around the ventricular system (|x| < 35, -50 < y < 35, -5 < z < 35 mm), keeping components > 1 cm^3;
  the midline slab of that CSF below z = 12 mm is the 3rd ventricle (14), CSF near the pons the 4th (15);
* subcortical structures (thalamus, caudate, putamen, pallidum, hippocampus, amygdala, accumbens,
  ventral DC, brain-stem) as ellipsoids at their standard MNI positions, cerebellum below the tentorium.

It serves the offline ``atlas`` segmentation backend and the demo cohort's ground truth; real studies
should use SynthSeg. A synthetic skull and scalp shell is added around the brain (see :func:`add_head`)
so that the skull condition exists and native-space heads can be registered to a head template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from vcm.io import save_nifti
from vcm.stage import stage_parser

# (label left, label right, centre |x|,y,z in MNI mm, radii mm, only on grey-matter voxels)
_STRUCTURES = [
    (10, 49, (11, -18, 7), (7, 12, 8), False),  # thalamus
    (11, 50, (13, 12, 10), (5, 10, 9), True),  # caudate
    (12, 51, (25, 3, 1), (6, 14, 8), True),  # putamen
    (13, 52, (19, -3, -1), (4, 7, 5), False),  # pallidum
    (28, 60, (11, -15, -9), (6, 7, 5), False),  # ventral DC
    (26, 58, (10, 11, -8), (4, 4, 4), False),  # accumbens
    (17, 53, (27, -22, -13), (7, 17, 7), True),  # hippocampus
    (18, 54, (23, -4, -19), (6, 7, 6), False),  # amygdala
]


@dataclass
class Template:
    """The template in MNI space: T1 head and brain, label atlas and brain mask (1 mm)."""

    t1_head: np.ndarray
    t1_brain: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


def load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (t1, gm, wm, brain mask, affine) of nilearn's MNI152 2009a at 1 mm."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0
    return t1.get_fdata(dtype=np.float32), gm, wm, mask, t1.affine


def world_grid(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape).astype(np.float32)


def derive_labels(gm: np.ndarray, wm: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Derive a FreeSurfer-ID label map from tissue maps (see the module docstring)."""
    x, y, z = world_grid(mask.shape, affine)
    right = x >= 0
    csf = mask & ((gm + wm) < 0.5)
    depth = ndi.distance_transform_edt(mask, sampling=np.abs(np.diag(affine)[:3]))

    labels = np.zeros(mask.shape, dtype=np.uint16)
    tissue = mask & ~csf
    cortex = tissue & (gm > wm)
    labels[tissue & ~cortex] = np.where(right, 41, 2)[tissue & ~cortex]
    labels[cortex] = np.where(right, 42, 3)[cortex]

    # Cerebellum: below the tentorium, behind the brain-stem.
    cereb = tissue & (y < -40) & (z < -15 - 0.3 * (y + 40))
    labels[cereb & cortex] = np.where(right, 47, 8)[cereb & cortex]
    labels[cereb & ~cortex] = np.where(right, 46, 7)[cereb & ~cortex]
    stem = tissue & (((x / 11) ** 2 + ((y + 27) / 13) ** 2 + ((z + 35) / 30) ** 2) <= 1)
    labels[stem] = 16

    for left_id, right_id, (cx, cy, cz), (rx, ry, rz), gm_only in _STRUCTURES:
        inside = (((np.abs(x) - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2) <= 1
        sel = (
            tissue & inside & (cortex | (labels == 2) | (labels == 41))
            if not gm_only
            else tissue & inside & cortex
        )
        labels[sel] = np.where(right, right_id, left_id)[sel]

    labels[csf] = 24
    box = (np.abs(x) < 35) & (y > -50) & (y < 35) & (z > -5) & (z < 35)
    comp, n = ndi.label(csf & (depth > 10) & box)
    if n:
        sizes = ndi.sum(np.ones_like(comp), comp, index=np.arange(1, n + 1))
        ventricles = np.isin(comp, 1 + np.flatnonzero(sizes > 1000))
        third = ventricles & (np.abs(x) < 3) & (z < 12)
        lateral = ventricles & ~third
        labels[lateral] = np.where(right, 43, 4)[lateral]
        labels[third] = 14
    fourth = csf & (np.abs(x) < 10) & (y > -60) & (y < -35) & (z > -45) & (z < -15)
    labels[fourth] = 15
    return labels


@dataclass(frozen=True)
class HeadShell:
    """Thicknesses (mm) and T1 intensities of the synthetic layers outside the brain."""

    csf_mm: float = 2.5
    inner_table_mm: float = 1.5
    diploe_mm: float = 2.5
    outer_table_mm: float = 1.5
    scalp_mm: float = 6.0
    csf: float = 0.12
    table: float = 0.05
    diploe: float = 0.45
    scalp: float = 0.75


def add_head(
    brain_t1: np.ndarray, brain: np.ndarray, spacing: np.ndarray, shell: HeadShell | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Wrap a skull-stripped T1 in CSF, skull (tables and diploe) and scalp layers.

    Returns:
        (head T1, head mask).
    """
    shell = shell or HeadShell()
    dist = ndi.distance_transform_edt(~brain, sampling=spacing)
    head = brain_t1.copy()
    edges = np.cumsum(
        [shell.csf_mm, shell.inner_table_mm, shell.diploe_mm, shell.outer_table_mm, shell.scalp_mm]
    )
    values = [shell.csf, shell.table, shell.diploe, shell.table, shell.scalp]
    lower = 0.0
    for upper, value in zip(edges, values, strict=True):
        layer = ~brain & (dist > lower) & (dist <= upper)
        head[layer] = value
        lower = upper
    outside_mask = dist <= edges[-1]
    head = np.where(brain, head, ndi.gaussian_filter(head, 0.6 / np.asarray(spacing)))
    return head.astype(np.float32), outside_mask


def build_template() -> Template:
    """Build the template and atlas from nilearn's files (deterministic, ~10 s)."""
    t1, gm, wm, mask, affine = load_mni152()
    labels = derive_labels(gm, wm, mask, affine)
    brain = labels > 0
    t1_brain = np.where(brain, t1, 0).astype(np.float32)
    head, _ = add_head(t1_brain, brain, np.abs(np.diag(affine)[:3]))
    return Template(head, t1_brain, labels, affine)


def write_template(out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    tpl = build_template()
    paths = {
        "t1_head": out / "t1_head.nii.gz",
        "t1_brain": out / "t1_brain.nii.gz",
        "labels": out / "labels.nii.gz",
    }
    save_nifti(paths["t1_head"], tpl.t1_head, tpl.affine, np.float32)
    save_nifti(paths["t1_brain"], tpl.t1_brain, tpl.affine, np.float32)
    save_nifti(paths["labels"], tpl.labels, tpl.affine, np.uint16)
    return paths


def cli(argv: list[str]) -> int:
    parser = stage_parser("template", __doc__, config=False)
    parser.add_argument("--out-dir", required=True, help="folder for t1_head, t1_brain and labels NIfTIs")
    args = parser.parse_args(argv)
    for name, path in write_template(args.out_dir).items():
        print(f"{name}: {path}")
    return 0
