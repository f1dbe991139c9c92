"""BIDS intake: one ``*_T1w.nii[.gz]`` per participant, demographics from ``participants.tsv``.

Layout read: ``<root>/participants.tsv`` (columns ``participant_id``, ``age``, ``sex``) and
``<root>/sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_<key>-<value>...]_T1w.nii[.gz]``.
Per participant:

1. the session: ``first`` / ``last`` in natural label order (ses-2 before ses-10), or a label
   (``ses-02`` or ``02``); a dataset without sessions has one implicit session;
2. within it, the lowest ``run-`` (files without a run count as run 0); other entities (``acq-``,
   ``rec-``) are ordered by name, and the next file is tried if one is unreadable;
3. age from ``participants.tsv``, overridden by ``age`` in ``sub-<label>/sub-<label>_sessions.tsv``
   for the chosen session when present (longitudinal datasets keep age per session there); ``89+``
   reads as 89;
4. sex: M/F/male/female (any case) or a code of ``sex_codes`` (default 0 = F, 1 = M);
5. diagnosis: filtered only when ``diagnosis_column`` names a participants.tsv column.

Participant folders missing from participants.tsv are dropped for *no demographics*; participants
listed without a folder or T1w file for *no T1 series*. NIfTIs are used in place.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from vcm.errors import StageError
from vcm.intake import (
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

log = logging.getLogger(__name__)

T1W_RE = re.compile(r"^(sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")
SUB_RE = re.compile(r"^sub-[A-Za-z0-9]+$")
NA_VALUES = {"", "n/a", "na", "nan"}


def _entities(path: Path) -> dict[str, str]:
    """BIDS entities of a file name: ``sub-01_ses-02_run-1_T1w.nii.gz`` -> {sub: 01, ses: 02, run: 1}."""
    match = T1W_RE.match(path.name)
    return dict(part.split("-", 1) for part in match.group(1).split("_")) if match else {}


def _cell(value: Any) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value).strip()
    return "" if text.lower() in NA_VALUES else text


def parse_age(value: Any) -> float | None:
    """Age in years from a TSV cell; ``89+`` (BIDS' de-identified top age) reads as 89; None if absent."""
    text = _cell(value).rstrip("+")
    try:
        age = float(text)
    except ValueError:
        return None
    return age if age == age and age >= 0 else None


def read_participants(root: Path, diagnosis_column: str | None) -> pd.DataFrame:
    """participants.tsv indexed by ``sub-<label>``, every cell a stripped string.

    Raises:
        StageError: the file is missing or unreadable, lacks a column, or repeats a participant.
    """
    path = root / "participants.tsv"
    if not path.is_file():
        raise StageError(
            f"{path}: not found (a BIDS dataset needs participants.tsv with participant_id, age, sex)"
        )
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: cannot read as TSV ({(str(err).splitlines() or [''])[0]})") from None
    frame.columns = [c.strip() for c in frame.columns]
    required = ["participant_id", "age", "sex"] + ([diagnosis_column] if diagnosis_column else [])
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(missing)}")
    ids = frame["participant_id"].str.strip()
    frame.index = ids.where(
        ids.str.startswith("sub-"), "sub-" + ids
    )  # the prefix is required but often left out
    duplicated = frame.index[frame.index.duplicated()]
    if len(duplicated):
        raise StageError(f"{path}: participant_id {duplicated[0]} appears more than once")
    return frame


def find_t1w(sub_dir: Path) -> dict[str, list[Path]]:
    """T1w files of one participant by session label ('' for a dataset without sessions)."""
    found: dict[str, list[Path]] = {}
    anat_dirs = [(sub_dir / "anat", "")] + [
        (ses / "anat", ses.name[len("ses-") :]) for ses in sub_dir.glob("ses-*") if ses.is_dir()
    ]
    for anat, session in anat_dirs:
        if anat.is_dir():
            # only this participant's files: a misplaced sub-02 file in sub-01/ is not sub-01's T1
            files = [p for p in anat.iterdir() if p.is_file() and _entities(p).get("sub") == sub_dir.name[4:]]
            if files:
                found[session] = files
    return found


def _run_order(path: Path) -> tuple:
    entities = _entities(path)
    run = entities.pop("run", "0")
    others = "_".join(f"{k}-{v}" for k, v in entities.items() if k not in ("sub", "ses"))
    return natural_key(others), int(run) if run.isdigit() else 0, path.name


def _session_age(sub_dir: Path, session: str) -> float | None:
    """Age for ``session`` from ``sub-<label>_sessions.tsv`` if it has an ``age`` column."""
    path = sub_dir / f"{sub_dir.name}_sessions.tsv"
    if not session or not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
        log.warning("%s: unreadable, ages from participants.tsv", path)
        return None
    if "session_id" not in frame.columns or "age" not in frame.columns:
        return None
    rows = frame[frame["session_id"].str.strip().isin([f"ses-{session}", session])]
    return parse_age(rows["age"].iloc[0]) if len(rows) else None


