"""The per-subject input checks that run before any per-subject job (``check-inputs``, a checkpoint).

The manifest is read and its rows checked by :mod:`vcm.prep.manifest` (columns ``subject, t1, age, sex`` and,
optionally, ``seg`` for the ``precomputed`` backend and ``t2`` for the ``t2`` condition). Structural problems
(unreadable CSV, missing column, duplicate or unsafe id) stop the whole run. A row-level problem (age missing,
not a number or negative; sex missing or not a known code), a T1 that is missing, unreadable, not 3-D, empty,
all zero or holds NaNs, or one too small to be a head (the ``data.gates`` field of view and voxel count,
:mod:`vcm.prep.gates`) excludes that subject with a one-line reason; every other subject goes on, and the
excluded ones are listed in ``excluded.csv``. With ``data.strict: true`` a row-level problem stops the run
instead, as a structural one does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from vcm.errors import StageError
from vcm.io import atomic_path
from vcm.prep.exclusion import EXCLUDED_COLUMNS
from vcm.prep.gates import GateSettings, input_failures
from vcm.prep.manifest import ManifestError, read_manifest
from vcm.stage import stage_parser

__all__ = ["check_inputs", "check_volume", "checked_manifest", "write_subject_meta"]

STAGE = "check_inputs"  # the stage named in excluded.csv


def check_volume(path: str | Path, what: str = "t1") -> str | None:
    """Return why a volume cannot be used, or None if it can."""
    # an empty manifest cell reads as a float NaN, which Path() would reject
    if not isinstance(path, str | Path) or not str(path) or str(path) == "nan":
        return f"no {what} path given"
    p = Path(path)
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
    manifest: str | Path,
    backend: str,
    second_image: bool = False,
    *,
    strict: bool = False,
    gates: GateSettings | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check every subject's row and files; return (usable rows, excluded rows with a ``reason`` column).

    Args:
        manifest: the manifest CSV.
        backend: ``segmentation.backend`` (``precomputed`` checks the ``seg`` column too).
        second_image: a condition set uses ``t2``: the ``t2`` column is needed and checked.
        strict: ``data.strict``: a row-level manifest problem raises instead of excluding the subject.
        gates: ``data.gates``: also exclude a T1 whose field of view or voxel count is too small
            (``None``: not checked).

    Raises:
        ManifestError: a structural problem (or, with ``strict``, a row-level one).
    """
    df = checked_manifest(manifest, backend, second_image, strict=strict, gates=gates)
    ok = df[df["reason"].isna()].drop(columns=["reason", "gate"])
    bad = df[df["reason"].notna()][["subject", "t1", "reason"]]
    return ok, bad


def checked_manifest(
    manifest: str | Path,
    backend: str,
    second_image: bool = False,
    *,
    strict: bool = False,
    gates: GateSettings | None = None,
) -> pd.DataFrame:
    """Every manifest row with why it cannot be used (``reason``, ``None`` if it can) and which check said
    so (``gate``: ``manifest`` for the row, ``file`` for a file, or a ``data.gates`` gate). The arguments
    are :func:`check_inputs`'s."""
    df = read_manifest(manifest, strict=strict)
    if second_image and "t2" not in df.columns:
        raise ManifestError(f"manifest {manifest}: a condition set uses t2, which needs a 't2' column")
    if backend == "precomputed" and "seg" not in df.columns:
        raise ManifestError(f"manifest {manifest}: segmentation.backend precomputed needs a 'seg' column")
    # a row already excluded by its age or sex keeps that reason; its files are not read
    checked = [
        (reason, "manifest") if isinstance(reason, str) else _files_problem(row, backend, second_image, gates)
        for reason, row in zip(df["reason"], df.to_dict("records"), strict=True)
    ]
    df["reason"] = [reason for reason, _ in checked]
    df["gate"] = [gate for _, gate in checked]
    return df


def _files_problem(
    row: dict, backend: str, second_image: bool, gates: GateSettings | None
) -> tuple[str | None, str | None]:
    """Why one subject's T1 (and, where used, T2 and label map) cannot be used and the gate that says so,
    or (None, None)."""
    reason = check_volume(row["t1"], "t1")
    if reason is None and gates is not None:
        img = nib.load(str(row["t1"]))
        failures = input_failures(img.shape[:3], img.header.get_zooms()[:3], gates)
        if failures:
            return "; ".join(f"t1 {f.reason}" for f in failures), ", ".join(f.gate for f in failures)
    if reason is None and second_image:
        reason = check_volume(row["t2"], "t2")
    if reason is None and backend == "precomputed":
        reason = check_volume(row["seg"], "seg")
    return reason, None if reason is None else "file"


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
    from vcm.condition_names import uses_second_image
    from vcm.config import load_config

    parser = stage_parser("check-inputs", __doc__)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="CSV of the subjects that passed (resolved paths)")
    parser.add_argument(
        "--excluded", required=True, help="CSV of excluded subjects (subject, stage, gate, reason, t1)"
    )
    parser.add_argument(
        "--meta-dir", help="also write <subject>.json (t1, seg, age, sex) here, only where changed"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    table = checked_manifest(
        args.manifest,
        cfg["segmentation"]["backend"],
        uses_second_image(cfg),
        strict=cfg["data"]["strict"],
        gates=GateSettings.from_config(cfg),
    )
    ok = table[table["reason"].isna()].drop(columns=["reason", "gate"])
    bad = table[table["reason"].notna()].assign(stage=STAGE)[list(EXCLUDED_COLUMNS)]
    for row in bad.to_dict("records"):
        print(f"subject {row['subject']}: excluded at {STAGE}: {row['reason']}", file=sys.stderr)
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
