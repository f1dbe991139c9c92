"""The embedded demo world: native-space synthetic heads made from the MNI152 template, seeded.

The world is built so that the four BrainLDM covariates (sex, age, LV volume, brain volume) do *not* tell you
the anatomy: a control module has something to add only when the condition masks carry what the covariates
do not. Per subject, drawn independently:

* **ventricles**: a lateral-ventricle volume from a skewed (log-normal) distribution, about 8-120 ml native,
  with a mild age trend; the volume is reached by a smooth diffeomorphic expansion or shrinkage
  (:mod:`vcm.anatomy`) whose push differs per region: left/right asymmetry, frontal, body, occipital and
  temporal horns, third-ventricle width;
* **shape**: a smooth random displacement with wavelengths of 48 mm and more (three or more latent voxels of
  the demo backbone), moving the ventricles relative to the brain;
* **cortical atrophy**: wider sulci and thinner grey matter (cortical voxels with little tissue in the
  template's partial-volume maps become CSF) and a wider extra-axial CSF layer;
* **size**: brain scale by sex (UK Biobank-sized brains) and subject, skull and scalp thicknesses.

Then a random pose into a native scanner grid (2 mm by default), a multiplicative bias field, a gamma change
and noise. A **T2-weighted-like** image comes from the same anatomy with its own tissue contrast (bright CSF,
dark white matter), bias and noise. The ground-truth label map (FreeSurfer IDs, native space) is written beside
each image for the ``precomputed`` backend and the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm import tqdm

from vcm.anatomy import VentricleField, lattice_displacement, solve_ventricle_field
from vcm.grid import Grid
from vcm.io import atomic_path, provenance, save_nifti, write_json, write_text
from vcm.labels import LATERAL_VENTRICLES, brain_mask, mask_of
from vcm.prep.template import HeadShell, Template, add_head, build_template, world_grid
from vcm.stage import stage_parser

NATIVE_FOV_MM = (184.0, 232.0, 200.0)
TEMPLATE_CENTRE_MM = np.array([0.0, -17.0, 10.0])
# The box (template mm) in which ventricle fields are solved, and its spacing.
VENTRICLE_BOX_MM = ((-60.0, 60.0), (-80.0, 60.0), (-40.0, 60.0))
VENTRICLE_BOX_SPACING_MM = 2.0
# Lateral-ventricle volume (native ml): log-normal around 24 ml at 63 years, skewed to AD-like sizes.
LV_MEDIAN_ML, LV_LOG_SD, LV_AGE_SLOPE, LV_RANGE_ML = 24.0, 0.55, 0.025, (8.0, 120.0)
SHAPE_LATTICE_MM, SHAPE_AMPLITUDE_MM = 24.0, 3.5
ATROPHY_THRESHOLD = 0.15  # at full atrophy, cortex with under 65 % tissue becomes CSF
CSF_T1 = 0.30  # the template's ventricular T1 intensity
CORTEX = (3, 42, 8, 47)
INFERIOR_LATERAL = {5: (-31.0, -18.0, -9.0), 44: (31.0, -18.0, -9.0)}  # temporal-horn seeds (MNI mm)
TEMPORAL_HORN_RADII_MM = (2.5, 11.0, 3.0)


@dataclass
class DemoWorld:
    """The template with temporal horns, its partial-volume tissue map and the ventricle regions on a box grid."""

    tpl: Template
    tissue: np.ndarray
    box_affine: np.ndarray
    regions: dict[str, np.ndarray]
    lv_box: np.ndarray


@functools.lru_cache(maxsize=1)
def demo_world() -> DemoWorld:
    """Build the world once per process (about 10 s)."""
    from vcm.prep.template import load_mni152

    tpl = build_template()
    _, gm, wm, _, _ = load_mni152()
    labels, t1_brain = tpl.labels.copy(), tpl.t1_brain.copy()
    x, y, z = world_grid(labels.shape, tpl.affine)
    rx, ry, rz = TEMPORAL_HORN_RADII_MM
    for label, (cx, cy, cz) in INFERIOR_LATERAL.items():
        seed = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1) & (labels > 0)
        labels[seed], t1_brain[seed] = label, CSF_T1
    tpl = Template(tpl.t1_head, t1_brain, labels, tpl.affine)

    s = VENTRICLE_BOX_SPACING_MM
    lo = np.array([b[0] for b in VENTRICLE_BOX_MM])
    shape = tuple(int((b[1] - b[0]) / s) + 1 for b in VENTRICLE_BOX_MM)
    box_affine = np.diag([s, s, s, 1.0])
    box_affine[:3, 3] = lo
    pts = world_grid(shape, box_affine).reshape(3, -1)
    inv = np.linalg.inv(tpl.affine)
    box_labels = ndi.map_coordinates(labels, inv[:3, :3] @ pts + inv[:3, 3:4], order=0).reshape(shape)
    yb = pts[1].reshape(shape)
    regions = {}
    for side, lv_id, temporal_id in (("left", 4, 5), ("right", 43, 44)):
        lv = box_labels == lv_id
        regions[f"{side}_frontal"] = lv & (yb > 8)
        regions[f"{side}_occipital"] = lv & (yb < -30)
        regions[f"{side}_body"] = lv & (yb <= 8) & (yb >= -30)
        regions[f"{side}_temporal"] = box_labels == temporal_id
    regions["third"] = box_labels == 14
    lv_box = mask_of(box_labels, LATERAL_VENTRICLES).astype(np.float32)
    return DemoWorld(tpl, (gm + wm).astype(np.float32), box_affine, regions, lv_box)


@dataclass
class Draw:
    """One subject's random draws: covariates, anatomy, pose, head shell and scanner seeds."""

    age: float
    sex: str
    lv_ml: float
    scale: float
    weights: dict[str, float]
    atrophy: float
    shape_seed: int
    linear: np.ndarray
    shift: np.ndarray
    shell: HeadShell
    scan_seed: int


