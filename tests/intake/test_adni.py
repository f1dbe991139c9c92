"""ADNI intake on a synthetic download: real DICOM through the real dcm2niix, ADNIMERGE-shaped CSV."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from vcm.cli import main
from vcm.errors import StageError
from vcm.intake import resolve_settings
from vcm.intake.adni import collect
from vcm.intake.cli import cli

pytestmark = pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")


def years(days: int) -> float:
    return days / 365.25


@pytest.fixture(scope="module")
def default_run(adni_download: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python -m vcm manifest`` with default settings: outputs and printed summary."""
    out_dir = tmp_path_factory.mktemp("adni_out")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli(["--source", "adni", "--root", str(adni_download), "--out", str(out_dir / "manifest.csv"),
                  "--nifti-dir", str(out_dir / "nifti")])  # fmt: skip
    return {
        "rc": rc,
        "stdout": stdout.getvalue(),
        "manifest": pd.read_csv(out_dir / "manifest.csv"),
        "report": pd.read_csv(out_dir / "manifest_intake.csv", keep_default_na=False),
        "nifti_dir": out_dir / "nifti",
    }


def run(adni_download: Path, tmp_path: Path, **settings) -> dict:
    """collect() with some settings changed; outcomes by participant."""
    base = {
        "source": "adni",
        "root": str(adni_download),
        "out": str(tmp_path / "m.csv"),
        "nifti_dir": str(tmp_path / "n"),
    }
    return {o.participant: o for o in collect(resolve_settings({**base, **settings}))}


def test_manifest_rows_ages_sexes(default_run: dict) -> None:
    assert default_run["rc"] == 0
    manifest = default_run["manifest"].set_index("subject")
    assert list(default_run["manifest"].columns) == ["subject", "t1", "age", "sex"]
    assert list(manifest.index) == ["002_S_0001", "002_S_0002", "002_S_0009"]
    # age at scan = baseline AGE + (scan date - baseline EXAMDATE) / 365.25
    assert manifest.loc["002_S_0001", "age"] == pytest.approx(
        74.2 + years(8), abs=0.01
    )  # 2006-04-10 -> 04-18
    assert manifest.loc["002_S_0002", "age"] == pytest.approx(
        70.3 + years(16), abs=0.01
    )  # 2009-12-20 -> 01-05
    assert manifest.loc["002_S_0009", "age"] == pytest.approx(72.0 + years(12), abs=0.01)
    assert manifest["sex"].to_dict() == {"002_S_0001": "M", "002_S_0002": "F", "002_S_0009": "F"}
    # the baseline DICOM was converted; NIfTI downloads are used in place (0009: its same-day repeat)
    assert manifest.loc["002_S_0001", "t1"] == str(default_run["nifti_dir"] / "002_S_0001_I40001.nii.gz")
    assert manifest.loc["002_S_0002", "t1"].endswith("/I200001/ADNI_002_S_0002_MR_MP-RAGE_I200001.nii")
    assert "/MPRAGE_Repeat/" in manifest.loc["002_S_0009", "t1"]
    assert all(Path(p).is_file() for p in manifest["t1"])


def test_drop_reasons(default_run: dict) -> None:
    report = default_run["report"].set_index("participant")
    # every downloaded participant is reported, and only those (002_S_0010 is in ADNIMERGE only)
    assert sorted(report.index) == [f"002_S_{i:04d}" for i in range(1, 10)]
    dropped = report[report["status"] == "dropped"]["reason"].to_dict()
    assert dropped == {
        "002_S_0003": "wrong diagnosis",
        "002_S_0004": "no demographics",
        "002_S_0005": "no T1 series",
        "002_S_0006": "conversion failed",
        "002_S_0007": "no demographics",
        "002_S_0008": "unreadable",
    }
    assert report.loc["002_S_0003", "diagnosis"] == "Dementia"
    assert "3-plane_localizer" in report.loc["002_S_0005", "detail"]
    assert "dcm2niix exit" in report.loc["002_S_0006", "detail"]
    assert "180 days" in report.loc["002_S_0007", "detail"]
    assert report.loc["002_S_0001", "series"] == "MPRAGE" and report.loc["002_S_0001", "visit"] == "bl"
    assert report.loc["002_S_0001", "scan_date"] == "2006-04-18"
    assert report.loc["002_S_0001", "path"].endswith("/2006-04-18_08_20_30.0/I40001")
    assert "conversion failed" in report.loc["002_S_0009", "detail"]  # the repeat's note names the failure
    assert "9 participants found, 3 kept, 6 dropped" in default_run["stdout"]
    assert "dropped, no demographics: 2" in default_run["stdout"]


def test_converted_nifti_and_sidecar(default_run: dict, dicom_facts: dict) -> None:
    nifti = default_run["nifti_dir"] / "002_S_0001_I40001.nii.gz"
    img = nib.load(str(nifti))
    rows, columns, slices = dicom_facts["shape"]
    assert img.shape == (columns, rows, slices)
    row_spacing, column_spacing = dicom_facts["spacing"]
    assert img.header.get_zooms() == pytest.approx((column_spacing, row_spacing, dicom_facts["thickness"]))
    # same voxel values (dcm2niix may flip rows into NIfTI orientation)
    assert np.array_equal(np.sort(np.asarray(img.dataobj).ravel()), np.sort(dicom_facts["volume"].ravel()))
    sidecar = json.loads((default_run["nifti_dir"] / "002_S_0001_I40001.json").read_text())
    assert sidecar["SeriesDescription"] == "MPRAGE"
    # the failed conversions left nothing behind: no temporary folders, no half-written files
    assert sorted(p.name for p in default_run["nifti_dir"].iterdir()) == [
        "002_S_0001_I40001.json",
        "002_S_0001_I40001.nii.gz",
    ]


