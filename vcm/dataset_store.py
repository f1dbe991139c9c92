"""The training HDF5 ``dataset.h5``: its layout, its writer and its readers.

The one module that opens ``dataset.h5``. :func:`vcm.dataset.build_dataset` gathers the prepared subjects
and writes them through :func:`create_dataset`; every consumer reads through :class:`DatasetFile` (typed
readers, one clear :class:`~vcm.errors.StageError` for a missing or foreign file) or, where a lazy per-process
handle is needed (:class:`vcm.data.RealDataset`), through :func:`open_dataset`.

Layout (docs/architecture.md, "HDF5 contract")::

    /subjects          N subject ids (strings)
    /image             N x 1 x D x H x W   float16 or float32 (``dataset.image_dtype``)
    /label             N x D x H x W       uint16 FreeSurfer IDs
    /cond/<name>       N x 1 x D x H x W   uint8 masks and class maps (lv, brain, semantics), images as /image;
                                           ``/cond/semantics`` has the attribute ``classes`` (background first)
    /covariates        N x 4 float32, scaled, in BrainLDM's order (attribute ``order``)
    /covariates_raw    N x 4 float64 (0=F,1=M, years, mm3, mm3; attribute ``units``)
    /splits/val        sorted row indices; nested /splits/train_<n> (train_10 is a subset of train_20, ...)
    attrs              grid_affine, grid_shape, grid_spacing_mm and the provenance (resolved config and its
                       sha256, versions, git sha, host, SLURM ids)

Volumes are chunked one subject per chunk, gzip 4 + shuffle. Row arguments of the readers follow h5py: an
``int`` reads one subject (no leading axis), a sorted sequence of rows reads those subjects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vcm.errors import StageError
from vcm.grid import Grid
from vcm.io import atomic_path
from vcm.labels import SEMANTIC_CLASSES

__all__ = ["DEFAULT_SEMANTIC_CLASSES", "DatasetFile", "DatasetWriter", "create_dataset", "open_dataset"]

Rows = int | Sequence[int] | np.ndarray

DEFAULT_SEMANTIC_CLASSES = len(SEMANTIC_CLASSES)
"""Foreground classes of ``/cond/semantics`` in a file that does not list them (the paper's 8)."""

_REQUIRED = ("image",)  # what makes a dataset.h5; readers check the rest of what they read (require)
_MASK_CONDITIONS = ("lv", "brain", "semantics")  # uint8; the other conditions are images
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


# --- readers -----------------------------------------------------------------------------------------------


def open_dataset(path: str | Path) -> h5py.File:
    """Open a ``dataset.h5`` read-only; the caller closes it (prefer :class:`DatasetFile`).

    Raises:
        StageError: the file is missing, is not HDF5, or has no ``/image``.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"dataset not found: {path}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise StageError(f"{path}: not an HDF5 file ({err})") from None
    for key in _REQUIRED:
        if key not in h5:
            h5.close()
            raise StageError(f"{path}: no /{key} dataset (not a dataset.h5; rebuild it)")
    return h5


class DatasetFile:
    """Read access to one ``dataset.h5`` (a context manager; arrays come back in their stored dtypes).

    Args:
        path: the file.

    Raises:
        StageError: see :func:`open_dataset`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.h5 = open_dataset(self.path)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> DatasetFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """Subjects (rows) in the file."""
        return int(self.h5["image"].shape[0])

    def require(self, *keys: str) -> None:
        """Check that the datasets ``keys`` (``subjects``, ``label``, ``cond``, ``covariates``, ...) are stored.

        Raises:
            StageError: the first missing one.
        """
        for key in keys:
            if key not in self.h5:
                raise StageError(f"{self.path}: no /{key} dataset (rebuild dataset.h5)")

    # --- index ---------------------------------------------------------------------------------------------

    def subjects(self, rows: Rows | None = None) -> list[str]:
        """Subject ids of ``rows`` (``None``: every subject, in file order)."""
        if rows is None:
            return _strings(self.h5["subjects"][:])
        if isinstance(rows, (int, np.integer)):
            return _strings(self.h5["subjects"][int(rows) : int(rows) + 1])
        return _strings(self.h5["subjects"][rows])

    def split_names(self) -> list[str]:
        """The stored splits, sorted (``val``, ``train_10``, ...)."""
        return sorted(self.h5["splits"]) if "splits" in self.h5 else []

    def split_sizes(self) -> dict[str, int]:
        """Subjects per split."""
        return {name: len(self.h5[f"splits/{name}"]) for name in self.split_names()}

    def has_split(self, name: str) -> bool:
        return f"splits/{name}" in self.h5

    def split(self, name: str) -> np.ndarray:
        """The sorted rows (int64) of split ``name``.

        Raises:
            StageError: no such split (the message lists the stored ones).
        """
        if not self.has_split(name):
            raise StageError(
                f"{self.path}: no split '{name}' (have: {', '.join(self.split_names()) or 'none'})"
            )
        return np.sort(np.asarray(self.h5[f"splits/{name}"][:], dtype=np.int64))

    # --- grid ----------------------------------------------------------------------------------------------

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """(D, H, W) of the volumes."""
        return tuple(int(s) for s in self.h5["image"].shape[2:])

    @property
    def has_affine(self) -> bool:
        return "grid_affine" in self.h5.attrs

    @property
    def affine(self) -> np.ndarray:
        """The grid's 4 x 4 voxel-to-world affine (float).

        Raises:
            StageError: the file has no ``grid_affine`` attribute.
        """
        if not self.has_affine:
            raise StageError(f"{self.path}: no grid_affine attribute (rebuild dataset.h5)")
        return np.asarray(self.h5.attrs["grid_affine"], dtype=float)

    @property
    def spacing_mm(self) -> float | None:
        """The grid's voxel size as recorded (``grid_spacing_mm``), or ``None``."""
        spacing = self.h5.attrs.get("grid_spacing_mm")
        return None if spacing is None else float(spacing)

    @property
    def config_sha256(self) -> str:
        """The digest of the config the file was built with (which build of the dataset; ``""`` if absent)."""
        return str(self.h5.attrs.get("config_sha256", ""))

    # --- volumes -------------------------------------------------------------------------------------------

    @property
    def image_dtype(self) -> np.dtype:
        return self.h5["image"].dtype

    @property
    def lazy_images(self) -> h5py.Dataset:
        """``/image`` itself, N x 1 x D x H x W, for a reader that goes batch by batch (the encoder)."""
        return self.h5["image"]

    def images(self, rows: Rows) -> np.ndarray:
        """``/image`` rows: (n, 1, *grid), or (1, *grid) for one row."""
        return np.asarray(self.h5["image"][rows])

    def labels(self, rows: Rows) -> np.ndarray:
        """``/label`` rows (uint16 FreeSurfer IDs): (n, *grid), or (*grid) for one row."""
        return np.asarray(self.h5["label"][rows])

    def condition_names(self) -> list[str]:
        """The stored conditions, sorted."""
        return sorted(self.h5["cond"]) if "cond" in self.h5 else []

    def has_condition(self, name: str) -> bool:
        return f"cond/{name}" in self.h5

    def require_conditions(self, names: Sequence[str], needed_by: str | None = None) -> None:
        """Check that every condition of ``names`` is stored.

        Raises:
            StageError: the first missing one (and what needs it, when given), with the stored ones.
        """
        missing = [n for n in names if not self.has_condition(n)]
        if missing:
            what = f" for {needed_by}" if needed_by else ""
            have = ", ".join(self.condition_names()) or "none"
            raise StageError(f"{self.path}: no condition {missing[0]!r}{what} (have: {have})")

    def condition_dtype(self, name: str) -> np.dtype:
        return self.h5[f"cond/{name}"].dtype

    def conditions(self, name: str, rows: Rows) -> np.ndarray:
        """``/cond/<name>`` rows: (n, 1, *grid), or (1, *grid) for one row."""
        return np.asarray(self.h5[f"cond/{name}"][rows])

    def semantic_classes(self) -> list[str] | None:
        """The class names of ``/cond/semantics`` (background first), or ``None`` when not recorded."""
        classes = self.h5["cond/semantics"].attrs.get("classes") if self.has_condition("semantics") else None
        return None if classes is None else _strings(classes)

    @property
    def n_semantic(self) -> int:
        """Foreground classes of ``/cond/semantics`` (its one-hot channels; background is left out)."""
        classes = self.semantic_classes()
        return len(classes) - 1 if classes is not None else DEFAULT_SEMANTIC_CLASSES

    # --- covariates ----------------------------------------------------------------------------------------

    def covariates(self, rows: Rows) -> np.ndarray:
        """Scaled covariates (float32), (n, 4) or (4,) for one row."""
        return np.asarray(self.h5["covariates"][rows], dtype=np.float32)

    @property
    def has_raw_covariates(self) -> bool:
        return "covariates_raw" in self.h5

    def covariates_raw(self, rows: Rows) -> np.ndarray:
        """Raw covariates (float64: 0/1, years, mm³, mm³), (n, 4) or (4,) for one row."""
        return np.asarray(self.h5["covariates_raw"][rows], dtype=np.float64)


# --- writer ------------------------------------------------------------------------------------------------


class DatasetWriter:
    """Fills a new ``dataset.h5`` subject by subject (from :func:`create_dataset`).

    Args:
        h5: the file, open for writing.
        subjects: the subject ids, in row order.
        conditions: the condition names to store.
        shape: the grid (D, H, W).
        image_dtype: the dtype of ``/image`` and of the image conditions.
    """

    def __init__(
        self,
        h5: h5py.File,
        subjects: Sequence[str],
        conditions: Sequence[str],
        shape: Sequence[int],
        image_dtype: np.dtype | str,
    ) -> None:
        n, shape, image_dtype = len(subjects), tuple(int(s) for s in shape), np.dtype(image_dtype)
        chunk = (1, 1, *shape)
        self.h5 = h5
        h5.create_dataset("subjects", data=np.array(list(subjects), dtype=object), dtype=h5py.string_dtype())
        self.image = h5.create_dataset(
            "image", (n, 1, *shape), dtype=image_dtype, chunks=chunk, **_COMPRESSION
        )
        self.label = h5.create_dataset(
            "label", (n, *shape), dtype=np.uint16, chunks=(1, *shape), **_COMPRESSION
        )
        self.conditions = {
            name: h5.create_dataset(
                f"cond/{name}",
                (n, 1, *shape),
                dtype=np.uint8 if name in _MASK_CONDITIONS else image_dtype,
                chunks=chunk,
                **_COMPRESSION,
            )
            for name in conditions
        }
        self.covariates = np.zeros((n, 4), np.float32)
        self.covariates_raw = np.zeros((n, 4), np.float64)

    def put_subject(
        self,
        row: int,
        image: np.ndarray,
        label: np.ndarray,
        conditions: Mapping[str, np.ndarray],
        covariates: Sequence[float],
        covariates_raw: Sequence[float],
    ) -> None:
        """Store subject ``row``: volumes on the grid (cast to the stored dtypes), scaled and raw covariates."""
        self.image[row, 0] = np.asarray(image).astype(self.image.dtype)
        self.label[row] = np.asarray(label).astype(np.uint16)
        for name, ds in self.conditions.items():
            ds[row, 0] = np.asarray(conditions[name]).astype(ds.dtype)
        self.covariates[row] = covariates
        self.covariates_raw[row] = covariates_raw

    def finish(self, splits: Mapping[str, np.ndarray], grid: Grid, attrs: Mapping[str, Any]) -> None:
        """Write the covariates, the splits, the grid and the provenance ``attrs``."""
        from vcm.prep.conditions import COVARIATE_ORDER

        h5 = self.h5
        h5.create_dataset("covariates", data=self.covariates)
        h5.create_dataset("covariates_raw", data=self.covariates_raw)
        h5["covariates"].attrs["order"] = list(COVARIATE_ORDER)
        h5["covariates_raw"].attrs["units"] = ["0=F,1=M", "years", "mm3", "mm3"]
        for name, idx in splits.items():
            h5.create_dataset(f"splits/{name}", data=np.asarray(idx).astype(np.int64))
        if "semantics" in self.conditions:
            h5["cond/semantics"].attrs["classes"] = ["background", *SEMANTIC_CLASSES]
        h5.attrs["grid_affine"] = grid.affine
        h5.attrs["grid_shape"] = list(grid.shape)
        h5.attrs["grid_spacing_mm"] = grid.spacing_mm
        for key, value in attrs.items():
            h5.attrs[key] = value


@contextmanager
def create_dataset(
    out: str | Path,
    subjects: Sequence[str],
    conditions: Sequence[str],
    shape: Sequence[int],
    image_dtype: np.dtype | str,
) -> Iterator[DatasetWriter]:
    """A :class:`DatasetWriter` on a temporary file that becomes ``out`` when the block ends without error."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        yield DatasetWriter(h5, subjects, conditions, shape, image_dtype)