def draw_subject(rng: np.random.Generator) -> Draw:
    """Draw a subject's parameters; every draw is independent of every other subject's."""
    age = float(rng.uniform(44, 82))
    sex = "M" if rng.random() < 0.5 else "F"
    lv_ml = float(np.exp(rng.normal(np.log(LV_MEDIAN_ML) + LV_AGE_SLOPE * (age - 63), LV_LOG_SD)))
    lv_ml = float(np.clip(lv_ml, *LV_RANGE_ML))
    # UK Biobank-sized heads (the MNI152 brain is ~1.85 l; these give ~1.2-1.6 l).
    scale = (0.95 if sex == "M" else 0.90) * float(rng.normal(1.0, 0.035))
    asym = float(np.exp(rng.normal(0, 0.3)))
    horns = {"frontal": 0.45, "body": 0.3, "occipital": 0.5, "temporal": 0.6}
    horn_w = {h: float(np.exp(rng.normal(0, sd))) for h, sd in horns.items()}
    weights = {}
    for side, side_w in (("left", asym**0.5), ("right", asym**-0.5)):
        for horn, w in horn_w.items():
            weights[f"{side}_{horn}"] = side_w * w * float(np.exp(rng.normal(0, 0.2)))
    weights["third"] = float(np.exp(rng.normal(0, 0.5)))
    atrophy = float(np.clip(rng.beta(2, 3) + 0.3 * (age - 63) / 19, 0, 1))
    shape_seed = int(rng.integers(2**31))
    rot = _rotation(np.deg2rad(rng.uniform(-10, 10, size=3)))
    linear = rot @ np.diag(scale * rng.uniform(0.97, 1.03, size=3))
    linear[0, 1] += rng.uniform(-0.03, 0.03)
    shift = TEMPLATE_CENTRE_MM + rng.uniform(-8, 8, size=3)
    shell = HeadShell(
        csf_mm=rng.uniform(1.5, 3.0) + 3.0 * atrophy,
        inner_table_mm=rng.uniform(1.0, 2.0),
        diploe_mm=rng.uniform(1.5, 4.0),
        outer_table_mm=rng.uniform(1.0, 2.0),
        scalp_mm=rng.uniform(4.0, 8.0),
        diploe=rng.uniform(0.35, 0.55),
        scalp=rng.uniform(0.65, 0.85),
    )
    return Draw(
        age, sex, lv_ml, scale, weights, atrophy, shape_seed, linear, shift, shell, int(rng.integers(2**31))
    )


def ventricle_field(world: DemoWorld, draw: Draw) -> VentricleField:
    """The subject's ventricle deformation, solved in template space for its target volume."""
    weights = sum(w * world.regions[name] for name, w in draw.weights.items())
    target_tpl_mm3 = draw.lv_ml * 1000.0 / abs(np.linalg.det(draw.linear))
    return solve_ventricle_field(weights, world.lv_box, world.box_affine, target_tpl_mm3)


