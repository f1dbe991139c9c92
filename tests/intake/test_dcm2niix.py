"""The dcm2niix wrapper reports the line that says why a conversion failed, never the version banner."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from vcm.intake import resolve_settings
from vcm.intake.adni import collect
from vcm.intake.dcm2niix import Dcm2niix, error_line

BANNER = "Chris Rorden's dcm2niiX version v1.0.20220720  (JP2:OpenJPEG) GCC12.2.0 x86-64 (64-bit Linux)"
TRUNCATED = "Warning: File not large enough to store image data: /data/ADNI/I1/ADNI_MR_001.dcm"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (f"{BANNER}\nFound 176 DICOM file(s)\n{TRUNCATED}\n", TRUNCATED),
        (
            f"{BANNER}\n{TRUNCATED}\nError: Unable to determine slice order\n",
            "Error: Unable to determine slice order",
        ),
        (
            f"{BANNER}\nFound 12 DICOM file(s)\nNo valid DICOM images were found\n",
            "No valid DICOM images were found",
        ),
        (
            f"{BANNER}\nFound 3 DICOM file(s)\nConvert 3 DICOM as x (0x0x3x1)\n\n",
            "Convert 3 DICOM as x (0x0x3x1)",
        ),
        (f"{BANNER}\n", "no output besides its version banner"),
        ("  \n", "no output"),
    ],
)
def test_error_line(output: str, expected: str) -> None:
    assert error_line(output) == expected


def fake_dcm2niix(folder: Path, output: str, exit_code: int) -> Path:
    """An executable that prints ``output`` and exits like a dcm2niix failing on a truncated series."""
    exe = folder / "dcm2niix"
    exe.write_text(f"#!/bin/sh\ncat <<'OUT'\n{output}\nOUT\nexit {exit_code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_truncated_series_reports_the_real_line(tmp_path: Path) -> None:
    exe = fake_dcm2niix(tmp_path, f"{BANNER}\nFound 2 DICOM file(s)\n{TRUNCATED}", 1)
    series = tmp_path / "ADNI" / "004_S_0001" / "MPRAGE" / "2010-01-05_09_00_00.0" / "I1"
    series.mkdir(parents=True)
    (series / "ADNI_MR_001.dcm").write_bytes(b"\0" * 200)
    path, why = Dcm2niix(str(exe), tmp_path / "nifti").convert(series, "004_S_0001_I1")
    assert path is None and why == f"dcm2niix exit 1: {TRUNCATED}"
    # ... and so does the intake report
    (tmp_path / "ADNIMERGE.csv").write_text(
        "PTID,VISCODE,EXAMDATE,DX,AGE,PTGENDER\n004_S_0001,bl,2010-01-05,CN,70,Male\n"
    )
    settings = {"root": str(tmp_path), "dcm2niix": str(exe), "nifti_dir": str(tmp_path / "nifti")}
    (outcome,) = collect(resolve_settings(settings))
    assert outcome.reason == "conversion failed" and TRUNCATED in outcome.detail
    assert "version" not in outcome.detail
