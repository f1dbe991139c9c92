"""Conditions of one subject on the grid: the inputs VCM is steered by, and the backbone's covariates.

* ``lv``: lateral-ventricle mask (FreeSurfer 4, 43; config may add 5, 44);
* ``brain``: brain mask (every label but background and CSF);
* ``skull``: the intensity image outside the brain mask dilated by ``skull_margin_mm``, inside the head;
* ``semantics``: the paper's 8 classes (appendix A.3) as a class map 0..8;
* ``lowres_<n>mm``: the image with axial slices <n> mm thick (slab average, then linear upsampling), for
  super-resolution;
* covariates [sex, age, LV volume, brain volume], raw and min-max scaled with ranges from ``resources/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage as ndi

from vcm.errors import StageError
from vcm.grid import Grid
from vcm.io import load_nifti, read_json, save_nifti, write_json
from vcm.labels import brain_mask, mask_of, semantic_map
from vcm.prep.exclusion import run_subject_stage
from vcm.prep.gates import Failure
from vcm.stage import stage_parser

COVARIATE_ORDER = ("sex", "age", "lv_volume", "brain_volume")
MASK_CONDITIONS = ("lv", "brain", "semantics")


def head_mask(image: np.ndarray, threshold: float = 0.08) -> np.ndarray:
    """The head: the largest bright component, holes filled slice by slice and in 3-D."""
    mask = ndi.binary_opening(image > threshold, iterations=1)
    comp, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum(mask, comp, index=np.arange(1, n + 1))
    mask = comp == (1 + int(np.argmax(sizes)))
    mask = ndi.binary_closing(mask, iterations=2)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndi.binary_fill_holes(mask[:, :, k])
    return ndi.binary_fill_holes(mask)


def skull_image(image: np.ndarray, labels: np.ndarray, spacing_mm: float, margin_mm: float) -> np.ndarray:
    """The partial image of skull and scalp: head minus the dilated brain."""
    brain = brain_mask(labels) | (labels == 24)
    outside = ndi.distance_transform_edt(~brain, sampling=spacing_mm) > margin_mm
    return np.where(outside & head_mask(image), image, 0.0).astype(np.float32)


def axial_lowres(image: np.ndarray, spacing_mm: float, slice_mm: float) -> np.ndarray:
    """Simulate thick axial slices: average slabs of ``slice_mm`` along z, then linear upsampling."""
    factor = slice_mm / spacing_mm
    if factor <= 1.0:
        return image.astype(np.float32)
    nz = image.shape[2]
    n_slabs = int(np.ceil(nz / factor))
    edges = np.minimum(np.round(np.arange(n_slabs + 1) * factor).astype(int), nz)
    slabs = np.stack(
        [image[:, :, a:b].mean(axis=2) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a], axis=2
    )
    centres = np.array([(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a])
    z = np.interp(np.arange(nz), centres, np.arange(len(centres)))
    coords = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), z, indexing="ij")
    return ndi.map_coordinates(slabs, coords, order=1, mode="nearest").astype(np.float32)


def load_ranges(path: str | Path) -> dict[str, tuple[float, float]]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(
            f"covariate ranges file {path} not found (config key conditions.covariate_ranges)"
        ) from None
    missing = [k for k in COVARIATE_ORDER if k not in raw]
    if missing:
        raise StageError(f"covariate ranges file {path}: missing {', '.join(missing)}")
    return {k: (float(raw[k][0]), float(raw[k][1])) for k in COVARIATE_ORDER}


def scale_covariates(
    raw: dict[str, float], ranges: dict[str, tuple[float, float]]
) -> tuple[list[float], list[str]]:
    """Min-max scale to [0, 1] in BrainLDM's order; values outside the range are clipped and reported."""
    scaled, clipped = [], []
    for key in COVARIATE_ORDER:
        lo, hi = ranges[key]
        v = (raw[key] - lo) / (hi - lo)
        if v < 0 or v > 1:
            clipped.append(key)
        scaled.append(float(np.clip(v, 0.0, 1.0)))
    return scaled, clipped


