"""ADNI intake: one T1 per participant from an image-archive download, demographics from ADNIMERGE.

The image archive lays a download out as ``ADNI/<PTID>/<series description>/<YYYY-MM-DD_HH_MM_SS.0>/
<image id>/`` holding a DICOM series (``*.dcm``) or a NIfTI. For each participant folder:

1. keep the series whose description matches ``series_pattern`` and none of ``series_exclude``,
   ``series_reformat`` (``MPRAGE_MPR_Cor``), ``series_contrast`` (``Axial_T1_Post``) (else *no T1
   series*; see :mod:`vcm.intake.series`);
2. choose the scan date: ``baseline`` the earliest, ``latest`` the latest, or a VISCODE (``m12``): the
   scan whose nearest ADNIMERGE visit has that VISCODE (else *no scan at visit*);
3. match the scan to the participant's ADNIMERGE row (by PTID) with the nearest EXAMDATE, within
   ``date_tolerance_days`` (else *no demographics*); age at scan = baseline ``AGE`` + (scan date -
   baseline EXAMDATE) / 365.25, sex from ``PTGENDER``;
4. filter on the diagnosis at that visit (``DX`` unless ``diagnosis_column`` says otherwise; *wrong
   diagnosis* / *no diagnosis*, with a hint when ``DX_bl`` has the value ``DX`` lacks);
5. convert a DICOM series with dcm2niix (JSON sidecar kept) or use the NIfTI in place, and check the
   image reads as 3-D (*conversion failed* / *unreadable*); the T1 series of that day are tried in the
   order of ``series_preference`` (raw before the archive's preprocessed versions by default), originals
   before repeats, before dropping the participant.

The report's ``skipped`` column lists the series not taken and why. The diagnosis is filtered after the
scan is chosen: with ``visit: latest``, a participant who was CN at baseline and has converted since is
dropped rather than silently swapped for an older scan.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vcm.errors import StageError
from vcm.intake import (
    CONVERSION_FAILED,
    NO_DEMOGRAPHICS,
    NO_DIAGNOSIS,
    NO_SCAN_AT_VISIT,
    NO_T1,
    UNREADABLE,
    WRONG_DIAGNOSIS,
    Outcome,
    check_volume,
    natural_key,
    parse_sex,
)
from vcm.intake.dcm2niix import Dcm2niix
from vcm.intake.series import candidate_key, why_not_t1, why_passed_over

__all__ = [
    "Scan",
    "adni_root",
    "collect",
    "find_adnimerge",
    "find_scans",
    "intake_participant",
    "materialise",
    "read_adnimerge",
]

log = logging.getLogger(__name__)

PTID_RE = re.compile(r"^\d{3}_S_\d{4}$")
DATE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:_|$)")
REQUIRED_COLUMNS = ("PTID", "VISCODE", "EXAMDATE", "AGE", "PTGENDER")
DEFAULT_DIAGNOSIS_COLUMN = "DX"


@dataclass(frozen=True)
class Scan:
    """One image folder of the download."""

    description: str
    scan_date: pd.Timestamp
    folder_date: str
    image_id: str
    path: Path


def adni_root(root: str | Path) -> Path:
    """The folder holding the ``<PTID>`` folders: ``root`` itself or ``root/ADNI``."""
    root = Path(root)
    if not root.is_dir():
        raise StageError(f"{root}: ADNI download folder not found")
    return root / "ADNI" if (root / "ADNI").is_dir() else root


def find_scans(ptid_dir: Path) -> tuple[list[Scan], list[str]]:
    """All image folders of one participant, and the folders skipped for not being laid out as ADNI's."""
    scans, skipped = [], []
    for series_dir in sorted(p for p in ptid_dir.iterdir() if p.is_dir()):
        for date_dir in sorted(p for p in series_dir.iterdir() if p.is_dir()):
            match = DATE_RE.match(date_dir.name)
            date = pd.to_datetime(match.group(1), errors="coerce", format="%Y-%m-%d") if match else pd.NaT
            if pd.isna(date):
                skipped.append(f"{series_dir.name}/{date_dir.name}")
                continue
            for image_dir in sorted(p for p in date_dir.iterdir() if p.is_dir()):
                scans.append(Scan(series_dir.name, date, date_dir.name, image_dir.name, image_dir))
    return scans, skipped


