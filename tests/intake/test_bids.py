"""BIDS intake on a synthetic dataset: sessions, runs, participants.tsv quirks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from vcm.errors import StageError
from vcm.intake import resolve_settings
from vcm.intake.bids import collect
from vcm.intake.cli import cli


def run(root: Path, tmp_path: Path, **settings) -> dict:
    """collect() with some settings changed; outcomes by participant."""
    base = {"source": "bids", "root": str(root), "out": str(tmp_path / "m.csv")}
    return {o.participant: o for o in collect(resolve_settings({**base, **settings}))}


def test_manifest_and_report(bids_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cohort.csv"
    assert cli(["--source", "bids", "--root", str(bids_dataset), "--out", str(out)]) == 0
    manifest = pd.read_csv(out).set_index("subject")
    assert list(manifest.index) == ["sub-01", "sub-02", "sub-04", "sub-06"]
    # sub-01: first session, lowest run (run-1 before run-2 and run-10), age from its sessions.tsv
    assert manifest.loc["sub-01", "t1"] == str(
        (bids_dataset / "sub-01/ses-01/anat/sub-01_ses-01_run-1_T1w.nii.gz").resolve()
    )
    assert manifest["age"].to_dict() == pytest.approx(
        {"sub-01": 34.6, "sub-02": 61.0, "sub-04": 89.0, "sub-06": 50.25}, abs=0.01
    )
    assert manifest["sex"].to_dict() == {"sub-01": "F", "sub-02": "M", "sub-04": "M", "sub-06": "F"}
    report = pd.read_csv(tmp_path / "cohort_intake.csv", keep_default_na=False).set_index("participant")
    assert report[report["status"] == "dropped"]["reason"].to_dict() == {
        "sub-03": "no demographics",  # folder but not in participants.tsv
        "sub-05": "no T1 series",  # listed but no folder
        "sub-07": "no demographics",  # age n/a
        "sub-08": "no T1 series",  # T2w only
        "sub-09": "unreadable",
    }
    assert (
        report.loc["sub-01", "visit"] == "ses-01"
        and report.loc["sub-01", "series"] == "sub-01_ses-01_run-1_T1w.nii.gz"
    )
    assert "3 T1w files" in report.loc["sub-01", "detail"]
    assert "9 participants found, 4 kept, 5 dropped" in capsys.readouterr().out


def test_session_choice(bids_dataset: Path, tmp_path: Path) -> None:
    last = run(bids_dataset, tmp_path, session="last")
    assert last["sub-01"].t1.endswith("sub-01_ses-02_T1w.nii.gz") and last["sub-01"].age == pytest.approx(
        36.1
    )
    named = run(bids_dataset, tmp_path, session="ses-02")
    assert named["sub-01"].status == "kept" and named["sub-01"].visit == "ses-02"
    assert named["sub-02"].reason == "no scan at visit"  # a dataset without sessions has no ses-02
    assert run(bids_dataset, tmp_path, session="02")["sub-01"].visit == "ses-02"


def test_diagnosis_column_and_sex_codes(bids_dataset: Path, tmp_path: Path) -> None:
    by_group = run(bids_dataset, tmp_path, diagnosis_column="group")
    assert (by_group["sub-06"].reason, by_group["sub-06"].diagnosis) == ("wrong diagnosis", "AD")
    assert by_group["sub-01"].status == "kept"
    # a dataset coding 1 = female
    assert run(bids_dataset, tmp_path, sex_codes={1: "F", 2: "M"})["sub-04"].sex == "F"
    assert run(bids_dataset, tmp_path, sex_codes={})["sub-04"].reason == "no demographics"


def test_bad_participants_tsv(bids_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\n")
    with pytest.raises(StageError, match=r"participants.tsv: missing column\(s\) sex"):
        run(root, tmp_path)
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t30\tF\n01\t31\tM\n")
    with pytest.raises(StageError, match="sub-01 appears more than once"):
        run(root, tmp_path)
    (root / "participants.tsv").unlink()
    with pytest.raises(StageError, match="participants.tsv: not found"):
        run(root, tmp_path)
    with pytest.raises(StageError, match="unknown key"):
        resolve_settings({"root": "x", "sesion": "first"})
