"""Datasets over cohort.h5 and dataset.h5 (vcm.data): laziness, filters, label maps, MONAI transforms.

The helpers here write a tiny ``cohort.h5`` (the contract's layout) and a tiny ``dataset.h5`` whose images
show their labels plainly (an easy segmentation task); tests/test_tstr.py and tests/test_report.py reuse them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from vcm.cli import StageError
from vcm.data import CohortDataset, RealDataset, label_lookup, n_classes
from vcm.grid import Grid

GRID = (16, 16, 16)
SEMANTIC_NAMES = [
    "background",
    "csf",
    "white_matter",
    "grey_matter",
    "ventricles",
    "deep_grey_matter",
    "amygdala",
    "hippocampus",
    "brain_stem",
]


def phantom(rng: np.random.Generator, grid=GRID) -> tuple[np.ndarray, np.ndarray]:
    """An image whose structures are visible: a brain (WM 2/41, cortex rim 3/42), two dark LVs (4, 43) at a
    random offset and size, CSF 24 between brain and a bright skull, background 0."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in grid], indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    labels = np.zeros(grid, np.uint16)
    labels[r < 0.85] = 24
    labels[r < 0.75] = 3
    labels[(r < 0.75) & (x < 0)] = 42
    labels[r < 0.6] = 2
    labels[(r < 0.6) & (x < 0)] = 41
    c = rng.uniform(-0.1, 0.1, 3)
    size = rng.uniform(0.18, 0.26)
    for side, fs in ((1, 4), (-1, 43)):
        blob = (
            (x - side * 0.28 - c[0]) ** 2 / size**2
            + (y - c[1]) ** 2 / (1.6 * size) ** 2
            + (z - c[2]) ** 2 / size**2
        ) < 1
        labels[blob] = fs
    intensity = {0: 0.0, 24: 0.15, 3: 0.55, 42: 0.55, 2: 0.8, 41: 0.8, 4: 0.1, 43: 0.1}
    image = np.vectorize(intensity.get, otypes=[np.float32])(labels)
    image[(r >= 0.85) & (r < 0.95)] = 0.9  # skull
    image = np.clip(image + 0.03 * rng.standard_normal(grid), 0, 1).astype(np.float32)
    return image, labels


def make_real(path: Path, n: int = 8, seed: int = 0) -> Path:
    """A ``dataset.h5`` (contract layout) of :func:`phantom` subjects; splits train_2, train_4 (nested) and val
    (subjects 6, 7 of 8)."""
    from vcm.labels import mask_of, semantic_map

    rng = np.random.default_rng(seed)
    images, labels = zip(*[phantom(rng) for _ in range(n)], strict=True)
    labels = np.stack(labels)
    grid = Grid(GRID, 10.0)
    with h5py.File(path, "w") as h5:
        h5["subjects"] = np.array([f"sub-{i:02d}" for i in range(n)], dtype=object)
        h5["image"] = np.stack(images)[:, None].astype(np.float16)
        h5["label"] = labels
        h5["cond/lv"] = mask_of(labels, (4, 43))[:, None].astype(np.uint8)
        h5["cond/semantics"] = semantic_map(labels)[:, None]
        h5["cond/semantics"].attrs["classes"] = SEMANTIC_NAMES
        h5["covariates"] = rng.random((n, 4)).astype(np.float32)
        h5["splits/train_2"] = np.array([0, 1])
        h5["splits/train_4"] = np.array([0, 1, 2, 3])
        h5["splits/val"] = np.array([n - 2, n - 1])
        h5.attrs["grid_affine"] = grid.affine
    return path


def make_cohort(folder: Path, n: int = 6, seed: int = 1, failed: tuple[int, ...] = (1, 4)) -> Path:
    """A ``cohort.h5`` with the contract's layout (plus ``manifest.csv`` and ``qc.csv`` beside it); the
    subjects in ``failed`` did not pass QC."""
    from vcm.labels import mask_of

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, labels = zip(*[phantom(rng) for _ in range(n)], strict=True)
    labels = np.stack(labels)
    passed = np.array([i not in failed for i in range(n)])
    dice = np.where(passed, rng.uniform(0.75, 0.95, n), rng.uniform(0.3, 0.6, n))
    subjects = [f"syn-{i:05d}" for i in range(n)]
    path = folder / "cohort.h5"
    with h5py.File(path, "w") as h5:
        h5["subjects"] = np.array(subjects, dtype=object)
        h5["image"] = np.stack(images)[:, None].astype(np.float16)
        h5["label"] = labels
        h5["cond/lv"] = mask_of(labels, (4, 43))[:, None].astype(np.float16)
        h5["covariates"] = rng.random((n, 4)).astype(np.float32)
        h5["seed"] = np.arange(n, dtype=np.int64) + 1000
        h5["source_subject"] = np.array([f"sub-{i % 3:02d}" for i in range(n)], dtype=object)
        h5["new_anatomy"] = np.arange(n) % 2 == 1
        h5["qc/dice"] = dice
        h5["qc/hd95"] = rng.uniform(2, 12, n)
        h5["qc/assd"] = rng.uniform(0.5, 3, n)
        h5["qc/passed"] = passed
        h5["qc/attempts"] = np.where(passed, 1, 3)
        h5.attrs["grid_affine"] = Grid(GRID, 10.0).affine
    table = pd.DataFrame({"subject": subjects, "source_subject": [f"sub-{i % 3:02d}" for i in range(n)]})
    table.to_csv(folder / "manifest.csv", index=False)
    pd.DataFrame({"subject": subjects, "dice": dice, "passed": passed}).to_csv(folder / "qc.csv", index=False)
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"cohort": make_cohort(root / "cohort"), "real": make_real(root / "dataset.h5")}


