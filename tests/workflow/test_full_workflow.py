"""The whole DAG on a tiny demo with a random-weight tiny backbone: models, cohort with QC, evaluation,
TSTR, summary and the Snakemake report. Checks that every stage connects and writes what it promises;
image quality is the shipped backbone's business (see docs/backbone.md)."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from .conftest import run_snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from vcm.models.backbone import Backbone, build_networks, save_bundle, tiny_definitions

    root = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    defs = tiny_definitions()
    save_bundle(root / "bundle", Backbone(*build_networks(defs), definitions=defs))
    results = root / "results"
    cfg = {
        "results": str(results),
        "data": {
            "manifest": f"{results}/demo/manifest.csv",
            "demo": {"n_subjects": 5, "seed": 0, "spacing_mm": 2.0},
        },
        "dataset": {"val_size": 1},
        # the second modality end to end: registered with the T1's transform, stored, trained on
        "condition_sets": {"lv_brain_skull": [["lv", "brain"], ["skull"]], "t2": [["t2"]]},
        "backbone": {"kind": "tiny", "bundle": str(root / "bundle")},
        "training": {
            "sizes": [3],
            "steps": 6,
            "minutes": None,
            "batch_size": 2,
            "checkpoint_every": 3,
            "preview": {"subjects": 1, "steps": 3},
        },
        "cohort": {"sets": ["lv_brain_skull"], "size": 4, "shard_size": 2, "steps": 3, "batch_size": 2},
        "qc": {"max_tries": 2, "segmenter": {"steps": 20}},
        "tstr": {"steps": 10, "passed_only": False},  # random weights: no subject passes QC
    }
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(configfile, timeout=2400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = root / "report.html"
    proc = run_snakemake(configfile, "--report", str(report), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return results, report


def test_model_cohort_and_qc(full_run):
    results, _ = full_run
    model = results / "models" / "lv_brain_skull" / "n3"
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
    assert (results / "models" / "t2" / "n3" / "vcm.pt").is_file()
    with h5py.File(results / "dataset.h5") as h5:
        assert h5["cond/t2"].shape == (5, 1, 40, 56, 40)
    qc_segmenter = json.loads((results / "models" / "qc_segmenter" / "segmenter.json").read_text())
    assert qc_segmenter["n_val"] == 1 and qc_segmenter["train_split"] == "train_3"
    assert 0 <= qc_segmenter["lv_dice"]["mean"] <= 1 and qc_segmenter["seconds_per_volume_1_thread"] < 1


def test_evaluation_tstr_summary_and_report(full_run):
    results, report = full_run
    table = pd.read_csv(results / "eval" / "lv_brain_skull_n3.csv")
    assert list(table["control"]) == ["controlled", "uncontrolled", "controlled - uncontrolled (paired)"]
    assert table["dice_mean"][:2].between(0, 1).all() and (table["n"] == 1).all()
    assert (table["segmentation"] == "segmenter").all()  # the QC segmenter re-segments the images
    tstr = pd.read_csv(results / "eval" / "tstr.csv")
    assert list(tstr["train_data"]) == ["synthetic", "real", "real+synthetic"]
    summary = (results / "summary.md").read_text()
    assert "TSTR" in summary or "tstr" in summary.lower()
    assert "## QC segmenter" in summary and "### Mask edit" in summary
    edit = json.loads((results / "eval" / "mask_edit" / "lv_brain_skull_n3.json").read_text())
    assert (
        len(edit["rows"]) == 3 and edit["segmentation"] == "segmenter"
    )  # one validation subject x 3 variants
    assert not (results / "eval" / "mask_edit" / "t2_n3.json").exists()  # no LV mask to edit in that set
    assert report.stat().st_size > 100_000
