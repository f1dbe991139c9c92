"""Registration of a native T1 to the template (antspyx), resampled onto the backbone grid.

The template head is resampled to ``registration.working_spacing_mm`` for the optimisation; the subject is
then resampled once, from native space, straight onto the configured grid, and its intensities clipped to
percentiles and min-max scaled to [0, 1] (the backbone's input convention). The registration's gates
(:mod:`vcm.prep.gates`: correlation with the template inside its brain, the affine's determinant) decide
whether the subject goes on; a failed gate or an error excludes it (:mod:`vcm.prep.exclusion`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from vcm.antspy import import_ants
from vcm.errors import StageError
from vcm.grid import Grid
from vcm.io import read_json, save_nifti, write_json
from vcm.labels import brain_mask
from vcm.prep.exclusion import run_subject_stage
from vcm.prep.gates import Failure, GateSettings, registration_failures
from vcm.stage import stage_parser

TRANSFORM_NAMES = {"Rigid": "Rigid", "Affine": "Affine", "SyN": "SyN"}
# the stage's declared outputs in its folder (t2.nii.gz too, with a second modality)
OUTPUTS = ("t1.nii.gz", "registration.json", "registration.png")


def to_ants(data: np.ndarray, affine: np.ndarray):
    """A numpy volume with a RAS affine as an ANTs image (ANTs works in LPS; nibabel converts)."""
    import nibabel as nib

    ants = import_ants()

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    return ants.from_nibabel_nifti(img)


def read_ants(path: str | Path):
    from vcm.io import load_nifti

    data, affine = load_nifti(path)
    if data.ndim == 4:  # a 3-D volume stored with a trailing singleton axis
        data = data[..., 0]
    return to_ants(data, affine)


def seed_ants(seed: int) -> None:
    """Make ANTs reproducible: antspyx ignores a ``random_seed`` argument; its global deterministic mode
    passes ``--random-seed`` to every registration (and runs ITK single-threaded). ANTs treats seed 0 as
    "seed from the clock", so config seed s is passed as s + 1."""
    import_ants()
    import ants.config

    ants.config.set_ants_deterministic(True, int(seed) + 1)


def normalise_intensity(data: np.ndarray, percentiles: tuple[float, float] = (0.0, 99.5)) -> np.ndarray:
    """Clip to percentiles of the non-zero voxels and scale to [0, 1]."""
    values = data[data > 0]
    if values.size == 0:
        return np.zeros_like(data, dtype=np.float32)
    lo, hi = np.percentile(values, percentiles)
    lo = min(lo, 0.0) if percentiles[0] == 0 else lo
    out = (np.clip(data, lo, hi) - lo) / max(hi - lo, 1e-8)
    return out.astype(np.float32)


def affine_determinant(transform_files: list[str]) -> float:
    """|det| of the affine part of ANTs forward transforms (template point -> native point).

    Native volumes follow from grid volumes by this factor.
    """
    ants = import_ants()

    det = 1.0
    for f in transform_files:
        if f.endswith(".mat"):
            params = np.asarray(ants.read_transform(f).parameters)
            det *= abs(np.linalg.det(params[:9].reshape(3, 3)))
    return float(det)


def register(
    t1_path: str | Path,
    template_head: str | Path,
    grid: Grid,
    out_dir: str | Path,
    transform: str = "Affine",
    working_spacing_mm: float = 2.0,
    seed: int = 0,
    percentiles: tuple[float, float] = (0.0, 99.5),
    t2_path: str | Path | None = None,
    template_labels: str | Path | None = None,
) -> dict:
    """Register one T1 to the template and resample it onto ``grid``.

    Writes ``t1.nii.gz`` (grid, [0, 1]), ``xfm/`` (ANTs forward and inverse transforms) and
    ``registration.json`` in ``out_dir``; returns the JSON's content: among others the correlation of the
    registered T1 with the template inside the template's head (``ncc_with_template``) and, given the
    template's ``template_labels``, inside its brain (``ncc_in_brain``, the ``template_similarity`` gate's
    measure), and the affine's determinant. A second modality of the same session (``t2_path``, in the T1's
    scanner space) goes onto the grid with the T1's transform as ``t2.nii.gz``.
    """
    ants = import_ants()
    from ants.math.image_similarity import image_similarity  # one module of a subpackage import_ants skips

    seed_ants(seed)
    out = Path(out_dir)
    xfm = out / "xfm"
    xfm.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    moving = read_ants(t1_path)
    fixed = ants.resample_image(
        read_ants(template_head), (working_spacing_mm,) * 3, use_voxels=False, interp_type=0
    )
    # Centre-of-mass initialisation keeps large native offsets inside ANTs' capture range.
    reg = ants.registration(
        fixed=fixed,
        moving=moving,
        type_of_transform=TRANSFORM_NAMES[transform],
        outprefix=str(xfm / "fwd_"),
        aff_metric="mattes",
    )
    fwd, inv = list(reg["fwdtransforms"]), list(reg["invtransforms"])
    reference = grid.reference_image()
    on_grid = ants.apply_transforms(fixed=reference, moving=moving, transformlist=fwd, interpolator="linear")
    data = normalise_intensity(on_grid.numpy(), percentiles)
    save_nifti(out / "t1.nii.gz", data, grid.affine, np.float32)
    if t2_path is not None:
        t2 = ants.apply_transforms(
            fixed=reference, moving=read_ants(t2_path), transformlist=fwd, interpolator="linear"
        )
        save_nifti(out / "t2.nii.gz", normalise_intensity(t2.numpy(), percentiles), grid.affine, np.float32)

    tpl_grid = ants.apply_transforms(fixed=reference, moving=read_ants(template_head), transformlist=[])
    head = tpl_grid.numpy()
    info = {
        "transform": transform,
        "seconds": round(time.perf_counter() - start, 2),
        "ncc_with_template": round(correlation(head, data, head > 0.02), 4),
        "mattes_mi": float(
            image_similarity(tpl_grid, to_ants(data, grid.affine), metric_type="MattesMutualInformation")
        ),
        "affine_determinant": affine_determinant(fwd),
        "fwdtransforms": [os.path.relpath(f, out) for f in fwd],
        "invtransforms": [os.path.relpath(f, out) for f in inv],
        "grid_shape": list(grid.shape),
        "grid_spacing_mm": grid.spacing_mm,
    }
    if template_labels is not None:
        labels = ants.apply_transforms(
            fixed=reference, moving=read_ants(template_labels), transformlist=[], interpolator="genericLabel"
        ).numpy()
        info["ncc_in_brain"] = round(
            correlation(head, data, brain_mask(np.rint(labels).astype(np.uint16))), 4
        )
    write_json(out / "registration.json", info)
    return info


def correlation(a: np.ndarray, b: np.ndarray, inside: np.ndarray) -> float:
    """Pearson correlation of two volumes over the voxels ``inside`` (NaN over fewer than 10 voxels or where
    either volume is constant: no evidence of a match)."""
    x, y = a[inside].astype(np.float64), b[inside].astype(np.float64)
    if x.size < 10 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def transforms_of(reg_dir: str | Path, inverse: bool = False) -> list[str]:
    """The saved forward (template -> native point mapping) or inverse transform files of a subject."""
    info = read_json(Path(reg_dir) / "registration.json")
    return [str(Path(reg_dir) / f) for f in info["invtransforms" if inverse else "fwdtransforms"]]


def resample_labels_to_grid(labels_path: str | Path, reg_dir: str | Path, grid: Grid) -> np.ndarray:
    """Carry a native-space label map onto the grid with the subject's forward transforms (nearest label)."""
    ants = import_ants()

    on_grid = ants.apply_transforms(
        fixed=grid.reference_image(),
        moving=read_ants(labels_path),
        transformlist=transforms_of(reg_dir),
        interpolator="genericLabel",
    )
    return np.rint(on_grid.numpy()).astype(np.uint16)


