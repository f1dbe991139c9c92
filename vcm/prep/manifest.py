"""The manifest: a CSV of subjects (``subject, t1, age, sex`` and, optionally, ``seg`` and ``t2``), read and
checked row by row without opening any image.

Relative paths are resolved against the manifest's folder. Structural problems (unreadable CSV, missing column,
duplicate or unsafe id) raise :class:`ManifestError`; a row-level problem (age missing, not a number or
negative; sex missing or not a known code) is returned as that row's reason, or raises under ``strict``
(``data.strict``). The images themselves are checked by :mod:`vcm.prep.inputs`. Light on purpose (pandas,
no image readers): the Snakefile checks the manifest while it builds the DAG.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from vcm.errors import StageError

__all__ = ["REQUIRED_COLUMNS", "SEX_CODES", "ManifestError", "read_manifest", "row_problems"]

REQUIRED_COLUMNS = ("subject", "t1", "age", "sex")
SEX_CODES = {"F": "F", "M": "M", "FEMALE": "F", "MALE": "M", "0": "F", "1": "M"}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ManifestError(StageError):
    """The manifest cannot be used as it is (stops before any job runs): a structural problem, or a row-level
    one under ``data.strict``."""


def read_manifest(path: str | Path, *, strict: bool = False) -> pd.DataFrame:
    """Read and validate a manifest CSV; resolve relative paths against its folder.

    Every row comes back, with ``age`` as a float, ``sex`` as ``F``/``M`` and a ``reason`` column: ``None``
    for a usable row, else why the row cannot be used (see :func:`row_problems`); such a row's ``age`` or
    ``sex`` is NaN.

    Args:
        path: the manifest CSV.
        strict: a row-level problem raises (``data.strict``) instead of being returned as a reason.

    Raises:
        ManifestError: one line naming the manifest and the problem (and, for a row, the subject).
    """
    path = Path(path)
    df = _read_csv(path)
    _check_structure(df, path)
    reasons = row_problems(df)
    if strict and reasons.notna().any():
        subject = df["subject"][reasons.notna()].iloc[0]
        raise ManifestError(f"manifest {path}: subject {subject}: {reasons[reasons.notna()].iloc[0]}")
    df["sex"] = _sex_codes(df["sex"])
    df["age"] = _ages(df["age"])
    df.loc[reasons.notna(), ["age", "sex"]] = np.nan
    df["reason"] = reasons
    base = path.resolve().parent
    for col in ("t1", "seg", "t2"):
        if col in df.columns:
            df[col] = [
                str(base / p) if isinstance(p, str) and p and not Path(p).is_absolute() else p
                for p in df[col]
            ]
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"manifest {path}: file not found (config key data.manifest)")
    try:
        # age as text too: a reason quotes the value as written ('-3', not -3.0)
        return pd.read_csv(path, dtype={"subject": str, "sex": str, "age": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {path}: not a readable CSV ({str(err).splitlines()[0]})") from None


def _check_structure(df: pd.DataFrame, path: Path) -> None:
    """Problems of the manifest as a whole (the run cannot name its subjects): raise at once."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {path}: missing required column(s) {', '.join(missing)} (expected {', '.join(REQUIRED_COLUMNS)}[, seg])"
        )
    if df.empty:
        raise ManifestError(f"manifest {path}: no subjects")
    dup = df["subject"][df["subject"].duplicated()].unique()
    if len(dup):
        raise ManifestError(f"manifest {path}: duplicate subject id(s) {', '.join(map(str, dup[:5]))}")
    bad_ids = [s for s in df["subject"] if not isinstance(s, str) or not _SAFE_ID.match(s)]
    if bad_ids:
        raise ManifestError(
            f"manifest {path}: subject id {bad_ids[0]!r} is not file-name safe (letters, digits, '_', '-', '.')"
        )


def _sex_codes(sex: pd.Series) -> pd.Series:
    """``F``/``M`` for each known code (any case, spaces around), NaN for a missing or unknown one."""
    return sex.str.strip().str.upper().map(SEX_CODES)


def _ages(age: pd.Series) -> pd.Series:
    """Each age as a float, NaN where it is missing or not a number."""
    return pd.to_numeric(age.str.strip(), errors="coerce").astype(float)


def _age_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "age is missing"
    age = pd.to_numeric(value.strip(), errors="coerce")
    if not np.isfinite(age):
        return f"age {value!r} is not a number"
    if age < 0:
        return f"age {value!r} is negative"
    return None


def _sex_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "sex is missing"
    if value.strip().upper() not in SEX_CODES:
        return f"sex {value!r} is not F/M (or 0/1, female/male)"
    return None


def row_problems(df: pd.DataFrame) -> pd.Series:
    """Why each row of a raw manifest (``age`` and ``sex`` as text) cannot be used, or ``None``.

    A reason names the column and the value as written (``sex 'X' is not F/M (or 0/1, female/male)``); a row
    with several problems gets them all, joined by ``; ``.
    """
    reasons = pd.Series([None] * len(df), index=df.index, dtype=object)
    # vectorised first: only the rows that fail are looked at one by one (large manifests parse at DAG time)
    ages = _ages(df["age"])
    suspect = _sex_codes(df["sex"]).isna() | ~np.isfinite(ages) | (ages < 0)
    for i in df.index[suspect]:
        found = [r for r in (_age_problem(df.at[i, "age"]), _sex_problem(df.at[i, "sex"])) if r is not None]
        reasons[i] = "; ".join(found)
    return reasons
