"""The dcm2niix wrapper of the ADNI intake: one DICOM series to one NIfTI + JSON sidecar, atomically.

Kept apart from :mod:`vcm.intake.adni` because it is about the converter, not about ADNI: how it is
called, how its output is checked and moved into place, and which line of its output says why it failed
(dcm2niix prints its version banner first, so the first line is never the reason).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from vcm.errors import StageError
from vcm.intake import check_volume

__all__ = ["DCM2NIIX_TIMEOUT_S", "Dcm2niix", "error_line"]

DCM2NIIX_TIMEOUT_S = 600  # a 3-D T1 converts in seconds; this only stops a hung process
# "Chris Rorden's dcm2niiX version v1.0.20220720 ..." (the first line of every run)
_BANNER_RE = re.compile(r"dcm2nii\S*\s+version", re.IGNORECASE)
_ERROR_RE = re.compile(r"error|no valid|unable|failed", re.IGNORECASE)
_WARNING_RE = re.compile(r"warning", re.IGNORECASE)


def error_line(output: str) -> str:
    """The line of dcm2niix's output that says why it failed.

    The first line naming an error (``Error``, ``No valid``, ``Unable``, ``failed``), else the first
    warning, else the last line; never the version banner.

    Args:
        output: dcm2niix's stdout and stderr.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    lines = [line for line in lines if not _BANNER_RE.search(line)]
    if not lines:
        return "no output besides its version banner" if output.strip() else "no output"
    errors = [line for line in lines if _ERROR_RE.search(line)]
    warnings = [line for line in lines if _WARNING_RE.search(line)]
    return (errors or warnings or lines[-1:])[0][:300]


class Dcm2niix:
    """Convert DICOM series to NIfTI with dcm2niix, writing into ``nifti_dir`` atomically.

    dcm2niix writes into a temporary folder next to the final files; the image is checked there and
    renamed into place, so a failed or interrupted conversion never leaves a file under the final name.
    """

    def __init__(self, exe: str, nifti_dir: str | Path, overwrite: bool = False) -> None:
        self.exe, self.nifti_dir, self.overwrite = exe, Path(nifti_dir), overwrite
        self._resolved: str | None = None

    def _executable(self) -> str:
        # Resolved on first use: a download of NIfTIs only does not need dcm2niix installed.
        if self._resolved is None:
            self._resolved = shutil.which(self.exe)
            if self._resolved is None:
                raise StageError(
                    f"intake.dcm2niix: '{self.exe}' not found (install dcm2niix or set its path)"
                )
        return self._resolved

    def convert(self, dicom_dir: Path, name: str) -> tuple[Path | None, str]:
        """Convert one series to ``<nifti_dir>/<name>.nii.gz`` (+ ``.json``).

        Returns:
            (the NIfTI, a note) on success, (None, why it failed) on failure.
        """
        target = self.nifti_dir / f"{name}.nii.gz"
        sidecar = self.nifti_dir / f"{name}.json"
        if not self.overwrite and target.is_file() and sidecar.is_file() and check_volume(target) is None:
            return target, "reused an earlier conversion"
        exe = self._executable()
        self.nifti_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.nifti_dir))
        try:
            cmd = [exe, "-z", "y", "-b", "y", "-f", name, "-o", str(tmp), str(dicom_dir)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DCM2NIIX_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None, f"dcm2niix timed out after {DCM2NIIX_TIMEOUT_S} s"
            outputs = sorted(tmp.glob("*.nii.gz"))
            if proc.returncode != 0 or not outputs:
                return (
                    None,
                    f"dcm2niix exit {proc.returncode}: {error_line(proc.stdout + proc.stderr)}",
                )
            # Several outputs mean several series or echoes in one folder: take the unsuffixed one only.
            chosen = tmp / f"{name}.nii.gz"
            if not chosen.is_file():
                if len(outputs) != 1:
                    names = ", ".join(p.name for p in outputs)
                    return None, f"dcm2niix wrote {len(outputs)} images ({names}), expected one"
                chosen = outputs[0]
            problem = check_volume(chosen)
            if problem:
                return None, f"dcm2niix output {problem}"
            json_out = chosen.with_name(chosen.name[: -len(".nii.gz")] + ".json")
            note = ""
            if json_out.is_file():
                os.replace(json_out, sidecar)  # sidecar first: a NIfTI under the final name has its JSON
            else:
                note = "dcm2niix wrote no JSON sidecar"
            os.replace(chosen, target)
            return target, note
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
