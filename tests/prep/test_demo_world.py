"""The demo world (vcm.prep.demo): anatomy that the covariates do not give away, T1 and T2 of one anatomy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vcm.grid import Grid
from vcm.io import load_nifti
from vcm.labels import LATERAL_VENTRICLES, mask_of
from vcm.prep.demo import build_demo, covariate_guess_dice, make_subject


@pytest.fixture(scope="module")
def subjects():
    grid = Grid.from_config("demo")
    return [make_subject(np.random.default_rng([7, i]), 4.0, grid) for i in range(3)]


def test_subjects_differ_and_reach_their_ventricle_volume(subjects):
    lv = [mask_of(s["labels"], LATERAL_VENTRICLES) for s in subjects]
    assert all(m.sum() > 20 for m in lv)
    for s in subjects:
        # the solved field reaches the drawn volume on its box; the rendered labels carry it (4 mm sampling)
        assert s["field"].lv_mm3 == pytest.approx(
            s["draw"].lv_ml * 1000 / abs(np.linalg.det(s["draw"].linear)), rel=0.05
        )
        assert s["lv_mm3"] == pytest.approx(s["draw"].lv_ml * 1000, rel=0.25)
    dice = 2 * (lv[0] & lv[1]).sum() / (lv[0].sum() + lv[1].sum())
    assert dice < 0.9  # different anatomy, not one template


def test_t1_and_t2_show_one_anatomy_with_opposite_contrast(subjects):
    s = subjects[0]
    lv, wm = mask_of(s["labels"], LATERAL_VENTRICLES), mask_of(s["labels"], (2, 41))
    assert np.median(s["t1"][lv]) < 0.6 * np.median(s["t1"][wm])  # T1: dark ventricles
    assert np.median(s["t2"][lv]) > 1.5 * np.median(s["t2"][wm])  # T2: bright ventricles
    again = make_subject(np.random.default_rng([7, 0]), 4.0, Grid.from_config("demo"))
    np.testing.assert_array_equal(again["labels"], s["labels"])  # seeded: the same subject
    np.testing.assert_array_equal(again["t2"], s["t2"])


def test_covariate_guess_dice():
    masks = np.zeros((4, 6, 6, 6), bool)
    masks[:3, 1:4, 1:4, 1:4] = True  # three alike, one elsewhere
    masks[3, 4:6, 4:6, 4:6] = True
    cov = np.array([[0.0], [0.1], [0.2], [0.15]])
    dice = covariate_guess_dice(masks, cov, k=3)
    assert dice[0] == pytest.approx(1.0)  # neighbours 1, 3, 2: two of three agree with it
    assert dice[3] == pytest.approx(0.0)  # its neighbours vote for the others' ventricles


def test_build_demo_writes_t1_t2_labels_manifest_and_world_report(tmp_path):
    manifest = build_demo(tmp_path, n_subjects=4, seed=3, spacing_mm=4.0)
    table = pd.read_csv(manifest)
    assert list(table.columns) == ["subject", "t1", "t2", "age", "sex", "seg", "true_lv_mm3"]
    t1, aff1 = load_nifti(tmp_path / table.loc[0, "t1"])
    t2, aff2 = load_nifti(tmp_path / table.loc[0, "t2"])
    assert t1.shape == t2.shape and np.allclose(aff1, aff2)
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["subjects"] == 4 and 0 <= world["covariate_guess_lv_dice"]["mean"] <= 1
    assert 8 <= world["lv_ml"]["min"] <= world["lv_ml"]["max"] <= 130


def test_build_demo_writes_the_same_files_in_worker_processes(tmp_path):
    inline = build_demo(tmp_path / "inline", n_subjects=2, seed=3, spacing_mm=4.0)
    pooled = build_demo(tmp_path / "pooled", n_subjects=2, seed=3, spacing_mm=4.0, workers=2)
    assert inline.read_bytes() == pooled.read_bytes()
    assert (tmp_path / "inline/world.json").read_text() == (tmp_path / "pooled/world.json").read_text()
    for sid in ("sub-001", "sub-002"):
        for kind in ("t1", "t2", "labels"):
            a, _ = load_nifti(tmp_path / "inline" / sid / f"{kind}.nii.gz")
            b, _ = load_nifti(tmp_path / "pooled" / sid / f"{kind}.nii.gz")
            assert np.array_equal(a, b), (sid, kind)