def render(
    world: DemoWorld, draw: Draw, field: VentricleField, points: np.ndarray, images: bool = True
) -> dict[str, np.ndarray]:
    """Labels (and brain T1 with atrophy) at template-space points (3, N), before head and scanner."""
    shape_rng = np.random.default_rng(draw.shape_seed)
    p = points + lattice_displacement(shape_rng, points, SHAPE_LATTICE_MM, SHAPE_AMPLITUDE_MM)
    src = p + field.displacement(p)
    inv = np.linalg.inv(world.tpl.affine)
    vox = inv[:3, :3] @ src + inv[:3, 3:4]
    labels = ndi.map_coordinates(world.tpl.labels, vox, order=0, cval=0).astype(np.uint16)
    tissue = ndi.map_coordinates(world.tissue, vox, order=1, cval=0.0)
    # Atrophy: cortex where the template has little tissue (sulcal partial volume) becomes CSF.
    threshold = 0.5 + ATROPHY_THRESHOLD * draw.atrophy
    cortex = np.isin(labels, CORTEX)
    labels[cortex & (tissue < threshold)] = 24
    out = {"labels": labels}
    if images:
        t1 = ndi.map_coordinates(world.tpl.t1_brain, vox, order=1, cval=0.0)
        csf = cortex * np.clip((threshold - tissue) / 0.12 + 0.5, 0, 1)
        out["t1"] = (t1 * (1 - csf) + CSF_T1 * csf).astype(np.float32)
    return out


def t2_from_t1(t1_brain: np.ndarray) -> np.ndarray:
    """T2-weighted contrast from the template's T1 intensities: CSF bright, grey mid, white dark."""
    return np.where(t1_brain > 0, np.clip(1.0 - 1.18 * (t1_brain - CSF_T1), 0.05, 1.0), 0.0).astype(
        np.float32
    )


def _scanner(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bias field, gamma, gain and Rician-like noise floor."""
    bias = np.exp(_smooth_field(rng, img.shape, 4, 0.12))
    out = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25) * bias * rng.uniform(300, 1200)
    out = out + rng.normal(0, 0.02 * out.max(), size=img.shape)
    return np.abs(out).astype(np.float32)


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


def make_subject(rng: np.random.Generator, spacing_mm: float, grid: Grid | None = None) -> dict:
    """Make one subject; return its images, labels, affine and covariates.

    Args:
        rng: the subject's random stream.
        spacing_mm: voxel size of the volumes written.
        grid: when given, the subject is sampled in template space on ``grid``'s field of view (as a perfect
            affine registration would put it) instead of in a randomly posed native scanner grid.
    """
    world = demo_world()
    draw = draw_subject(rng)
    field = ventricle_field(world, draw)
    if grid is None:
        shape = tuple(int(round(f / spacing_mm)) for f in NATIVE_FOV_MM)
        native_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
        native_affine[:3, 3] = draw.shift - spacing_mm * (np.asarray(shape) - 1) / 2
        to_native = np.eye(4)  # template world -> subject world
        to_native[:3, :3] = draw.linear
        to_native[:3, 3] = draw.shift - draw.linear @ TEMPLATE_CENTRE_MM
        volume_factor = 1.0  # native mm^3 per mm^3 of the sampled volume
    else:
        shape = tuple(int(round(n * grid.spacing_mm / spacing_mm)) for n in grid.shape)
        native_affine = Grid(shape, spacing_mm, grid.center_mm).affine  # type: ignore[arg-type]
        to_native = np.eye(4)
        volume_factor = float(abs(np.linalg.det(draw.linear)))
    back = np.linalg.inv(to_native)
    q = world_grid(shape, native_affine).reshape(3, -1)
    sub = render(world, draw, field, back[:3, :3] @ q + back[:3, 3:4])
    labels, t1 = sub["labels"].reshape(shape), sub["t1"].reshape(shape)
    head_mask = brain_mask(labels) | (labels == 24)
    spacing = np.full(3, spacing_mm)
    head, _ = add_head(t1, head_mask, spacing, draw.shell)
    t2_shell = dataclasses.replace(draw.shell, csf=1.0, table=0.03, diploe=0.3, scalp=0.5)
    t2_head, _ = add_head(t2_from_t1(t1), head_mask, spacing, t2_shell)
    scan = np.random.default_rng(draw.scan_seed)
    voxel = spacing_mm**3 * volume_factor
    return {
        "t1": _scanner(head, scan),
        "t2": _scanner(t2_head, scan),
        "labels": labels,
        "affine": native_affine,
        "age": draw.age,
        "sex": draw.sex,
        "lv_mm3": float(mask_of(labels, LATERAL_VENTRICLES).sum() * voxel),
        "brain_mm3": float(brain_mask(labels).sum() * voxel),
        "draw": draw,
        "field": field,
    }


def grid_lv_mask(draw: Draw, field: VentricleField, grid: Grid) -> np.ndarray:
    """The subject's lateral ventricles on ``grid`` in template space (a perfect affine registration)."""
    points = world_grid(grid.shape, grid.affine).reshape(3, -1)
    labels = render(demo_world(), draw, field, points, images=False)["labels"].reshape(grid.shape)
    return mask_of(labels, LATERAL_VENTRICLES)