def test_visit_latest_and_viscode(adni_download: Path, tmp_path: Path) -> None:
    latest = run(adni_download, tmp_path, visit="latest")
    assert latest["002_S_0001"].status == "kept" and latest["002_S_0001"].visit == "m12"
    assert latest["002_S_0001"].t1.endswith("ADNI_002_S_0001_MR_MPRAGE_I80001.nii.gz")
    assert latest["002_S_0001"].age == pytest.approx(74.2 + years(375), abs=0.01)  # 2006-04-10 -> 2007-04-20
    assert (latest["002_S_0009"].status, latest["002_S_0009"].reason) == ("dropped", "no diagnosis")
    m12 = run(adni_download, tmp_path, visit="m12")
    assert m12["002_S_0001"].status == "kept" and m12["002_S_0001"].scan_date == "2007-04-20"
    assert m12["002_S_0002"].reason == "no scan at visit"


def test_diagnosis_tolerance_and_series_settings(adni_download: Path, tmp_path: Path) -> None:
    anyone = run(adni_download, tmp_path, diagnosis="any")
    assert anyone["002_S_0003"].status == "kept" and anyone["002_S_0003"].sex == "F"
    # DX_bl says SMC for 0002, whom DX (the default) calls CN at that visit
    baseline_dx = run(adni_download, tmp_path, diagnosis=["CN"], diagnosis_column="DX_bl")
    assert (
        baseline_dx["002_S_0002"].reason == "wrong diagnosis" and baseline_dx["002_S_0002"].diagnosis == "SMC"
    )
    tolerant = run(adni_download, tmp_path, date_tolerance_days=600)
    assert tolerant["002_S_0007"].status == "kept"
    assert tolerant["002_S_0007"].age == pytest.approx(68.0 + years(508), abs=0.01)
    # a pattern the MPRAGE folders do not match: 0001 has only its localizer left, which is excluded
    spgr_only = run(adni_download, tmp_path, series_pattern="spgr")
    assert spgr_only["002_S_0001"].reason == "no T1 series"


def test_config_file_and_flag_override(
    adni_download: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "project: x\nintake:\n  source: adni\n"
        f"  root: {adni_download / 'ADNI'}\n"  # the ADNI folder itself; ADNIMERGE.csv is found next to it
        f"  out: {tmp_path / 'from_config.csv'}\n  nifti_dir: {tmp_path / 'nifti'}\n  diagnosis: [CN, Dementia]\n"
    )
    assert cli(["--config", str(config), "--out", str(tmp_path / "sub" / "flag.csv")]) == 0
    manifest = pd.read_csv(tmp_path / "sub" / "flag.csv")
    assert "002_S_0003" in set(manifest["subject"])  # diagnosis from the config
    assert (tmp_path / "sub" / "flag_intake.csv").is_file()
    assert not (tmp_path / "from_config.csv").exists()  # the flag won
    assert "manifest:" in capsys.readouterr().out


def test_expected_failures_are_one_line(
    adni_download: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(StageError, match="ADNI download folder not found"):
        cli(["--root", str(tmp_path / "nowhere")])
    merge = pd.read_csv(adni_download / "ADNIMERGE.csv").drop(columns=["AGE"])
    merge.to_csv(tmp_path / "ADNIMERGE.csv", index=False)
    with pytest.raises(StageError, match=r"ADNIMERGE.csv: missing column\(s\) AGE"):
        cli(["--root", str(adni_download), "--adnimerge", str(tmp_path / "ADNIMERGE.csv")])
    config = tmp_path / "c.yaml"
    config.write_text("intake:\n  root: x\n  visits: baseline\n")
    with pytest.raises(StageError, match="unknown key.*visits"):
        cli(["--config", str(config)])
    # through the stage runner: exit code 1 and one line on stderr
    rc = main(["manifest", "--root", str(adni_download), "--adnimerge", str(tmp_path / "ADNIMERGE.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and err.startswith("vcm manifest: error:") and "AGE" in err


def test_nothing_kept_writes_report_only(adni_download: Path, tmp_path: Path) -> None:
    out = tmp_path / "none.csv"
    with pytest.raises(StageError, match="no participant kept"):
        cli(
            [
                "--root",
                str(adni_download),
                "--diagnosis",
                "LMCI",
                "--out",
                str(out),
                "--nifti-dir",
                str(tmp_path / "n"),
            ]
        )
    assert not out.exists()
    report = pd.read_csv(tmp_path / "none_intake.csv")
    assert (report["status"] == "dropped").all() and len(report) == 9


def test_documented_relative_folders_resolve_in_the_pipeline(
    adni_download: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented command, with relative folders, run from a folder that is not the manifest's."""
    from vcm.prep.manifest import read_manifest

    monkeypatch.chdir(tmp_path)  # the repository root: resources/ and results/ below it
    root = os.path.relpath(adni_download, tmp_path)
    argv = ["--source", "adni", "--root", root, "--out", "resources/manifest.csv"]
    assert cli([*argv, "--nifti-dir", "results/intake/nifti"]) == 0
    manifest = read_manifest("resources/manifest.csv")  # resolves relative paths against resources/
    assert len(manifest) == 3 and "002_S_0001" in set(manifest["subject"])  # a converted DICOM series
    assert all(Path(p).is_file() for p in manifest["t1"]), list(manifest["t1"])
    monkeypatch.chdir(tmp_path / "resources")  # the same manifest read from elsewhere
    assert all(Path(p).is_file() for p in read_manifest("manifest.csv")["t1"])
