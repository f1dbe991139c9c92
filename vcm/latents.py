"""Pre-encoded autoencoder posteriors of the training images (``latents.h5``; paper §3.2, B.2).

VCM trains on latents of a *frozen* autoencoder, so every image is encoded once, before training, instead of
at every step. The left-right flip augmentation needs the latent of the flipped image, which is not the flip
of the latent (the encoder is not equivariant to flips), so the flipped image is encoded too.

Layout::

    /mu, /sigma    float32  N x 2 x C x h x w x d   posterior mean and standard deviation, autoencoder units
                                                    (not multiplied by the scale factor); index 1:
                                                    0 = the image, 1 = the image flipped along axis 0 of the
                                                    LAS grid (left-right). Only the image is flipped here;
                                                    training flips the conditions together with it.
    /subjects      the dataset's subject ids, in the same order
    attrs          provenance, ``bundle_sha256`` (see :func:`bundle_sha256`), ``flip_axis`` (0),
                   ``downsample_factor``, ``dataset``

The one module that opens ``latents.h5``: :func:`write_latents` writes it, :class:`LatentsFile` reads it.

A diffusion latent is then ``(mu + sigma * n) * scale_factor`` with ``n ~ N(0, I)`` drawn at every step, or
``mu * scale_factor`` for a backbone whose U-Net was trained on posterior means (the bundle's
``latent_sampling``; the tiny backbone's).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from vcm.errors import StageError

__all__ = ["FLIP_AXIS", "LatentsFile", "bundle_sha256", "cli", "encode_dataset", "flip_lr", "write_latents"]

logger = logging.getLogger(__name__)

FLIP_AXIS = 0
"""The left-right axis of the LAS grid (first spatial axis)."""

_BUNDLE_FILES = ("models/autoencoder.pt", "models/model.pt", "configs/network.json")


def flip_lr(x: torch.Tensor) -> torch.Tensor:
    """Flip (B, C, *grid) tensors left-right (spatial axis :data:`FLIP_AXIS`)."""
    return torch.flip(x, dims=(2 + FLIP_AXIS,))


def bundle_sha256(folder: str | Path) -> str:
    """One sha256 over a backbone bundle's files (weights and network definition, where present).

    Hashes the relative name and the content sha256 of each file, so renaming or replacing any of them
    changes the digest; models and latents record it to refuse mixing backbones.
    """
    from vcm.io import sha256_file

    folder = Path(folder)
    digest = hashlib.sha256()
    found = False
    for rel in _BUNDLE_FILES:
        path = folder / rel
        if path.is_file():
            digest.update(f"{rel}:{sha256_file(path)}\n".encode())
            found = True
    if not found:
        raise StageError(f"backbone bundle has no weights: {folder}")
    return digest.hexdigest()


@torch.no_grad()
def encode_dataset(
    backbone,
    images: h5py.Dataset | np.ndarray,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior ``(mu, sigma)`` of every image and of its left-right flip.

    Args:
        backbone: a :class:`~vcm.models.backbone.Backbone` (its autoencoder is used).
        images: N x 1 x D x H x W (any float or integer dtype; read batch by batch).
        batch_size: images per encoder call (each call encodes the batch and its flip together).
        device: where to run the encoder.
        progress: show a tqdm bar.

    Returns:
        ``mu`` and ``sigma``, float32 arrays N x 2 x C x h x w x d (index 1: 0 = original, 1 = flipped).
    """
    n = int(images.shape[0])
    mu_out = sigma_out = None
    bar = tqdm(total=n, desc="encode-latents", unit="image", disable=not progress)
    for start in range(0, n, batch_size):
        x = torch.as_tensor(np.asarray(images[start : start + batch_size]), dtype=torch.float32).to(device)
        b = x.shape[0]
        mu, sigma = backbone.encode(torch.cat([x, flip_lr(x)]))  # one call for both views
        mu = mu.float().reshape(2, b, *mu.shape[1:]).transpose(0, 1).cpu().numpy()
        sigma = sigma.float().reshape(2, b, *sigma.shape[1:]).transpose(0, 1).cpu().numpy()
        if mu_out is None:
            mu_out = np.empty((n, *mu.shape[1:]), np.float32)
            sigma_out = np.empty_like(mu_out)
        mu_out[start : start + b], sigma_out[start : start + b] = mu, sigma
        bar.update(b)
    bar.close()
    if mu_out is None:
        raise StageError("the dataset has no images to encode")
    return mu_out, sigma_out


