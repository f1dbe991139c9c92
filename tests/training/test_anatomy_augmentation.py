"""Anatomy augmentation: ventricle-pushed copies of the training subjects (vcm.training.anatomy_augmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import encode, make_bundle, make_labelled_dataset, two_branch_config
from vcm.cohort.sources import ranges_path
from vcm.dataset_store import DatasetFile
from vcm.errors import StageError
from vcm.prep.conditions import load_ranges, scale_covariates
from vcm.training.anatomy_augmentation import AnatomyAugmentation, augment_subjects
from vcm.training.loop import train
from vcm.training.run import set_up

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("anatomy")
    dataset, bundle = make_labelled_dataset(root / "dataset.h5"), make_bundle(root / "bundle")
    return {"dataset": dataset, "bundle": bundle, "latents": encode(dataset, bundle, root / "latents.h5")}


def test_copies_have_larger_ventricles_dark_where_they_grew(files):
    cfg = two_branch_config()
    settings = AnatomyAugmentation(copies=2, lv_factor=(1.5, 2.0))
    out = augment_subjects(files["dataset"], [0, 1, 2], ["lv", "brain", "skull"], cfg, settings, 0, False)
    assert out.images.shape == (6, 1, 16, 16, 16) and out.images.dtype == np.float32
    assert out.conditions["lv"].shape == (6, 1, 16, 16, 16) and out.conditions["lv"].dtype == np.uint8
    assert out.conditions["skull"].dtype == np.float16 and out.covariates.shape == (6, 4)
    assert out.subjects[:2] == ["sub-00~lv0", "sub-00~lv1"]
    with DatasetFile(files["dataset"]) as data:
        lv0 = data.conditions("lv", [0, 1, 2])[:, 0].astype(bool)
        image0 = data.images([0, 1, 2])[:, 0].astype(np.float32)
        raw0 = data.covariates_raw([0, 1, 2])
    ranges = load_ranges(ranges_path(cfg["conditions"]["covariate_ranges"]))
    for k in range(6):
        src = k // 2
        lv = out.conditions["lv"][k, 0].astype(bool)
        ratio = lv.sum() / lv0[src].sum()
        # the voxel count reaches the drawn factor (a coarse 16³ grid: within a few voxels)
        assert 1.45 <= ratio <= 2.05 and ratio == pytest.approx(out.lv_ratio[k], rel=1e-6)
        grown = lv & ~lv0[src]
        assert grown.sum() > 0
        # the image moved with the labels: the new ventricle voxels are dark (0.1) where tissue (0.45-0.75) was
        assert out.images[k, 0][grown].mean() < image0[src][grown].mean() - 0.2
        # the covariates: the source's sex and age, its LV volume times the ratio, scaled as prep scales them
        raw = dict(zip(("sex", "age", "lv_volume", "brain_volume"), raw0[src].tolist(), strict=True))
        raw["lv_volume"] *= out.lv_ratio[k]
        scaled, _ = scale_covariates(raw, ranges)
        np.testing.assert_allclose(out.covariates[k, :3], scaled[:3], rtol=1e-6)
    again = augment_subjects(files["dataset"], [0, 1, 2], ["lv", "brain", "skull"], cfg, settings, 0, False)
    np.testing.assert_array_equal(again.images, out.images)  # seeded per (seed, row, copy)
    other = augment_subjects(files["dataset"], [0, 1, 2], ["lv"], cfg, settings, 1, False)
    assert not np.array_equal(other.lv_ratio, out.lv_ratio)


@pytest.mark.parametrize(
    ("section", "message"),
    [({"copies": -1}, "copies >= 0"), ({"lv_factor": [2.0, 1.5]}, "low <= high"), ({"n": 1}, "unknown keys")],
)
def test_bad_settings_name_the_config_key(section, message):
    with pytest.raises(StageError, match=r"training\.anatomy_augmentation.*" + message):
        AnatomyAugmentation.from_config(section)


def test_training_adds_the_copies_to_the_split_and_stays_reproducible(tmp_path, files):
    aug = {"copies": 1, "lv_factor": [1.3, 1.6]}
    cfg = two_branch_config(
        steps=2, batch_size=2, lr=1e-3, checkpoint_every=2, seed=0, anatomy_augmentation=aug
    )
    inputs = (files["dataset"], files["latents"], files["bundle"])
    run = set_up(cfg, inputs, "two", 4, tmp_path / "setup", "cpu", {})
    assert len(run.data) == 8 and run.data.subjects[4:] == [f"sub-0{i}~lv0" for i in range(4)]
    assert run.data.mu.shape[0] == run.data.cond["lv"].shape[0] == run.data.cov.shape[0] == 8
    # the copies' latents are the frozen encoder's of the pushed images, not their sources'
    assert not torch.equal(run.data.mu[4:], run.data.mu[:4])
    assert (run.data.cond["lv"][4:].sum((1, 2, 3, 4)) > run.data.cond["lv"][:4].sum((1, 2, 3, 4))).all()
    plain = set_up(two_branch_config(steps=2), inputs, "two", 4, tmp_path / "plain", "cpu", {})
    assert len(plain.data) == 4

    a, b = (train(cfg, *inputs, "two", 4, tmp_path / out, progress=False) for out in ("a", "b"))
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
