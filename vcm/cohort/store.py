"""The cohort's HDF5 files: every shard's ``shard.h5``, the merged ``cohort.h5``, and the tables beside it.

The one module that writes and reads them; the rest of the package and the consumers (the dataset class,
the report) go through :func:`write_shard`, :func:`merge_cohort`, :func:`open_cohort` and
:func:`read_qc_summary`.

``shard.h5`` and ``cohort.h5`` share one layout (DESIGN.md contract): ``/subjects``, ``/image`` N×1×D×H×W,
``/label`` N×D×H×W, ``/cond/<name>`` N×1×D×H×W, ``/covariates`` N×4, ``/seed``, ``/source_subject``,
``/new_anatomy``, ``/qc/<metric>``, ``/qc/passed``, ``/qc/attempts``; also ``/index``, ``/seg``,
``/source_index``, ``/covariates_raw`` (the label map's values), ``/design/{target,designed}_<covariate>``
(``cohort.design``; the re-segmented image's volumes are ``/qc/image_{lv,brain}_volume``),
``/attempts/draw`` and ``/attempts/source_index`` (the plan each attempt sampled: a retry redraws it under ``cohort.retry_new_anatomy``), ``/intensity/<structure>`` (the image's median intensity per semantic class, next to
``/qc_reference/{low,high}``, the real range) and ``/attempts/<field>``, one row per QC attempt; with the privacy screen (:mod:`vcm.privacy`) on, ``/privacy/<field>`` per subject (its kept
attempt's nearest real training subject: ``nearest_real``, ``nearest_index``, ``nearest_similarity``,
``nearest_label_dice``, ``max_label_dice``, ``possible_copy``), the same fields per attempt under
``/attempts``, and the real-to-real baseline ``/privacy_reference/{subjects,nearest_real,similarity}`` (its
attributes: the settings); provenance attributes. Volumes are gzip-compressed one subject per chunk, without timestamps, so that
the same content makes the same datasets. Beside ``cohort.h5``: ``manifest.csv`` (one row per subject: NIfTI
paths relative to the manifest, source, seed, covariates, QC) and ``qc.csv`` (one row per attempt, the privacy
fields last).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from vcm.cohort.plan import CohortSettings, subject_id
from vcm.cohort.subjects import read_record, read_volume, volume_path
from vcm.errors import StageError
from vcm.io import atomic_path, provenance
from vcm.privacy import PRIVACY_FIELDS

if TYPE_CHECKING:
    from vcm.cohort.sources import DatasetSource
    from vcm.privacy import PrivacyBaseline, PrivacySettings
    from vcm.qc import QCSettings

__all__ = [
    "COHORT_FILE",
    "MANIFEST_FILE",
    "QC_FILE",
    "SHARD_FILE",
    "merge_cohort",
    "open_cohort",
    "read_privacy",
    "read_qc_summary",
    "write_shard",
]

SHARD_FILE = "shard.h5"
COHORT_FILE = "cohort.h5"
MANIFEST_FILE = "manifest.csv"
QC_FILE = "qc.csv"
# an attempt's own fields in subject.json's "tries", stored apart from its QC metrics
_ATTEMPT_FIELDS = ("attempt", "draw", "source_index", "seed", "passed", "kept", "reasons")
COVARIATES = ("sex", "age", "lv_volume", "brain_volume")
# attributes of each shard that the merged file lists under its "shards" attribute: where it ran, not how
# long (each shard.h5 keeps its timings), so that the same config and seed give the same cohort.h5 bytes
_SHARD_INFO = (
    "shard",
    "host",
    "device",
    "slurm_job_id",
    "slurm_array_job_id",
    "slurm_array_task_id",
    "vcm_git_sha",
)
# datasets stored once, not per subject or attempt: the merge copies them from the first shard
_REFERENCES = ("qc_reference", "privacy_reference")
_PRIVACY_DTYPES = {"nearest_real": object, "nearest_index": np.int64, "possible_copy": bool}


# --- readers -----------------------------------------------------------------------------------------------


def open_cohort(path: str | Path) -> h5py.File:
    """Open a ``cohort.h5`` (or ``shard.h5``) for reading; the caller closes it.

    Raises:
        StageError: the file is missing or has no ``/subjects``, ``/image`` or ``/label``.
    """
    if not Path(path).is_file():
        raise StageError(f"cohort file not found: {path}")
    h5 = h5py.File(path, "r")
    for key in ("subjects", "image", "label"):
        if key not in h5:
            h5.close()
            raise StageError(f"{path}: no /{key} dataset")
    return h5


def read_qc_summary(path: str | Path) -> dict[str, Any]:
    """What a ``shard.h5`` or ``cohort.h5`` says about its QC: ``subjects``, ``passed``, ``samples`` (attempts
    drawn), ``dice_median`` (LV Dice, NaN-aware) and ``sampling_seconds_per_sample`` (``"?"`` when absent);
    of a shard also ``step_seconds``, seconds per step (:data:`vcm.cohort.shard.STEPS`; empty when absent)."""
    with open_cohort(path) as h5:
        passed, attempts, dice = h5["qc/passed"][:], h5["qc/attempts"][:], h5["qc/dice"][:]
        return {
            "subjects": len(h5["subjects"]),
            "passed": int(passed.sum()),
            "samples": int(attempts.sum()),
            "dice_median": float(np.nanmedian(dice)),
            "sampling_seconds_per_sample": h5.attrs.get("sampling_seconds_per_sample", "?"),
            "step_seconds": json.loads(h5.attrs.get("step_seconds", "{}")),
        }


def read_privacy(path: str | Path) -> dict[str, Any] | None:
    """The privacy screen of a ``cohort.h5`` (``None`` when it was off): per subject ``similarity``,
    ``possible_copy`` and ``nearest_real``; the real-to-real ``baseline`` similarities; ``max_similarity``."""
    with open_cohort(path) as h5:
        if "privacy" not in h5 or "privacy_reference" not in h5:
            return None
        return {
            "similarity": h5["privacy/nearest_similarity"][:],
            "possible_copy": h5["privacy/possible_copy"][:],
            "nearest_real": list(h5["privacy/nearest_real"].asstr()[:]),
            "baseline": h5["privacy_reference/similarity"][:],
            "max_similarity": float(h5["privacy_reference"].attrs["max_similarity"]),
        }


# --- shard.h5 ----------------------------------------------------------------------------------------------


def _h5_kwargs(shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"track_times": False}  # no timestamps: identical content, identical datasets
    if len(shape) > 1 and np.dtype(dtype).kind != "O":
        kw.update(chunks=(1, *shape[1:]), compression="gzip", compression_opts=4, shuffle=True)
    return kw


def _put(h5: h5py.File, key: str, value: Any, dtype: Any = None) -> None:
    value = np.asarray(value, dtype=dtype)
    h5.create_dataset(
        key,
        data=value,
        dtype=h5py.string_dtype() if value.dtype.kind in "OU" else value.dtype,
        **_h5_kwargs(value.shape, value.dtype),
    )


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def write_shard(
    out_dir: Path,
    indices: range,
    names: Sequence[str],
    data: DatasetSource,
    signature: str,
    attrs: Mapping[str, str],
    ranges: Mapping[str, np.ndarray],
    qc_settings: QCSettings,
    privacy: tuple[PrivacySettings, PrivacyBaseline] | None = None,
) -> Path:
    """``shard.h5`` from the complete subject folders of ``indices`` (atomically).

    Args:
        out_dir: the shard folder (holds the subject folders).
        indices: the shard's subjects.
        names: the conditions to store (the dataset's).
        data: the dataset the subjects were made from (grid, dtypes, affine).
        signature: the settings signature of the subjects.
        attrs: provenance attributes.
        ranges: the QC reference intensity ranges (``low``, ``high``, ``classes``).
        qc_settings: the QC settings, stored as JSON.
        privacy: the privacy screen's settings and real-to-real baseline (``None``: the screen was off).

    Returns:
        the ``shard.h5`` path.
    """
    records = [read_record(out_dir / subject_id(i)) for i in indices]
    path = out_dir / SHARD_FILE
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        _put(h5, "subjects", np.array([r["subject"] for r in records], dtype=object))
        _put(h5, "index", [r["index"] for r in records], np.int64)
        _write_volumes(h5, out_dir, records, names, data)
        _write_records(h5, records)
        _put(h5, "qc_reference/low", ranges["low"], np.float64)
        _put(h5, "qc_reference/high", ranges["high"], np.float64)
        h5["qc_reference"].attrs["classes"] = [str(c) for c in ranges["classes"]]
        if privacy is not None:
            _write_privacy_reference(h5, *privacy)
        h5.attrs["grid_affine"] = data.affine
        h5.attrs["grid_shape"] = list(data.grid)
        h5.attrs["grid_spacing_mm"] = data.spacing
        h5.attrs["signature"] = signature
        h5.attrs["qc_settings"] = json.dumps(asdict(qc_settings))
        h5.attrs["first_index"] = indices.start
        for key, value in attrs.items():
            h5.attrs[key] = value
    return path


def _write_volumes(
    h5: h5py.File, out_dir: Path, records: Sequence[Mapping], names: Sequence[str], data: DatasetSource
) -> None:
    """``/image``, ``/label``, ``/seg`` and ``/cond/<name>`` from the subject folders' NIfTIs."""
    n, grid = len(records), data.grid

    def volume(key: str, shape: Sequence[int], dtype: Any) -> h5py.Dataset:
        return h5.create_dataset(key, (n, *shape), dtype=dtype, **_h5_kwargs((n, *shape), dtype))

    image = volume("image", (1, *grid), data.image_dtype)
    label = volume("label", grid, np.uint16)
    seg = volume("seg", grid, np.uint16)
    conds = {name: volume(f"cond/{name}", (1, *grid), data.dtype(name)) for name in names}
    for k, r in enumerate(records):
        folder = out_dir / r["subject"]
        image[k, 0] = read_volume(folder, "image").astype(data.image_dtype)
        label[k] = read_volume(folder, "label", np.uint16)
        seg[k] = read_volume(folder, "seg", np.uint16)
        for name, ds in conds.items():
            ds[k, 0] = read_volume(folder, name, np.float32).astype(ds.dtype)
    if "semantics" in conds:
        conds["semantics"].attrs["classes"] = data.semantic_class_names()


def _write_privacy_reference(h5: h5py.File, settings: PrivacySettings, baseline: PrivacyBaseline) -> None:
    """The real-to-real baseline of the privacy screen, its settings as attributes."""
    _put(h5, "privacy_reference/subjects", np.array(baseline.subjects, dtype=object))
    _put(h5, "privacy_reference/nearest_real", np.array(baseline.nearest_real, dtype=object))
    _put(h5, "privacy_reference/similarity", baseline.similarity, np.float64)
    for key, value in asdict(settings).items():
        h5["privacy_reference"].attrs[key] = value


def _write_privacy(h5: h5py.File, records: Sequence[Mapping], tries: Sequence[Mapping]) -> None:
    """The kept attempts' privacy screens under ``/privacy``, every attempt's under ``/attempts``."""
    for name in PRIVACY_FIELDS:
        dtype = _PRIVACY_DTYPES.get(name, np.float64)
        for key, rows in ((f"privacy/{name}", [r["privacy"] for r in records]), (f"attempts/{name}", tries)):
            values = [row[name] if dtype is not np.float64 else _nan(row[name]) for row in rows]
            _put(h5, key, np.array(values, dtype=object) if dtype is object else values, dtype)


def _write_records(h5: h5py.File, records: Sequence[Mapping]) -> None:
    """The per-subject fields of ``subject.json``, and one row per QC attempt under ``/attempts``."""
    metrics = sorted({k for r in records for k in r["qc"]})
    tries = [t for r in records for t in r["tries"]]
    special = {*_ATTEMPT_FIELDS, *PRIVACY_FIELDS}
    try_keys = sorted({k for t in tries for k in t} - special)
    _put(h5, "covariates", [r["covariates"] for r in records], np.float32)
    _put(h5, "covariates_raw", [r["covariates_raw"] for r in records], np.float64)
    h5["covariates"].attrs["order"] = list(COVARIATES)
    _put(h5, "seed", [r["seed"] for r in records], np.int64)
    _put(h5, "source_subject", np.array([r["source_subject"] for r in records], dtype=object))
    _put(h5, "source_index", [r["source_index"] for r in records], np.int64)
    _put(h5, "new_anatomy", [r["new_anatomy"] for r in records], bool)
    for k, name in enumerate(COVARIATES):  # cohort.design: target, whether set; the label's is covariates_raw
        _put(h5, f"design/target_{name}", [r["design"]["target"][k] for r in records], np.float64)
        _put(h5, f"design/designed_{name}", [r["design"]["designed"][k] for r in records], bool)
    for m in metrics:  # per-structure medians apart: /qc holds the checks' metrics
        key = f"intensity/{m.removeprefix('median_')}" if m.startswith("median_") else f"qc/{m}"
        _put(h5, key, [_nan(r["qc"].get(m)) for r in records], np.float64)
    _put(h5, "qc/passed", [r["passed"] for r in records], bool)
    _put(h5, "qc/attempts", [r["attempts"] for r in records], np.int64)
    _put(h5, "attempts/index", [r["index"] for r in records for _ in r["tries"]], np.int64)
    _put(h5, "attempts/attempt", [t["attempt"] for t in tries], np.int64)
    _put(h5, "attempts/draw", [t["draw"] for t in tries], np.int64)  # the plan it sampled
    _put(h5, "attempts/source_index", [t["source_index"] for t in tries], np.int64)
    _put(h5, "attempts/seed", [t["seed"] for t in tries], np.int64)
    _put(h5, "attempts/passed", [t["passed"] for t in tries], bool)
    _put(h5, "attempts/kept", [t["kept"] for t in tries], bool)
    _put(h5, "attempts/reasons", np.array([t["reasons"] for t in tries], dtype=object))
    for m in try_keys:
        _put(h5, f"attempts/{m}", [_nan(t.get(m)) for t in tries], np.float64)
    if records and all("privacy" in r for r in records):
        _write_privacy(h5, records, tries)


# --- merge -------------------------------------------------------------------------------------------------


def merge_cohort(
    cfg: Mapping[str, Any], shards: Sequence[str | Path], out_dir: str | Path, condset: str | None = None
) -> dict[str, Path]:
    """Concatenate shard files into ``cohort.h5`` and write ``manifest.csv`` and ``qc.csv`` (all atomically).

    Args:
        cfg: the validated config.
        shards: the ``shard.h5`` files (any order; sorted by their first subject).
        out_dir: the cohort folder; the manifest's paths are relative to it.
        condset: the condition set, checked against the shards'.

    Returns:
        the written files: ``cohort``, ``manifest``, ``qc``.

    Raises:
        StageError: a missing or incomplete shard, shards made with different settings, or subjects missing
            from or repeated in ``0 … cohort.size − 1``.
    """
    import pandas as pd

    settings = CohortSettings.from_config(cfg)
    out_dir = Path(out_dir)
    opened = _open_shards(shards)
    try:
        n = _check_shards(opened, settings.size, condset)
        path = out_dir / COHORT_FILE
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
            _copy_datasets(out, opened, n)
            for key, value in _merged_attrs(cfg, opened, n).items():
                out.attrs[key] = value
        manifest = [row for p, h5 in opened for row in _manifest_rows(p, h5, out_dir)]
        qc_table = [row for _, h5 in opened for row in _attempt_rows(h5)]
        with atomic_path(out_dir / MANIFEST_FILE) as tmp:
            pd.DataFrame(manifest).to_csv(tmp, index=False)
        with atomic_path(out_dir / QC_FILE) as tmp:
            pd.DataFrame(qc_table).to_csv(tmp, index=False)
    finally:
        for _, h5 in opened:
            h5.close()
    return {"cohort": path, "manifest": out_dir / MANIFEST_FILE, "qc": out_dir / QC_FILE}


def _open_shards(shards: Sequence[str | Path]) -> list[tuple[Path, h5py.File]]:
    """The shard files, open for reading, sorted by their first subject."""
    opened: list[tuple[Path, h5py.File]] = []
    try:
        for p in shards:
            if not Path(p).is_file():
                raise StageError(f"shard file not found: {p} (run generate-shard first)")
            try:
                opened.append((Path(p), h5py.File(p, "r")))
            except OSError as err:
                raise StageError(f"{p}: not a readable HDF5 file ({str(err).splitlines()[0]})") from None
        if not opened:
            raise StageError("no shard files given")
    except StageError:
        for _, h5 in opened:
            h5.close()
        raise
    return sorted(opened, key=lambda ph: int(ph[1].attrs["first_index"]))


def _check_shards(opened: Sequence[tuple[Path, h5py.File]], size: int, condset: str | None) -> int:
    """The number of subjects, once the shards agree and hold each of ``0 … size − 1`` exactly once."""
    first = opened[0][1]
    for p, h5 in opened:
        for key in ("signature", "model_sha256", "condition_set"):
            if h5.attrs.get(key) != first.attrs.get(key):
                raise StageError(f"{p}: made with a different {key} than {opened[0][0]}; rerun its shard")
    if condset is not None and first.attrs.get("condition_set") != condset:
        raise StageError(
            f"{opened[0][0]}: shards of condition set {first.attrs.get('condition_set')!r}, not {condset!r}"
        )
    index = np.concatenate([h5["index"][:] for _, h5 in opened])
    expected = np.arange(size)
    if index.shape != expected.shape or not np.array_equal(index, expected):
        raise StageError(
            f"the shards hold subjects {_ranges_text(index)}, expected 0-{size - 1} (cohort.size {size})"
        )
    return len(index)


def _ranges_text(index: np.ndarray) -> str:
    if index.size == 0:
        return "none"
    return f"{index.min()}-{index.max()} ({index.size} subjects, {len(np.unique(index))} distinct)"


def _copy_datasets(out: h5py.File, opened: Sequence[tuple[Path, h5py.File]], n: int) -> None:
    """Every dataset of the shards, concatenated (the references once), volumes one subject at a time."""
    first = opened[0][1]
    keys: list[str] = []
    first.visititems(lambda k, o: keys.append(k) if isinstance(o, h5py.Dataset) else None)
    once = tuple(f"{group}/" for group in _REFERENCES)
    per_subject = [k for k in keys if not k.startswith(("attempts/", *once))]
    for key in keys:
        src = first[key]
        if key.startswith(once):
            out.create_dataset(key, data=src[:], track_times=False)
            continue
        total = n if key in per_subject else sum(h5[key].shape[0] for _, h5 in opened)
        shape = (total, *src.shape[1:])
        ds = out.create_dataset(key, shape, dtype=src.dtype, **_h5_kwargs(shape, src.dtype))
        for name, value in src.attrs.items():
            ds.attrs[name] = value
        at = 0
        for p, h5 in opened:
            if key not in h5:
                raise StageError(f"{p}: no /{key} (a shard from another version; rerun it)")
            part = h5[key]
            step = 1 if part.ndim > 2 else part.shape[0] or 1  # volumes one by one
            for s in range(0, part.shape[0], step):
                block = part[s : s + (1 if part.ndim > 2 else part.shape[0])]
                ds[at : at + len(block)] = block
                at += len(block)
    for group in _REFERENCES:
        for name, value in first[group].attrs.items() if group in first else ():
            out[group].attrs[name] = value


def _merged_attrs(cfg: Mapping[str, Any], opened: Sequence[tuple[Path, h5py.File]], n: int) -> dict[str, Any]:
    """The merged file's attributes: the shards' grid and settings, fresh provenance, each shard's origin."""
    from vcm.config import dump_config

    first = opened[0][1]
    attrs: dict[str, Any] = {
        key: first.attrs[key]
        for key in ("grid_affine", "grid_shape", "grid_spacing_mm", "signature", "qc_settings")
    }
    shard_info = [{k: str(h5.attrs.get(k, "")) for k in _SHARD_INFO} for _, h5 in opened]
    attrs.update(
        provenance(
            dump_config(dict(cfg)),
            model=first.attrs.get("model", ""),
            model_sha256=first.attrs.get("model_sha256", ""),
            bundle_sha256=first.attrs.get("bundle_sha256", ""),
            dataset=first.attrs.get("dataset", ""),
            condition_set=first.attrs.get("condition_set", ""),
            n_subjects=n,
            n_passed=int(np.sum([h5["qc/passed"][:].sum() for _, h5 in opened])),
            shards=json.dumps(shard_info),
        )
    )
    return attrs


# --- tables ------------------------------------------------------------------------------------------------


def _manifest_rows(path: Path, h5: h5py.File, out_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``manifest.csv``, one per subject of a shard: a valid vcm input manifest (``t1``, age, sex)."""
    folder = path.parent
    subjects = [s.decode() if isinstance(s, bytes) else str(s) for s in h5["subjects"][:]]
    metrics = sorted(k for k in h5["qc"] if k not in ("passed", "attempts"))
    intensity = list(h5["intensity"]) if "intensity" in h5 else []
    names = sorted(h5["cond"])
    rows = []
    for k, sid in enumerate(subjects):
        sdir = folder / sid

        def rel(name: str, sdir: Path = sdir) -> str:
            return os.path.relpath(volume_path(sdir, name), out_dir)

        cov, raw = h5["covariates"][k], h5["covariates_raw"][k]
        rows.append(
            {
                "subject": sid,
                "index": int(h5["index"][k]),
                "image": rel("image"),
                "t1": rel("image"),  # with age and sex: a valid vcm input manifest
                "age": float(raw[1]) if np.isfinite(raw[1]) else None,
                "sex": ("M" if cov[0] >= 0.5 else "F"),
                "label": rel("label"),
                "resegmentation": rel("seg"),
                **{f"cond_{n}": rel(n) for n in names},
                "source_subject": h5["source_subject"].asstr()[k],
                "new_anatomy": bool(h5["new_anatomy"][k]),
                "seed": int(h5["seed"][k]),
                "attempts": int(h5["qc/attempts"][k]),
                "passed": bool(h5["qc/passed"][k]),
                **{f"cov_{n}": float(v) for n, v in zip(COVARIATES, cov, strict=True)},
                "lv_volume_mm3": float(raw[2]),
                "brain_volume_mm3": float(raw[3]),
                **{f"target_{n}": float(h5[f"design/target_{n}"][k]) for n in COVARIATES},
                **{f"label_{n}": float(v) for n, v in zip(COVARIATES, raw, strict=True)},
                **{m: float(h5[f"qc/{m}"][k]) for m in metrics},
                **{f"median_{c}": float(h5[f"intensity/{c}"][k]) for c in intensity},
                "shard": str(h5.attrs.get("shard", folder.name)),
            }
        )
    return rows


def _attempt_rows(h5: h5py.File) -> list[dict[str, Any]]:
    """Rows of ``qc.csv``, one per QC attempt of a shard (attempts counted from 1)."""
    a = h5["attempts"]
    fields = sorted(k for k in a if k not in ("index", *_ATTEMPT_FIELDS, *PRIVACY_FIELDS))
    privacy = [k for k in PRIVACY_FIELDS if k in a]
    return [
        {
            "subject": subject_id(int(a["index"][j])),
            "index": int(a["index"][j]),
            "attempt": int(a["attempt"][j]) + 1,
            "draw": int(a["draw"][j]),  # the plan sampled (cohort.retry_new_anatomy)
            "source_index": int(a["source_index"][j]),
            "seed": int(a["seed"][j]),
            "passed": bool(a["passed"][j]),
            "kept": bool(a["kept"][j]),
            **{m: float(a[m][j]) for m in fields},
            "reasons": a["reasons"].asstr()[j],
            **{k: _privacy_value(a[k], j) for k in privacy},
        }
        for j in range(a["index"].shape[0])
    ]


def _privacy_value(ds: h5py.Dataset, j: int) -> Any:
    if ds.dtype.kind == "O":
        return ds.asstr()[j]
    return ds[j].item()
