"""The backbone's training corpus: images, covariates and splits of an HDF5 in the ``dataset.h5`` layout.

Both stages draw their batches from it, so it is read once and held in memory (images as float16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vcm.errors import StageError

__all__ = ["FLIP_DIM", "Corpus", "load_corpus"]

FLIP_DIM = 2
"""Left-right axis of a (B, C, x, y, z) batch: axis 0 of the LAS image grid."""


@dataclass
class Corpus:
    """Images and covariates of the training HDF5, held in memory (float16 images)."""

    path: Path
    images: torch.Tensor  # (N, 1, *grid) float16
    covariates: torch.Tensor  # (N, 4) float32, scaled to [0, 1]
    train: np.ndarray
    val: np.ndarray
    labels: np.ndarray | None = None  # (N, *grid) label maps as stored, when the file has /label

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.images.shape[2:])


def load_corpus(path: str | Path, labels: bool = False) -> Corpus:
    """Read ``/image``, ``/covariates`` and the splits of a training HDF5 (and ``/label`` with ``labels``).

    ``/splits/train`` is used when present, otherwise every image not in ``/splits/val``; without
    ``/splits/val`` there is no held-out loss.

    Raises:
        StageError: the file is missing, unreadable or not in the ``dataset.h5`` layout.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise StageError(f"training data not found: {path}")
    try:
        with h5py.File(path, "r") as h5:
            for key in ("image", "covariates"):
                if key not in h5:
                    raise StageError(f"{path}: no /{key} dataset (expected the dataset.h5 layout)")
            images = torch.from_numpy(np.asarray(h5["image"][...], dtype=np.float16))
            covariates = torch.from_numpy(np.asarray(h5["covariates"][...], dtype=np.float32))
            label = np.asarray(h5["label"][...]) if labels and "label" in h5 else None
            splits = h5.get("splits", {})
            val = np.asarray(splits["val"][...], dtype=np.int64) if "val" in splits else np.zeros(0, np.int64)
            if "train" in splits:
                train = np.asarray(splits["train"][...], dtype=np.int64)
            else:
                train = np.setdiff1d(np.arange(images.shape[0]), val)
    except OSError as err:
        raise StageError(f"{path}: not a readable HDF5 file ({err})") from None
    _check_shapes(path, images, covariates, train, val)
    if label is not None and label.shape != (images.shape[0], *images.shape[2:]):
        raise StageError(f"{path}: /label must be {images.shape[0]}×{'×'.join(map(str, images.shape[2:]))}")
    return Corpus(path, images, covariates, np.sort(train), np.sort(val), label)


def _check_shapes(
    path: Path, images: torch.Tensor, covariates: torch.Tensor, train: np.ndarray, val: np.ndarray
) -> None:
    if images.dim() != 5 or images.shape[1] != 1:
        raise StageError(f"{path}: /image must be N×1×D×H×W, got {tuple(images.shape)}")
    if covariates.shape != (images.shape[0], 4):
        raise StageError(f"{path}: /covariates must be {images.shape[0]}×4, got {tuple(covariates.shape)}")
    if len(train) == 0:
        raise StageError(f"{path}: no training images")
    for name, idx in (("train", train), ("val", val)):
        if len(idx) and (idx.min() < 0 or idx.max() >= images.shape[0]):
            raise StageError(f"{path}: /splits/{name} indexes outside /image")
