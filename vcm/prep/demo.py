"""The embedded demo cohort: native-space synthetic heads made from the MNI152 template, seeded.

Each subject is the template anatomy pushed through (in this order) a ventricle expansion that grows with
age (so the LV-volume covariate really varies), a smooth random non-linear deformation, a sex- and
subject-dependent scale, and a random affine into a native scanner grid (2 mm by default). A synthetic
skull and scalp shell with per-subject thicknesses is added in native space, then a multiplicative bias
field, a gamma intensity change and Gaussian noise. The ground-truth label map (FreeSurfer IDs, native
space) is written beside each T1 for tests and the ``precomputed`` backend.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm import tqdm

from vcm.grid import Grid
from vcm.io import atomic_path, provenance, save_nifti, write_text
from vcm.labels import LATERAL_VENTRICLES, brain_mask, mask_of
from vcm.prep.template import HeadShell, Template, add_head, build_template, world_grid

NATIVE_FOV_MM = (184.0, 232.0, 200.0)


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], coarse: int, amplitude: float
) -> np.ndarray:
    """A smooth random scalar field on ``shape``: coarse Gaussian noise, cubic upsampling."""
    field = rng.normal(0.0, amplitude, size=(coarse,) * 3)
    zoom = [s / coarse for s in shape]
    return ndi.zoom(field, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]


def make_subject(
    tpl: Template, rng: np.random.Generator, spacing_mm: float, grid: Grid | None = None
) -> dict:
    """Make one subject; return its arrays, affine and covariates.

    Args:
        tpl: the template anatomy.
        rng: the subject's random stream.
        spacing_mm: voxel size of the volume written.
        grid: when given, the subject is sampled in template space on ``grid``'s field of view (as a perfect
            affine registration would put it) instead of in a randomly posed native scanner grid.
    """
    age = float(rng.uniform(44, 82))
    sex = "M" if rng.random() < 0.5 else "F"
    # Ventricles grow with age (roughly 3x from 45 to 80 y in UK Biobank), with subject variation.
    expansion = float(np.clip(0.15 + 0.022 * (age - 44) + rng.normal(0, 0.12), -0.2, 1.2))
    # UK Biobank-sized heads (the MNI152 brain is ~1.85 l; these give ~1.25-1.55 l, inside the covariate ranges).
    scale = (0.93 if sex == "M" else 0.88) * float(rng.normal(1.0, 0.025))

    # Native grid: a random rigid pose of the head with a small anisotropic scale and shear.
    shape = tuple(int(round(f / spacing_mm)) for f in NATIVE_FOV_MM)
    rot = _rotation(np.deg2rad(rng.uniform(-10, 10, size=3)))
    lin = rot @ np.diag(scale * rng.uniform(0.97, 1.03, size=3))
    lin[0, 1] += rng.uniform(-0.03, 0.03)
    shift = np.array([0.0, -17.0, 10.0]) + rng.uniform(-8, 8, size=3)
    to_native = np.eye(4)  # template world -> subject world
    to_native[:3, :3], to_native[:3, 3] = lin, shift - lin @ np.array([0.0, -17.0, 10.0])
    native_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    native_affine[:3, 3] = shift - spacing_mm * (np.asarray(shape) - 1) / 2
    volume_factor = 1.0  # native mm^3 per mm^3 of the sampled volume
    if grid is not None:
        volume_factor = float(abs(np.linalg.det(lin)))
        shape = tuple(int(round(n * grid.spacing_mm / spacing_mm)) for n in grid.shape)
        native_affine = Grid(shape, spacing_mm, grid.center_mm).affine  # type: ignore[arg-type]
        to_native = np.eye(4)

    # For each native voxel: world point -> template point p -> deformed source point p - u(p).
    q = world_grid(shape, native_affine).reshape(3, -1)
    back = np.linalg.inv(to_native)
    p = back[:3, :3] @ q + back[:3, 3:4]
    vent = mask_of(tpl.labels, LATERAL_VENTRICLES)
    centre = tpl.affine[:3, :3] @ np.argwhere(vent).mean(0) + tpl.affine[:3, 3]
    d = p - centre[:, None]
    u = expansion * d * np.exp(-(d**2).sum(0) / (2 * 22.0**2))  # radial push around the ventricles
    for axis in range(3):
        u[axis] += _smooth_field(rng, shape, 5, 1.6).reshape(-1)
    src = p - u
    inv_tpl = np.linalg.inv(tpl.affine)
    vox = inv_tpl[:3, :3] @ src + inv_tpl[:3, 3:4]
    t1 = ndi.map_coordinates(tpl.t1_brain, vox, order=1, cval=0.0).reshape(shape)
    labels = ndi.map_coordinates(tpl.labels, vox, order=0, cval=0).reshape(shape).astype(np.uint16)

    # Head shell, then scanner effects.
    shell = HeadShell(
        csf_mm=rng.uniform(1.5, 3.5),
        inner_table_mm=rng.uniform(1.0, 2.0),
        diploe_mm=rng.uniform(1.5, 4.0),
        outer_table_mm=rng.uniform(1.0, 2.0),
        scalp_mm=rng.uniform(4.0, 8.0),
        diploe=rng.uniform(0.35, 0.55),
        scalp=rng.uniform(0.65, 0.85),
    )
    head, _ = add_head(t1, brain_mask(labels) | (labels == 24), np.full(3, spacing_mm), shell)
    bias = np.exp(_smooth_field(rng, shape, 4, 0.12))
    gamma = rng.uniform(0.8, 1.25)
    img = np.clip(head, 0, None) ** gamma * bias * rng.uniform(300, 1200)
    img = img + rng.normal(0, 0.02 * img.max(), size=shape)
    img = np.abs(img).astype(np.float32)  # magnitude images are non-negative (Rician-like floor)
    voxel = spacing_mm**3 * volume_factor
    return {
        "t1": img,
        "labels": labels,
        "affine": native_affine,
        "age": age,
        "sex": sex,
        "lv_mm3": float(vent_volume(labels) * voxel),
        "brain_mm3": float(brain_mask(labels).sum() * voxel),
    }


def vent_volume(labels: np.ndarray) -> int:
    return int(mask_of(labels, LATERAL_VENTRICLES).sum())


def build_demo(out_dir: str | Path, n_subjects: int = 24, seed: int = 0, spacing_mm: float = 2.0) -> Path:
    """Write ``n_subjects`` demo subjects and ``manifest.csv`` under ``out_dir``; return the manifest path."""
    out = Path(out_dir)
    tpl = build_template()
    rows = []
    for i in tqdm(range(n_subjects), desc="demo subjects", unit="subject"):
        rng = np.random.default_rng([seed, i])  # per-subject stream: subject i does not depend on n
        sub = make_subject(tpl, rng, spacing_mm)
        sid = f"sub-{i + 1:03d}"
        t1_path, seg_path = (
            out / sid / "t1.nii.gz",
            out / sid / "labels.nii.gz",
        )  # manifest paths are relative to it
        save_nifti(t1_path, sub["t1"], sub["affine"], np.float32)
        save_nifti(seg_path, sub["labels"], sub["affine"], np.uint16)
        rows.append(
            {
                "subject": sid,
                "t1": f"{sid}/t1.nii.gz",
                "age": round(sub["age"], 2),
                "sex": sub["sex"],
                "seg": f"{sid}/labels.nii.gz",
                "true_lv_mm3": round(sub["lv_mm3"], 1),
            }
        )
    manifest = out / "manifest.csv"
    with atomic_path(manifest) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    write_text(out / "README.txt", __doc__ or "")
    return manifest


def build_corpus(
    out: str | Path,
    n_subjects: int,
    grid: Grid,
    seed: int = 0,
    ranges_path: str | Path = "resources/covariate_ranges.yaml",
) -> Path:
    """An HDF5 of demo-generator subjects already on ``grid``: the backbone's pretraining corpus.

    It plays UK Biobank's part for BrainLDM: many subjects, never the demo cohort itself (a separate random
    stream), with images and covariates in the ``dataset.h5`` layout (``/image``, ``/label``,
    ``/covariates``, ``/covariates_raw``, ``/subjects``, ``/splits/train``, ``/splits/val``). Subjects are
    sampled at up to 2 mm and block-averaged onto coarser grids, like a registration's resampling.
    """
    import h5py

    from vcm.prep.conditions import COVARIATE_ORDER, load_ranges, scale_covariates
    from vcm.prep.registration import normalise_intensity

    tpl = build_template()
    ranges = load_ranges(ranges_path)
    factor = max(1, int(round(grid.spacing_mm / 2.0)))
    n_val = max(1, n_subjects // 20)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        kw = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        image = h5.create_dataset(
            "image", (n_subjects, 1, *grid.shape), np.float16, chunks=(1, 1, *grid.shape), **kw
        )
        label = h5.create_dataset(
            "label", (n_subjects, *grid.shape), np.uint16, chunks=(1, *grid.shape), **kw
        )
        cov, raw = np.zeros((n_subjects, 4), np.float32), np.zeros((n_subjects, 4))
        for i in tqdm(range(n_subjects), desc="backbone corpus", unit="subject"):
            sub = make_subject(tpl, np.random.default_rng([seed, 1, i]), grid.spacing_mm / factor, grid)
            t1 = (
                sub["t1"]
                .reshape(grid.shape[0], factor, grid.shape[1], factor, grid.shape[2], factor)
                .mean((1, 3, 5))
            )
            image[i, 0] = normalise_intensity(t1)
            label[i] = sub["labels"][factor // 2 :: factor, factor // 2 :: factor, factor // 2 :: factor]
            values = {
                "sex": float(sub["sex"] == "M"),
                "age": sub["age"],
                "lv_volume": sub["lv_mm3"],
                "brain_volume": sub["brain_mm3"],
            }
            raw[i] = [values[k] for k in COVARIATE_ORDER]
            cov[i] = scale_covariates(values, ranges)[0]
        h5.create_dataset(
            "subjects",
            data=np.array([f"corpus-{i:05d}" for i in range(n_subjects)], dtype=object),
            dtype=h5py.string_dtype(),
        )
        h5.create_dataset("covariates", data=cov)
        h5.create_dataset("covariates_raw", data=raw)
        h5["covariates"].attrs["order"] = list(COVARIATE_ORDER)
        h5.create_dataset("splits/val", data=np.arange(n_val))
        h5.create_dataset("splits/train", data=np.arange(n_val, n_subjects))
        h5.attrs["grid_affine"] = grid.affine
        h5.attrs["grid_shape"] = list(grid.shape)
        h5.attrs["grid_spacing_mm"] = grid.spacing_mm
        for key, value in provenance(None, corpus_seed=seed, corpus_subjects=n_subjects).items():
            h5.attrs[key] = value
    return Path(out)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m vcm demo", description="Build the embedded demo cohort.")
    parser.add_argument("--out-dir", help="folder of the demo cohort")
    parser.add_argument("--n-subjects", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing-mm", type=float, default=2.0)
    parser.add_argument(
        "--corpus", metavar="H5", help="instead: write a backbone pretraining corpus on --grid"
    )
    parser.add_argument("--grid", default="demo", help="grid preset of --corpus")
    args = parser.parse_args(argv)
    if args.corpus:
        path = build_corpus(args.corpus, args.n_subjects, Grid.from_config(args.grid), args.seed)
        print(f"corpus: {path}")
        return 0
    manifest = build_demo(args.out_dir, args.n_subjects, args.seed, args.spacing_mm)
    print(f"manifest: {manifest}")
    return 0