def intake_participant(sub: str, root: Path, row: pd.Series | None, settings: dict[str, Any]) -> Outcome:
    """Decide one participant: choose its T1w and demographics, or say why it is dropped.

    Args:
        sub: ``sub-<label>``.
        root: the dataset root.
        row: its participants.tsv row, or None if not listed.
        settings: the resolved intake settings.
    """
    outcome = Outcome(sub)
    sub_dir = root / sub
    sessions = find_t1w(sub_dir) if sub_dir.is_dir() else {}
    if not sessions:
        return outcome.drop(
            NO_T1, f"no {sub}/[ses-*/]anat/*_T1w.nii[.gz]" if sub_dir.is_dir() else f"no {sub} folder"
        )
    if row is None:
        return outcome.drop(NO_DEMOGRAPHICS, "not in participants.tsv")

    labels = sorted(sessions, key=natural_key)
    wanted = settings["session"]
    if wanted.lower() in ("first", "last"):
        session = labels[0] if wanted.lower() == "first" else labels[-1]
    else:
        session = wanted[len("ses-") :] if wanted.startswith("ses-") else wanted
        if session not in sessions:
            shown = ", ".join(f"ses-{s}" for s in labels if s) or "none"
            return outcome.drop(NO_SCAN_AT_VISIT, f"no T1w in ses-{session} (sessions with T1w: {shown})")
    outcome.visit = f"ses-{session}" if session else ""

    session_age = _session_age(sub_dir, session)
    age = session_age if session_age is not None else parse_age(row["age"])
    sex = parse_sex(_cell(row["sex"]), settings["sex_codes"])
    missing = [
        f"{name} '{_cell(row[name])}'" for name, value in (("age", age), ("sex", sex)) if value is None
    ]
    if missing:
        return outcome.drop(NO_DEMOGRAPHICS, f"participants.tsv has no usable {' or '.join(missing)}")
    outcome.age, outcome.sex = age, sex

    column = settings["diagnosis_column"]
    if column:
        outcome.diagnosis = _cell(row[column])
        allowed = {d.upper() for d in settings["diagnosis"]}
        if allowed and not outcome.diagnosis:
            return outcome.drop(NO_DIAGNOSIS, f"{column} empty in participants.tsv")
        if allowed and outcome.diagnosis.upper() not in allowed:
            return outcome.drop(WRONG_DIAGNOSIS, f"{column}={outcome.diagnosis}")

    candidates = sorted(sessions[session], key=_run_order)
    failures = []
    for path in candidates:
        problem = check_volume(path)
        if problem is None:
            outcome.series, outcome.path = path.name, str(path.resolve())
            notes = [f"{len(candidates)} T1w files in the session"] if len(candidates) > 1 else []
            notes += [f"earlier failed: {'; '.join(failures)}"] if failures else []
            return outcome.keep(path.resolve(), "; ".join(notes))
        failures.append(f"{path.name}: {problem}")
    outcome.series, outcome.path = candidates[0].name, str(candidates[0].resolve())
    return outcome.drop(UNREADABLE, "; ".join(failures))


def collect(settings: dict[str, Any]) -> list[Outcome]:
    """One :class:`~vcm.intake.Outcome` per participant of a BIDS dataset (folder or participants.tsv row).

    Args:
        settings: resolved intake settings (see :func:`vcm.intake.resolve_settings`).

    Raises:
        StageError: the dataset folder or participants.tsv is missing or malformed.
    """
    root = Path(settings["root"])
    if not root.is_dir():
        raise StageError(f"{root}: BIDS dataset folder not found")
    participants = read_participants(root, settings["diagnosis_column"])
    folders = {p.name for p in root.glob("sub-*") if p.is_dir() and SUB_RE.match(p.name)}
    ignored = sorted(p.name for p in root.glob("sub-*") if p.is_dir() and not SUB_RE.match(p.name))
    if ignored:  # e.g. "sub-01 copy": not a BIDS label, and not a filename-safe subject id
        log.warning("BIDS: ignored folders not named sub-<alphanumeric label>: %s", ", ".join(ignored))
    subs = sorted(folders | set(participants.index), key=natural_key)
    if not subs:
        raise StageError(f"{root}: no sub-* folders and no participants in participants.tsv")
    log.info(
        "BIDS: %d participant folders, %d participants.tsv rows in %s", len(folders), len(participants), root
    )
    return [
        intake_participant(sub, root, participants.loc[sub] if sub in participants.index else None, settings)
        for sub in subs
    ]