def overlay_png(
    out_dir: str | Path, template_labels: str | Path, grid: Grid, subject: str, note: str | None = None
) -> None:
    """3-plane PNG of the registered subject with the template's brain outline in red (``note``: a line
    added to the title, e.g. why the subject was excluded)."""
    from vcm.io import load_nifti
    from vcm.plots import three_plane

    ants = import_ants()

    data, _ = load_nifti(Path(out_dir) / "t1.nii.gz")
    tpl = ants.apply_transforms(
        fixed=grid.reference_image(),
        moving=read_ants(template_labels),
        transformlist=[],
        interpolator="genericLabel",
    ).numpy()
    title = f"{subject}: registered T1, template brain outline"
    three_plane(
        Path(out_dir) / "registration.png",
        data,
        f"{title}\n{note}" if note else title,
        contour=tpl > 0,
    )


def register_subject(
    cfg: dict,
    gates: GateSettings,
    subject: str,
    t1: str,
    t2: str | None,
    template_dir: str | Path,
    out_dir: str | Path,
) -> list[Failure]:
    """The ``register`` stage of one subject: registration, its gates, the overlay; returns the failed gates.

    Raises:
        StageError: the T1 (or T2) cannot be read.
    """
    from vcm.prep.inputs import check_volume

    problem = check_volume(t1) or (check_volume(t2, "t2") if t2 else None)
    if problem:
        raise StageError(problem)
    grid = Grid.from_config(cfg["grid"])
    reg = cfg["registration"]
    tpl = Path(template_dir)
    info = register(
        t1,
        tpl / "t1_head.nii.gz",
        grid,
        out_dir,
        reg["transform"],
        reg["working_spacing_mm"],
        reg["seed"],
        tuple(cfg["intensity"]["clip_percentiles"]),
        t2,
        tpl / "labels.nii.gz",
    )
    failures = registration_failures(info["ncc_in_brain"], info["affine_determinant"], gates)
    note = f"excluded: {'; '.join(f.reason for f in failures)}" if failures else None
    overlay_png(out_dir, tpl / "labels.nii.gz", grid, subject, note)
    print(
        f"subject {subject}: {reg['transform']} registration in {info['seconds']} s, correlation with the template "
        f"{info['ncc_in_brain']} in its brain, {info['ncc_with_template']} in its head, affine determinant "
        f"{info['affine_determinant']:.3f}"
    )
    return failures


def cli(argv: list[str]) -> int:
    from vcm.config import load_config

    parser = stage_parser("register", __doc__)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--t1", required=True)
    parser.add_argument("--t2", default=None, help="second modality of the same session (t2 condition)")
    parser.add_argument("--template-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--status", required=True, help="this stage's status (passed, or why excluded)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    gates = GateSettings.from_config(cfg)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    out = Path(args.out_dir)
    outputs = [out / name for name in OUTPUTS] + ([out / "t2.nii.gz"] if args.t2 else [])
    run_subject_stage(
        args.subject,
        "register",
        lambda: register_subject(cfg, gates, args.subject, args.t1, args.t2, args.template_dir, out),
        status=args.status,
        outputs=outputs,
    )
    return 0