def write_latents(
    out: str | Path,
    mu: np.ndarray,
    sigma: np.ndarray,
    subjects: list[str] | None,
    attrs: dict[str, object],
) -> Path:
    """Write ``latents.h5`` atomically (chunked one subject per chunk)."""
    from vcm.io import atomic_path

    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        chunk = (1, *mu.shape[1:])
        h5.create_dataset("mu", data=mu, chunks=chunk)
        h5.create_dataset("sigma", data=sigma, chunks=chunk)
        if subjects is not None:
            h5.create_dataset("subjects", data=np.array(subjects, dtype=object), dtype=h5py.string_dtype())
        h5["mu"].attrs["index_1"] = ["original", f"flipped_axis_{FLIP_AXIS}"]
        for key, value in attrs.items():
            h5.attrs[key] = value
    return Path(out)


class LatentsFile:
    """Read access to one ``latents.h5`` (a context manager).

    Args:
        path: the file.

    Raises:
        StageError: the file is missing or has no ``/mu`` or ``/sigma``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StageError(f"latents not found: {path} (run encode-latents)")
        self.h5 = h5py.File(self.path, "r")
        for key in ("mu", "sigma"):
            if key not in self.h5:
                self.h5.close()
                raise StageError(f"{path}: no /{key} dataset (rerun encode-latents)")

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> LatentsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.h5["mu"].shape[0])

    def subjects(self) -> list[str] | None:
        """The dataset's subject ids the latents were encoded from (``None`` when not recorded)."""
        if "subjects" not in self.h5:
            return None
        return [s.decode() if isinstance(s, bytes) else str(s) for s in self.h5["subjects"][:]]

    @property
    def bundle_sha256(self) -> str:
        """The digest of the backbone bundle that encoded them (``""`` when not recorded)."""
        return str(self.h5.attrs.get("bundle_sha256", ""))

    def posteriors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``mu`` and ``sigma`` (float32, n x 2 x C x h x w x d) of the sorted ``rows``."""
        return (
            np.asarray(self.h5["mu"][rows], dtype=np.float32),
            np.asarray(self.h5["sigma"][rows], dtype=np.float32),
        )


def cli(argv: list[str]) -> int:
    """``python -m vcm encode-latents``: encode every image of ``dataset.h5`` and its flip, once."""
    from vcm.config import dump_config, load_config
    from vcm.dataset_store import DatasetFile
    from vcm.io import provenance
    from vcm.models.backbone import load_bundle
    from vcm.stage import configure_runtime, stage_parser

    parser = stage_parser("encode-latents", __doc__, threads=True, device=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--bundle", required=True, help="backbone bundle folder")
    parser.add_argument("--out", required=True, help="latents.h5 to write")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    device = configure_runtime(args)
    cfg = load_config(args.config)
    backbone = load_bundle(args.bundle, scale_factor=cfg["backbone"]["scale_factor"], device=device)
    start = time.perf_counter()
    with DatasetFile(args.dataset) as data:
        grid = data.grid_shape
        factor = backbone.downsample_factor
        if any(s % factor for s in grid):
            raise StageError(
                f"image grid {grid} is not divisible by the autoencoder's downsampling factor {factor}"
            )
        subjects = data.subjects()
        mu, sigma = encode_dataset(backbone, data.lazy_images, args.batch_size, device)
    attrs = provenance(
        dump_config(cfg),
        bundle=str(args.bundle),
        bundle_sha256=bundle_sha256(args.bundle),
        dataset=str(args.dataset),
        device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
    )
    attrs.update({"flip_axis": FLIP_AXIS, "downsample_factor": factor})
    path = write_latents(args.out, mu, sigma, subjects, attrs)
    print(
        f"{path}: mu/sigma {mu.shape} for {len(subjects)} subjects (original + left-right flip) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0
