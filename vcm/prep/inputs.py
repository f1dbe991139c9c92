"""The manifest and the per-subject input checks that run before any per-subject job.

Columns: ``subject, t1, age, sex`` and, optionally, ``seg`` (label maps for the ``precomputed`` backend) and
``t2`` (a second modality from the same session as the T1, for the ``t2`` condition); relative paths are
resolved against the manifest's folder.

Structural problems (missing column, duplicate id) stop the whole run. A subject whose T1 is missing,
unreadable, not 3-D, empty, all zero or holds NaNs is excluded with a one-line reason; every other subject
goes on, and the excluded ones are listed in ``excluded.csv``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from vcm.errors import StageError
from vcm.io import atomic_path

REQUIRED_COLUMNS = ("subject", "t1", "age", "sex")
SEX_CODES = {"F": "F", "M": "M", "FEMALE": "F", "MALE": "M", "0": "F", "1": "M"}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ManifestError(StageError):
    """The manifest as a whole is unusable (stops before any job runs)."""


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest CSV; resolve relative paths against its folder.

    Raises:
        ManifestError: one line naming the manifest and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path}: file not found (config key data.manifest)")
    try:
        df = pd.read_csv(path, dtype={"subject": str, "sex": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {path}: not a readable CSV ({str(err).splitlines()[0]})") from None
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
    sex = df["sex"].astype(str).str.strip().str.upper().map(SEX_CODES)
    if sex.isna().any():
        row = df[sex.isna()].iloc[0]
        raise ManifestError(
            f"manifest {path}: subject {row['subject']}: sex {row['sex']!r} is not F/M (or 0/1)"
        )
    df["sex"] = sex
    age = pd.to_numeric(df["age"], errors="coerce")
    if age.isna().any():
        row = df[age.isna()].iloc[0]
        raise ManifestError(f"manifest {path}: subject {row['subject']}: age {row['age']!r} is not a number")
    df["age"] = age.astype(float)
    base = path.resolve().parent
    for col in ("t1", "seg", "t2"):
        if col in df.columns:
            df[col] = [
                str(base / p) if isinstance(p, str) and p and not Path(p).is_absolute() else p
                for p in df[col]
            ]
    return df


def check_volume(path: str | Path, what: str = "t1") -> str | None:
    """Return why a volume cannot be used, or None if it can."""
    p = Path(path)
    if not isinstance(path, str | Path) or not str(path) or str(path) == "nan":
        return f"no {what} path given"
    if not p.is_file():
        return f"{what} file {p} not found"
    try:
        img = nib.load(str(p))
        shape = img.shape
    except Exception as err:  # nibabel raises many types for corrupt files
        return f"{what} file {p} is unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
    dims = [s for s in shape if s != 1] if len(shape) > 3 else list(shape)
    if len(shape) > 3 and len(dims) > 3:
        return f"{what} file {p} is {len(shape)}-D {tuple(shape)}; expected one 3-D volume"
    if len(shape) < 3:
        return f"{what} file {p} is {len(shape)}-D {tuple(shape)}; expected a 3-D volume"
    if int(np.prod(shape)) == 0:
        return f"{what} file {p} is empty (shape {tuple(shape)})"
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        return f"{what} file {p} is unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'truncated data'})"
    if not np.isfinite(data).all():
        return f"{what} file {p} contains NaN or infinite values"
    if not np.any(data):
        return f"{what} file {p} is all zero"
    return None


def check_inputs(
    manifest: str | Path, backend: str, second_image: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check every subject's files; return (usable rows, excluded rows with a ``reason`` column).

    Args:
        manifest: the manifest CSV.
        backend: ``segmentation.backend`` (``precomputed`` checks the ``seg`` column too).
        second_image: a condition set uses ``t2``: the ``t2`` column is needed and checked.
    """
    df = read_manifest(manifest)
    if second_image and "t2" not in df.columns:
        raise ManifestError(f"manifest {manifest}: a condition set uses t2, which needs a 't2' column")
    reasons = []
    for _, row in df.iterrows():
        reason = check_volume(row["t1"], "t1")
        if reason is None and second_image:
            reason = check_volume(row["t2"], "t2")
        if reason is None and backend == "precomputed":
            if "seg" not in df.columns:
                raise ManifestError(
                    f"manifest {manifest}: segmentation.backend precomputed needs a 'seg' column"
                )
            reason = check_volume(row["seg"], "seg")
        reasons.append(reason)
    df["reason"] = reasons
    ok = df[df["reason"].isna()].drop(columns="reason")
    bad = df[df["reason"].notna()][["subject", "t1", "reason"]]
    return ok, bad


def write_subject_meta(table: pd.DataFrame, folder: str | Path) -> None:
    """One JSON per subject with its manifest row, rewritten only when the row changed.

    Per-subject rules take these as inputs: adding a subject to the manifest touches no other subject's
    file, so nothing else reruns.
    """
    from vcm.io import write_json

    for row in table.to_dict("records"):
        meta = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        path = Path(folder) / f"{row['subject']}.json"
        text = json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
        if not path.is_file() or path.read_text() != text:
            write_json(path, meta)


def cli(argv: list[str]) -> int:
    from vcm.config import load_config

    parser = argparse.ArgumentParser(prog="python -m vcm check-inputs", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="CSV of the subjects that passed (resolved paths)")
    parser.add_argument("--excluded", required=True, help="CSV of excluded subjects with their reason")
    parser.add_argument(
        "--meta-dir", help="also write <subject>.json (t1, seg, age, sex) here, only where changed"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    from vcm.dataset import uses_second_image

    ok, bad = check_inputs(args.manifest, cfg["segmentation"]["backend"], uses_second_image(cfg))
    for _, row in bad.iterrows():
        print(f"subject {row['subject']}: excluded: {row['reason']}", file=sys.stderr)
    with atomic_path(args.excluded) as tmp:
        bad.to_csv(tmp, index=False)
    if ok.empty:
        raise StageError(
            f"manifest {args.manifest}: no subject passed the input checks (see {args.excluded})"
        )
    if args.meta_dir:
        write_subject_meta(ok, args.meta_dir)
    with atomic_path(args.out) as tmp:
        ok.to_csv(tmp, index=False)
    print(f"{len(ok)} subject(s) passed, {len(bad)} excluded")
    return 0
