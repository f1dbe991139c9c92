"""Datasets over cohort.h5 and dataset.h5 (vcm.data): laziness, filters, label maps, MONAI transforms.

On a tiny ``cohort.h5`` (the contract's layout) and a tiny ``dataset.h5`` whose images show their labels
plainly (an easy segmentation task), both from tests/fixtures.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.fixtures import GRID, make_cohort, make_real
from vcm.data import CohortDataset, RealDataset, label_lookup, n_classes
from vcm.errors import StageError

pytestmark = pytest.mark.usefixtures("one_thread")


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
