"""The training HDF5 (``dataset.h5``): every prepared subject's image, labels, conditions and covariates.

Layout (DESIGN.md): ``/subjects``, ``/image`` N x 1 x D x H x W, ``/label`` N x D x H x W (uint16 FreeSurfer
IDs), ``/cond/<name>`` N x 1 x D x H x W, ``/covariates`` N x 4 (scaled, BrainLDM order), ``/covariates_raw``,
``/splits/val`` and nested ``/splits/train_<n>`` (train_10 is a subset of train_20, ...). Chunked one
subject per chunk, gzip-compressed; provenance as file attributes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from vcm.config import dump_config
from vcm.errors import StageError
from vcm.grid import Grid
from vcm.io import atomic_path, load_nifti, provenance, read_json
from vcm.labels import SEMANTIC_CLASSES
from vcm.prep.conditions import COVARIATE_ORDER

IMAGE_CONDITIONS = ("skull", "t2")  # stored as images; the rest of the masks are integer maps
SECOND_IMAGE = "t2"  # a second modality of the same subject (paper: translation from another modality)


def uses_second_image(cfg: dict) -> bool:
    """Whether a condition set uses the second modality (then prep registers and stores it)."""
    return any(SECOND_IMAGE in group for groups in cfg["condition_sets"].values() for group in groups)


def condition_names(cfg: dict) -> list[str]:
    return [
        "lv",
        "brain",
        "semantics",
        "skull",
        *[f"lowres_{mm:g}mm" for mm in cfg["conditions"]["lowres_slice_mm"]],
        *([SECOND_IMAGE] if uses_second_image(cfg) else []),
    ]


def make_splits(subjects: list[str], sizes: list[int], val_size: int, seed: int) -> dict[str, np.ndarray]:
    """A validation split and nested training subsets (indices into ``subjects``), seeded.

    Raises:
        StageError: when the subjects cannot fill the validation split and the largest training size.
    """
    n = len(subjects)
    need = val_size + max(sizes)
    if need > n:
        raise StageError(
            f"config keys 'dataset.val_size' + max('training.sizes') need {need} subjects, but {n} passed preparation"
        )
    order = np.random.default_rng(seed).permutation(n)
    splits = {"val": np.sort(order[:val_size])}
    rest = order[val_size:]
    for size in sorted(set(sizes)):
        splits[f"train_{size}"] = np.sort(rest[:size])
    return splits


def build_dataset(cfg: dict, subjects_csv: str | Path, prep_dir: str | Path, out: str | Path) -> Path:
    """Gather the prepared subjects listed in ``subjects_csv`` into one HDF5 at ``out`` (atomically)."""
    grid = Grid.from_config(cfg["grid"])
    table = pd.read_csv(subjects_csv, dtype={"subject": str})
    subjects = list(table["subject"])
    splits = make_splits(
        subjects, cfg["training"]["sizes"], cfg["dataset"]["val_size"], cfg["dataset"]["seed"]
    )
    names = condition_names(cfg)
    n, shape = len(subjects), grid.shape
    img_dtype = np.dtype(cfg["dataset"]["image_dtype"])
    chunk = (1, 1, *shape)
    prep = Path(prep_dir)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        kw = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        h5.create_dataset("subjects", data=np.array(subjects, dtype=object), dtype=h5py.string_dtype())
        image = h5.create_dataset("image", (n, 1, *shape), dtype=img_dtype, chunks=chunk, **kw)
        label = h5.create_dataset("label", (n, *shape), dtype=np.uint16, chunks=(1, *shape), **kw)
        conds = {
            name: h5.create_dataset(
                f"cond/{name}",
                (n, 1, *shape),
                dtype=np.uint8 if name in ("lv", "brain", "semantics") else img_dtype,
                chunks=chunk,
                **kw,
            )
            for name in names
        }
        cov = np.zeros((n, 4), np.float32)
        cov_raw = np.zeros((n, 4), np.float64)
        for i, sid in enumerate(tqdm(subjects, desc="dataset.h5", unit="subject")):
            sdir = prep / sid
            image[i, 0] = load_nifti(sdir / "t1.nii.gz")[0].astype(img_dtype)
            label[i] = load_nifti(sdir / "labels.nii.gz", np.int32)[0].astype(np.uint16)
            for name in names:
                conds[name][i, 0] = load_nifti(sdir / "conditions" / f"{name}.nii.gz")[0].astype(
                    conds[name].dtype
                )
            info = read_json(sdir / "conditions" / "covariates.json")
            cov[i] = info["scaled"]
            cov_raw[i] = [info["raw"][k] for k in COVARIATE_ORDER]
        h5.create_dataset("covariates", data=cov)
        h5.create_dataset("covariates_raw", data=cov_raw)
        h5["covariates"].attrs["order"] = list(COVARIATE_ORDER)
        h5["covariates_raw"].attrs["units"] = ["0=F,1=M", "years", "mm3", "mm3"]
        for name, idx in splits.items():
            h5.create_dataset(f"splits/{name}", data=idx.astype(np.int64))
        h5["cond/semantics"].attrs["classes"] = ["background", *SEMANTIC_CLASSES]
        h5.attrs["grid_affine"] = grid.affine
        h5.attrs["grid_shape"] = list(shape)
        h5.attrs["grid_spacing_mm"] = grid.spacing_mm
        for key, value in provenance(dump_config(cfg), n_subjects=n).items():
            h5.attrs[key] = value
    return Path(out)


def cli(argv: list[str]) -> int:
    from vcm.config import load_config

    parser = argparse.ArgumentParser(prog="python -m vcm dataset", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--subjects", required=True, help="CSV of the subjects to include (check-inputs output)"
    )
    parser.add_argument(
        "--prep-dir", required=True, help="folder holding <subject>/t1.nii.gz, labels, conditions/"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    path = build_dataset(cfg, args.subjects, args.prep_dir, args.out)
    with h5py.File(path) as h5:
        splits = ", ".join(f"{k} ({len(v)})" for k, v in h5["splits"].items())
        print(f"{path}: {len(h5['subjects'])} subjects, image {h5['image'].shape}, splits: {splits}")
    return 0
