"""FreeSurfer label IDs (as SynthSeg writes them) and the label groups the conditions are made of."""

from __future__ import annotations

import numpy as np

FS_LABELS: dict[int, str] = {
    0: "background",
    2: "left cerebral white matter",
    3: "left cerebral cortex",
    4: "left lateral ventricle",
    5: "left inferior lateral ventricle",
    7: "left cerebellum white matter",
    8: "left cerebellum cortex",
    10: "left thalamus",
    11: "left caudate",
    12: "left putamen",
    13: "left pallidum",
    14: "3rd ventricle",
    15: "4th ventricle",
    16: "brain-stem",
    17: "left hippocampus",
    18: "left amygdala",
    24: "CSF",
    26: "left accumbens area",
    28: "left ventral DC",
    41: "right cerebral white matter",
    42: "right cerebral cortex",
    43: "right lateral ventricle",
    44: "right inferior lateral ventricle",
    46: "right cerebellum white matter",
    47: "right cerebellum cortex",
    49: "right thalamus",
    50: "right caudate",
    51: "right putamen",
    52: "right pallidum",
    53: "right hippocampus",
    54: "right amygdala",
    58: "right accumbens area",
    60: "right ventral DC",
}

LATERAL_VENTRICLES = (4, 43)
NON_BRAIN = (0, 24)  # brain mask = every label except background and extra-cerebral CSF

# Paper appendix A.3: eight semantic classes (1..8; 0 is background).
SEMANTIC_CLASSES: dict[str, tuple[int, ...]] = {
    "csf": (24,),
    "white_matter": (2, 41, 7, 46, 28, 60),
    "grey_matter": (3, 42, 8, 47, 13, 52),
    "ventricles": (4, 43, 5, 44, 14, 15),
    "deep_grey_matter": (10, 49, 11, 50, 12, 51, 26, 58),
    "amygdala": (18, 54),
    "hippocampus": (17, 53),
    "brain_stem": (16,),
}


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0


def mask_of(labels: np.ndarray, ids: tuple[int, ...] | list[int]) -> np.ndarray:
    """Binary mask of the voxels whose label is one of ``ids``."""
    return np.isin(labels, np.asarray(ids, dtype=labels.dtype))


def brain_mask(labels: np.ndarray) -> np.ndarray:
    return (labels > 0) & ~mask_of(labels, NON_BRAIN)


def semantic_map(labels: np.ndarray) -> np.ndarray:
    """Map FreeSurfer IDs to the 8 semantic classes (uint8, 0 = background)."""
    lut = np.zeros(int(max(FS_LABELS)) + 1, dtype=np.uint8)
    for cls, ids in enumerate(SEMANTIC_CLASSES.values(), start=1):
        lut[list(ids)] = cls
    out = np.zeros(labels.shape, dtype=np.uint8)
    known = (labels >= 0) & (labels < lut.size)
    out[known] = lut[labels[known].astype(np.int64)]
    return out
