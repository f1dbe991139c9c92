"""Real data intake: build the manifest (``subject, t1, age, sex``) from an ADNI download or a BIDS dataset.

Both readers (:mod:`vcm.intake.adni`, :mod:`vcm.intake.bids`) return one :class:`Outcome` per participant
found, kept or dropped with a reason from a fixed vocabulary, so that the intake report says exactly why
each participant is or is not in the manifest. This module holds what they share: the settings (the
``intake`` section of the config), the drop reasons, image checks and the writers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from vcm.errors import StageError
from vcm.io import write_text

__all__ = [
    "CONVERSION_FAILED",
    "DEFAULTS",
    "MANIFEST_COLUMNS",
    "NO_DEMOGRAPHICS",
    "NO_DIAGNOSIS",
    "NO_SCAN_AT_VISIT",
    "NO_T1",
    "REASONS",
    "SERIES_PREFERENCES",
    "UNREADABLE",
    "WRONG_DIAGNOSIS",
    "Outcome",
    "check_volume",
    "manifest_frame",
    "natural_key",
    "parse_sex",
    "report_frame",
    "report_path",
    "resolve_settings",
    "summary",
    "write_outputs",
]

log = logging.getLogger(__name__)

# Drop reasons: a fixed vocabulary so that reports can be counted and compared across runs.
NO_T1 = "no T1 series"
NO_DEMOGRAPHICS = "no demographics"
NO_DIAGNOSIS = "no diagnosis"
WRONG_DIAGNOSIS = "wrong diagnosis"
NO_SCAN_AT_VISIT = "no scan at visit"
CONVERSION_FAILED = "conversion failed"
UNREADABLE = "unreadable"
REASONS = (
    NO_T1,
    NO_DEMOGRAPHICS,
    NO_DIAGNOSIS,
    WRONG_DIAGNOSIS,
    NO_SCAN_AT_VISIT,
    CONVERSION_FAILED,
    UNREADABLE,
)

MANIFEST_COLUMNS = ["subject", "t1", "age", "sex"]
SERIES_PREFERENCES = ("raw", "preprocessed", "any")

# The `intake` section of config/config.yaml; docs/intake_config.yaml documents each key.
DEFAULTS: dict[str, Any] = {
    "source": "adni",
    "root": None,
    "adnimerge": None,
    "diagnosis": ["CN"],
    "diagnosis_column": None,
    "visit": "baseline",
    "session": "first",
    "series_pattern": r"mp-?rage|mpr|ir-?f?spgr|t1",
    "series_exclude": r"locali[sz]er|scout|calibration|survey|flair",
    # Reformats of the T1 into another plane: MPRAGE_MPR_Cor, MPR_Sag, Ax_Reformat (not Sagittal_3D_...).
    "series_reformat": r"reformat|(?<![a-z0-9])mpr[_ -]?(?:cor|sag|tra|ax)(?![a-z])"
    r"|(?<![a-z0-9])(?:cor|sag|tra|ax)[_ -]?mpr(?![a-z])",
    # Post-contrast T1s: Axial_T1_Post, T1+C, T1_C+, T1_GAD.
    "series_contrast": r"(?<![a-z])(?:post|gad|gado|gadolinium)(?![a-z])|\+ ?c(?![a-z])|(?<![a-z])c ?\+",
    # The archive's preprocessed versions: MPR__GradWarp__B1_Correction__N3__Scaled, MT1__N3m.
    "series_preprocessed": r"gradwarp|b1[_ -]?correction|(?<![a-z0-9])n3m?(?![a-z0-9])|scaled",
    "series_preference": "raw",
    "date_tolerance_days": 180,
    "sex_codes": {"0": "F", "1": "M"},
    "dcm2niix": "dcm2niix",
    "overwrite": False,
    "out": "resources/manifest.csv",
    "nifti_dir": "results/intake/nifti",
}


@dataclass
class Outcome:
    """What happened to one participant: kept (with its manifest row) or dropped (with a reason).

    Attributes:
        participant: the participant id (ADNI PTID, BIDS ``sub-<label>``); the manifest's ``subject``.
        status: ``kept`` or ``dropped``.
        reason: empty when kept, else one of :data:`REASONS`.
        detail: one human-readable line saying what was found.
        series: the chosen series (ADNI series description, BIDS file name).
        path: the chosen source (ADNI image folder or NIfTI, BIDS NIfTI).
        skipped: ADNI: the series not taken, ``<description>[/<image id>]: <why>`` joined by ``; ``.
        t1: the NIfTI written to the manifest, as an absolute path.
        visit: ADNI VISCODE or BIDS session of the chosen scan.
        scan_date: ADNI scan date (YYYY-MM-DD).
        diagnosis: the diagnosis the filter saw.
        age: age at scan in years.
        sex: ``F`` or ``M``.
    """

    participant: str
    status: str = "dropped"
    reason: str = ""
    detail: str = ""
    series: str = ""
    path: str = ""
    skipped: str = ""
    t1: str = ""
    visit: str = ""
    scan_date: str = ""
    diagnosis: str = ""
    age: float | None = None
    sex: str = ""

    def drop(self, reason: str, detail: str) -> Outcome:
        """Mark dropped for ``reason`` and return self (so readers can ``return outcome.drop(...)``)."""
        assert reason in REASONS, reason
        self.status, self.reason, self.detail = "dropped", reason, detail
        return self

    def keep(self, t1: str | Path, detail: str = "") -> Outcome:
        """Mark kept with the NIfTI ``t1`` and return self.

        ``t1`` is made absolute: the pipeline resolves a relative manifest path against the manifest's
        folder, not the working directory this ran in, so only an absolute path means the same to both.
        """
        self.status, self.reason, self.t1, self.detail = "kept", "", os.path.abspath(t1), detail
        return self


def resolve_settings(section: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> dict:
    """Merge defaults, the config's ``intake`` section and command-line overrides; validate.

    Args:
        section: the ``intake`` section of the config (None when there is no config).
        overrides: values given on the command line; None values are ignored.

    Returns:
        The settings, with every key of :data:`DEFAULTS`.

    Raises:
        StageError: an unknown key or a bad value.
    """
    section, overrides = dict(section or {}), dict(overrides or {})
    unknown = sorted((set(section) | set(overrides)) - set(DEFAULTS))
    if unknown:
        raise StageError(f"intake: unknown key(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    # A null in the config is a value (e.g. `diagnosis: null` keeps all); a None override was not given.
    settings = {**DEFAULTS, **section, **{k: v for k, v in overrides.items() if v is not None}}
    if settings["source"] not in ("adni", "bids"):
        raise StageError(f"intake.source: '{settings['source']}' is neither 'adni' nor 'bids'")
    if not settings["root"]:
        raise StageError("intake.root: not set (the ADNI download folder or the BIDS dataset root)")
    if not settings["out"] or not settings["nifti_dir"]:
        raise StageError("intake.out / intake.nifti_dir: must be set")
    diagnosis = settings["diagnosis"]
    diagnosis = [] if diagnosis is None else [diagnosis] if isinstance(diagnosis, str) else list(diagnosis)
    diagnosis = [str(d).strip() for d in diagnosis if str(d).strip()]
    # 'any' (or an empty list) switches the diagnosis filter off.
    settings["diagnosis"] = [] if any(d.lower() in ("any", "all") for d in diagnosis) else diagnosis
    try:
        settings["date_tolerance_days"] = float(settings["date_tolerance_days"])
    except (TypeError, ValueError):
        raise StageError(
            f"intake.date_tolerance_days: '{settings['date_tolerance_days']}' is not a number"
        ) from None
    if settings["date_tolerance_days"] < 0:
        raise StageError("intake.date_tolerance_days: must be >= 0")
    if settings["series_preference"] not in SERIES_PREFERENCES:
        raise StageError(
            f"intake.series_preference: '{settings['series_preference']}' is not one of "
            f"{', '.join(SERIES_PREFERENCES)}"
        )
    for key in (
        "series_pattern",
        "series_exclude",
        "series_reformat",
        "series_contrast",
        "series_preprocessed",
    ):
        try:
            re.compile(settings[key] or "")
        except re.error as err:
            raise StageError(f"intake.{key}: bad regular expression ({err})") from None
    codes = settings["sex_codes"] or {}
    if not isinstance(codes, Mapping) or any(str(v).upper() not in ("F", "M") for v in codes.values()):
        raise StageError(f"intake.sex_codes: must map codes to F or M, got {codes!r}")
    # YAML reads `0: F` with an int key; participants.tsv cells are strings.
    settings["sex_codes"] = {str(k).strip(): str(v).upper() for k, v in codes.items()}
    for key in ("visit", "session"):
        settings[key] = str(settings[key] or DEFAULTS[key]).strip()
    settings["dcm2niix"] = settings["dcm2niix"] or DEFAULTS["dcm2niix"]
    return settings


def parse_sex(value: Any, codes: Mapping[str, str]) -> str | None:
    """``F``/``M`` from M, F, male, female (any case) or a code in ``codes``; None if unknown or empty."""
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
    if text in codes:
        return codes[text]
    return {"m": "M", "male": "M", "f": "F", "female": "F"}.get(text.lower())


def check_volume(path: Path) -> str | None:
    """Why ``path`` is not a readable 3-D NIfTI, or None if it is.

    The last slice is read as well as the header: for a gzipped file this decompresses the whole
    stream, so a truncated download is caught here rather than in a later stage.
    """
    try:
        img = nib.load(str(path))
        shape = img.shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
            return f"not a 3-D image (shape {tuple(shape)})"
        np.asarray(img.dataobj[..., -1])
    except Exception as err:  # nibabel raises many types for a bad file; each means "unreadable"
        first = (str(err).splitlines() or [""])[0]
        return f"{type(err).__name__}: {first}"[:300]
    return None


def natural_key(text: str) -> list:
    """Sort key putting ses-2 before ses-10 and run-2 before run-10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def report_frame(outcomes: Iterable[Outcome]) -> pd.DataFrame:
    """The intake report: one row per participant, kept first, then dropped, each sorted by id."""
    columns = list(Outcome.__dataclass_fields__)
    frame = pd.DataFrame([asdict(o) for o in outcomes], columns=columns)
    frame["age"] = pd.to_numeric(frame["age"]).round(3)
    order = frame["status"].map({"kept": 0, "dropped": 1})
    return frame.assign(_order=order).sort_values(["_order", "participant"]).drop(columns="_order")