def find_adnimerge(settings: dict[str, Any], root: Path) -> Path:
    """The configured ADNIMERGE.csv, or one in the download folder or next to it."""
    if settings["adnimerge"]:
        path = Path(settings["adnimerge"])
        if not path.is_file():
            raise StageError(f"{path}: ADNIMERGE file not found")
        return path
    given = Path(settings["root"])
    for folder in dict.fromkeys([given, root, given.parent]):
        if (folder / "ADNIMERGE.csv").is_file():
            return folder / "ADNIMERGE.csv"
    raise StageError(f"intake.adnimerge: not set and no ADNIMERGE.csv in {given} or {given.parent}")


def read_adnimerge(path: Path, diagnosis_column: str | None) -> pd.DataFrame:
    """Read the columns the intake needs from ADNIMERGE.csv, with dates and ages parsed.

    Args:
        path: ADNIMERGE.csv as downloaded from LONI (some 100 columns; only a few are read).
        diagnosis_column: the column the diagnosis filter needs, or None when not filtering.

    Raises:
        StageError: the file cannot be read or lacks a required column.
    """
    wanted = {*REQUIRED_COLUMNS, DEFAULT_DIAGNOSIS_COLUMN, "DX_bl"} | ({diagnosis_column} - {None})
    try:
        frame = pd.read_csv(path, dtype=str, usecols=lambda c: c in wanted)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: cannot read as CSV ({(str(err).splitlines() or [''])[0]})") from None
    required = [*REQUIRED_COLUMNS] + ([diagnosis_column] if diagnosis_column else [])
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(missing)}")
    for column in frame.columns:
        frame[column] = frame[column].str.strip()
    # ADNIMERGE exports write YYYY-MM-DD; older spreadsheet round-trips write M/D/YYYY.
    frame["EXAMDATE"] = pd.to_datetime(frame["EXAMDATE"], errors="coerce", format="mixed")
    frame["AGE"] = pd.to_numeric(frame["AGE"], errors="coerce")
    return frame


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(DICOM files, NIfTI files) directly in an image folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    dicoms = [p for p in files if p.suffix.lower() == ".dcm"]
    niftis = [p for p in files if p.name.lower().endswith((".nii", ".nii.gz"))]
    return dicoms, niftis


def materialise(scan: Scan, ptid: str, converter: Dcm2niix) -> tuple[Path | None, str, str]:
    """The NIfTI of one scan: converted from DICOM or the downloaded NIfTI.

    Returns:
        (path, "", note) on success, (None, drop reason, why) on failure.
    """
    dicoms, niftis = _image_files(scan.path)
    if dicoms:
        safe_id = re.sub(r"[^A-Za-z0-9_-]", "_", scan.image_id)
        path, note = converter.convert(scan.path, f"{ptid}_{safe_id}")
        return (path, "", note) if path is not None else (None, CONVERSION_FAILED, note)
    if niftis:
        problem = check_volume(niftis[0])
        if problem:
            return None, UNREADABLE, f"{niftis[0].name}: {problem}"
        note = f"{len(niftis)} NIfTI files in the folder, took the first" if len(niftis) > 1 else ""
        return niftis[0].resolve(), "", note
    return None, UNREADABLE, "no .dcm or .nii(.gz) files in the image folder"


def _nearest_visit(rows: pd.DataFrame, date: pd.Timestamp) -> tuple[pd.Series, int]:
    """The ADNIMERGE row with the EXAMDATE nearest ``date`` (the earlier on a tie), and |days| to it."""
    days = (rows["EXAMDATE"] - date).abs().dt.days
    position = int(days.to_numpy().argmin())
    return rows.iloc[position], int(days.iloc[position])


def _first_value(rows: pd.DataFrame, column: str) -> Any:
    values = rows[column].dropna()
    return values.iloc[0] if len(values) else None


def _t1_scans(scans: list[Scan], settings: dict) -> tuple[list[Scan], dict[str, str]]:
    """The T1 candidates, and the other series' descriptions with why each is not one."""
    t1, others = [], {}
    for scan in scans:
        why = why_not_t1(scan.description, settings)
        if why is None:
            t1.append(scan)
        else:
            others.setdefault(scan.description, why)
    return t1, others


