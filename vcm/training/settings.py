"""The training settings of a control module: one dataclass read from the config's ``training`` section.

Kept apart from the loop so that the stages which only read a setting (the previews' sampler, steps and seed)
do not import the loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from vcm.config import section_values
from vcm.errors import StageError
from vcm.training.batches import TIMESTEP_SAMPLING

__all__ = ["Settings"]

# training.preview's keys -> the fields that hold them
_PREVIEW = {
    "subjects": "preview_subjects",
    "sampler": "preview_sampler",
    "steps": "preview_steps",
    "seed": "preview_seed",
}


@dataclass
class Settings:
    """Training settings, from the config's ``training`` section (the field defaults are the schema's).

    Args:
        method: ``vcm`` or ``controlnet``: the one this model trains (one of ``training.methods``; the
            workflow trains each of them in its own job).
        steps: optimisation steps (upper bound when ``minutes`` is set).
        batch_size: global batch (split over DDP ranks).
        lr: peak AdamW learning rate; annealed to ``lr * min_lr_ratio``.
        checkpoint_every: steps between ``checkpoint_latest.pt`` writes.
        seed: seeds the networks' init and every random draw of training.
        minutes: wall-clock budget of the training loop (summed over resumes): training stops when it is
            spent (or after ``steps``), and the warm-up (5 % of it) and the cosine annealing follow the elapsed
            fraction of it, so the schedule completes whatever the speed.
        warmup_steps: linear warm-up when training by steps; default 5 % of ``steps``, at most 100.
        min_lr_ratio: final lr / peak lr (paper: 5e-6 / 5e-5).
        weight_decay: AdamW weight decay.
        flip: left-right flip augmentation with the pre-encoded flipped latent.
        modality_dropout: ``latent`` (paper), ``input`` (ablation) or ``none``.
        p_all: probability of keeping every group (paper: 0.4 for two groups).
        l1_scale: multiplies eq. 4's λ = 1 / (b·c·h·w·d) (1: the paper as written).
        timesteps: how training draws ``t``: ``uniform`` (the paper) or ``cubic``, ``t = (1 - u³)·T``, which
            favours the noisy early sampling steps where the anatomy is laid down (T2I-Adapter's choice for
            structural conditions; see :func:`~vcm.training.batches.draw_timesteps`).
        noise_draws: ``(t, noise)`` pairs per subject and step (paper: 1). VCM's time-free encoder runs once
            per subject, so K draws give K times the samples for less than K times the time, and a less noisy
            gradient (on the demo's CPU the encoders were about half of a step and the backbone's pass a
            quarter, before ``encoder_num_res_blocks`` and ``prior_reuse`` took most of both out).
        loss_weighting: ``none`` (eq. 4) or ``backbone``: each sample's MSE divided by the frozen backbone's
            MSE on it, so that every noise level counts the same (VCM only; see :func:`~vcm.diffusion.vcm_loss`).
        lv_weight: extra weight of the noise error in the latent voxels the ``lv`` condition covers (and
            their neighbours): each voxel counts ``1 + lv_weight · coverage`` (0: the paper; see
            :func:`~vcm.training.loss.lv_region_weight`).
        prior_reuse: how many times, on average, each of the frozen backbone's noise predictions is trained on
            (VCM only): 1 (the paper) runs the backbone on fresh noise every step; ``R > 1`` computes a bank of
            ``steps · batch_size · noise_draws / R`` noisy latents and predictions before the first step and
            draws from it (:mod:`~vcm.training.prior_bank`), which takes the backbone out of the step.
        grad_clip_norm: clips the global gradient norm before each AdamW step (``None``: no clipping, the
            paper). A short run at a high peak lr can take one outsized step at the end of the warm-up and stall
            for hundreds of steps; clipping bounds that step (docs/benchmarks.md, sessions 16-17).
        ema_decay: when set, ``vcm.pt`` holds an exponential moving average of the weights with this decay
            (:mod:`~vcm.training.ema`; lower during the first steps) instead of the last step's (``None``: the
            last step's, the paper); the checkpoints keep both.
        anatomy_augmentation: ``copies`` of each training subject with its lateral ventricles pushed to a
            larger volume, drawn in ``lv_factor`` (:mod:`~vcm.training.anatomy_augmentation`; empty or 0
            copies: none, the paper).
        vcm: overrides of :class:`~vcm.models.vcm.VCM` arguments (e.g. channel widths for the demo grid).
        controlnet: overrides of :class:`~vcm.models.controlnet.ControlNetControl` arguments.
        preview_subjects: validation subjects previewed at the end of training (0: no preview).
        preview_sampler: sampler of the previews; default ``cohort.sampler``.
        preview_steps: sampling steps of the previews; default ``cohort.steps``.
        preview_seed: base seed of the previews' noise.
    """

    method: str = "vcm"
    steps: int = 2000
    batch_size: int = 2
    lr: float = 5e-5
    checkpoint_every: int = 100
    seed: int = 0
    minutes: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    flip: bool = True
    modality_dropout: str = "latent"
    p_all: float = 0.4
    l1_scale: float = 1.0
    timesteps: str = "uniform"
    noise_draws: int = 1
    loss_weighting: str = "none"
    lv_weight: float = 0.0
    prior_reuse: int = 1
    grad_clip_norm: float | None = None
    ema_decay: float | None = None
    anatomy_augmentation: dict[str, Any] = field(
        default_factory=lambda: {"copies": 0, "lv_factor": [1.25, 2.5]}
    )
    vcm: dict[str, Any] = field(default_factory=dict)
    controlnet: dict[str, Any] = field(default_factory=dict)
    preview_subjects: int = 2
    preview_sampler: str | None = None
    preview_steps: int | None = None
    preview_seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> Settings:
        """Read ``cfg["training"]`` of a validated config (and ``cohort.sampler`` and ``cohort.steps`` where
        the previews defer to them), with ``training.by_method.<method>`` over it; ``overrides`` that are not
        ``None`` win. ``method`` defaults to the first of ``training.methods``."""
        names = [f.name for f in fields(cls) if f.name not in (*_PREVIEW.values(), "method")]
        values = section_values(
            cfg, "training", names, read_elsewhere=("sizes", "methods", "preview", "by_method")
        )
        values["method"] = overrides.get("method") or cfg["training"]["methods"][0]
        values.update(cfg["training"]["by_method"].get(values["method"], {}))  # validated by the config
        preview = section_values(cfg, "training.preview", list(_PREVIEW))
        values.update({name: preview[key] for key, name in _PREVIEW.items()})
        for key in ("sampler", "steps"):
            if values[f"preview_{key}"] is None:
                values[f"preview_{key}"] = cfg["cohort"][key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("minutes") == 0:  # an override of 0 removes the time budget
            values["minutes"] = None
        out = cls(**values)
        for key, allowed in (
            ("method", ("vcm", "controlnet")),
            ("modality_dropout", ("latent", "input", "none")),
            ("loss_weighting", ("none", "backbone")),
            ("timesteps", TIMESTEP_SAMPLING),
        ):
            if getattr(out, key) not in allowed:
                expected = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
                raise StageError(
                    f"config key 'training.{key}': expected {expected}, got {getattr(out, key)!r}"
                )
        return out

    @property
    def warmup(self) -> int:
        """Warm-up steps of a training by steps: ``warmup_steps``, else 5 % of ``steps`` (1 to 100)."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return max(1, min(100, math.ceil(0.05 * self.steps)))
