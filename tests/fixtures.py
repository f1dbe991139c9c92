"""Builders shared by the tests: tiny fake ``dataset.h5`` and ``cohort.h5`` files on a 16³ grid of 10 mm
voxels, a tiny random backbone bundle and its latents, tiny VCM / ControlNet settings.

Plain functions (no pytest here): each test module calls them from its own fixtures with its own parameters.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from vcm.grid import Grid
from vcm.labels import brain_mask, mask_of, semantic_map
from vcm.latents import cli as latents_cli
from vcm.models.backbone import Backbone, build_networks, save_bundle, tiny_definitions

REPO = Path(__file__).resolve().parent.parent
GRID = (16, 16, 16)
SPACING = 10.0
SEMANTIC_NAMES = [
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
TINY_VCM = {
    "encoder_channels": [4, 8],
    "encoder_norm_num_groups": 4,
    "unet_channels": [8, 16],
    "unet_num_res_blocks": 1,
    "unet_num_head_channels": 8,
    "unet_norm_num_groups": 8,
    "unet_out_channels": 8,
    "head_channels": 8,
}
TINY_CONTROLNET = {"conditioning_channels": [4, 8, 8]}


def write_splits(h5: h5py.File, val: list[int]) -> None:
    """The training splits train_2 and train_4 (nested, subjects 0-3) and the validation subjects ``val``."""
    h5["splits/train_2"] = np.array([0, 1])
    h5["splits/train_4"] = np.array([0, 1, 2, 3])
    h5["splits/val"] = np.array(val)


def write_grid_attrs(h5: h5py.File, grid: Grid) -> None:
    h5.attrs["grid_affine"] = grid.affine
    h5.attrs["grid_shape"] = list(grid.shape)
    h5.attrs["grid_spacing_mm"] = grid.spacing_mm


# --- dataset.h5 --------------------------------------------------------------------------------------------


def make_dataset(path: Path, n: int = 6, seed: int = 0) -> Path:
    """A dataset.h5 with the real layout on a 16³ grid of 10 mm voxels: head-like blobs, an off-centre LV
    blob (left-right asymmetric, so that a flip is visible), splits train_2, train_4 and val (2)."""
    rng = np.random.default_rng(seed)
    grid = Grid(GRID, SPACING)
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
        h5["cond/semantics"].attrs["classes"] = SEMANTIC_NAMES
        h5["cond/skull"] = (image * (r > 0.8)).astype(np.float16)
        h5["covariates"] = rng.random((n, 4)).astype(np.float32)
        write_splits(h5, val=[4, 5])
        write_grid_attrs(h5, grid)
    return path


def make_labelled_dataset(path: Path, n: int = 6) -> Path:
    """dataset.h5 on a 16³ grid of 10 mm voxels with FreeSurfer label maps: CSF shell, cortex, white matter,
    lateral ventricles of growing size, a skull image; conditions derived as vcm.prep.conditions does."""
    rng = np.random.default_rng(0)
    grid = Grid(GRID, SPACING)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in GRID], indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    labels, images = [], []
    for i in range(n):
        lab = np.zeros(GRID, np.uint16)
        lab[r < 0.8] = 24
        lab[r < 0.72] = np.where(x[r < 0.72] < 0, 3, 42)
        lab[r < 0.55] = np.where(x[r < 0.55] < 0, 2, 41)
        lv = (np.abs(x) - 0.22) ** 2 / 0.03 + y**2 / 0.12 + z**2 / 0.05 < 1 + 0.15 * i
        lab[lv] = np.where(x[lv] < 0, 4, 43)
        lab[(r < 0.2) & (z < -0.05)] = 16
        tone = {0: 0.0, 24: 0.15, 3: 0.45, 42: 0.45, 2: 0.75, 41: 0.75, 4: 0.1, 43: 0.1, 16: 0.6}
        img = np.vectorize(tone.get)(lab).astype(np.float32)
        img[(r >= 0.8) & (r < 0.95)] = 0.55
        img = np.clip(img + 0.02 * rng.standard_normal(GRID), 0, 1)
        labels.append(lab)
        images.append(img)
    labels, images = np.stack(labels), np.stack(images)
    skull = images * ((r >= 0.8) & (r < 0.95))
    with h5py.File(path, "w") as h5:
        h5["subjects"] = np.array([f"sub-{i:02d}" for i in range(n)], dtype=object)
        h5["image"] = images[:, None].astype(np.float16)
        h5["label"] = labels
        h5["cond/lv"] = np.stack([mask_of(lab, (4, 43)) for lab in labels])[:, None].astype(np.uint8)
        h5["cond/brain"] = np.stack([brain_mask(lab) for lab in labels])[:, None].astype(np.uint8)
        h5["cond/semantics"] = np.stack([semantic_map(lab) for lab in labels])[:, None]
        h5["cond/semantics"].attrs["classes"] = SEMANTIC_NAMES
        h5["cond/skull"] = skull[:, None].astype(np.float16)
        h5["covariates"] = rng.random((n, 4)).astype(np.float32)
        lv_mm3 = [mask_of(lab, (4, 43)).sum() * SPACING**3 * 1.1 for lab in labels]
        brain_mm3 = [brain_mask(lab).sum() * SPACING**3 * 1.1 for lab in labels]
        h5["covariates_raw"] = np.stack(
            [np.arange(n) % 2, 50 + np.arange(n), lv_mm3, brain_mm3], axis=1
        ).astype(np.float64)
        write_splits(h5, val=[4, 5])
        write_grid_attrs(h5, grid)
        h5.attrs["config_sha256"] = "test"
    return path


# --- backbone and latents ----------------------------------------------------------------------------------


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
        latents_cli(
            [*args, "--bundle", str(bundle), "--out", str(out), "--batch-size", "4", "--device", "cpu"]
        )
        == 0
    )
    return out


def make_encoded(root: Path) -> dict[str, Path]:
    """:func:`make_dataset`, :func:`make_bundle` and the latents :func:`encode` writes, under ``root``."""
    dataset, bundle = make_dataset(root / "dataset.h5"), make_bundle(root / "bundle")
    return {"dataset": dataset, "bundle": bundle, "latents": encode(dataset, bundle, root / "latents.h5")}


def two_branch_config(**training) -> dict:
    """The demo config with one set ``two`` (``[lv, brain]`` and ``[skull]`` branches) and a tiny VCM;
    ``training`` updates the ``training`` section."""
    from vcm.config import load_config

    cfg = load_config(REPO / "config" / "config.yaml")
    cfg["condition_sets"] = {"two": [["lv", "brain"], ["skull"]]}
    cfg["training"].update(vcm=TINY_VCM, **training)
    return cfg


def make_vcm(path: Path, groups: list, bundle: Path, condset: str, seed: int = 0) -> Path:
    """A tiny ``vcm.pt`` on ``bundle`` whose weights leave the identity (a visible control, the same every run)."""
    from vcm.latents import bundle_sha256
    from vcm.models.backbone import load_bundle
    from vcm.models.build import build_model

    backbone = load_bundle(bundle)
    torch.manual_seed(seed)
    model = build_model("vcm", groups, backbone, TINY_VCM)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": 1,
            "method": "vcm",
            "model": model.state_dict(),
            "model_config": model.config,
            "condition_set": condset,
            "condition_groups": [[[n, c] for n, c in g] for g in groups],
            "training_size": 2,
            "backbone_sha256": bundle_sha256(bundle),
            "scale_factor": 1.0,
        },
        path,
    )
    return path


# --- phantoms with visible structures: dataset.h5 and cohort.h5 --------------------------------------------


def phantom(rng: np.random.Generator, grid=GRID) -> tuple[np.ndarray, np.ndarray]:
    """An image whose structures are visible: a brain (WM 2/41, cortex rim 3/42), two dark LVs (4, 43) at a
    random offset and size, CSF 24 between brain and a bright skull, background 0."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in grid], indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    labels = np.zeros(grid, np.uint16)
    labels[r < 0.85] = 24
    labels[r < 0.75] = 3
    labels[(r < 0.75) & (x < 0)] = 42
    labels[r < 0.6] = 2
    labels[(r < 0.6) & (x < 0)] = 41
    c = rng.uniform(-0.1, 0.1, 3)
    size = rng.uniform(0.18, 0.26)
    for side, fs in ((1, 4), (-1, 43)):
        blob = (
            (x - side * 0.28 - c[0]) ** 2 / size**2
            + (y - c[1]) ** 2 / (1.6 * size) ** 2
            + (z - c[2]) ** 2 / size**2
        ) < 1
        labels[blob] = fs
    intensity = {0: 0.0, 24: 0.15, 3: 0.55, 42: 0.55, 2: 0.8, 41: 0.8, 4: 0.1, 43: 0.1}
    image = np.vectorize(intensity.get, otypes=[np.float32])(labels)
    image[(r >= 0.85) & (r < 0.95)] = 0.9  # skull
    image = np.clip(image + 0.03 * rng.standard_normal(grid), 0, 1).astype(np.float32)
    return image, labels


