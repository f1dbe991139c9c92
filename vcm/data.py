"""Torch datasets over the project's HDF5 files, for whoever trains on the synthetic cohort.

* :class:`CohortDataset` reads a synthetic cohort (``results/cohorts/<set>/cohort.h5``);
* :class:`RealDataset` reads the prepared real subjects (``results/dataset.h5``), one split at a time.

Both are lazy: the constructor reads only the index (subject ids, QC flags, split); each item is read from
the file when asked for, and every process opens its own handle (an ``h5py.File`` must not cross a
``fork``: a :class:`~torch.utils.data.DataLoader` worker reopens the file on its first item). Items are
dicts that MONAI dictionary transforms accept::

    {"image": (1, D, H, W) float32, "label": (D, H, W) int64, "subject": str, "index": int,
     "covariates": (4,) float32, ...}

``label`` has no channel axis (it is a class map, as the brief of the contract asks); MONAI's spatial
transforms want one, so start a pipeline with ``EnsureChannelFirstd(keys="label", channel_dim="no_channel")``.

Example::

    from monai.transforms import Compose, EnsureChannelFirstd, RandFlipd
    ds = CohortDataset("results/cohorts/lv_brain_skull/cohort.h5", label_map="semantics",
                       transform=Compose([EnsureChannelFirstd("label", channel_dim="no_channel"),
                                          RandFlipd(["image", "label"], prob=0.5, spatial_axis=0)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, shuffle=True)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from vcm.cohort.store import open_cohort
from vcm.dataset_store import DatasetFile, open_dataset
from vcm.errors import StageError
from vcm.labels import FS_LABELS, LATERAL_VENTRICLES, SEMANTIC_CLASSES

__all__ = ["CohortDataset", "RealDataset", "label_lookup", "n_classes"]

LabelMap = str | Mapping[int, int] | None


def label_lookup(label_map: LabelMap, lv_labels: Sequence[int] = LATERAL_VENTRICLES) -> np.ndarray | None:
    """A lookup table FreeSurfer ID -> class for ``label_map``.

    Args:
        label_map: ``None`` or ``"fs"`` (keep the FreeSurfer IDs), ``"lv"`` (1 = lateral ventricles),
            ``"brain"`` (1 = brain: every label but background and CSF), ``"semantics"`` (the paper's 8
            classes, :data:`vcm.labels.SEMANTIC_CLASSES`, 1..8) or a mapping ``{fs_id: class}`` (unlisted IDs
            become 0).
        lv_labels: the FreeSurfer IDs of the LV mask (config ``conditions.lv_labels``).

    Returns:
        a uint8/int64 table indexed by FreeSurfer ID, or ``None`` for the identity.
    """
    if label_map is None or label_map == "fs":
        return None
    size = max(int(max(FS_LABELS)), *(int(i) for i in lv_labels)) + 1
    if isinstance(label_map, Mapping):
        size = max(size, *(int(k) + 1 for k in label_map))
    lut = np.zeros(size, dtype=np.int64)
    if label_map == "lv":
        lut[list(lv_labels)] = 1
    elif label_map == "brain":
        lut[[i for i in FS_LABELS if i not in (0, 24)]] = 1
    elif label_map == "semantics":
        for cls, ids in enumerate(SEMANTIC_CLASSES.values(), start=1):
            lut[list(ids)] = cls
    elif isinstance(label_map, Mapping):
        for fs_id, cls in label_map.items():
            lut[int(fs_id)] = int(cls)
    else:
        raise StageError(f"label_map: expected fs, lv, brain, semantics or a mapping, got {label_map!r}")
    return lut


def n_classes(label_map: LabelMap) -> int | None:
    """Foreground classes of a named ``label_map`` (``None`` for FreeSurfer IDs or a custom mapping)."""
    return (
        {"lv": 1, "brain": 1, "semantics": len(SEMANTIC_CLASSES)}.get(label_map)
        if isinstance(label_map, str)
        else None
    )


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class _H5Dataset(Dataset):
    """Shared lazy reading of ``/image``, ``/label``, ``/cond/*`` and ``/covariates`` rows of one HDF5 file.

    The rows and the layout they share are the contracts' (:mod:`vcm.cohort.store`, :mod:`vcm.dataset_store`);
    a subclass names the contract's opener as ``_open``.
    """

    _open: Callable[[Path], h5py.File]

    def __init__(
        self,
        path: str | Path,
        rows: np.ndarray,
        label_map: LabelMap,
        lv_labels: Sequence[int],
        conditions: Sequence[str],
        transform: Callable[[dict[str, Any]], Any] | None,
    ) -> None:
        self.path = Path(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.label_map = label_map
        self._lut = label_lookup(label_map, lv_labels)
        self.conditions = tuple(conditions)
        self.transform = transform
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    # --- file handle: one per process ------------------------------------------------------------------

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            # a handle inherited through fork is not safe to use: open a fresh one in this process
            self._h5 = type(self)._open(self.path)
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        """Close this process's file handle (reopened on the next item)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None  # spawn-started workers pickle the dataset
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass

    # --- items --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows)

    def map_labels(self, labels: np.ndarray) -> np.ndarray:
        """FreeSurfer IDs -> the configured classes (int64)."""
        labels = labels.astype(np.int64)
        if self._lut is None:
            return labels
        out = np.zeros_like(labels)
        known = labels < self._lut.size
        out[known] = self._lut[labels[known]]
        return out

    def _read(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} subjects")
        row = int(self.rows[i])
        h5 = self._file()
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.asarray(h5["image"][row], dtype=np.float32)),
            "label": torch.from_numpy(self.map_labels(h5["label"][row])),
            "subject": _strings(h5["subjects"][row : row + 1])[0],
            "index": row,
        }
        if "covariates" in h5:
            item["covariates"] = torch.from_numpy(np.asarray(h5["covariates"][row], dtype=np.float32))
        for name in self.conditions:
            item[f"cond_{name}"] = torch.from_numpy(np.asarray(h5[f"cond/{name}"][row], dtype=np.float32))
        return item

    def _finish(self, item: dict[str, Any]) -> Any:
        return self.transform(item) if self.transform is not None else item

    def __getitem__(self, i: int) -> Any:
        return self._finish(self._read(i))

    @staticmethod
    def _check(path: Path, h5: h5py.File, conditions: Sequence[str]) -> None:
        for key in ("subjects", "image", "label"):
            if key not in h5:
                raise StageError(f"{path}: no /{key} dataset")
        missing = [n for n in conditions if f"cond/{n}" not in h5]
        if missing:
            have = ", ".join(h5["cond"]) if "cond" in h5 else "none"
            raise StageError(f"{path}: no condition {missing[0]!r} (have: {have})")


class CohortDataset(_H5Dataset):
    """The synthetic subjects of a ``cohort.h5``, read lazily.

    Items: ``image`` (1, D, H, W) float32 in [0, 1]; ``label`` (D, H, W) int64, the label map that conditioned
    the sample, mapped by ``label_map``; ``subject``, ``index`` (row in the file), ``covariates`` (4,),
    ``seed``, ``source_subject``, ``new_anatomy``, ``qc_passed`` and ``cond_<name>`` (1, D, H, W) for each
    requested condition.

    Args:
        path: the cohort file.
        passed_only: keep only the subjects whose ``/qc/passed`` is true (files without ``/qc/passed``
            count as all passed).
        label_map: see :func:`label_lookup` (``None``: FreeSurfer IDs; ``"lv"``; ``"semantics"``; a mapping).
        lv_labels: FreeSurfer IDs of the LV (``label_map="lv"``).
        conditions: condition names to return as ``cond_<name>``.
        transform: applied to each item dict (e.g. a MONAI ``Compose`` of dictionary transforms).

    Raises:
        StageError: the file is missing or lacks the datasets asked for.
    """

    _open = staticmethod(open_cohort)

    def __init__(
        self,
        path: str | Path,
        passed_only: bool = True,
        label_map: LabelMap = None,
        lv_labels: Sequence[int] = LATERAL_VENTRICLES,
        conditions: Sequence[str] = (),
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        path = Path(path)
        with open_cohort(path) as h5:
            self._check(path, h5, conditions)
            n = len(h5["subjects"])
            passed = np.asarray(h5["qc/passed"][:], dtype=bool) if "qc/passed" in h5 else np.ones(n, bool)
            self.n_total, self.n_passed = n, int(passed.sum())
        rows = np.flatnonzero(passed) if passed_only else np.arange(n)
        super().__init__(path, rows, label_map, lv_labels, conditions, transform)
        self.passed_only = passed_only

    def __getitem__(self, i: int) -> Any:
        item = self._read(i)
        row, h5 = item["index"], self._file()
        if "seed" in h5:
            item["seed"] = int(h5["seed"][row])
        if "source_subject" in h5:
            item["source_subject"] = _strings(h5["source_subject"][row : row + 1])[0]
        if "new_anatomy" in h5:
            item["new_anatomy"] = bool(h5["new_anatomy"][row])
        item["qc_passed"] = bool(h5["qc/passed"][row]) if "qc/passed" in h5 else True
        return self._finish(item)


class RealDataset(_H5Dataset):
    """The real subjects of ``dataset.h5`` (one split), read lazily, with :class:`CohortDataset`'s items.

    Args:
        path: ``dataset.h5``.
        split: a split name (``val``, ``train_10``, ...), explicit row indices, or ``None`` for every subject.
        label_map, lv_labels, conditions, transform: as for :class:`CohortDataset`.

    Raises:
        StageError: the file or the split is missing.
    """

    _open = staticmethod(open_dataset)

    def __init__(
        self,
        path: str | Path,
        split: str | Sequence[int] | None = "val",
        label_map: LabelMap = None,
        lv_labels: Sequence[int] = LATERAL_VENTRICLES,
        conditions: Sequence[str] = (),
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        path = Path(path)
        with DatasetFile(path) as data:
            data.require("subjects", "label")
            data.require_conditions(conditions)
            if split is None:
                rows = np.arange(len(data))
            elif isinstance(split, str):
                rows = data.split(split)
            else:
                rows = np.asarray(split, dtype=np.int64)
        super().__init__(path, rows, label_map, lv_labels, conditions, transform)
        self.split = split
