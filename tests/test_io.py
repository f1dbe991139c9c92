"""Atomic writes (vcm.io): nothing half-written under the final name, and the mode a plain open() gives."""

import os
import stat

import numpy as np
import pytest

from vcm.io import atomic_path, save_nifti, write_text


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_get_the_umask_mode_not_mkstemp_0600(tmp_path, monkeypatch, umask, mode):
    # files are shared on clusters: a group member must be able to read a cohort its owner wrote
    import vcm.io

    monkeypatch.setattr(vcm.io, "_FILE_MODE", 0o666 & ~umask)
    write_text(tmp_path / "a.txt", "x")
    save_nifti(tmp_path / "b.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4), np.float32)
    for name in ("a.txt", "b.nii.gz"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode


def test_file_mode_follows_the_process_umask():
    import vcm.io

    current = os.umask(0)
    os.umask(current)
    assert vcm.io._FILE_MODE == 0o666 & ~current


def test_save_torch_gives_the_same_bytes_for_the_same_contents(tmp_path):
    """torch.save given a path names the archive after the (random, temporary) file: not through save_torch."""
    import torch

    from vcm.io import save_torch

    obj = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"steps": 6}}
    a, b = save_torch(obj, tmp_path / "a.pt"), save_torch(obj, tmp_path / "sub" / "b.pt")
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch.load(b, weights_only=True)["w"], obj["w"])
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