def manifest_frame(outcomes: Iterable[Outcome]) -> pd.DataFrame:
    """The manifest: ``subject, t1, age, sex`` of the kept participants, sorted by subject."""
    kept = [o for o in outcomes if o.status == "kept"]
    frame = pd.DataFrame(
        {
            "subject": [o.participant for o in kept],
            "t1": [o.t1 for o in kept],
            "age": [round(float(o.age), 3) for o in kept],
            "sex": [o.sex for o in kept],
        },
        columns=MANIFEST_COLUMNS,
    )
    return frame.sort_values("subject").reset_index(drop=True)


def report_path(out: str | Path) -> Path:
    """``<manifest stem>_intake.csv`` next to the manifest."""
    out = Path(out)
    return out.with_name(f"{out.stem}_intake.csv")


def write_outputs(outcomes: list[Outcome], out: str | Path) -> tuple[Path, Path]:
    """Write the manifest and the intake report atomically; return their paths.

    Raises:
        StageError: no participant was kept (the report is written first, so it says why).
    """
    out = Path(out)
    report = report_path(out)
    write_text(report, report_frame(outcomes).to_csv(index=False))
    manifest = manifest_frame(outcomes)
    if manifest.empty:
        raise StageError(
            f"{out}: not written, no participant kept ({len(outcomes)} found; reasons in {report})"
        )
    if manifest["subject"].duplicated().any():
        dup = manifest.loc[manifest["subject"].duplicated(), "subject"].iloc[0]
        raise StageError(f"{out}: not written, subject '{dup}' appears twice")
    write_text(out, manifest.to_csv(index=False))
    return out, report


def summary(outcomes: list[Outcome], source: str) -> str:
    """A few lines counting participants found, kept and dropped per reason."""
    kept = sum(o.status == "kept" for o in outcomes)
    lines = [
        f"intake ({source}): {len(outcomes)} participants found, {kept} kept, {len(outcomes) - kept} dropped"
    ]
    counts = pd.Series([o.reason for o in outcomes if o.status == "dropped"], dtype=object).value_counts()
    lines += [f"  dropped, {reason}: {count}" for reason, count in counts.items()]
    return "\n".join(lines)
