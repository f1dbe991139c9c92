"""File I/O shared by all stages: atomic writes, NIfTI, JSON, provenance."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""What ``open()`` would give a new file under this process's umask (read once, at import: setting the umask
to read it is not thread-safe)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder as ``path``; rename it onto ``path`` on success.

    A crash, a kill or an exception leaves no half-written file under the final name (the rename is
    atomic on POSIX file systems because source and target share the folder).

    Args:
        path: the final file name.
        suffix: suffix of the temporary name; defaults to the final name's suffixes, so that libraries
            which infer the format from the name (nibabel, matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files: give the umask's mode, so a group can read a cohort
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented, numpy scalars converted)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_nifti(
    path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, dtype: Any | None = None
) -> None:
    """Save a volume as NIfTI atomically, with sform and qform set to ``affine``."""
    data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header.set_data_dtype(data.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def load_nifti(path: str | os.PathLike, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI volume; return (data, affine)."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=dtype), img.affine


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, and the same bytes for the same ``obj``.

    Saved through an open file, not a path: given a path, torch names the archive's records after the file,
    which here is a random temporary name, so equal contents would give different files. Tensors are saved
    in the default (contiguous) layout, whatever layout they were computed in (:func:`vcm.models.layout.place`).
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(_contiguous(obj), f)
    return Path(path)


def _contiguous(obj: Any) -> Any:
    """``obj`` with every tensor in it (through dicts, lists and tuples) in the default layout's strides.

    Not ``Tensor.contiguous()`` alone: a channels-last tensor with one channel counts as contiguous but keeps
    its own strides, which the file records.
    """
    if hasattr(obj, "stride") and hasattr(obj, "clone"):
        strides, size = [], 1
        for n in reversed(obj.shape):
            strides.insert(0, size)
            size *= max(int(n), 1)
        if tuple(obj.stride()) == tuple(strides):
            return obj
        import torch

        return obj.clone(memory_format=torch.contiguous_format)
    if isinstance(obj, dict):  # a shallow copy keeps a state dict's ``_metadata``
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = _contiguous(v)
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_contiguous(v) for v in obj)
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_sha() -> str:
    """The git commit of the vcm checkout, or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(config_text: str | None = None, **extra: Any) -> dict[str, str]:
    """Provenance attributes for an output file: versions, device, config and its sha256, SLURM ids."""
    from importlib import metadata

    from vcm import __version__

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    attrs: dict[str, str] = {
        "vcm_version": __version__,
        "vcm_git_sha": git_sha(),
        "python": platform.python_version(),
        "host": platform.node(),
        "torch_version": version("torch"),
        "monai_version": version("monai"),
        "ants_version": version("antspyx"),
        "numpy_version": version("numpy"),
    }
    if config_text is not None:
        attrs["config_yaml"] = config_text
        attrs["config_sha256"] = hashlib.sha256(config_text.encode()).hexdigest()
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        if os.environ.get(key):
            attrs[key.lower()] = os.environ[key]
    attrs.update({k: str(v) for k, v in extra.items()})
    return attrs