def _choose_date(t1: list[Scan], rows: pd.DataFrame, settings: dict) -> tuple[pd.Timestamp | None, str]:
    """The scan date asked for by ``visit``, or (None, why there is none)."""
    dates = sorted({s.scan_date for s in t1})
    visit = settings["visit"]
    if visit.lower() in ("baseline", "latest"):
        return (dates[0] if visit.lower() == "baseline" else dates[-1]), ""
    # A VISCODE: among the scan dates matched to that visit, the closest to its EXAMDATE.
    matched = [(d, *_nearest_visit(rows, d)) for d in dates]
    at_visit = [
        (days, d)
        for d, row, days in matched
        if str(row["VISCODE"]).lower() == visit.lower() and days <= settings["date_tolerance_days"]
    ]
    if not at_visit:
        seen = ", ".join(f"{d:%Y-%m-%d}~{row['VISCODE']}" for d, row, _ in matched)
        return None, f"no T1 scan at visit {visit} (scans: {seen})"
    return min(at_visit)[1], ""


def _demographics(outcome: Outcome, rows: pd.DataFrame, date: pd.Timestamp, settings: dict) -> str:
    """Set the outcome's age and sex at ``date``; return why they cannot be set ('' when they are)."""
    baseline = rows[rows["VISCODE"] == "bl"]
    baseline = baseline if len(baseline) else rows.iloc[:1]  # no bl row: the earliest visit stands in
    base_age = baseline["AGE"].iloc[0]
    base_age = _first_value(rows, "AGE") if pd.isna(base_age) else base_age  # AGE repeats on every row
    sex = parse_sex(_first_value(rows, "PTGENDER"), settings["sex_codes"])
    missing = [
        name for name, value in (("AGE", base_age), ("PTGENDER", sex)) if value is None or pd.isna(value)
    ]
    if missing:
        return f"ADNIMERGE has no usable {' or '.join(missing)}"
    outcome.age = float(base_age) + (date - baseline["EXAMDATE"].iloc[0]).days / 365.25
    outcome.sex = sex
    return ""


def _diagnosis_problem(
    outcome: Outcome, row: pd.Series, rows: pd.DataFrame, settings: dict
) -> tuple[str, str]:
    """(drop reason, detail) when the diagnosis at the matched visit is not kept, else ('', '')."""
    column = settings["diagnosis_column"] or DEFAULT_DIAGNOSIS_COLUMN
    diagnosis = row.get(column)
    outcome.diagnosis = "" if diagnosis is None or pd.isna(diagnosis) else str(diagnosis)
    wanted = {d.upper() for d in settings["diagnosis"]}
    if not wanted:
        return "", ""
    if not outcome.diagnosis:
        detail = f"diagnosis column '{column}' is empty at visit {outcome.visit} ({row['EXAMDATE']:%Y-%m-%d})"
        # DX is often empty where DX_bl (the baseline diagnosis, on every row) is not: say so.
        baseline = _first_value(rows, "DX_bl") if column != "DX_bl" and "DX_bl" in rows else None
        if baseline is not None and str(baseline).strip():
            keeps = str(baseline).upper() in wanted
            detail += f"; DX_bl is {baseline}" + (": --diagnosis-column DX_bl would keep it" if keeps else "")
        return NO_DIAGNOSIS, detail
    if outcome.diagnosis.upper() not in wanted:
        return WRONG_DIAGNOSIS, f"{column}={outcome.diagnosis} at visit {outcome.visit}"
    return "", ""


def _take_first_usable(
    outcome: Outcome, candidates: list[Scan], skipped: list[str], settings: dict, converter: Dcm2niix
) -> Outcome:
    """Keep the first candidate that converts or reads; drop with the failures if none does."""
    failures: list[tuple[Scan, str, str]] = []  # (scan, drop reason, why)
    for position, scan in enumerate(candidates):
        path, reason, note = materialise(scan, outcome.participant, converter)
        if path is None:
            failures.append((scan, reason, note))
            continue
        outcome.series, outcome.path = scan.description, str(scan.path.resolve())
        skipped = [f"{s.description}/{s.image_id}: {r}, see detail" for s, r, _ in failures] + skipped
        skipped += [
            f"{s.description}/{s.image_id}: {why_passed_over(s.description, scan.description, settings)}"
            for s in candidates[position + 1 :]
        ]
        outcome.skipped = "; ".join(skipped)
        tried = "; ".join(f"{s.description}/{s.image_id}: {r}, {why}" for s, r, why in failures)
        return outcome.keep(path, "; ".join(filter(None, [note, tried and f"earlier failed: {tried}"])))
    # Report the first (preferred) series and the reason it failed.
    first, reason, _ = failures[0]
    outcome.series, outcome.path = first.description, str(first.path.resolve())
    outcome.skipped = "; ".join(skipped)
    return outcome.drop(reason, "; ".join(f"{s.description}/{s.image_id}: {why}" for s, _, why in failures))


