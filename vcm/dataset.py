"""The training HDF5 (``dataset.h5``): every prepared subject's image, labels, conditions and covariates.

Only subjects that passed every gate of preparation go in (``passed.csv``, :mod:`vcm.prep.exclusion`).

The ``dataset`` stage: the seeded validation split and nested training subsets (``/splits/val``,
``/splits/train_<n>``), and the gathering of the prepared subjects' NIfTIs. The file's layout, writer and
readers live in :mod:`vcm.dataset_store`; which conditions a config stores, in :mod:`vcm.condition_names`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vcm.condition_names import condition_names
from vcm.config import dump_config
from vcm.dataset_store import DatasetFile, create_dataset
from vcm.errors import StageError
from vcm.grid import Grid
from vcm.io import load_nifti, provenance, read_json
from vcm.prep.conditions import COVARIATE_ORDER
from vcm.prep.exclusion import require_passed
from vcm.stage import stage_parser

__all__ = ["build_dataset", "cli", "make_splits"]

IMAGE_CONDITIONS = ("skull", "t2")  # stored as images; the rest of the masks are integer maps


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
    """Gather the prepared subjects listed in ``subjects_csv`` into one HDF5 at ``out`` (atomically).

    Raises:
        StageError: a listed subject's preparation recorded an exclusion (:mod:`vcm.prep.exclusion`): its
            folder holds placeholders, not data.
    """
    grid = Grid.from_config(cfg["grid"])
    table = pd.read_csv(subjects_csv, dtype={"subject": str})
    subjects = list(table["subject"])
    for sid in subjects:
        require_passed(prep_dir, sid)
    splits = make_splits(
        subjects, cfg["training"]["sizes"], cfg["dataset"]["val_size"], cfg["dataset"]["seed"]
    )
    names = condition_names(cfg)
    prep = Path(prep_dir)
    with create_dataset(out, subjects, names, grid.shape, cfg["dataset"]["image_dtype"]) as writer:
        for i, sid in enumerate(tqdm(subjects, desc="dataset.h5", unit="subject")):
            sdir = prep / sid
            info = read_json(sdir / "conditions" / "covariates.json")
            writer.put_subject(
                i,
                image=load_nifti(sdir / "t1.nii.gz")[0],
                label=load_nifti(sdir / "labels.nii.gz", np.int32)[0],
                conditions={n: load_nifti(sdir / "conditions" / f"{n}.nii.gz")[0] for n in names},
                covariates=info["scaled"],
                covariates_raw=[info["raw"][k] for k in COVARIATE_ORDER],
            )
        writer.finish(splits, grid, provenance(dump_config(cfg), n_subjects=len(subjects)))
    return Path(out)


def cli(argv: list[str]) -> int:
    """``python -m vcm dataset``: gather the prepared subjects into ``dataset.h5``."""
    from vcm.config import load_config

    parser = stage_parser("dataset", __doc__)
    parser.add_argument(
        "--subjects", required=True, help="CSV of the subjects to include (subject-gates' passed.csv)"
    )
    parser.add_argument(
        "--prep-dir", required=True, help="folder holding <subject>/t1.nii.gz, labels, conditions/"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    path = build_dataset(cfg, args.subjects, args.prep_dir, args.out)
    with DatasetFile(path) as data:
        splits = ", ".join(f"{k} ({v})" for k, v in data.split_sizes().items())
        print(f"{path}: {len(data)} subjects, image {(len(data), 1, *data.grid_shape)}, splits: {splits}")
    return 0
