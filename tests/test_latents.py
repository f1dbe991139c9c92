"""encode-latents: the posterior of every image and of its left-right flip, computed once (vcm.latents).

On a tiny dataset.h5 (16³ grid) and a tiny random backbone bundle from tests/fixtures.py.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.fixtures import encode, make_bundle, make_encoded
from vcm.errors import StageError
from vcm.latents import LatentsFile, bundle_sha256, flip_lr
from vcm.models.backbone import load_bundle

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_encoded(tmp_path_factory.mktemp("latents"))


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
    # encode_dataset runs each batch with its flip in one call; channels-last convolutions on the CPU round
    # differently per batch composition (up to ~1.5e-5 here), far below the 1e-3 that tells a view from a copy
    np.testing.assert_allclose(mu[:, 0], mu0.numpy(), atol=5e-5)
    np.testing.assert_allclose(mu[:, 1], mu1.numpy(), atol=5e-5)
    np.testing.assert_allclose(sigma[:, 1], sigma1.numpy(), atol=5e-5)
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


def test_latents_file_reads_what_encode_wrote(tmp_path, files):
    with LatentsFile(files["latents"]) as encoded, h5py.File(files["dataset"]) as ds:
        assert len(encoded) == 6 and encoded.subjects() == [s.decode() for s in ds["subjects"][:]]
        assert encoded.bundle_sha256 == bundle_sha256(files["bundle"])
        mu, sigma = encoded.posteriors(np.array([1, 3]))
        assert mu.shape == sigma.shape == (2, 2, 3, 4, 4, 4) and mu.dtype == np.float32
    with pytest.raises(StageError, match="latents not found"):
        LatentsFile(tmp_path / "none.h5")
