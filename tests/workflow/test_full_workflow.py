"""The whole DAG on a tiny demo with a random-weight tiny backbone: models, cohort with QC, evaluation,
TSTR, summary and the Snakemake report (the session's ``full_run``, tests/workflow/conftest.py). Checks that
every stage connects and writes what it promises, and that a rerun writes the same bytes; image quality is the
shipped backbone's business (see docs/backbone.md)."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from vcm.io import sha256_file

from .conftest import run_snakemake

pytestmark = pytest.mark.workflow


def test_model_cohort_and_qc(full_run):
    results = full_run["results"]
    model = results / "models" / "vcm" / "lv_brain_skull" / "n3"
    assert (model / "vcm.pt").is_file() and (model / "loss.png").is_file()
    assert len(pd.read_csv(model / "loss.csv")) >= 1
    cohort = results / "cohorts" / "lv_brain_skull"
    with h5py.File(cohort / "cohort.h5") as h5:
        assert h5["image"].shape == (4, 1, 40, 56, 40)
        assert h5["label"].shape == (4, 40, 56, 40)
        assert len(set(h5["seed"][:].tolist())) == 4
        assert h5["qc/passed"].dtype == bool and (h5["qc/attempts"][:] >= 1).all()
        assert set(h5["cond"]) >= {"lv", "brain", "skull"}
        assert np.isfinite(h5["image"][:].astype(np.float32)).all()
    manifest = pd.read_csv(cohort / "manifest.csv")
    assert len(manifest) == 4 and {"subject", "t1", "age", "sex"} <= set(manifest.columns)
    assert len(pd.read_csv(cohort / "qc.csv")) >= 4
    assert (results / "models" / "vcm" / "t2" / "n3" / "vcm.pt").is_file()
    with h5py.File(results / "dataset.h5") as h5:
        assert h5["cond/t2"].shape == (5, 1, 40, 56, 40)
    qc_segmenter = json.loads((results / "models" / "qc_segmenter" / "segmenter.json").read_text())
    assert qc_segmenter["n_val"] == 1 and qc_segmenter["train_split"] == "train_3"
    assert 0 <= qc_segmenter["lv_dice"]["mean"] <= 1 and qc_segmenter["seconds_per_volume_1_thread"] < 1


def test_evaluation_tstr_summary_and_report(full_run):
    results, report = full_run["results"], full_run["report"]
    table = pd.read_csv(results / "eval" / "vcm" / "lv_brain_skull_n3.csv")
    assert list(table["control"]) == ["controlled", "uncontrolled", "controlled - uncontrolled (paired)"]
    assert table["dice_mean"][:2].between(0, 1).all() and (table["n"] == 1).all()
    assert (table["segmentation"] == "segmenter").all()  # the QC segmenter re-segments the images
    assert table["parameters"][0] > 0 and table["seconds_per_step"][0] > 0  # the training cost columns
    md = (results / "eval" / "table.md").read_text()
    for row in ("backbone (uncontrolled)", "VCM", "Δ VCM − backbone"):
        assert f"| lv_brain_skull | 3 | {row} |" in md, row
    tstr = pd.read_csv(results / "eval" / "tstr.csv")
    assert list(tstr["train_data"]) == ["synthetic", "real", "real+synthetic"]
    summary = (results / "summary.md").read_text()
    assert "TSTR" in summary or "tstr" in summary.lower()
    assert "## QC segmenter" in summary and "### Mask edit" in summary
    edit = json.loads((results / "eval" / "mask_edit" / "vcm" / "lv_brain_skull_n3.json").read_text())
    assert (
        len(edit["rows"]) == 3 and edit["segmentation"] == "segmenter"
    )  # one validation subject x 3 variants
    assert not (
        results / "eval" / "mask_edit" / "vcm" / "t2_n3.json"
    ).exists()  # no LV mask to edit in that set
    assert report.stat().st_size > 100_000


def test_a_rerun_writes_byte_identical_data_models_and_cohort(full_run):
    """Same config and seed, run again from dataset.h5 on: the same bytes (no clock, no path of a temporary file
    in any of them). Last in this module: it rewrites the files the other tests read, with the same bytes."""
    results = full_run["results"]
    files = [
        results / "dataset.h5",
        results / "models" / "vcm" / "lv_brain_skull" / "n3" / "vcm.pt",
        results / "models" / "vcm" / "t2" / "n3" / "vcm.pt",
        results / "cohorts" / "lv_brain_skull" / "cohort.h5",
    ]
    before = {f.name if f.suffix == ".h5" else str(f.parent): sha256_file(f) for f in files}
    mtimes = [f.stat().st_mtime_ns for f in files]
    proc = run_snakemake(full_run["config"], "--forcerun", "dataset", targets=files, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert all(f.stat().st_mtime_ns > m for f, m in zip(files, mtimes, strict=True))  # really made again
    after = {f.name if f.suffix == ".h5" else str(f.parent): sha256_file(f) for f in files}
    assert after == before
