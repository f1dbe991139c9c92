"""ADNI series choice on a NIfTI-only download: raw before preprocessed, reformats and post-contrast
series excluded, every series not taken reported with why; the DX_bl hint for an empty DX."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from vcm.errors import StageError
from vcm.intake import resolve_settings
from vcm.intake.adni import collect
from vcm.intake.cli import cli


def run(root: Path, tmp_path: Path, **settings) -> dict:
    """collect() with some settings changed; outcomes by participant."""
    base = {"source": "adni", "root": str(root), "out": str(tmp_path / "m.csv"), "nifti_dir": str(tmp_path)}
    return {o.participant: o for o in collect(resolve_settings({**base, **settings}))}


@pytest.fixture
def report(adni_series_download: Path, tmp_path: Path) -> pd.DataFrame:
    """The intake report of ``vcm manifest`` with default settings, by participant."""
    out = tmp_path / "manifest.csv"
    assert cli(["--root", str(adni_series_download), "--out", str(out), "--nifti-dir", str(tmp_path)]) == 0
    return pd.read_csv(tmp_path / "manifest_intake.csv", keep_default_na=False).set_index("participant")


def test_raw_series_preferred_and_skipped_series_reported(report: pd.DataFrame) -> None:
    chosen = report.loc["003_S_0001"]
    # the preprocessed series sorts first by name; the raw MPRAGE of the same day is taken
    assert chosen["status"] == "kept" and chosen["series"] == "MPRAGE"
    assert chosen["t1"].endswith("/MPRAGE/2010-01-05_09_00_00.0/I1002/ADNI_003_S_0001_MR_I1002.nii.gz")
    skipped = chosen["skipped"].split("; ")
    assert set(skipped) == {
        "MPR__GradWarp__B1_Correction__N3__Scaled/I1001: preprocessed, raw preferred (series_preference)",
        "MPRAGE_MPR_Cor: reformat (series_reformat)",
        "MPR_Cor: reformat (series_reformat)",
        "Axial_T1_Post: post-contrast (series_contrast)",
        "T1+C: post-contrast (series_contrast)",
        "Localizer: not a T1 (series_pattern)",
    }
    # only a preprocessed series that day: it is the fallback, and nothing else was passed over
    assert report.loc["003_S_0002", "status"] == "kept"
    assert report.loc["003_S_0002", "series"] == "MPR__GradWarp__B1_Correction__N3__Scaled"
    assert report.loc["003_S_0002", "skipped"] == ""
    # a sagittal acquisition is not a reformat
    assert report.loc["003_S_0005", "status"] == "kept"
    assert report.loc["003_S_0005", "series"] == "Accelerated_Sagittal_MPRAGE"


def test_preprocessed_preference(adni_series_download: Path, tmp_path: Path) -> None:
    outcome = run(adni_series_download, tmp_path, series_preference="preprocessed")["003_S_0001"]
    assert outcome.series == "MPR__GradWarp__B1_Correction__N3__Scaled"
    assert "MPRAGE/I1002: raw, preprocessed preferred (series_preference)" in outcome.skipped
    by_name = run(adni_series_download, tmp_path, series_preference="any")["003_S_0001"]
    assert by_name.series == "MPR__GradWarp__B1_Correction__N3__Scaled"  # name order, as before


def test_reformats_and_post_contrast_excluded(
    report: pd.DataFrame, adni_series_download: Path, tmp_path: Path
) -> None:
    assert report.loc["003_S_0003", "reason"] == "no T1 series"
    assert set(report.loc["003_S_0003", "skipped"].split("; ")) == {
        "Axial_T1_Post: post-contrast (series_contrast)",
        "MPRAGE_MPR_Cor: reformat (series_reformat)",
    }
    # the patterns are settings: empty ones switch the exclusions off
    kept = run(adni_series_download, tmp_path, series_reformat="", series_contrast="")["003_S_0003"]
    assert kept.status == "kept" and kept.series == "Axial_T1_Post"


def test_empty_diagnosis_hints_at_baseline_column(
    report: pd.DataFrame, adni_series_download: Path, tmp_path: Path
) -> None:
    assert report.loc["003_S_0004", "reason"] == "no diagnosis"
    detail = report.loc["003_S_0004", "detail"]
    assert "diagnosis column 'DX' is empty" in detail
    assert "--diagnosis-column DX_bl would keep it" in detail
    assert run(adni_series_download, tmp_path, diagnosis_column="DX_bl")["003_S_0004"].status == "kept"
    # no hint when DX_bl would not keep the participant either
    merge = pd.read_csv(adni_series_download / "ADNIMERGE.csv")
    merge.loc[merge["PTID"] == "003_S_0004", "DX_bl"] = "SMC"
    merge.to_csv(tmp_path / "ADNIMERGE.csv", index=False)
    outcome = run(adni_series_download, tmp_path, adnimerge=str(tmp_path / "ADNIMERGE.csv"))["003_S_0004"]
    assert outcome.reason == "no diagnosis" and "DX_bl is SMC" in outcome.detail
    assert "would keep it" not in outcome.detail


def test_series_preference_is_validated() -> None:
    with pytest.raises(StageError, match="intake.series_preference"):
        resolve_settings({"root": "r", "series_preference": "newest"})
    with pytest.raises(StageError, match="intake.series_reformat: bad regular expression"):
        resolve_settings({"root": "r", "series_reformat": "mpr("})
