"""dataset.h5: layout, nested splits, provenance, atomic write."""

import h5py
import numpy as np
import pandas as pd
import pytest

from vcm.config import validate_config
from vcm.dataset import build_dataset, make_splits
from vcm.dataset_store import DatasetFile
from vcm.errors import StageError
from vcm.grid import Grid
from vcm.io import save_nifti, write_json


def test_splits_are_nested_disjoint_from_val_and_seeded():
    subjects = [f"s{i}" for i in range(30)]
    a = make_splits(subjects, [10, 20], 5, seed=1)
    b = make_splits(subjects, [20, 10], 5, seed=1)
    assert set(a) == {"val", "train_10", "train_20"}
    assert len(a["val"]) == 5 and len(a["train_10"]) == 10 and len(a["train_20"]) == 20
    assert set(a["train_10"]) < set(a["train_20"])
    assert not set(a["val"]) & set(a["train_20"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(make_splits(subjects, [10], 5, seed=2)["val"], a["val"])


def test_splits_report_too_few_subjects():
    with pytest.raises(StageError, match=r"need 25 subjects, but 12 passed"):
        make_splits([f"s{i}" for i in range(12)], [20], 5, seed=0)


def _fake_prep(root, subjects, grid, rng):
    for k, sid in enumerate(subjects):
        d = root / sid
        save_nifti(d / "t1.nii.gz", rng.random(grid.shape), grid.affine)
        labels = np.zeros(grid.shape, np.uint16)
        labels[2:5, 2:5, 2:5] = 4 + k
        save_nifti(d / "labels.nii.gz", labels, grid.affine, np.uint16)
        for name in ("lv", "brain", "semantics"):
            save_nifti(d / "conditions" / f"{name}.nii.gz", labels > 0, grid.affine, np.uint8)
        for name in ("skull", "lowres_4mm", "lowres_8mm"):
            save_nifti(d / "conditions" / f"{name}.nii.gz", rng.random(grid.shape), grid.affine)
        write_json(
            d / "conditions" / "covariates.json",
            {
                "raw": {"sex": 1.0, "age": 60.0 + k, "lv_volume": 1e4, "brain_volume": 1.2e6},
                "scaled": [1.0, k / 10, 0.1, 0.2],
            },
        )


def test_build_dataset_layout(tmp_path, rng):
    cfg = validate_config(
        {
            "grid": {"shape": [8, 10, 8], "spacing_mm": 20},
            "training": {"sizes": [2, 3]},
            "dataset": {"val_size": 1},
        }
    )
    grid = Grid.from_config(cfg["grid"])
    subjects = ["a", "b", "c", "d", "e"]
    _fake_prep(tmp_path / "prep", subjects, grid, rng)
    pd.DataFrame({"subject": subjects}).to_csv(tmp_path / "subjects.csv", index=False)
    out = build_dataset(cfg, tmp_path / "subjects.csv", tmp_path / "prep", tmp_path / "dataset.h5")
    with h5py.File(out) as h5:
        assert [s.decode() for s in h5["subjects"][:]] == subjects
        assert h5["image"].shape == (5, 1, 8, 10, 8) and h5["image"].dtype == np.float16
        assert h5["image"].chunks == (1, 1, 8, 10, 8) and h5["image"].compression == "gzip"
        assert h5["label"].dtype == np.uint16 and h5["label"][3, 3, 3, 3] == 7
        assert set(h5["cond"]) == {"lv", "brain", "semantics", "skull", "lowres_4mm", "lowres_8mm"}
        assert h5["cond/lv"].dtype == np.uint8
        np.testing.assert_allclose(h5["covariates"][:, 1], [0, 0.1, 0.2, 0.3, 0.4], atol=1e-6)
        assert list(h5["covariates"].attrs["order"]) == ["sex", "age", "lv_volume", "brain_volume"]
        assert h5["covariates_raw"][4, 1] == 64.0
        assert len(h5["splits/val"]) == 1 and set(h5["splits/train_2"][:]) < set(h5["splits/train_3"][:])
        assert "spacing_mm: 20" in h5.attrs["config_yaml"] and len(h5.attrs["config_sha256"]) == 64
        np.testing.assert_allclose(h5.attrs["grid_affine"], grid.affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dataset.h5",
        "prep",
        "subjects.csv",
    ]  # no temp left


def test_build_dataset_leaves_nothing_when_a_subject_is_missing(tmp_path, rng):
    cfg = validate_config(
        {
            "grid": {"shape": [8, 10, 8], "spacing_mm": 20},
            "training": {"sizes": [1]},
            "dataset": {"val_size": 1},
        }
    )
    _fake_prep(tmp_path / "prep", ["a"], Grid.from_config(cfg["grid"]), rng)
    pd.DataFrame({"subject": ["a", "b"]}).to_csv(tmp_path / "subjects.csv", index=False)
    with pytest.raises(FileNotFoundError):
        build_dataset(cfg, tmp_path / "subjects.csv", tmp_path / "prep", tmp_path / "dataset.h5")
    assert not any(p.name.startswith(".dataset") or p.name == "dataset.h5" for p in tmp_path.iterdir())


def test_dataset_file_reads_what_build_dataset_wrote(tmp_path, rng):
    cfg = validate_config(
        {
            "grid": {"shape": [8, 10, 8], "spacing_mm": 20},
            "training": {"sizes": [2]},
            "dataset": {"val_size": 2},
        }
    )
    grid = Grid.from_config(cfg["grid"])
    _fake_prep(tmp_path / "prep", ["a", "b", "c", "d"], grid, rng)
    pd.DataFrame({"subject": ["a", "b", "c", "d"]}).to_csv(tmp_path / "subjects.csv", index=False)
    out = build_dataset(cfg, tmp_path / "subjects.csv", tmp_path / "prep", tmp_path / "dataset.h5")
    with DatasetFile(out) as data:
        assert len(data) == 4 and data.subjects() == ["a", "b", "c", "d"]
        val = data.split("val")
        assert data.split_sizes() == {"train_2": 2, "val": 2} and list(val) == sorted(val)
        assert data.subjects(val) == [["a", "b", "c", "d"][i] for i in val] and data.subjects(1) == ["b"]
        assert data.grid_shape == (8, 10, 8) and data.spacing_mm == 20
        np.testing.assert_allclose(data.affine, grid.affine)
        assert data.images(val).shape == (2, 1, 8, 10, 8) and data.labels(1)[3, 3, 3] == 5
        assert data.conditions("lv", val).dtype == np.uint8 and data.condition_dtype("skull") == np.float16
        assert data.covariates(3)[1] == pytest.approx(0.3) and data.covariates_raw(val).shape == (2, 4)
        assert data.n_semantic == 8 and data.semantic_classes()[0] == "background"
        assert len(data.config_sha256) == 64
        with pytest.raises(StageError, match=r"no split 'train_9' \(have: train_2, val\)"):
            data.split("train_9")
        with pytest.raises(StageError, match="no condition 't2' for the model"):
            data.require_conditions(["lv", "t2"], needed_by="the model")
    with pytest.raises(StageError, match="dataset not found"):
        DatasetFile(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(StageError, match="not an HDF5 file"):
        DatasetFile(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = 1
    with pytest.raises(StageError, match="no /image dataset"):
        DatasetFile(tmp_path / "other.h5")


def test_build_dataset_refuses_a_subject_whose_preparation_excluded_it(tmp_path, rng):
    from vcm.prep.exclusion import Exclusion, status_path, write_status

    cfg = validate_config(
        {
            "grid": {"shape": [8, 10, 8], "spacing_mm": 20},
            "training": {"sizes": [1]},
            "dataset": {"val_size": 1},
        }
    )
    _fake_prep(tmp_path / "prep", ["a", "b"], Grid.from_config(cfg["grid"]), rng)
    write_status(status_path(tmp_path / "prep", "a", "conditions"), "a", "conditions", None)
    excluded = Exclusion("b", "register", ("template_similarity",), "correlation with the template 0.050")
    write_status(status_path(tmp_path / "prep", "b", "conditions"), "b", "conditions", excluded)
    pd.DataFrame({"subject": ["a", "b"]}).to_csv(tmp_path / "subjects.csv", index=False)
    with pytest.raises(
        StageError, match="subject b: excluded at register: correlation with the template 0.050"
    ):
        build_dataset(cfg, tmp_path / "subjects.csv", tmp_path / "prep", tmp_path / "dataset.h5")
    assert not (tmp_path / "dataset.h5").exists()