def test_cohort_items_shapes_dtypes_and_qc_filter(files):
    ds = CohortDataset(files["cohort"])
    assert len(ds) == 4 and ds.n_total == 6 and ds.n_passed == 4  # subjects 1 and 4 failed QC
    assert [ds[i]["subject"] for i in range(len(ds))] == ["syn-00000", "syn-00002", "syn-00003", "syn-00005"]
    item = ds[1]
    assert item["image"].shape == (1, *GRID) and item["image"].dtype == torch.float32
    assert item["label"].shape == GRID and item["label"].dtype == torch.int64
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert set(np.unique(item["label"].numpy())) == {0, 2, 3, 4, 24, 41, 42, 43}  # FreeSurfer IDs by default
    assert item["covariates"].shape == (4,) and item["covariates"].dtype == torch.float32
    assert item["seed"] == 1002 and item["source_subject"] == "sub-02" and item["new_anatomy"] is False
    assert item["qc_passed"] is True and item["index"] == 2
    every = CohortDataset(files["cohort"], passed_only=False)
    assert len(every) == 6 and [every[i]["qc_passed"] for i in range(6)] == [
        True,
        False,
        True,
        True,
        False,
        True,
    ]
    with pytest.raises(IndexError):
        ds[4]


def test_label_maps(files):
    with h5py.File(files["cohort"]) as h5:
        fs = h5["label"][0].astype(np.int64)
    lv = CohortDataset(files["cohort"], label_map="lv")[0]["label"].numpy()
    np.testing.assert_array_equal(lv, np.isin(fs, [4, 43]).astype(np.int64))
    sem = CohortDataset(files["cohort"], label_map="semantics")[0]["label"].numpy()
    assert set(np.unique(sem)) == {0, 1, 2, 3, 4}  # background, CSF, WM, GM, ventricles
    assert (sem[fs == 4] == 4).all() and (sem[fs == 24] == 1).all() and (sem[fs == 42] == 3).all()
    custom = CohortDataset(files["cohort"], label_map={43: 2, 4: 1})[0]["label"].numpy()
    assert set(np.unique(custom)) == {0, 1, 2} and (custom[fs == 43] == 2).all()
    extra = CohortDataset(files["cohort"], label_map="lv", lv_labels=(4,))[0]["label"].numpy()
    assert extra.sum() == (fs == 4).sum()
    assert n_classes("lv") == 1 and n_classes("semantics") == 8 and n_classes(None) is None
    assert label_lookup("fs") is None
    with pytest.raises(StageError, match="label_map"):
        label_lookup("tissue")


def test_real_dataset_splits_and_conditions(files):
    val = RealDataset(files["real"], "val", conditions=["lv"])
    assert len(val) == 2 and [val[i]["subject"] for i in range(2)] == ["sub-06", "sub-07"]
    assert val[0]["cond_lv"].shape == (1, *GRID) and val[0]["cond_lv"].dtype == torch.float32
    assert len(RealDataset(files["real"], "train_4")) == 4
    assert len(RealDataset(files["real"], None)) == 8
    assert [RealDataset(files["real"], [5, 2])[i]["index"] for i in range(2)] == [5, 2]
    with pytest.raises(StageError, match=r"no split 'train_9' \(have: train_2, train_4, val\)"):
        RealDataset(files["real"], "train_9")
    with pytest.raises(StageError, match="no condition 'skull'"):
        RealDataset(files["real"], conditions=["skull"])
    with pytest.raises(StageError, match="cohort file not found"):
        CohortDataset(files["real"].parent / "missing.h5")


def test_lazy_one_handle_per_process_and_picklable(files):
    ds = CohortDataset(files["cohort"])
    assert ds._h5 is None  # the constructor reads the index and closes the file
    ds[0]
    assert ds._h5 is not None and ds._h5.id.valid
    clone = pickle.loads(pickle.dumps(ds))  # what a spawn-started worker receives
    assert clone._h5 is None
    torch.testing.assert_close(clone[2]["image"], ds[2]["image"])
    ds._pid = -1  # as if inherited through fork: the next item reopens the file
    old = ds._h5
    ds[0]
    assert ds._h5 is not old
    ds.close()
    old.close()


def test_monai_dict_transforms_and_dataloader_workers(files):
    from monai.transforms import Compose, EnsureChannelFirstd, RandFlipd, ScaleIntensityd

    transform = Compose(
        [
            EnsureChannelFirstd(keys="label", channel_dim="no_channel"),
            RandFlipd(keys=["image", "label"], prob=1.0, spatial_axis=0),
            ScaleIntensityd(keys="image"),
        ]
    )
    ds = CohortDataset(files["cohort"], label_map="lv", transform=transform)
    plain = CohortDataset(files["cohort"], label_map="lv")
    item = ds[0]
    assert item["label"].shape == (1, *GRID) and item["subject"] == "syn-00000"
    np.testing.assert_array_equal(item["label"][0].numpy(), plain[0]["label"].numpy()[::-1])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(2, 1, *GRID)] * 2
    assert batches[0]["label"].shape == (2, 1, *GRID)
    assert list(batches[1]["subject"]) == ["syn-00003", "syn-00005"]
