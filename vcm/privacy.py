"""The privacy screen: is a synthetic subject a copy of a real training subject?

The memorisation check of the medical generative-model literature: for each synthetic subject, the real
subject of the model's training split (every subject of it) that its image is most similar to, and how that
similarity compares with the real-to-real baseline (each real training subject's nearest *other* real
training subject), the distribution a copy would stand out from.

* **Image similarity**: Pearson correlation of the intensities inside the *population brain mask*, the union
  of the brain masks of every real training subject, on the grid coarsened to about ``qc.privacy.spacing_mm``
  (block means). A fixed mask makes the correlation a dot product of standardised vectors: one matrix-vector
  product per sample, one matrix product for the baseline, whatever the number of real subjects.
* **Label Dice**: the mean Dice over the 8 semantic classes (:data:`vcm.labels.SEMANTIC_CLASSES`; the classes
  present in either map) between the synthetic subject's label map and each real one's, with the nearest
  subject by image and the largest over all real subjects. A subject made from a real source without a new
  anatomy has that source's label map, so a label Dice of 1 says where the conditions came from; the flag
  rests on the image alone.
* **Flag**: a sample whose nearest similarity exceeds ``qc.privacy.max_similarity`` (default 0.9) is a
  *possible copy*: it fails QC (reason ``possible copy of <subject>``) and is resampled from the next
  attempt's seed like any failed check. Measured on the demo (40×56×40 at 4 mm, 24 training subjects): the
  real-to-real nearest similarities are 0.71-0.81, the synthetic subjects' 0.67-0.84 (97 % nearest to their
  own condition source), and a perfectly memorised latent, a real image through the demo autoencoder,
  0.91-0.95 (a verbatim copy: 1). A threshold should sit above the baseline and below that autoencoder
  ceiling; the report draws all three.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vcm.config import section_values
from vcm.dataset_store import DatasetFile
from vcm.errors import StageError
from vcm.labels import SEMANTIC_CLASSES, brain_mask, semantic_map

__all__ = [
    "PRIVACY_FIELDS",
    "PrivacyBaseline",
    "PrivacyResult",
    "PrivacySettings",
    "RealSubjects",
    "coarsen_image",
    "coarsen_labels",
]

# the per-attempt fields of subject.json, /attempts and qc.csv, in qc.csv's order
PRIVACY_FIELDS = (
    "nearest_real",
    "nearest_index",
    "nearest_similarity",
    "nearest_label_dice",
    "max_label_dice",
    "possible_copy",
)
_N_CLASSES = len(SEMANTIC_CLASSES)


@dataclass
class PrivacySettings:
    """The validated config's ``qc.privacy`` section (the field defaults are the schema's).

    Args:
        enabled: screen every sample; ``False`` records nothing.
        max_similarity: a sample whose nearest real similarity exceeds this is a possible copy.
        spacing_mm: the similarities are computed on the grid coarsened by the integer factor closest to
            ``spacing_mm`` / the grid spacing (at least 1), which bounds the memory of the real subjects.
    """

    enabled: bool = True
    max_similarity: float = 0.9
    spacing_mm: float = 2.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PrivacySettings:
        out = cls(**section_values(cfg, "qc.privacy", set(cls.__dataclass_fields__)))
        if not 0 < float(out.max_similarity) <= 1:
            raise StageError(
                f"config key 'qc.privacy.max_similarity': expected (0, 1], got {out.max_similarity}"
            )
        return out

    def factor(self, grid_spacing_mm: float) -> int:
        """The coarsening factor of a grid of ``grid_spacing_mm`` voxels."""
        return max(1, int(round(float(self.spacing_mm) / float(grid_spacing_mm))))


@dataclass
class PrivacyResult:
    """The screen of one sample: its nearest real training subject and whether it is a possible copy."""

    nearest_real: str
    nearest_index: int
    nearest_similarity: float
    nearest_label_dice: float
    max_label_dice: float
    possible_copy: bool

    @property
    def reason(self) -> str:
        return f"possible copy of {self.nearest_real} (similarity {self.nearest_similarity:.3f})"

    def record(self) -> dict[str, Any]:
        """The fields of :data:`PRIVACY_FIELDS`, plain Python values."""
        return {name: getattr(self, name) for name in PRIVACY_FIELDS}


@dataclass
class PrivacyBaseline:
    """The real-to-real baseline: each real training subject's nearest other one and their similarity."""

    subjects: list[str]
    nearest_real: list[str]
    similarity: np.ndarray


# --- the comparison grid -----------------------------------------------------------------------------------