def covariate_guess_dice(masks: np.ndarray, covariates: np.ndarray, k: int = 3) -> np.ndarray:
    """Per subject, the Dice of its mask with the majority vote of the masks of its k nearest neighbours in
    (scaled) covariates: how much of the anatomy the covariates alone give away."""
    flat = masks.reshape(len(masks), -1).astype(bool)
    dist = np.linalg.norm(covariates[:, None] - covariates[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    out = np.zeros(len(masks))
    for i in range(len(masks)):
        vote = flat[np.argsort(dist[i])[:k]].sum(0) > k // 2
        out[i] = 2 * (vote & flat[i]).sum() / max(vote.sum() + flat[i].sum(), 1)
    return out


def _scaled(sub: dict, ranges: dict[str, tuple[float, float]]) -> tuple[list[float], list[float]]:
    from vcm.prep.conditions import COVARIATE_ORDER, scale_covariates

    values = {
        "sex": float(sub["sex"] == "M"),
        "age": sub["age"],
        "lv_volume": sub["lv_mm3"],
        "brain_volume": sub["brain_mm3"],
    }
    return scale_covariates(values, ranges)[0], [values[k] for k in COVARIATE_ORDER]


def world_report(subjects: list[dict], masks: np.ndarray, covariates: np.ndarray) -> dict:
    """What the world's anatomy looks like, and how much of it the covariates give away.

    Args:
        subjects: per subject its ``lv_mm3``, ``age`` and ``atrophy``.
        masks: the subjects' LV masks on one grid.
        covariates: their scaled covariates.
    """
    guess = covariate_guess_dice(masks, covariates)
    lv = np.array([s["lv_mm3"] for s in subjects]) / 1000
    corr = float(np.corrcoef(lv, [s["age"] for s in subjects])[0, 1]) if len(subjects) > 2 else float("nan")
    return {
        "subjects": len(subjects),
        "covariate_guess_lv_dice": {"mean": float(guess.mean()), "sd": float(guess.std()), "k": 3},
        "lv_ml": {"min": float(lv.min()), "median": float(np.median(lv)), "max": float(lv.max())},
        "lv_age_correlation": corr,
        "atrophy": [round(s["atrophy"], 3) for s in subjects],
    }


def build_demo(
    out_dir: str | Path,
    n_subjects: int = 24,
    seed: int = 0,
    spacing_mm: float = 2.0,
    ranges_path: str | Path = "resources/covariate_ranges.yaml",
    workers: int = 1,
) -> Path:
    """Write ``n_subjects`` demo subjects, ``manifest.csv`` and ``world.json`` under ``out_dir``, the subjects
    in ``workers`` processes (the same files for any number).

    Returns:
        the manifest path. ``world.json`` holds the LV Dice of a covariate-only guess (the majority vote of the
        LV masks of the 3 subjects nearest in scaled covariates, on the demo grid in template space).
    """
    from vcm.prep.conditions import load_ranges

    out = Path(out_dir)
    ranges = load_ranges(ranges_path)
    grid = Grid.from_config("demo")
    make = functools.partial(
        _demo_subject, seed=seed, spacing_mm=spacing_mm, out=out, grid=grid, ranges=ranges
    )
    rows, subjects, masks, covs = [], [], [], []
    with _pool(workers) as pool:
        for row, summary, mask, cov in tqdm(
            pool(make, range(n_subjects)), total=n_subjects, desc="demo subjects", unit="subject"
        ):
            rows.append(row)
            subjects.append(summary)
            masks.append(mask)
            covs.append(cov)
    manifest = out / "manifest.csv"
    with atomic_path(manifest) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    report = world_report(subjects, np.stack(masks), np.asarray(covs))
    write_json(out / "world.json", report)
    guess = report["covariate_guess_lv_dice"]
    print(
        f"demo world: {n_subjects} subjects, LV {report['lv_ml']['min']:.1f}-{report['lv_ml']['max']:.1f} ml"
        f" (median {report['lv_ml']['median']:.1f}); covariate-only LV guess Dice"
        f" {guess['mean']:.3f} ± {guess['sd']:.3f} (3 nearest subjects, majority vote; goal <= 0.5)"
    )
    write_text(out / "README.txt", __doc__ or "")
    return manifest


def _demo_subject(i: int, seed: int, spacing_mm: float, out: Path, grid: Grid, ranges: dict) -> tuple:
    """Demo subject ``i`` written under ``out``: its manifest row, what :func:`world_report` reads, its LV mask
    on ``grid`` and its scaled covariates."""
    rng = np.random.default_rng(
        [seed, i]
    )  # per-subject stream: subject i does not depend on n or the workers
    sub = make_subject(rng, spacing_mm)
    sid = f"sub-{i + 1:03d}"
    paths = {k: out / sid / f"{k}.nii.gz" for k in ("t1", "t2", "labels")}
    save_nifti(paths["t1"], sub["t1"], sub["affine"], np.float32)
    save_nifti(paths["t2"], sub["t2"], sub["affine"], np.float32)
    save_nifti(paths["labels"], sub["labels"], sub["affine"], np.uint16)
    row = {
        "subject": sid,
        "t1": f"{sid}/t1.nii.gz",  # manifest paths are relative to the manifest
        "t2": f"{sid}/t2.nii.gz",
        "age": round(sub["age"], 2),
        "sex": sub["sex"],
        "seg": f"{sid}/labels.nii.gz",
        "true_lv_mm3": round(sub["lv_mm3"], 1),
    }
    summary = {"lv_mm3": sub["lv_mm3"], "age": sub["age"], "atrophy": sub["draw"].atrophy}
    return row, summary, grid_lv_mask(sub["draw"], sub["field"], grid), _scaled(sub, ranges)[0]


def _corpus_subject(i: int, seed: int, grid: Grid, factor: int, ranges: dict) -> tuple:
    from vcm.prep.registration import normalise_intensity

    sub = make_subject(np.random.default_rng([seed, 1, i]), grid.spacing_mm / factor, grid)
    t1 = (
        sub["t1"].reshape(grid.shape[0], factor, grid.shape[1], factor, grid.shape[2], factor).mean((1, 3, 5))
    )
    labels = sub["labels"][factor // 2 :: factor, factor // 2 :: factor, factor // 2 :: factor]
    return (normalise_intensity(t1), labels, *_scaled(sub, ranges))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: threads inside them only oversubscribe the cores


@contextlib.contextmanager
def _pool(workers: int):
    """An ordered map over subjects: inline, or in worker processes (each subject has its own stream)."""
    if workers <= 1:
        yield map
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        yield functools.partial(pool.imap, chunksize=1)


def build_corpus(
    out: str | Path,
    n_subjects: int,
    grid: Grid,
    seed: int = 0,
    ranges_path: str | Path = "resources/covariate_ranges.yaml",
    workers: int = 1,
) -> Path:
    """An HDF5 of demo-world subjects already on ``grid``: the backbone's pretraining corpus.

    It plays UK Biobank's part for BrainLDM: many subjects, never the demo cohort itself (a separate random
    stream), with images and covariates in the ``dataset.h5`` layout (``/image``, ``/label``,
    ``/covariates``, ``/covariates_raw``, ``/subjects``, ``/splits/train``, ``/splits/val``). Subjects are
    sampled at up to 2 mm and block-averaged onto coarser grids, like a registration's resampling.
    """
    import h5py

    from vcm.prep.conditions import COVARIATE_ORDER, load_ranges

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
        make = functools.partial(_corpus_subject, seed=seed, grid=grid, factor=factor, ranges=ranges)
        with _pool(workers) as pool:
            for i, (t1, labels, cov[i], raw[i]) in enumerate(
                tqdm(pool(make, range(n_subjects)), total=n_subjects, desc="backbone corpus", unit="subject")
            ):
                image[i, 0], label[i] = t1, labels
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
    parser = stage_parser("demo", "Build the embedded demo cohort.", config=False)
    parser.add_argument("--out-dir", help="folder of the demo cohort")
    parser.add_argument("--n-subjects", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing-mm", type=float, default=2.0)
    parser.add_argument(
        "--corpus", metavar="H5", help="instead: write a backbone pretraining corpus on --grid"
    )
    parser.add_argument("--grid", default="demo", help="grid preset of --corpus")
    parser.add_argument("--workers", type=int, default=1, help="processes that build the subjects")
    args = parser.parse_args(argv)
    if args.corpus:
        path = build_corpus(
            args.corpus, args.n_subjects, Grid.from_config(args.grid), args.seed, workers=args.workers
        )
        print(f"corpus: {path}")
        return 0
    manifest = build_demo(args.out_dir, args.n_subjects, args.seed, args.spacing_mm, workers=args.workers)
    print(f"manifest: {manifest}")
    return 0
