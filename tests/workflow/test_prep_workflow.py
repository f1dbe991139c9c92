"""The real Snakefile on a reduced demo: manifest -> registration -> segmentation -> conditions -> dataset.h5."""

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from .conftest import run_snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the workflow once on a 6-subject demo (built by the demo_cohort rule)."""
    import yaml

    root = tmp_path_factory.mktemp("wf")
    results = root / "results"
    cfg = {
        "results": str(results),
        "data": {
            "manifest": f"{results}/demo/manifest.csv",
            "demo": {"n_subjects": 6, "seed": 0, "spacing_mm": 2.0},
        },
        "dataset": {"val_size": 2},
        "training": {"sizes": [2, 4]},
        "condition_sets": {"lv_t2": [["lv"], ["t2"]]},
    }
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(configfile, targets=(results / "dataset.h5", results / "excluded.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


def test_dataset_holds_every_subject_with_conditions_and_covariates(demo_run):
    with h5py.File(demo_run / "dataset.h5") as h5:
        subjects = [s.decode() for s in h5["subjects"][:]]
        assert subjects == [f"sub-{i:03d}" for i in range(1, 7)]
        assert h5["image"].shape == (6, 1, 40, 56, 40)
        img = h5["image"][:].astype(np.float32)
        assert img.min() >= 0 and img.max() == pytest.approx(1.0, abs=1e-3)
        lv = h5["cond/lv"][:]
        assert lv.shape == (6, 1, 40, 56, 40) and lv.max() == 1
        assert set(np.unique(h5["cond/semantics"][:])) <= set(range(9))
        t2 = h5["cond/t2"][:].astype(np.float32)  # the second modality, through the T1's registration
        assert t2.shape == (6, 1, 40, 56, 40) and t2.max() == pytest.approx(1.0, abs=1e-3)
        ventricles = lv[:, 0] > 0
        assert t2[:, 0][ventricles].mean() > 2 * img[:, 0][ventricles].mean()  # bright CSF in T2, dark in T1
        cov = h5["covariates"][:]
        assert cov.shape == (6, 4) and (cov >= 0).all() and (cov <= 1).all()
        raw = h5["covariates_raw"][:]
        assert raw[:, 2].std() / raw[:, 2].mean() > 0.1, "LV volume must vary between subjects"
        assert len(h5["splits/val"]) == 2 and set(h5["splits/train_2"][:]) < set(h5["splits/train_4"][:])
        assert h5.attrs["vcm_version"] and "registration" in h5.attrs["config_yaml"]
    # The LV volumes (the demo's true labels through the precomputed backend) follow the ground truth.
    manifest = pd.read_csv(demo_run / "demo" / "manifest.csv")
    r = np.corrcoef(manifest["true_lv_mm3"], raw[:, 2])[0, 1]
    assert r > 0.95, f"correlation of the prepared and true LV volume {r:.2f}"


def test_every_rule_leaves_a_log_and_pictures(demo_run):
    for rule in ("register_segment", "conditions"):
        assert (demo_run / "logs" / rule / "sub-001.log").is_file()
    assert (demo_run / "logs" / "dataset.log").is_file()
    assert (demo_run / "prep" / "sub-003" / "registration.png").stat().st_size > 10_000
    assert pd.read_csv(demo_run / "excluded.csv").empty


def test_bad_subjects_are_excluded_and_the_rest_finish(demo_run, tmp_path, write_config):
    import nibabel as nib

    demo = demo_run / "demo"
    rows = pd.read_csv(demo / "manifest.csv").iloc[:3]
    rows["t1"] = [str(demo / p) for p in rows["t1"]]
    nan = nib.load(rows["t1"][0])
    data = np.asarray(nan.dataobj, np.float32)
    data[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(data, nan.affine), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), tmp_path / "four_d.nii.gz")
    # Volumes that read cleanly but are no head: a 4×4×4 crop, and noise of a demo head's size.
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "tiny.nii.gz")
    noise = np.random.default_rng(0).random(data.shape).astype(np.float32) * 500
    nib.save(nib.Nifti1Image(noise, nan.affine), tmp_path / "noise.nii.gz")
    bad = pd.DataFrame(
        {
            "subject": ["bad-nan", "bad-missing", "bad-4d", "bad-tiny", "bad-noise"],
            "t1": [
                str(tmp_path / "nan.nii.gz"),
                str(tmp_path / "gone.nii.gz"),
                str(tmp_path / "four_d.nii.gz"),
                str(tmp_path / "tiny.nii.gz"),
                str(tmp_path / "noise.nii.gz"),
            ],
            "age": [60, 61, 62, 63, 64],
            "sex": ["F", "M", "F", "M", "F"],
        }
    )
    # Row-level manifest problems exclude their subject too (data.strict is false by default).
    bad_rows = pd.DataFrame(
        {
            "subject": ["bad-sex", "bad-age"],
            "t1": [rows["t1"][1], rows["t1"][2]],
            "age": ["70", "-3"],
            "sex": ["X", "F"],
        }
    )
    pd.concat([rows[["subject", "t1", "age", "sex"]], bad, bad_rows]).to_csv(
        tmp_path / "manifest.csv", index=False
    )
    results = tmp_path / "results"
    # Reuse the registered template of the first run: the template rule is deterministic.
    shutil.copytree(demo_run / "template", results / "template")
    configfile = write_config(
        {
            "results": str(results),
            "data": {"manifest": str(tmp_path / "manifest.csv")},
            "dataset": {"val_size": 1},
            "training": {"sizes": [2]},
            "segmentation": {"backend": "atlas"},  # no seg column here; the offline atlas stays covered
        }
    )
    proc = run_snakemake(configfile, "--keep-going", targets=(results / "dataset.h5",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    excluded = pd.read_csv(results / "excluded.csv").set_index("subject")
    assert list(excluded.index) == [
        "bad-nan",
        "bad-missing",
        "bad-4d",
        "bad-tiny",
        "bad-sex",
        "bad-age",
        "bad-noise",
    ]
    assert (
        set(excluded["stage"][:-1]) == {"check_inputs"} and excluded.loc["bad-noise", "stage"] == "register"
    )
    assert excluded.loc["bad-tiny", "gate"] == "field_of_view, voxel_count"
    assert "template_similarity" in excluded.loc["bad-noise", "gate"]
    assert "NaN" in excluded.loc["bad-nan", "reason"]
    assert "not found" in excluded.loc["bad-missing", "reason"]
    assert "4-D" in excluded.loc["bad-4d", "reason"]
    assert excluded.loc["bad-sex", "reason"] == "sex 'X' is not F/M (or 0/1, female/male)"
    assert excluded.loc["bad-age", "reason"] == "age '-3' is negative"
    log = (results / "logs" / "check_inputs.log").read_text()
    assert "subject bad-nan: excluded at check_inputs:" in log
    assert "subject bad-sex: excluded at check_inputs: sex 'X' is not F/M" in log
    noise_log = (results / "logs" / "register_segment" / "bad-noise.log").read_text()
    assert "subject bad-noise: excluded at register: correlation with the template" in noise_log
    assert "subject bad-noise: excluded at register; nothing to do at segment" in noise_log
    assert pd.read_csv(results / "passed.csv")["subject"].tolist() == ["sub-001", "sub-002", "sub-003"]
    with h5py.File(results / "dataset.h5") as h5:
        assert [s.decode() for s in h5["subjects"][:]] == ["sub-001", "sub-002", "sub-003"]


@pytest.mark.parametrize(
    ("rows", "strict", "message"),
    [
        (
            {"subject": ["a", "a"], "t1": ["x", "y"], "age": [1, 2], "sex": ["F", "M"]},
            False,
            "duplicate subject id(s) a",
        ),
        ({"subject": ["a"], "t1": ["x"], "sex": ["F"]}, False, "missing required column(s) age"),
        # a row-level problem excludes its subject, unless data.strict asks to stop on it
        (
            {"subject": ["a", "b"], "t1": ["x", "y"], "age": [1, 2], "sex": ["F", "X"]},
            True,
            "subject b: sex 'X' is not F/M (or 0/1, female/male)",
        ),
    ],
)
def test_broken_manifest_stops_before_any_job(tmp_path, write_config, rows, strict, message):
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    configfile = write_config(
        {
            "results": str(tmp_path / "results"),
            "data": {"manifest": str(tmp_path / "manifest.csv"), "strict": strict},
        }
    )
    proc = run_snakemake(configfile, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "results" / "logs").exists()


def test_bad_config_value_stops_with_the_key(tmp_path, write_config):
    configfile = write_config(
        {"results": str(tmp_path / "results"), "registration": {"transform": "Bspline"}}
    )
    proc = run_snakemake(configfile, "-n", timeout=120)
    assert proc.returncode != 0
    assert "config key 'registration.transform': 'Bspline' is not one of" in proc.stdout + proc.stderr
