"""The evaluation's engine: sample every validation subject with and without control, score, write.

:func:`evaluate_model` runs the steps in order: load the model and its backbone (:func:`load_controlled`),
read the validation subjects (:func:`read_validation`), sample and score them batch by batch
(:class:`Evaluation`), summarise (:func:`vcm.evaluation.tables.summarise`) and write the table, the
per-subject rows and a JSON of settings and notes. The controlled and uncontrolled images of a subject
start from the same noise (seed ``evaluation.seed * 1_000_003 + row``) and the same covariates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from vcm.diffusion import noise_from_seeds, sample_images
from vcm.errors import StageError
from vcm.evaluation.fid import fid_3d, load_medicalnet, medicalnet_features
from vcm.evaluation.metrics import (
    alignment_metrics,
    image_metrics,
    ms_ssim_scales,
    ms_ssim_weights,
    skull_dist,
)
from vcm.evaluation.segmenters import make_image_segmenter
from vcm.evaluation.settings import EvalSettings
from vcm.evaluation.tables import summarise

__all__ = [
    "Evaluation",
    "ValidationSet",
    "evaluate_model",
    "load_controlled",
    "read_validation",
    "training_cost",
]

UNCONTROLLED = "uncontrolled"
"""The method name of the backbone sampled without any control."""


@dataclass
class ValidationSet:
    """The validation subjects of ``dataset.h5`` that the evaluation samples and scores against.

    Args:
        index: their rows of ``dataset.h5`` (sorted).
        subjects: their subject IDs.
        conditions: the stored condition arrays the model needs, (N, C, *grid) each.
        n_semantic: semantic classes of ``/cond/semantics`` (for the one-hot condition tensors).
        real: the real images, (N, *grid) float32.
        lv: the condition LV masks, (N, *grid) bool.
        skull: the real skull images where the model uses a skull condition, else ``None``.
        covariates: (N, 1, K) float32.
        affine: the grid's voxel-to-world affine.
    """

    index: np.ndarray
    subjects: list[str]
    conditions: dict[str, torch.Tensor]
    n_semantic: int
    real: np.ndarray
    lv: np.ndarray
    skull: np.ndarray | None
    covariates: torch.Tensor
    affine: np.ndarray

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.real.shape[1:])

    @property
    def spacing(self) -> float:
        """The mean voxel size, mm."""
        return float(np.sqrt((self.affine[:3, :3] ** 2).sum(0)).mean())

    def seeds(self, seed: int) -> list[int]:
        """The noise seed of each subject: ``seed * 1_000_003 + row`` (the previews' scheme)."""
        return [seed * 1_000_003 + int(i) for i in self.index]


def read_validation(
    dataset: str | Path,
    names: Sequence[str],
    lv_labels: Sequence[int],
    n_subjects: int | None = None,
    model_path: str | Path | None = None,
) -> ValidationSet:
    """Read the first ``n_subjects`` validation subjects (``None``: all) with the conditions ``names``.

    Raises:
        StageError: no such file, no or an empty ``/splits/val``, or a condition the model needs is absent.
    """
    from vcm.dataset_store import DatasetFile
    from vcm.labels import mask_of

    with DatasetFile(dataset) as data:
        val = data.split("val")[:n_subjects]
        if val.size == 0:
            raise StageError(f"{dataset}: /splits/val is empty: nothing to evaluate")
        data.require_conditions(names, needed_by=str(model_path))
        return ValidationSet(
            index=val,
            subjects=data.subjects(val),
            conditions={n: torch.from_numpy(data.conditions(n, val)) for n in names},
            n_semantic=data.n_semantic,
            real=np.asarray(data.images(val)[:, 0], dtype=np.float32),
            # the condition's LV mask; from the label map where the file has no LV condition
            lv=(
                data.conditions("lv", val)[:, 0] > 0
                if data.has_condition("lv")
                else mask_of(data.labels(val), tuple(lv_labels))
            ),
            skull=np.asarray(data.conditions("skull", val)[:, 0], np.float32) if "skull" in names else None,
            covariates=torch.from_numpy(data.covariates(val)).unsqueeze(1),
            affine=data.affine,
        )


def load_controlled(
    model_path: str | Path, bundle: str | Path, device: torch.device | str
) -> tuple[nn.Module, dict[str, Any], Any]:
    """The trained module, its metadata and the backbone bundle it was trained on.

    Raises:
        StageError: the model was trained on another backbone bundle.
    """
    from vcm.latents import bundle_sha256
    from vcm.models.backbone import load_bundle
    from vcm.models.build import load_model

    model, meta = load_model(model_path, device)
    if meta.get("backbone_sha256") and meta["backbone_sha256"] != bundle_sha256(bundle):
        raise StageError(f"{model_path} was trained on another backbone bundle than {bundle}")
    backbone = load_bundle(bundle, scale_factor=meta.get("scale_factor"), device=device)
    return model, meta, backbone


@dataclass
class Evaluation:
    """One model's evaluation: samples the validation subjects controlled and uncontrolled, scores each image.

    Args:
        model: the trained control module.
        method: its method (``vcm`` or ``controlnet``).
        backbone: the frozen backbone.
        data: the validation subjects.
        settings: the evaluation settings.
        scales: MS-SSIM scales.
        segment: ``segment(image) -> FreeSurfer labels``.
        lv_labels: FreeSurfer IDs of the LV in the segmentation.
        medicalnet: the FID 3D feature extractor, or ``None``.
        device: where to sample.
    """

    model: nn.Module
    method: str
    backbone: Any
    data: ValidationSet
    settings: EvalSettings
    scales: int
    segment: Callable[[np.ndarray], np.ndarray]
    lv_labels: tuple[int, ...]
    medicalnet: nn.Module | None
    device: torch.device | str

    def run(self, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, list[torch.Tensor]]]:
        """Sample and score every subject, ``settings.batch_size`` at a time.

        Returns:
            one record per subject and method (controlled and uncontrolled interleaved per batch), and the
            MedicalNet features per method and batch (empty lists without MedicalNet).
        """
        n = len(self.data.index)
        records: list[dict[str, Any]] = []
        # MedicalNet features per batch: keeping the images would cost 2 x N volumes of memory
        features: dict[str, list[torch.Tensor]] = {self.method: [], UNCONTROLLED: []}
        bs = max(1, int(self.settings.batch_size))
        total = 2 * n * self.settings.steps
        bar = tqdm(total=total, desc=f"evaluate {self.settings.sampler}", unit="step", disable=not progress)
        tick = lambda _step, _steps: bar.update(1)  # noqa: E731
        for lo in range(0, n, bs):
            for name, imgs in self.sample(slice(lo, lo + bs), tick).items():
                records += self.score(name, imgs, lo)
                if self.medicalnet is not None:
                    features[name].append(medicalnet_features(self.medicalnet, imgs))
        bar.close()
        return records, features

    def sample(self, sl: slice, tick: Callable[[int, int], Any]) -> dict[str, np.ndarray]:
        """The images of the subjects ``sl``: controlled, then uncontrolled from the same noise and covariates."""
        from vcm.models.conditions import condition_tensor

        factor = self.backbone.downsample_factor
        latent = (self.backbone.latent_channels, *(s // factor for s in self.data.grid))
        noise = noise_from_seeds(self.data.seeds(self.settings.seed)[sl], latent, device=self.device)
        cov = self.data.covariates[sl].to(self.device)
        n_sem = self.data.n_semantic
        conditions = {
            n: condition_tensor(n, x[sl], n_sem).to(self.device) for n, x in self.data.conditions.items()
        }
        how = (self.settings.sampler, self.settings.steps, tick)
        scale = self.settings.control_scale
        return {
            self.method: sample_images(
                self.model, self.method, self.backbone, conditions, cov, noise, *how, control_scale=scale
            ),
            UNCONTROLLED: sample_images(None, self.method, self.backbone, conditions, cov, noise, *how),
        }

    def score(self, name: str, imgs: np.ndarray, lo: int) -> list[dict[str, Any]]:
        """One record per image of method ``name``; ``imgs`` are the subjects from row ``lo`` on."""
        from vcm.labels import mask_of

        data, s = self.data, self.settings
        sim = image_metrics(imgs, data.real[lo : lo + len(imgs)], s.ssim_kernel, s.ssim_sigma, self.scales)
        seeds = data.seeds(s.seed)
        records = []
        for j, img in enumerate(imgs):
            k = lo + j
            seg_lv = mask_of(self.segment(img), self.lv_labels)
            records.append(
                {
                    "subject": data.subjects[k],
                    "index": int(data.index[k]),
                    "seed": seeds[k],
                    "method": name,
                    **alignment_metrics(seg_lv, data.lv[k], data.spacing),
                    "skull_dist": skull_dist(img, data.skull[k]) if data.skull is not None else math.nan,
                    "ssim": float(sim["ssim"][j]),
                    "ms_ssim": float(sim["ms_ssim"][j]),
                    "seg_lv_voxels": int(seg_lv.sum()),
                    "cond_lv_voxels": int(data.lv[k].sum()),
                }
            )
        return records


def _fid_per_method(
    medicalnet: nn.Module | None, features: Mapping[str, list[torch.Tensor]], real: np.ndarray
) -> dict[str, float]:
    """FID 3D of each method's images against the real validation images; empty without MedicalNet."""
    if medicalnet is None:
        return {}
    real_features = medicalnet_features(medicalnet, real)
    return {name: fid_3d(torch.cat(f), real_features) for name, f in features.items()}


def _model_table(
    records: list[dict[str, Any]],
    fid: Mapping[str, float],
    method: str,
    meta: Mapping[str, Any],
    settings: EvalSettings,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-subject rows (controlled first, then by row) and the model's summary table."""
    per_subject = pd.DataFrame(records)
    per_subject["method"] = pd.Categorical(per_subject["method"], [method, UNCONTROLLED])
    per_subject = per_subject.sort_values(["method", "index"], kind="stable")
    per_subject["method"] = per_subject["method"].astype(str)
    table = summarise(per_subject, fid, settings.seed)
    table.insert(0, "condition_set", meta.get("condition_set"))
    table.insert(1, "training_size", meta.get("training_size"))
    table.insert(2, "model", method)
    control = {UNCONTROLLED: "uncontrolled", "difference": "controlled - uncontrolled (paired)"}
    table.insert(4, "control", [control.get(m, "controlled") for m in table["method"]])
    table["segmentation"] = settings.segmentation
    return per_subject, table


def training_cost(model: nn.Module, model_path: str | Path) -> dict[str, float]:
    """The model's trainable parameter count, its training steps and its seconds per training step.

    Steps and seconds per step come from ``loss.csv`` beside ``vcm.pt`` (its last step, and its last
    ``elapsed_s``, summed over resumes, over that step); NaN when that file is absent or holds no step.
    Methods trained side by side may have different budgets (``training.by_method``), so the table says each.
    """
    steps = seconds = math.nan
    loss_csv = Path(model_path).with_name("loss.csv")
    if loss_csv.is_file():
        loss = pd.read_csv(loss_csv)
        if len(loss) and loss["step"].iloc[-1] > 0:
            steps = float(loss["step"].iloc[-1])
            seconds = float(loss["elapsed_s"].iloc[-1]) / steps
    return {
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "training_steps": steps,
        "seconds_per_step": seconds,
    }


def _write_outputs(out: Path, per_subject: pd.DataFrame, table: pd.DataFrame, info: dict[str, Any]) -> None:
    """``<stem>_subjects.csv``, ``<stem>.json`` and, last, the table ``out``."""
    from vcm.io import atomic_path, write_json

    stem = out.name.removesuffix(".csv")
    with atomic_path(out.with_name(f"{stem}_subjects.csv")) as tmp:
        per_subject.to_csv(tmp, index=False, float_format="%.6g")
    write_json(out.with_name(f"{stem}.json"), info)
    with atomic_path(out) as tmp:  # the declared output last: its presence means the set is complete
        table.to_csv(tmp, index=False, float_format="%.6g")


def evaluate_model(
    cfg: Mapping[str, Any],
    dataset: str | Path,
    model_path: str | Path,
    bundle: str | Path,
    out: str | Path,
    template_dir: str | Path | None = None,
    settings: EvalSettings | None = None,
    device: torch.device | str = "cpu",
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: bool = True,
    segmenter_path: str | Path | None = None,
) -> pd.DataFrame:
    """Controlled vs uncontrolled on the validation subjects; writes the table, the per-subject rows and a JSON.

    Args:
        cfg: the validated config (``evaluation``, ``cohort.sampler`` and ``steps``, ``conditions``,
            ``segmentation``).
        dataset: ``dataset.h5``.
        model_path: the model's ``vcm.pt``.
        bundle: the backbone bundle the model was trained on.
        out: the table CSV; ``<stem>_subjects.csv`` and ``<stem>.json`` go beside it.
        template_dir: the template (atlas segmentation).
        settings: defaults to :meth:`EvalSettings.from_config`.
        device: where to sample.
        segment: ``segment(image) -> FreeSurfer labels``; default the settings' backend
            (:func:`~vcm.evaluation.segmenters.make_image_segmenter`).
        progress: tqdm bars.
        segmenter_path: ``segmenter.pt``, for the ``segmenter`` backend.

    Returns:
        the table written to ``out``.
    """
    from vcm.io import provenance, sha256_file

    start = time.perf_counter()
    settings = settings or EvalSettings.from_config(cfg)
    out = Path(out)
    notes: list[str] = []
    medicalnet = load_medicalnet(settings.medicalnet_weights) if settings.medicalnet_weights else None
    if medicalnet is None:
        notes.append("FID 3D skipped: evaluation.medicalnet_weights not set (a local MedicalNet checkpoint)")
    model, meta, backbone = load_controlled(model_path, bundle, device)
    names = [n for g in meta["condition_groups"] for n, _ in g]
    lv_labels = tuple(cfg["conditions"]["lv_labels"])
    data = read_validation(dataset, names, lv_labels, settings.subjects, model_path)
    scales = settings.ms_ssim_scales or ms_ssim_scales(data.grid, settings.ssim_kernel)
    if segment is None:
        segment = make_image_segmenter(
            cfg, settings.segmentation, template_dir, data.affine, data.grid, segmenter_path
        )
    method = meta["method"]
    run = Evaluation(model, method, backbone, data, settings, scales, segment, lv_labels, medicalnet, device)
    records, features = run.run(progress)

    fid = _fid_per_method(medicalnet, features, data.real)
    if medicalnet is not None and len(data.index) < 2:
        notes.append("FID 3D undefined with fewer than 2 subjects")
    per_subject, table = _model_table(records, fid, method, meta, settings)
    cost = training_cost(model, model_path)
    for key, value in cost.items():  # the controlled row's; the backbone's is not trained here
        table[key] = [value if m == method else math.nan for m in table["method"]]
    if data.skull is None:
        notes.append("skull-dist: no skull condition in this set")
    if (per_subject["seg_lv_voxels"] == 0).any():
        notes.append("segmentations without LV have no HD95/ASSD (counted in n_empty)")

    info = {
        "model": str(model_path),
        "model_sha256": sha256_file(model_path),
        "condition_set": meta.get("condition_set"),
        "training_size": meta.get("training_size"),
        "method": method,
        **cost,
        "subjects": data.subjects,
        "settings": asdict(settings),
        "ms_ssim_scales": scales,
        "ms_ssim_weights": ms_ssim_weights(scales),
        "ssim_kernel": settings.ssim_kernel,
        "spacing_mm": data.spacing,
        "segmentation": settings.segmentation,
        "medicalnet_depth": getattr(medicalnet, "depth", None),
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 2),
        "provenance": provenance(None, dataset=str(dataset), bundle=str(bundle), device=str(device)),
    }
    _write_outputs(out, per_subject, table, info)
    return table
