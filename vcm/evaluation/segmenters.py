"""The re-segmentation backends: what finds the anatomy (the LV) in a synthetic image.

One home for the backends that the cohort's QC (:mod:`vcm.qc`), the evaluation (:mod:`vcm.evaluation.run`),
the training previews and the mask-edit check (:mod:`vcm.mask_edit`) share, so that a Dice from any of them
was measured the same way:

* ``segmenter`` (the default): the QC U-Net trained on the real training subjects
  (:mod:`vcm.models.segmenter`), independent of the condition masks and ~0.1 s a volume;
* ``atlas``: the template's labels warped onto the image (:func:`~vcm.prep.segmentation.segment_atlas`);
* ``synthseg``: the configured SynthSeg command, its 1 mm labels resampled onto the grid.

:func:`make_segmenter` gives a :data:`Segmenter` (image and its NIfTI path: what the QC already writes);
:func:`make_image_segmenter` wraps it for callers that hold only the image (it writes the NIfTI itself).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vcm.antspy import import_ants
from vcm.errors import StageError

if TYPE_CHECKING:
    from vcm.qc import QCSettings

__all__ = ["BACKENDS", "Segmenter", "make_image_segmenter", "make_segmenter"]

Segmenter = Callable[[np.ndarray, Path], np.ndarray]
"""``segmenter(image, image_path) -> FreeSurfer label map`` on the same grid; ``image_path`` is the image
written as NIfTI (with the grid affine) for backends that read files."""

BACKENDS = ("segmenter", "atlas", "synthseg")
"""The backend names that ``qc.backend`` and ``evaluation.segmentation`` accept."""


def _atlas(
    image: np.ndarray, path: Path, template_dir: str | Path, grid: Any, transform: str, seed: int
) -> np.ndarray:
    from vcm.prep.segmentation import segment_atlas

    return segment_atlas(path, template_dir, grid, transform, seed)


def make_segmenter(
    cfg: Mapping[str, Any],
    settings: QCSettings,
    template_dir: str | Path | None,
    grid: Any,
    segmenter_path: str | Path | None = None,
) -> Segmenter:
    """The configured re-segmentation backend as a :data:`Segmenter` on ``grid``.

    Args:
        cfg: the validated config (``segmentation``, ``registration.seed``).
        settings: QC settings (``backend``).
        template_dir: the template folder (``t1_head.nii.gz``, ``labels.nii.gz``), needed by ``atlas``.
        grid: the :class:`~vcm.grid.Grid` of the synthetic images.
        segmenter_path: ``segmenter.pt``, needed by ``segmenter``.
    """
    seg_cfg = cfg.get("segmentation", {})
    if settings.backend == "segmenter":
        from vcm.models.segmenter import load_segmenter

        if segmenter_path is None:
            raise StageError("QC backend segmenter needs the trained QC segmenter (--segmenter segmenter.pt)")
        return load_segmenter(segmenter_path, grid.affine)
    if settings.backend == "atlas":
        if template_dir is None or not (Path(template_dir) / "labels.nii.gz").is_file():
            raise StageError(
                f"QC backend atlas needs the template folder (labels.nii.gz); got {template_dir}"
            )
        transform = seg_cfg.get("atlas", {}).get("transform", "SyN")
        seed = int(cfg.get("registration", {}).get("seed", 0))
        # a partial of a module-level function pickles, so generate-shard can run it in worker processes
        return functools.partial(_atlas, template_dir=template_dir, grid=grid, transform=transform, seed=seed)
    return _synthseg(seg_cfg.get("synthseg", {}), grid)


def _synthseg(s: Mapping[str, Any], grid: Any) -> Segmenter:
    """The ``synthseg`` backend with the config's ``segmentation.synthseg`` settings ``s``."""

    def synthseg(image: np.ndarray, path: Path) -> np.ndarray:
        from vcm.prep.registration import read_ants
        from vcm.prep.segmentation import run_synthseg

        ants = import_ants()

        with tempfile.TemporaryDirectory(prefix="vcm_qc_synthseg_", dir=path.parent) as tmp:
            seg_path, _ = run_synthseg(
                path,
                tmp,
                s.get("command", "mri_synthseg"),
                s.get("robust", False),
                s.get("threads", 1),
                s.get("cpu", True),
                list(s.get("extra_args", [])),
            )
            # SynthSeg writes 1 mm isotropic: back onto the grid, nearest label
            on_grid = ants.apply_transforms(
                fixed=grid.reference_image(),
                moving=read_ants(seg_path),
                transformlist=[],
                interpolator="genericLabel",
            )
            return np.rint(on_grid.numpy()).astype(np.uint16)

    return synthseg


def make_image_segmenter(
    cfg: Mapping[str, Any],
    backend: str,
    template_dir: str | Path | None,
    affine: np.ndarray,
    shape: Sequence[int],
    segmenter_path: str | Path | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """``segment(image) -> FreeSurfer labels`` for synthetic images on the grid of ``affine`` and ``shape``:
    the backend ``backend`` of :func:`make_segmenter` on the image written as NIfTI in a temporary folder.

    Args:
        cfg: the validated config (``qc``, ``segmentation``, ``registration.seed``).
        backend: one of :data:`BACKENDS`.
        template_dir: the template folder, needed by ``atlas``.
        affine: the grid's voxel-to-world affine.
        shape: the grid's shape.
        segmenter_path: ``segmenter.pt``, needed by ``segmenter``.
    """
    from vcm.grid import Grid
    from vcm.io import save_nifti
    from vcm.qc import QCSettings

    settings = dataclasses.replace(QCSettings.from_config(cfg), backend=backend)
    segmenter = make_segmenter(cfg, settings, template_dir, Grid.from_affine(shape, affine), segmenter_path)

    def segment(image: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="vcm_eval_") as tmp:
            path = Path(tmp) / "synthetic.nii.gz"
            save_nifti(path, image, affine, np.float32)
            return segmenter(image, path)

    return segment