def intake_participant(
    ptid: str, scans: list[Scan], skipped: list[str], rows: pd.DataFrame, settings: dict, converter: Dcm2niix
) -> Outcome:
    """Decide one participant: choose its T1 and demographics, or say why it is dropped.

    Args:
        ptid: the participant id (``002_S_0295``).
        scans: its image folders.
        skipped: its folders not laid out as ADNI's (named in the detail when no T1 is found).
        rows: its ADNIMERGE rows (any order; may be empty).
        settings: the resolved intake settings.
        converter: the dcm2niix wrapper.
    """
    outcome = Outcome(ptid)
    t1, not_t1 = _t1_scans(scans, settings)
    not_taken = [f"{description}: {why}" for description, why in sorted(not_t1.items())]
    outcome.skipped = "; ".join(not_taken)
    if not t1:
        found = sorted({s.description for s in scans})
        detail = f"series found: {', '.join(found)}" if found else "no image folders"
        if skipped:
            detail += f"; skipped folders not named YYYY-MM-DD_...: {', '.join(skipped[:3])}"
        return outcome.drop(NO_T1, detail)
    rows = rows[rows["EXAMDATE"].notna()].sort_values("EXAMDATE", kind="stable")
    if rows.empty:
        return outcome.drop(NO_DEMOGRAPHICS, "PTID not in ADNIMERGE (or no EXAMDATE)")
    date, why = _choose_date(t1, rows, settings)
    if date is None:
        return outcome.drop(NO_SCAN_AT_VISIT, why)
    outcome.scan_date = f"{date:%Y-%m-%d}"

    row, days = _nearest_visit(rows, date)
    tolerance = settings["date_tolerance_days"]
    if days > tolerance:
        return outcome.drop(
            NO_DEMOGRAPHICS,
            f"no ADNIMERGE visit within {tolerance:g} days of scan {date:%Y-%m-%d} "
            f"(nearest {row['VISCODE']} {row['EXAMDATE']:%Y-%m-%d})",
        )
    outcome.visit = str(row["VISCODE"])
    why = _demographics(outcome, rows, date, settings)
    if why:
        return outcome.drop(NO_DEMOGRAPHICS, why)
    reason, why = _diagnosis_problem(outcome, row, rows, settings)
    if reason:
        return outcome.drop(reason, why)

    # The T1 series of that day in order of preference; the next is tried if one fails.
    candidates = sorted(
        (s for s in t1 if s.scan_date == date),
        key=lambda s: (candidate_key(s.description, settings), s.folder_date, natural_key(s.image_id)),
    )
    return _take_first_usable(outcome, candidates, not_taken, settings, converter)


def collect(settings: dict[str, Any]) -> list[Outcome]:
    """One :class:`~vcm.intake.Outcome` per participant folder of an ADNI download.

    Args:
        settings: resolved intake settings (see :func:`vcm.intake.resolve_settings`).

    Raises:
        StageError: the folder or ADNIMERGE is missing or malformed, or dcm2niix is not installed.
    """
    root = adni_root(settings["root"])
    column = (settings["diagnosis_column"] or DEFAULT_DIAGNOSIS_COLUMN) if settings["diagnosis"] else None
    adnimerge = find_adnimerge(settings, root)
    merge = read_adnimerge(adnimerge, column)
    ptid_dirs = sorted(p for p in root.iterdir() if p.is_dir() and PTID_RE.match(p.name))
    if not ptid_dirs:
        raise StageError(f"{root}: no participant folders named like 002_S_0295")
    log.info("ADNI: %d participant folders in %s, demographics from %s", len(ptid_dirs), root, adnimerge)
    by_ptid = dict(tuple(merge.groupby("PTID", sort=False)))
    converter = Dcm2niix(settings["dcm2niix"], settings["nifti_dir"], bool(settings["overwrite"]))
    outcomes = []
    for ptid_dir in ptid_dirs:
        scans, skipped = find_scans(ptid_dir)
        rows = by_ptid.get(ptid_dir.name, merge.iloc[:0])
        outcome = intake_participant(ptid_dir.name, scans, skipped, rows, settings, converter)
        log.debug("%s: %s %s %s", outcome.participant, outcome.status, outcome.reason, outcome.detail)
        outcomes.append(outcome)
    return outcomes
