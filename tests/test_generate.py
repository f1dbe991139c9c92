"""generate-shard and merge-cohort (vcm.cohort): seeds, new anatomies, QC retries, resume, merged layout.

A 16³ fake dataset.h5 with FreeSurfer label maps, a tiny random backbone (latent 3×4³), a tiny VCM trained
for 2 steps by vcm.training, 2 DDIM steps; a fake re-segmentation backend except in the atlas test.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.fixtures import GRID, TINY_VCM, encode, make_bundle, make_labelled_dataset
from tests.fixtures import SEMANTIC_NAMES as CLASSES
from vcm.cohort.cli import cli, merge_cli
from vcm.cohort.plan import CohortSettings, noise_seed, shard_ids, shard_range, subject_id
from vcm.cohort.shard import generate_shard
from vcm.cohort.sources import DatasetSource, plan_subject, smooth_displacement
from vcm.cohort.store import SHARD_FILE, merge_cohort
from vcm.cohort.subjects import SUBJECT_FILE
from vcm.config import load_config, load_schema, validate_config
from vcm.errors import StageError
from vcm.io import load_nifti
from vcm.labels import brain_mask, mask_of, semantic_map
from vcm.training.loop import train

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def fake_segmenter(image: np.ndarray, path: Path) -> np.ndarray:
    """A deterministic stand-in for the atlas backend: dark voxels inside the head are 'ventricle'."""
    head = np.asarray(load_nifti(path.parent / "brain.nii.gz")[0]) > 0
    return np.where(head & (image < np.median(image[head])), 4, 2).astype(np.uint16) * head


def _base_cfg(root: Path) -> dict:
    cfg = load_config(REPO / "config" / "config.yaml")
    cfg["condition_sets"] = {"two": [["lv", "brain"], ["skull"]]}
    cfg["training"].update(steps=2, batch_size=2, lr=1e-3, checkpoint_every=10, seed=0, vcm=TINY_VCM)
    cfg["cohort"].update(
        sets=["two"],
        size=5,
        shard_size=2,
        steps=2,
        new_anatomy_fraction=0.5,
        seed=0,
        batch_size=2,
        decode_chunk=1,
        deform_max_mm=15.0,
        deform_smoothness_mm=40.0,
        qc_workers=0,  # inline; test_qc_workers_change_no_file covers the workers
        design={},  # the source's covariates; test_design_cohort_records_target_and_achieved covers a design
    )
    cfg["qc"].update(dice_min=0.0, max_tries=2, intensity_outliers_max=None)
    cfg["conditions"]["covariate_ranges"] = str(REPO / "resources" / "covariate_ranges.yaml")
    cfg["results"] = str(root / "results")
    return cfg


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    dataset, bundle = make_labelled_dataset(root / "dataset.h5"), make_bundle(root / "bundle")
    latents = encode(dataset, bundle, root / "latents.h5")
    cfg = _base_cfg(root)
    result = train(cfg, dataset, latents, bundle, "two", 4, root / "model", progress=False)
    return {"root": root, "dataset": dataset, "bundle": bundle, "model": result.model_path}


@pytest.fixture
def gcfg(files) -> dict:
    return _base_cfg(files["root"])


def run_cohort(cfg: dict, files: dict, out: Path, segmenter=fake_segmenter, **kwargs) -> list[Path]:
    paths = []
    for k, sid in enumerate(shard_ids(cfg)):
        paths.append(
            generate_shard(
                cfg,
                files["dataset"],
                files["model"],
                files["bundle"],
                "two",
                k,
                out / "shards" / sid,
                segmenter=segmenter,
                progress=False,
                **kwargs,
            )
        )
    return paths


def subject_arrays(folder: Path) -> dict[str, bytes]:
    """Every NIfTI of a subject folder, as file bytes (gzip without timestamps: comparable)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as h5:
        h5.visititems(lambda k, o: out.__setitem__(k, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def cohorts(files, tmp_path_factory) -> dict[str, Path]:
    """The same 5-subject cohort made in shards of 2 and of 3, and merged."""
    root = tmp_path_factory.mktemp("cohorts")
    out = {}
    for shard_size in (2, 3):
        cfg = _base_cfg(files["root"])
        cfg["cohort"]["shard_size"] = shard_size
        folder = root / f"s{shard_size}"
        shards = run_cohort(cfg, files, folder)
        merge_cohort(cfg, shards, folder, "two")
        out[f"s{shard_size}"] = folder
    return out


# --- seeds, shards, new anatomies --------------------------------------------------------------------------


def test_shard_ranges_and_seeds():
    assert shard_ids(validate_config({"cohort": {"size": 5, "shard_size": 2}})) == ["00000", "00001", "00002"]
    assert list(shard_range(2, 5, 2)) == [4] and list(shard_range(0, 5, 3)) == [0, 1, 2]
    with pytest.raises(StageError, match="makes 3 shards"):
        shard_range(3, 5, 2)
    seeds = {noise_seed(0, i, a) for i in range(50) for a in range(3)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(0, 7, 1) == noise_seed(0, 7, 1) != noise_seed(1, 7, 1)
    assert subject_id(12) == "syn-00012"


def test_shard_ids_are_the_workflows():
    """The one derivation of the shard ids (the Snakefile's too): cohort.size / shard_size, rounded up."""
    for size, shard_size in ((1, 1), (4, 2), (5, 2), (32, 16), (33, 16)):
        cfg = validate_config({"cohort": {"size": size, "shard_size": shard_size}})
        ids = shard_ids(cfg)
        assert ids == [f"{k:05d}" for k in range(-(-size // shard_size))]
        assert [i for k in range(len(ids)) for i in shard_range(k, size, shard_size)] == list(range(size))


def test_cohort_settings_read_the_validated_config():
    """The schema owns the defaults: the settings take them from the validated config, not their own."""
    cfg = validate_config({})
    schema = load_schema()["properties"]["cohort"]["properties"]
    assert CohortSettings.from_config(cfg).steps == schema["steps"]["default"]
    assert CohortSettings.from_config(cfg).sampler == schema["sampler"]["default"]
    del cfg["cohort"]["steps"]
    with pytest.raises(StageError, match="'cohort.steps' is missing"):
        CohortSettings.from_config(cfg)


def test_smooth_displacement_is_bounded_and_seeded():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    d = smooth_displacement((20, 24, 16), 2.0, 6.0, 20.0, rng())
    assert d.shape == (3, 20, 24, 16)
    assert np.sqrt((d**2).sum(0)).max() == pytest.approx(3.0, rel=1e-5)  # 6 mm in 2 mm voxels
    np.testing.assert_array_equal(d, smooth_displacement((20, 24, 16), 2.0, 6.0, 20.0, rng()))
    assert np.abs(np.diff(d, axis=1)).max() < 0.5  # smooth: neighbours move together


def test_new_anatomy_rederives_conditions_and_volumes(files, gcfg):
    gcfg["cohort"]["new_anatomy_fraction"] = 1.0
    settings = CohortSettings.from_config(gcfg)
    data = DatasetSource(files["dataset"], gcfg)
    try:
        sources = data.source_indices(["train"], "train_4")
        np.testing.assert_array_equal(sources, [0, 1, 2, 3])
        plans = [plan_subject(i, settings, data, sources) for i in range(8)]
        # balanced rounds: every source once in 0..3 and again in 4..7
        assert sorted(p.source_index for p in plans[:4]) == [0, 1, 2, 3]
        assert sorted(p.source_index for p in plans[4:]) == [0, 1, 2, 3]
        p = plans[0]
        label, conds, cov, raw = data.read(p.source_index)
        assert p.new_anatomy and not np.array_equal(p.label, label)
        np.testing.assert_array_equal(p.conditions["lv"], mask_of(p.label, (4, 43)))
        np.testing.assert_array_equal(p.conditions["brain"], brain_mask(p.label))
        np.testing.assert_array_equal(p.conditions["semantics"], semantic_map(p.label))
        assert p.conditions["skull"].dtype == np.float16 and not np.array_equal(
            p.conditions["skull"], conds["skull"]
        )
        assert set(np.unique(p.label)) <= set(np.unique(label))  # nearest neighbour: no new label values
        ratio = mask_of(p.label, (4, 43)).sum() / mask_of(label, (4, 43)).sum()
        assert p.covariates_raw[2] == pytest.approx(raw[2] * ratio)
        assert p.covariates_raw[:2].tolist() == raw[:2].tolist()  # sex and age are the source's
        np.testing.assert_array_equal(plan_subject(0, settings, data, sources).label, p.label)  # seeded
        gcfg["cohort"]["new_anatomy_fraction"] = 0.0
        q = plan_subject(0, CohortSettings.from_config(gcfg), data, sources)
        assert not q.new_anatomy and np.array_equal(q.label, data.read(q.source_index)[0])
        np.testing.assert_array_equal(q.covariates, data.read(q.source_index)[2])
    finally:
        data.close()


# --- cohorts -----------------------------------------------------------------------------------------------


def test_subjects_do_not_depend_on_the_shard_size(cohorts):
    a, b = h5_arrays(cohorts["s2"] / "cohort.h5"), h5_arrays(cohorts["s3"] / "cohort.h5")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["new_anatomy"].any() and not a["new_anatomy"].all()  # both kinds of source were made
    for i in range(5):
        sa = subject_arrays(cohorts["s2"] / "shards" / f"{i // 2:05d}" / subject_id(i))
        sb = subject_arrays(cohorts["s3"] / "shards" / f"{i // 3:05d}" / subject_id(i))
        assert sa.keys() == sb.keys() and len(sa) == 7  # image, label, seg, lv, brain, semantics, skull
        assert sa == sb, subject_id(i)
    assert len({bytes(x) for x in a["image"]}) == 5  # different subjects, not copies


def test_merged_cohort_layout(cohorts, files):
    folder = cohorts["s2"]
    with h5py.File(folder / "cohort.h5") as h5, h5py.File(files["dataset"]) as ds:
        n = 5
        assert [s.decode() for s in h5["subjects"][:]] == [subject_id(i) for i in range(n)]
        assert h5["image"].shape == (n, 1, *GRID) and h5["image"].dtype == ds["image"].dtype
        assert h5["label"].shape == h5["seg"].shape == (n, *GRID) and h5["label"].dtype == np.uint16
        for name in ("lv", "brain", "semantics", "skull"):
            assert (
                h5[f"cond/{name}"].shape == (n, 1, *GRID)
                and h5[f"cond/{name}"].dtype == ds[f"cond/{name}"].dtype
            )
        assert list(h5["cond/semantics"].attrs["classes"]) == CLASSES
        assert h5["covariates"].shape == (n, 4) and h5["covariates"].dtype == np.float32
        assert h5["seed"].dtype == np.int64 and h5["new_anatomy"].dtype == bool
        assert set(h5["source_subject"].asstr()[:]) <= {
            "sub-00",
            "sub-01",
            "sub-02",
            "sub-03",
        }  # training split
        for m in ("dice", "hd95", "assd", "skull_dist", "intensity_outliers"):
            assert h5[f"qc/{m}"].shape == (n,), m
        assert sorted(h5["intensity"]) == sorted(CLASSES[1:]) and h5["intensity/csf"].shape == (n,)
        assert h5["qc_reference/low"].shape == (8,)
        assert h5["qc/passed"].dtype == bool and h5["qc/attempts"].dtype == np.int64
        assert h5["qc/passed"][:].all() and (h5["qc/attempts"][:] == 1).all()  # dice_min 0: first tries pass
        np.testing.assert_array_equal(h5["seed"][:], [noise_seed(0, i, 0) for i in range(n)])
        np.testing.assert_array_equal(h5.attrs["grid_affine"], ds.attrs["grid_affine"])
        from vcm.io import sha256_file

        assert h5.attrs["model_sha256"] == sha256_file(files["model"])
        assert h5.attrs["config_sha256"] and h5.attrs["torch_version"] and h5.attrs["condition_set"] == "two"
        assert len(json.loads(h5.attrs["shards"])) == 3
        # the label map and the conditions agree; the cohort's NIfTIs are the HDF5's arrays
        np.testing.assert_array_equal(h5["cond/lv"][:, 0], mask_of(h5["label"][:], (4, 43)))
        img, affine = load_nifti(folder / "shards" / "00001" / "syn-00002" / "image.nii.gz")
        np.testing.assert_array_equal(img.astype(h5["image"].dtype), h5["image"][2, 0])
        np.testing.assert_array_equal(affine, ds.attrs["grid_affine"])
    manifest = pd.read_csv(folder / "manifest.csv")
    assert len(manifest) == 5 and manifest["subject"].tolist() == [subject_id(i) for i in range(5)]
    for col in ("image", "label", "resegmentation", "cond_lv", "cond_skull", "t1"):
        assert all((folder / p).is_file() for p in manifest[col]), col
    assert {
        "source_subject",
        "new_anatomy",
        "seed",
        "passed",
        "attempts",
        "dice",
        "cov_age",
        "age",
        "sex",
    } <= set(manifest.columns)
    qc = pd.read_csv(folder / "qc.csv")
    assert len(qc) == 5 and qc["kept"].all() and (qc["attempt"] == 1).all()


def test_failing_qc_is_retried_with_fresh_seeds_and_flagged(files, gcfg, tmp_path):
    gcfg["cohort"].update(size=3, shard_size=3)
    gcfg["qc"].update(dice_min=1.0, max_tries=3)

    def never(image, path):
        return np.zeros(image.shape, np.uint16)  # no ventricle found: Dice 0

    shard = run_cohort(gcfg, files, tmp_path, segmenter=never)[0]
    merge_cohort(gcfg, [shard], tmp_path)
    with h5py.File(tmp_path / "cohort.h5") as h5:
        assert not h5["qc/passed"][:].any()  # kept, but never silently passed
        assert (h5["qc/attempts"][:] == 3).all()
        assert (h5["qc/dice"][:] == 0).all()
        np.testing.assert_array_equal(
            h5["seed"][:], [noise_seed(0, i, 0) for i in range(3)]
        )  # ties: the first
        assert h5["attempts/index"].shape == (9,)
    qc = pd.read_csv(tmp_path / "qc.csv")
    assert len(qc) == 9 and qc.groupby("subject")["kept"].sum().tolist() == [1, 1, 1]
    assert sorted(qc["seed"]) == sorted(noise_seed(0, i, a) for i in range(3) for a in range(3))
    assert qc["reasons"].str.startswith("dice 0.000 < 1").all()

    # a segmenter that finds the true ventricles from the second try on: two attempts, passed
    calls: dict[str, int] = {}

    def second(image, path):
        calls[path.parent.name] = calls.get(path.parent.name, 0) + 1
        label = load_nifti(path.parent / "label.nii.gz", np.uint16)[0]
        return label if calls[path.parent.name] >= 2 else np.zeros_like(label)

    out = tmp_path / "second"
    run_cohort(gcfg, files, out, segmenter=second)
    with h5py.File(out / "shards" / "00000" / SHARD_FILE) as h5:
        assert h5["qc/passed"][:].all() and (h5["qc/attempts"][:] == 2).all()
        assert (h5["qc/dice"][:] == 1.0).all()
        np.testing.assert_array_equal(h5["seed"][:], [noise_seed(0, i, 1) for i in range(3)])
        np.testing.assert_array_equal(h5["attempts/kept"][:], [False, True] * 3)


@pytest.mark.parametrize("redraw", [True, False])
def test_a_retry_redraws_the_source_and_anatomy(files, gcfg, tmp_path, redraw):
    """With ``cohort.retry_new_anatomy`` each retry samples a new plan (source and warp; the first attempt as
    without it), and the folder keeps the kept attempt's label map; without it every attempt samples one plan."""
    gcfg["cohort"].update(size=2, shard_size=2, new_anatomy_fraction=1.0, retry_new_anatomy=redraw)
    gcfg["qc"].update(dice_min=1.0, max_tries=3)

    def never(image, path):
        return np.zeros(image.shape, np.uint16)  # every attempt fails: the first is kept (ties)

    merge_cohort(gcfg, run_cohort(gcfg, files, tmp_path, segmenter=never), tmp_path)
    qc = pd.read_csv(tmp_path / "qc.csv")
    draws = (qc["attempt"] - 1) if redraw else 0 * qc["attempt"]
    assert qc["draw"].tolist() == draws.tolist()
    settings = CohortSettings.from_config(gcfg)
    data = DatasetSource(files["dataset"], gcfg)
    try:
        sources = data.source_indices(["train"], "train_4")
        for i in range(2):
            plans = [plan_subject(i, settings, data, sources, None, d) for d in range(3)]
            assert qc[qc["subject"] == subject_id(i)]["source_index"].tolist() == (
                [p.source_index for p in plans] if redraw else [plans[0].source_index] * 3
            )
            assert not np.array_equal(plans[0].label, plans[2].label)  # a new warp (and maybe source)
            folder = tmp_path / "shards" / "00000" / subject_id(i)
            on_disk = load_nifti(folder / "label.nii.gz", np.uint16)[0]
            np.testing.assert_array_equal(on_disk, plans[0].label)  # the kept first attempt's, rewritten
            np.testing.assert_array_equal(
                load_nifti(folder / "lv.nii.gz", np.uint8)[0], plans[0].conditions["lv"]
            )
            assert json.loads((folder / SUBJECT_FILE).read_text())["draw"] == 0
    finally:
        data.close()
    with h5py.File(tmp_path / "cohort.h5") as h5:
        assert h5["attempts/draw"].dtype == np.int64 and h5["attempts/draw"][:].tolist() == draws.tolist()
        first = h5["attempts/attempt"][:] == 0
        # the first attempts sample the same plan and noise either way
        assert h5["attempts/seed"][first].tolist() == [noise_seed(0, i, 0) for i in range(2)]


def test_a_copy_of_a_real_training_image_is_flagged_and_leaves_the_passed_set(
    files, gcfg, tmp_path, monkeypatch
):
    """A decoder that returns a real training subject verbatim: every attempt is a possible copy of it, is
    resampled, and the subject leaves the passed set; qc.csv and cohort.h5 name the real subject."""
    from vcm.cohort.sampler import CohortSampler

    gcfg["cohort"].update(size=2, shard_size=2)
    gcfg["qc"].update(max_tries=2)
    with h5py.File(files["dataset"]) as h5:
        real = np.asarray(h5["image"][1, 0], np.float32)  # sub-01, of the training split train_4
    decoded = CohortSampler.decode

    def copying(self, z):
        images = decoded(self, z)
        images[0] = real  # the batch's first sample is a copy; the other is the model's own
        return images

    monkeypatch.setattr(CohortSampler, "decode", copying)
    shard = run_cohort(gcfg, files, tmp_path)[0]
    merge_cohort(gcfg, [shard], tmp_path)
    with h5py.File(tmp_path / "cohort.h5") as h5:
        assert h5["qc/passed"][:].tolist() == [False, True]  # the copy failed every try
        assert h5["qc/attempts"][:].tolist() == [2, 1]
        assert h5["privacy/possible_copy"][:].tolist() == [True, False]
        assert h5["privacy/nearest_real"].asstr()[0] == "sub-01" and h5["privacy/nearest_index"][0] == 1
        assert h5["privacy/nearest_similarity"][0] == pytest.approx(1.0, abs=1e-4)
        assert h5["privacy/nearest_similarity"][1] < 0.9
        assert 0 <= h5["privacy/nearest_label_dice"][0] <= h5["privacy/max_label_dice"][0] <= 1
        assert h5["privacy_reference/subjects"].asstr()[:].tolist() == [f"sub-{i:02d}" for i in range(4)]
        baseline = h5["privacy_reference/nearest_real"].asstr()[:].tolist()
        assert all(n != f"sub-{i:02d}" for i, n in enumerate(baseline))  # never itself
        assert h5["privacy_reference"].attrs["max_similarity"] == 0.9
    qc = pd.read_csv(tmp_path / "qc.csv")
    assert list(qc.columns[-6:]) == [
        "nearest_real",
        "nearest_index",
        "nearest_similarity",
        "nearest_label_dice",
        "max_label_dice",
        "possible_copy",
    ]
    copies = qc[qc["subject"] == "syn-00000"]
    assert len(copies) == 2 and copies["possible_copy"].all() and (copies["nearest_real"] == "sub-01").all()
    assert copies["reasons"].str.startswith("possible copy of sub-01").all()
    assert not qc[qc["subject"] == "syn-00001"]["possible_copy"].any()
    record = json.loads((tmp_path / "shards" / "00000" / "syn-00000" / SUBJECT_FILE).read_text())
    assert record["privacy"]["possible_copy"] and not record["passed"]

    # the screen off: nothing recorded, the copy passes as QC alone decides
    gcfg["qc"]["privacy"]["enabled"] = False  # gcfg is validated: the section holds every key
    off = tmp_path / "off"
    merge_cohort(gcfg, run_cohort(gcfg, files, off), off)
    with h5py.File(off / "cohort.h5") as h5:
        assert "privacy" not in h5 and "privacy_reference" not in h5 and h5["qc/passed"][:].all()
    assert "possible_copy" not in pd.read_csv(off / "qc.csv").columns


def picky_segmenter(image: np.ndarray, path: Path) -> np.ndarray:
    """Fails the first attempt of every other subject, decided by the attempt's file name (``syn-<i>/.attempt<a>``)
    alone, so that retries happen whatever the trained model samples; pickles, so it runs in the QC worker
    processes as the atlas backend does."""
    label = load_nifti(path.parent / "label.nii.gz", np.uint16)[0]
    first_attempt = path.name.startswith(".attempt0.")
    odd = int(path.parent.name.rsplit("-", 1)[1]) % 2
    return np.zeros_like(label) if first_attempt and not odd else label


def test_qc_workers_change_no_file(files, gcfg, tmp_path):
    """QC on worker threads (and processes, for a segmenter that pickles) overlaps the next batch's sampling and
    reorders batches, as retries come back a batch later; the files stay the same."""
    gcfg["cohort"].update(size=5, shard_size=5)
    gcfg["qc"].update(dice_min=0.5, max_tries=3)

    def closure(image, path):  # does not pickle: runs in the QC threads themselves
        return picky_segmenter(image, path)

    made = {}
    for workers, segmenter in ((0, picky_segmenter), (2, picky_segmenter), (3, closure)):
        gcfg["cohort"]["qc_workers"] = workers
        made[workers] = run_cohort(gcfg, files, tmp_path / str(workers), segmenter=segmenter)[0]
    reference = h5_arrays(made[0])
    assert (reference["qc/attempts"] > 1).any()  # the reordering was exercised
    for workers in (2, 3):
        other = h5_arrays(made[workers])
        assert other.keys() == reference.keys()
        for key in reference:
            np.testing.assert_array_equal(other[key], reference[key], err_msg=f"{workers} workers: {key}")
        for i in range(5):
            assert subject_arrays(made[workers].parent / subject_id(i)) == subject_arrays(
                made[0].parent / subject_id(i)
            )
    gcfg["cohort"]["qc_workers"] = -1
    with pytest.raises(StageError, match="cohort.qc_workers"):
        CohortSettings.from_config(gcfg)


def test_resume_after_an_interruption_is_byte_identical(files, gcfg, cohorts, tmp_path):
    gcfg["cohort"]["shard_size"] = 3
    reference = cohorts["s3"] / "shards" / "00000"
    out = tmp_path / "00000"
    shutil.copytree(reference, out)
    # a killed job: no shard.h5, one subject without its completion mark and image, one half-written temp file
    (out / SHARD_FILE).unlink()
    (out / "syn-00001" / SUBJECT_FILE).unlink()
    (out / "syn-00001" / "image.nii.gz").unlink()
    (out / "syn-00001" / ".image.abc.tmp.nii.gz").write_bytes(b"partial")
    mtime = (out / "syn-00000" / SUBJECT_FILE).stat().st_mtime_ns
    path = generate_shard(
        gcfg,
        files["dataset"],
        files["model"],
        files["bundle"],
        "two",
        0,
        out,
        segmenter=fake_segmenter,
        progress=False,
    )
    assert (out / "syn-00000" / SUBJECT_FILE).stat().st_mtime_ns == mtime  # complete subjects are kept
    for i in range(3):
        assert subject_arrays(out / subject_id(i)) == subject_arrays(reference / subject_id(i))
    a, b = h5_arrays(path), h5_arrays(reference / SHARD_FILE)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # stopped after one subject (as a pre-empted job): the folder does not look complete, the rerun finishes
    fresh = tmp_path / "fresh"
    assert (
        generate_shard(
            gcfg,
            files["dataset"],
            files["model"],
            files["bundle"],
            "two",
            0,
            fresh,
            segmenter=fake_segmenter,
            stop_after=1,
            progress=False,
        )
        is None
    )
    assert not (fresh / SHARD_FILE).exists() and 0 < len(list(fresh.glob(f"*/{SUBJECT_FILE}"))) < 3
    generate_shard(
        gcfg,
        files["dataset"],
        files["model"],
        files["bundle"],
        "two",
        0,
        fresh,
        segmenter=fake_segmenter,
        progress=False,
    )
    for i in range(3):
        assert subject_arrays(fresh / subject_id(i)) == subject_arrays(reference / subject_id(i))

    # other settings: the complete subjects are not reused
    gcfg["cohort"]["steps"] = 3
    generate_shard(
        gcfg,
        files["dataset"],
        files["model"],
        files["bundle"],
        "two",
        0,
        fresh,
        segmenter=fake_segmenter,
        progress=False,
    )
    assert (
        subject_arrays(fresh / "syn-00000")["image.nii.gz"]
        != subject_arrays(reference / "syn-00000")["image.nii.gz"]
    )


def test_merge_refuses_incomplete_or_mixed_shards(files, gcfg, cohorts, tmp_path):
    shards = [cohorts["s2"] / "shards" / sid / SHARD_FILE for sid in ("00000", "00001", "00002")]
    with pytest.raises(StageError, match=r"expected 0-4"):
        merge_cohort(gcfg, shards[:2], tmp_path)
    with pytest.raises(StageError, match="shard file not found"):
        merge_cohort(gcfg, [*shards[:2], tmp_path / "missing" / SHARD_FILE], tmp_path)
    other = tmp_path / "other.h5"
    shutil.copy(shards[2], other)
    with h5py.File(other, "a") as h5:
        h5.attrs["signature"] = "else"
    with pytest.raises(StageError, match="different signature"):
        merge_cohort(gcfg, [*shards[:2], other], tmp_path)
    with pytest.raises(StageError, match="condition set"):
        merge_cohort(gcfg, shards, tmp_path, "lv")
    assert not (tmp_path / "cohort.h5").exists()


def _write_cfg(cfg: dict, path: Path) -> Path:
    """The config as a file that validates against the schema (keys the schema does not know yet left out)."""
    out = copy.deepcopy(cfg)
    out["training"].pop("vcm", None)
    schema = load_schema()["properties"]
    for section in ("cohort", "qc"):
        out[section] = {k: v for k, v in out[section].items() if k in schema[section]["properties"]}
    path.write_text(yaml.safe_dump(out))
    load_config(path)
    return path


def test_cli_with_the_atlas_backend_survives_a_kill(files, gcfg, template_dir, tmp_path, capsys):
    """The real stage in a subprocess, killed while it makes its subject; the rerun matches an uninterrupted
    run byte for byte (the resume test covers a shard killed between subjects)."""
    gcfg["cohort"].update(size=1, shard_size=1, steps=3)  # one atlas segmentation per run: ~3 s
    gcfg["qc"].update(max_tries=1, backend="atlas")
    config = _write_cfg(gcfg, tmp_path / "config.yaml")
    args = [
        "--config", str(config), "--dataset", str(files["dataset"]), "--model", str(files["model"]),
        "--bundle", str(files["bundle"]), "--condition-set", "two", "--template-dir", str(template_dir),
        "--device", "cpu", "--threads", "1",
    ]  # fmt: skip
    reference = tmp_path / "reference"
    assert cli([*args, "--shard", "00000", "--out-dir", str(reference)]) == 0
    assert "1 subjects" in capsys.readouterr().out
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vcm", "generate-shard", *args, "--shard", "0", "--out-dir", str(out)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120  # killed once it has started writing subjects
    while (
        not (out / "syn-00000" / "label.nii.gz").exists()
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / SHARD_FILE).exists() and not (out / "syn-00000" / SUBJECT_FILE).exists()
    assert cli([*args, "--shard", "0", "--out-dir", str(out)]) == 0
    assert subject_arrays(out / "syn-00000") == subject_arrays(reference / "syn-00000")
    with h5py.File(out / SHARD_FILE) as h5:
        assert len(np.unique(h5["seg"][:])) > 5  # a real atlas segmentation: many FreeSurfer labels
    assert (
        merge_cli(
            ["--config", str(config), "--shards", str(reference / SHARD_FILE), "--out-dir", str(tmp_path)]
        )
        == 0
    )
    assert "1 subjects from 1 shards" in capsys.readouterr().out


def test_one_line_errors(files, gcfg, tmp_path):
    args = [files["dataset"], files["model"], files["bundle"]]
    with pytest.raises(StageError, match="trained for condition set 'two'"):
        generate_shard(gcfg, *args, "lv", 0, tmp_path, segmenter=fake_segmenter)
    with pytest.raises(StageError, match="another backbone bundle"):
        generate_shard(
            gcfg, files["dataset"], files["model"], make_bundle(tmp_path / "b", seed=1), "two", 0, tmp_path
        )
    bad = copy.deepcopy(gcfg)
    bad["cohort"]["sources"] = ["test"]
    with pytest.raises(StageError, match="cohort.sources"):
        generate_shard(bad, *args, "two", 0, tmp_path, segmenter=fake_segmenter)
    with pytest.raises(StageError, match="model file not found"):
        generate_shard(gcfg, files["dataset"], tmp_path / "none.pt", files["bundle"], "two", 0, tmp_path)


def test_the_consumer_dataset_reads_the_merged_cohort(cohorts):
    from vcm.data import CohortDataset

    ds = CohortDataset(cohorts["s2"] / "cohort.h5", label_map="lv", conditions=("lv", "skull"))
    assert len(ds) == 5 and ds.n_passed == 5
    item = ds[3]
    assert item["image"].shape == (1, *GRID) and item["label"].shape == GRID
    assert item["subject"] == "syn-00003" and item["seed"] == noise_seed(0, 3, 0)
    assert torch.equal(item["label"].bool(), item["cond_lv"][0].bool())


@pytest.mark.parametrize("tolerance", [10.0, 1e-6])
def test_design_cohort_records_target_and_achieved(files, gcfg, tmp_path, tolerance):
    """A design's targets, the label maps' values and the re-segmented images' volumes reach subject.json,
    cohort.h5 and manifest.csv; QC fails a subject whose image LV misses its target by more than
    qc.target_tolerance; design.png's statistics are the KS of targets against achieved values."""
    from scipy.stats import ks_2samp

    from vcm.cohort.figures import design_histograms

    gcfg["cohort"].update(size=3, shard_size=3, new_anatomy_fraction=0.0)
    gcfg["cohort"]["design"] = {
        "lv_volume": {"uniform": {"low": 60, "high": 90}},
        "age": {"uniform": {"low": 60, "high": 61}},
    }
    gcfg["qc"]["target_tolerance"] = tolerance
    merge_cohort(gcfg, run_cohort(gcfg, files, tmp_path), tmp_path)
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    with h5py.File(tmp_path / "cohort.h5") as h5:
        target, label = h5["design/target_lv_volume"][:], h5["covariates_raw"][:, 2]
        assert h5["design/designed_lv_volume"][:].all() and not h5["design/designed_sex"][:].any()
        assert ((target >= 60_000) & (target <= 90_000)).all()
        # 10 mm voxels of 1.1 mL each: the label map's LV is within a voxel or two of its target
        np.testing.assert_allclose(label, target, rtol=0.1)
        lv_count = mask_of(h5["label"][:], (4, 43)).sum(axis=(1, 2, 3))
        seg_count = mask_of(h5["seg"][:], (4, 43)).sum(axis=(1, 2, 3))
        np.testing.assert_allclose(h5["qc/image_lv_volume"][:], label * seg_count / lv_count)
        np.testing.assert_allclose(h5["qc/lv_volume_error"][:], h5["qc/image_lv_volume"][:] / target - 1)
        assert ((h5["covariates_raw"][:, 1] >= 60) & (h5["covariates_raw"][:, 1] <= 61)).all()
        passed = h5["qc/passed"][:]
    assert passed.all() if tolerance > 1 else not passed.any()
    if tolerance < 1:
        assert manifest["attempts"].eq(2).all()  # failed, resampled, kept the best
        assert pd.read_csv(tmp_path / "qc.csv")["reasons"].str.contains("LV volume .* off its target").all()
    for col in ("target_lv_volume", "label_lv_volume", "image_lv_volume", "target_age", "target_sex"):
        assert col in manifest.columns, col
    np.testing.assert_allclose(manifest["target_lv_volume"], target)
    stats = design_histograms(tmp_path / "cohort.h5", tmp_path / "design.png")
    assert (tmp_path / "design.png").stat().st_size > 1000
    assert stats["lv_volume"]["designed"] and not stats["brain_volume"]["designed"]
    assert stats["lv_volume"]["ks_label"] == pytest.approx(ks_2samp(target, label).statistic)
    assert stats["lv_volume"]["ks_image"] == pytest.approx(
        ks_2samp(target, manifest["image_lv_volume"]).statistic
    )
