"""A synthetic subject's folder ``syn-<i:05d>/``: its NIfTIs and ``subject.json``, the completion mark.

The label map and conditions are written when the subject is planned (again when a retry redraws its plan,
``cohort.retry_new_anatomy``); the kept attempt's ``image`` and ``seg`` (the QC re-segmentation), and its
plan's label map and conditions, when it is finished, then ``subject.json`` (source, seeds, covariates, QC and
privacy screen (:mod:`vcm.privacy`) of every attempt), atomically and last: a folder without it is incomplete and is redone. A rerun keeps a complete
folder whose settings signature matches. All volumes carry the grid affine.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vcm.io import load_nifti, save_nifti, write_json

if TYPE_CHECKING:
    import torch

    from vcm.cohort.sources import SubjectPlan
    from vcm.privacy import PrivacyResult
    from vcm.qc import QCResult

__all__ = [
    "FORMAT_VERSION",
    "SUBJECT_FILE",
    "Attempt",
    "attempt_image",
    "complete_record",
    "read_record",
    "read_volume",
    "volume_path",
    "write_inputs",
    "write_subject",
]

SUBJECT_FILE = "subject.json"
# the layout of subject.json and shard.h5; part of the settings signature, so a new format remakes subjects
# (2: the privacy screen of every attempt; 3: cohort.design targets, image volumes, the LV target check;
# 4: each attempt's plan draw and source)
FORMAT_VERSION = 4


@dataclass
class Attempt:
    """One sample of a subject, the plan it was sampled from, its QC and its privacy screen (``None`` when
    ``qc.privacy.enabled`` is off; a possible copy is one of ``qc``'s failed checks)."""

    plan: SubjectPlan
    attempt: int
    seed: int
    qc: QCResult
    image: np.ndarray
    seg: np.ndarray
    privacy: PrivacyResult | None = None

    def rank(self) -> tuple[int, float]:
        """Fewest failed checks first, then the highest LV Dice."""
        dice = self.qc.metrics.get("dice", 0.0)
        return (self.qc.n_failed, -(dice if math.isfinite(dice) else -1.0))


def volume_path(folder: Path, name: str) -> Path:
    """The NIfTI ``name`` (``image``, ``label``, ``seg`` or a condition) of a subject folder."""
    return folder / f"{name}.nii.gz"


def read_volume(folder: Path, name: str, dtype: Any = np.float32) -> np.ndarray:
    """The array of a subject folder's NIfTI ``name``."""
    return load_nifti(volume_path(folder, name), dtype)[0]


def read_record(folder: Path) -> dict[str, Any]:
    """The subject's ``subject.json``."""
    return json.loads((folder / SUBJECT_FILE).read_text())


def complete_record(folder: Path, signature: str, names: Sequence[str]) -> dict[str, Any] | None:
    """The subject's record when its folder is complete and made with these settings, else ``None``."""
    path = folder / SUBJECT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = ["image", "label", "seg", *names]
    if record.get("signature") != signature or not all(volume_path(folder, f).is_file() for f in files):
        return None
    return record


def write_inputs(folder: Path, plan: SubjectPlan, affine: np.ndarray) -> None:
    """The planned label map and conditions (after clearing a killed run's temporary files)."""
    for stale in folder.glob(".*"):
        stale.unlink()
    save_nifti(volume_path(folder, "label"), plan.label, affine, np.uint16)
    for name, x in plan.conditions.items():
        save_nifti(volume_path(folder, name), x, affine, np.uint8 if x.dtype == np.uint8 else np.float32)


@contextlib.contextmanager
def attempt_image(folder: Path, attempt: int, image: np.ndarray, affine: np.ndarray) -> Iterator[Path]:
    """The attempt's image as a temporary NIfTI in the subject folder: the file a segmentation backend reads."""
    work = folder / f".attempt{attempt}.nii.gz"
    save_nifti(work, image, affine, np.float32)
    try:
        yield work
    finally:
        work.unlink(missing_ok=True)


def write_subject(
    folder: Path,
    attempts: list[Attempt],
    signature: str,
    affine: np.ndarray,
    device: torch.device,
) -> None:
    """Write the kept attempt's image and segmentation, then ``subject.json`` (the completion mark).

    The kept attempt is the first that passed QC, else the best ranked (:meth:`Attempt.rank`); the folder's
    label map and conditions are the last attempt's plan's, rewritten when the kept one was sampled from an
    earlier plan.
    """
    passed = [t for t in attempts if t.qc.passed]
    kept = passed[0] if passed else min(attempts, key=Attempt.rank)
    plan = kept.plan
    if plan is not attempts[-1].plan:
        write_inputs(folder, plan, affine)
    save_nifti(volume_path(folder, "image"), kept.image, affine, np.float32)
    save_nifti(volume_path(folder, "seg"), kept.seg, affine, np.uint16)
    record = {
        "format": FORMAT_VERSION,
        "subject": plan.subject,
        "index": plan.index,
        "source_subject": plan.source_subject,
        "source_index": plan.source_index,
        "new_anatomy": plan.new_anatomy,
        "draw": plan.draw,
        "seed": kept.seed,
        "attempt": kept.attempt,
        "attempts": len(attempts),
        "passed": kept.qc.passed,
        "covariates": plan.covariates.tolist(),
        "covariates_raw": plan.covariates_raw.tolist(),  # the label map's values
        "design": {  # targets in covariate units (the source's value where a covariate has none)
            "target": (plan.targets if plan.targets is not None else plan.covariates_raw).tolist(),
            "designed": list(plan.designed),
        },
        "qc": kept.qc.metrics,
        **({"privacy": kept.privacy.record()} if kept.privacy is not None else {}),
        "tries": [
            {
                "attempt": t.attempt,
                "draw": t.plan.draw,
                "source_index": t.plan.source_index,
                "seed": t.seed,
                "passed": t.qc.passed,
                "kept": t is kept,
                "reasons": "; ".join(t.qc.reasons),
                **t.qc.metrics,
                **(t.privacy.record() if t.privacy is not None else {}),
            }
            for t in attempts
        ],
        "device": device.type,
        "signature": signature,
    }
    write_json(folder / SUBJECT_FILE, _json_safe(record))


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON; read back as NaN
    return x
