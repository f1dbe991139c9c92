"""The evaluation's settings: the config's ``evaluation`` section as one typed object.

The schema (``workflow/schemas/config.schema.yaml``) owns the defaults; :meth:`EvalSettings.from_config`
reads a validated config (:func:`vcm.config.load_config` / :func:`~vcm.config.validate_config`) and resolves
the keys that defer to other sections (``sampler``, ``steps`` and ``control_scale`` to the ``cohort``'s,
``segmentation`` to ``qc.backend``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from vcm.config import section_values
from vcm.errors import StageError
from vcm.evaluation.segmenters import BACKENDS

__all__ = ["EvalSettings"]


@dataclass
class EvalSettings:
    """Evaluation settings, from the config's ``evaluation`` section (the field defaults are the schema's).

    Args:
        subjects: evaluate the first N validation subjects (``None``: all of them).
        sampler: ``ddim`` or ``dpmpp_2m`` (default ``cohort.sampler``).
        steps: sampling steps (default ``cohort.steps``).
        control_scale: multiplies the control at every sampling step (default ``cohort.control_scale``).
        seed: validation subject ``i`` of ``dataset.h5`` starts from the noise of seed ``seed * 1_000_003 + i``
            (the previews' scheme: the same subject gets the same noise in previews and evaluation).
        batch_size: subjects sampled together.
        segmentation: segmenter of the synthetic images, ``segmenter`` (the QC U-Net), ``atlas`` or
            ``synthseg``; ``None`` uses the cohort QC's (``qc.backend``).
        ssim_kernel: SSIM window, voxels (Gaussian).
        ssim_sigma: SSIM Gaussian sigma, voxels.
        ms_ssim_scales: MS-SSIM scales; ``None`` picks the most (up to 5) that the grid allows.
        medicalnet_weights: local MedicalNet checkpoint for FID 3D; ``None`` skips FID 3D.
    """

    subjects: int | None = None
    sampler: str | None = None
    steps: int | None = None
    control_scale: float | None = None
    seed: int = 0
    batch_size: int = 4
    segmentation: str | None = None
    ssim_kernel: int = 7
    ssim_sigma: float = 1.5
    ms_ssim_scales: int | None = None
    medicalnet_weights: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> EvalSettings:
        """Read ``cfg["evaluation"]`` of a validated config (and ``cohort.sampler``, ``steps``, ``control_scale``,
        ``qc.backend`` where it defers to them); ``overrides`` that are not ``None`` win.

        Raises:
            StageError: an unknown segmentation backend or an even SSIM window (overrides; the schema checks
                the config's values).
        """
        values = section_values(cfg, "evaluation", [f.name for f in fields(cls)], overrides)
        for key in ("sampler", "steps", "control_scale"):
            if values.get(key) is None:
                values[key] = cfg["cohort"][key]
        out = cls(**values)
        if out.segmentation is None:
            out.segmentation = cfg["qc"]["backend"]
        if out.segmentation not in BACKENDS:
            raise StageError(
                f"config key 'evaluation.segmentation': expected {', '.join(BACKENDS)}, got {out.segmentation!r}"
            )
        if out.ssim_kernel < 1 or out.ssim_kernel % 2 == 0:
            raise StageError(
                f"config key 'evaluation.ssim_kernel': expected an odd size >= 1, got {out.ssim_kernel}"
            )
        return out