def make_conditions(
    cfg: dict,
    t1_grid: str | Path,
    labels_grid: str | Path,
    volumes: dict,
    age: float,
    sex: str,
    out_dir: str | Path,
    t2_grid: str | Path | None = None,
) -> dict:
    """Write every condition NIfTI and ``covariates.json`` for one subject (``t2.nii.gz`` when a registered
    second modality is given)."""
    grid = Grid.from_config(cfg["grid"])
    c = cfg["conditions"]
    image, _ = load_nifti(t1_grid)
    labels = load_nifti(labels_grid, np.int32)[0].astype(np.uint16)
    out = Path(out_dir)
    save_nifti(out / "lv.nii.gz", mask_of(labels, c["lv_labels"]), grid.affine, np.uint8)
    save_nifti(out / "brain.nii.gz", brain_mask(labels), grid.affine, np.uint8)
    save_nifti(out / "semantics.nii.gz", semantic_map(labels), grid.affine, np.uint8)
    save_nifti(
        out / "skull.nii.gz",
        skull_image(image, labels, grid.spacing_mm, c["skull_margin_mm"]),
        grid.affine,
        np.float32,
    )
    for mm in c["lowres_slice_mm"]:
        save_nifti(
            out / f"lowres_{mm:g}mm.nii.gz", axial_lowres(image, grid.spacing_mm, mm), grid.affine, np.float32
        )
    if t2_grid is not None:
        save_nifti(out / "t2.nii.gz", load_nifti(t2_grid)[0], grid.affine, np.float32)
    raw = {
        "sex": 1.0 if sex == "M" else 0.0,
        "age": float(age),
        "lv_volume": volumes["lv_mm3"],
        "brain_volume": volumes["brain_mm3"],
    }
    scaled, clipped = scale_covariates(raw, load_ranges(c["covariate_ranges"]))
    info = {"order": list(COVARIATE_ORDER), "raw": raw, "scaled": scaled, "clipped": clipped}
    write_json(out / "covariates.json", info)
    return info


def cli(argv: list[str]) -> int:
    from vcm.condition_names import condition_names
    from vcm.config import load_config

    parser = stage_parser("conditions", __doc__)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--t1", required=True, help="registered T1 on the grid")
    parser.add_argument("--labels", required=True, help="labels on the grid")
    parser.add_argument("--t2", default=None, help="registered second modality on the grid (t2 condition)")
    parser.add_argument("--volumes", required=True, help="volumes.json of the segmentation")
    parser.add_argument("--meta", help="the subject's check-inputs JSON (gives age and sex)")
    parser.add_argument("--age", type=float)
    parser.add_argument("--sex", choices=["F", "M"])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--status", required=True, help="this stage's status (passed, or why excluded)")
    parser.add_argument("--previous-status", help="the segment stage's status (an excluded subject passes)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    meta = read_json(args.meta) if args.meta else {"age": args.age, "sex": args.sex}
    if meta.get("age") is None or meta.get("sex") not in ("F", "M"):
        raise StageError(f"subject {args.subject}: give --meta, or --age and --sex")
    out = Path(args.out_dir)

    def work() -> list[Failure]:  # no gate of its own: only an error excludes here
        info = make_conditions(
            cfg, args.t1, args.labels, read_json(args.volumes), meta["age"], meta["sex"], out, args.t2
        )
        note = f" (clipped to the range: {', '.join(info['clipped'])})" if info["clipped"] else ""
        print(f"subject {args.subject}: covariates {', '.join(f'{v:.3f}' for v in info['scaled'])}{note}")
        return []

    outputs = [out / f"{name}.nii.gz" for name in condition_names(cfg) if name != "t2" or args.t2]
    run_subject_stage(
        args.subject,
        "conditions",
        work,
        status=args.status,
        outputs=[*outputs, out / "covariates.json"],
        previous=args.previous_status,
    )
    return 0
