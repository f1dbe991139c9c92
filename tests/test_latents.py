"""encode-latents: the posterior of every image and of its left-right flip, computed once (vcm.latents).

The helpers here build a tiny dataset.h5 (16³ grid) and a tiny random backbone bundle; tests/test_train.py
reuses them.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vcm.cli import StageError
from vcm.grid import Grid
from vcm.latents import bundle_sha256, cli, flip_lr
from vcm.models.backbone import Backbone, build_networks, load_bundle, save_bundle, tiny_definitions

REPO = Path(__file__).resolve().parent.parent
GRID = (16, 16, 16)
SEMANTIC_CLASSES = [
    "background",
    "csf",
    "white_matter",
    "grey_matter",
    "ventricles",
    "deep_grey_matter",
    "amygdala",
    "hippocampus",
    "brain_stem",
]


def make_dataset(path: Path, n: int = 6, seed: int = 0) -> Path:
    """A dataset.h5 with the real layout on a 16³ grid of 10 mm voxels: head-like blobs, an off-centre LV
    blob (left-right asymmetric, so that a flip is visible), splits train_2, train_4 and val (2)."""
    rng = np.random.default_rng(seed)
    grid = Grid(GRID, 10.0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in GRID], indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    head = [np.clip(1 - r + 0.3 * x + 0.05 * rng.standard_normal(GRID), 0, 1) for _ in range(n)]
    image = np.stack(head)[:, None]
    lv = np.stack([(x - 0.3 - 0.05 * i) ** 2 + y**2 + z**2 < 0.15 for i in range(n)])[:, None]
    with h5py.File(path, "w") as h5:
        h5["subjects"] = np.array([f"sub-{i:02d}" for i in range(n)], dtype=object)
        h5["image"] = image.astype(np.float16)
        h5["cond/lv"] = lv.astype(np.uint8)
        h5["cond/brain"] = np.repeat((r < 0.8)[None, None], n, 0).astype(np.uint8)
        h5["cond/semantics"] = np.repeat(np.clip(r * 9, 0, 8).astype(np.uint8)[None, None], n, 0)
        h5["cond/semantics"].attrs["classes"] = SEMANTIC_CLASSES
        h5["cond/skull"] = (image * (r > 0.8)).astype(np.float16)
        h5["covariates"] = rng.random((n, 4)).astype(np.float32)
        h5["splits/train_2"] = np.array([0, 1])
        h5["splits/train_4"] = np.array([0, 1, 2, 3])
        h5["splits/val"] = np.array([4, 5])
        h5.attrs["grid_affine"] = grid.affine
        h5.attrs["grid_shape"] = list(GRID)
        h5.attrs["grid_spacing_mm"] = grid.spacing_mm
    return path


def make_bundle(folder: Path, seed: int = 0) -> Path:
    """A tiny random backbone (AE factor 4: 16³ -> latent 3×4³) whose U-Net predicts something non-zero."""
    defs = tiny_definitions(
        channels=(4, 8, 8),
        norm_num_groups=4,
        diffusion_channels=(8, 16),
        diffusion_num_head_channels=(0, 8),
        diffusion_norm_num_groups=8,
    )
    torch.manual_seed(seed)
    ae, dm = build_networks(defs)
    with torch.no_grad():  # MONAI zero-initialises the output conv
        dm.out[-1].conv.weight.normal_(std=0.05)
    return save_bundle(folder, Backbone(ae, dm, definitions=defs))


def encode(dataset: Path, bundle: Path, out: Path) -> Path:
    args = ["--config", str(REPO / "config" / "config.yaml"), "--dataset", str(dataset)]
    assert (
        cli([*args, "--bundle", str(bundle), "--out", str(out), "--batch-size", "4", "--device", "cpu"]) == 0
    )
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster than several and leaves the shared CPUs to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latents")
    dataset, bundle = make_dataset(root / "dataset.h5"), make_bundle(root / "bundle")
    return {"dataset": dataset, "bundle": bundle, "latents": encode(dataset, bundle, root / "latents.h5")}


def test_shapes_layout_and_provenance(files):
    with h5py.File(files["latents"]) as h5, h5py.File(files["dataset"]) as ds:
        assert h5["mu"].shape == h5["sigma"].shape == (6, 2, 3, 4, 4, 4)
        assert h5["mu"].dtype == np.float32
        assert (h5["sigma"][:] > 0).all()
        assert list(h5["subjects"][:]) == list(ds["subjects"][:])
        assert h5.attrs["bundle_sha256"] == bundle_sha256(files["bundle"])
        assert h5.attrs["flip_axis"] == 0 and h5.attrs["downsample_factor"] == 4
        assert "config_sha256" in h5.attrs and "torch_version" in h5.attrs


def test_flipped_entry_is_the_encoding_of_the_flipped_image(files):
    backbone = load_bundle(files["bundle"])
    with h5py.File(files["dataset"]) as ds, h5py.File(files["latents"]) as h5:
        image = torch.from_numpy(ds["image"][:3].astype(np.float32))
        mu, sigma = h5["mu"][:3], h5["sigma"][:3]
    with torch.no_grad():
        mu0, sigma0 = backbone.encode(image)
        mu1, sigma1 = backbone.encode(flip_lr(image))
    np.testing.assert_allclose(mu[:, 0], mu0.numpy(), atol=1e-5)
    np.testing.assert_allclose(mu[:, 1], mu1.numpy(), atol=1e-5)
    np.testing.assert_allclose(sigma[:, 1], sigma1.numpy(), atol=1e-5)
    # the asymmetric image: the flipped view is a different latent, not a copy
    assert np.abs(mu[:, 1] - mu[:, 0]).max() > 1e-3
    assert flip_lr(image)[0, 0, 0].equal(image[0, 0, -1])  # axis 0 of the LAS grid


def test_bundle_digest_changes_with_the_weights(tmp_path, files):
    other = make_bundle(tmp_path / "other", seed=1)
    assert bundle_sha256(other) != bundle_sha256(files["bundle"])
    with pytest.raises(StageError, match="no weights"):
        bundle_sha256(tmp_path)


def test_missing_dataset_is_one_line(tmp_path, files):
    with pytest.raises(StageError, match="dataset not found"):
        encode(tmp_path / "missing.h5", files["bundle"], tmp_path / "l.h5")
    assert not (tmp_path / "l.h5").exists()