def coarsen_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Block means of ``factor``³ voxels (float32; a trailing partial block is dropped)."""
    image = np.asarray(image, np.float32)
    if factor == 1:
        return image
    shape = [s // factor for s in image.shape]
    crop = image[tuple(slice(0, s * factor) for s in shape)]
    return crop.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


def coarsen_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """The label of each block's centre voxel (nearest neighbour; the same blocks as :func:`coarsen_image`)."""
    if factor == 1:
        return np.asarray(labels)
    shape = [s // factor for s in labels.shape]
    return np.asarray(labels)[tuple(slice(factor // 2, s * factor, factor) for s in shape)]


def _standardise(values: np.ndarray) -> np.ndarray:
    """Rows of zero mean and unit variance (float32); a constant row stays zero."""
    values = np.asarray(values, np.float64)
    centred = values - values.mean(axis=-1, keepdims=True)
    scale = np.sqrt((centred**2).mean(axis=-1, keepdims=True))
    return (centred / np.where(scale > 0, scale, 1.0)).astype(np.float32)


# --- the real training subjects ----------------------------------------------------------------------------


class RealSubjects:
    """The real training subjects on the comparison grid: what every synthetic sample is screened against.

    Args:
        subjects: their ids.
        index: their rows in ``dataset.h5``.
        images: their coarsened images (N, *grid).
        labels: their coarsened FreeSurfer label maps (N, *grid).
        factor: the coarsening factor (applied to the synthetic subjects too).
    """

    def __init__(
        self,
        subjects: Sequence[str],
        index: Sequence[int],
        images: np.ndarray,
        labels: np.ndarray,
        factor: int,
    ) -> None:
        if len(subjects) == 0:
            raise StageError("no real training subjects to screen synthetic subjects against")
        self.subjects, self.index, self.factor = list(subjects), np.asarray(index, np.int64), int(factor)
        self.mask = np.stack([brain_mask(lab) for lab in labels]).any(axis=0)  # the population brain mask
        self.z = _standardise(np.asarray(images)[:, self.mask])  # (N, V)
        semantics = np.stack([semantic_map(lab) for lab in labels])
        self.support = (semantics > 0).any(axis=0)  # outside it, no real class to overlap
        self.semantics = semantics[:, self.support]
        self.class_sizes = np.stack(
            [(semantics == c).sum(axis=(1, 2, 3)) for c in range(1, _N_CLASSES + 1)], 1
        )

    @classmethod
    def from_dataset(
        cls, dataset: str | Path, index: Sequence[int], spacing_mm: float, grid_spacing_mm: float
    ) -> RealSubjects:
        """The real subjects ``index`` of ``dataset.h5`` (``/image``, ``/label``), read one at a time."""
        factor = PrivacySettings(spacing_mm=spacing_mm).factor(grid_spacing_mm)
        index = np.sort(np.asarray(index, dtype=np.int64))
        with DatasetFile(dataset) as h5:
            names = h5.subjects()
            images = np.stack([coarsen_image(h5.images([int(i)])[0, 0], factor) for i in index])
            labels = np.stack([coarsen_labels(h5.labels([int(i)])[0], factor) for i in index])
        return cls([names[int(i)] for i in index], index, images, labels, factor)

    def similarities(self, image: np.ndarray) -> np.ndarray:
        """Pearson correlation of ``image`` (full grid) with every real subject inside the population mask."""
        x = _standardise(coarsen_image(image, self.factor)[self.mask])
        return (self.z @ x).astype(np.float64) / max(1, x.size)

    def label_dices(self, labels: np.ndarray) -> np.ndarray:
        """Mean semantic-class Dice of a label map (full grid, FreeSurfer IDs) with every real subject (NaN
        where no class is present in either)."""
        sem = semantic_map(coarsen_labels(labels, self.factor))
        inside = sem[self.support]
        sizes = np.array([(sem == c).sum() for c in range(1, _N_CLASSES + 1)])
        overlap = np.stack(
            [((self.semantics == c) & (inside == c)[None]).sum(axis=1) for c in range(1, _N_CLASSES + 1)], 1
        )
        total = self.class_sizes + sizes[None]
        dice = np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), np.nan)
        present = (total > 0).sum(axis=1)
        return np.where(present > 0, np.nansum(dice, axis=1) / np.maximum(present, 1), np.nan)

    def screen(self, image: np.ndarray, label_dice: np.ndarray, max_similarity: float) -> PrivacyResult:
        """The nearest real subject of a sample by image similarity, given its label map's
        :meth:`label_dices`; a possible copy when the similarity exceeds ``max_similarity``."""
        sims = self.similarities(image)
        k = int(np.argmax(np.where(np.isfinite(sims), sims, -np.inf)))
        similarity = float(sims[k])
        finite = label_dice[np.isfinite(label_dice)]
        return PrivacyResult(
            nearest_real=self.subjects[k],
            nearest_index=int(self.index[k]),
            nearest_similarity=similarity,
            nearest_label_dice=float(label_dice[k]),
            max_label_dice=float(finite.max()) if finite.size else math.nan,
            possible_copy=bool(similarity > max_similarity),
        )

    def baseline(self) -> PrivacyBaseline:
        """Each real subject's nearest *other* real subject (self-matches excluded) and their similarity."""
        gram = (self.z @ self.z.T).astype(np.float64) / max(1, self.z.shape[1])
        np.fill_diagonal(gram, -np.inf)
        if len(self.subjects) < 2:
            return PrivacyBaseline(self.subjects, [""], np.full(1, np.nan))
        nearest = np.argmax(gram, axis=1)
        return PrivacyBaseline(
            self.subjects, [self.subjects[int(j)] for j in nearest], gram[np.arange(len(nearest)), nearest]
        )