def make_real(path: Path, n: int = 8, seed: int = 0) -> Path:
    """A ``dataset.h5`` (contract layout) of :func:`phantom` subjects; splits train_2, train_4 (nested) and val
    (subjects 6, 7 of 8)."""
    rng = np.random.default_rng(seed)
    images, labels = zip(*[phantom(rng) for _ in range(n)], strict=True)
    labels = np.stack(labels)
    grid = Grid(GRID, SPACING)
    with h5py.File(path, "w") as h5:
        h5["subjects"] = np.array([f"sub-{i:02d}" for i in range(n)], dtype=object)
        h5["image"] = np.stack(images)[:, None].astype(np.float16)
        h5["label"] = labels
        h5["cond/lv"] = mask_of(labels, (4, 43))[:, None].astype(np.uint8)
        h5["cond/semantics"] = semantic_map(labels)[:, None]
        h5["cond/semantics"].attrs["classes"] = SEMANTIC_NAMES
        h5["covariates"] = rng.random((n, 4)).astype(np.float32)
        write_splits(h5, val=[n - 2, n - 1])
        h5.attrs["grid_affine"] = grid.affine
    return path


def make_cohort(folder: Path, n: int = 6, seed: int = 1, failed: tuple[int, ...] = (1, 4)) -> Path:
    """A ``cohort.h5`` with the contract's layout (plus ``manifest.csv`` and ``qc.csv`` beside it); the
    subjects in ``failed`` did not pass QC."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, labels = zip(*[phantom(rng) for _ in range(n)], strict=True)
    labels = np.stack(labels)
    passed = np.array([i not in failed for i in range(n)])
    dice = np.where(passed, rng.uniform(0.75, 0.95, n), rng.uniform(0.3, 0.6, n))
    subjects = [f"syn-{i:05d}" for i in range(n)]
    path = folder / "cohort.h5"
    with h5py.File(path, "w") as h5:
        h5["subjects"] = np.array(subjects, dtype=object)
        h5["image"] = np.stack(images)[:, None].astype(np.float16)
        h5["label"] = labels
        h5["cond/lv"] = mask_of(labels, (4, 43))[:, None].astype(np.float16)
        h5["covariates"] = rng.random((n, 4)).astype(np.float32)
        h5["seed"] = np.arange(n, dtype=np.int64) + 1000
        h5["source_subject"] = np.array([f"sub-{i % 3:02d}" for i in range(n)], dtype=object)
        h5["new_anatomy"] = np.arange(n) % 2 == 1
        h5["qc/dice"] = dice
        h5["qc/hd95"] = rng.uniform(2, 12, n)
        h5["qc/assd"] = rng.uniform(0.5, 3, n)
        h5["qc/passed"] = passed
        h5["qc/attempts"] = np.where(passed, 1, 3)
        h5.attrs["grid_affine"] = Grid(GRID, SPACING).affine
    table = pd.DataFrame({"subject": subjects, "source_subject": [f"sub-{i % 3:02d}" for i in range(n)]})
    table.to_csv(folder / "manifest.csv", index=False)
    pd.DataFrame({"subject": subjects, "dice": dice, "passed": passed}).to_csv(folder / "qc.csv", index=False)
    return path


# --- label maps -----------------------------------------------------------------------------------------------


def head_labels(ventricles: bool = True) -> np.ndarray:
    """A label map on the demo grid (4 mm): CSF shell, white matter and cortex (1.8 L of brain at 4 mm), lateral
    ventricles (11 mL) unless ``ventricles`` is false."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 56, 40)], indexing="ij")
    r = np.sqrt(x**2 + (y * 0.8) ** 2 + z**2)
    labels = np.zeros(r.shape, np.uint16)
    labels[r < 0.9] = 24
    labels[r < 0.8] = np.where(x[r < 0.8] < 0, 3, 42)
    labels[r < 0.6] = np.where(x[r < 0.6] < 0, 2, 41)
    if ventricles:
        lv = (np.abs(x) - 0.15) ** 2 + y**2 / 4 + z**2 < 0.01
        labels[lv] = np.where(x[lv] < 0, 4, 43)
    return labels
