"""Previews of a trained control module: controlled vs uncontrolled samples and the held-out objective.

At the end of training (and by the ``preview`` stage) a few validation subjects are sampled twice from the
same noise, with and without the control, next to the real image and the autoencoder's reconstruction of it
(the ceiling any control can reach through this autoencoder); the LV Dice of each says whether the control
placed the anatomy. :func:`noise_error` measures the training objective on held-out subjects, a far less
noisy signal than the Dice of a few samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vcm.dataset_store import DatasetFile
from vcm.diffusion import ddpm_scheduler, noise_from_seeds, sample_images
from vcm.errors import StageError
from vcm.grid import Grid
from vcm.labels import mask_dice, mask_of
from vcm.models.conditions import condition_tensor
from vcm.models.vcm import modulate
from vcm.training.batches import add_noise

__all__ = ["NOISE_ERROR_STEPS", "noise_error", "preview", "preview_summary", "write_disabled_preview"]

NOISE_ERROR_STEPS = (50, 200, 400, 600, 800, 950)


def _montage(path: Path, rows: list[dict[str, Any]]) -> None:
    """Real | AE reconstruction | controlled | uncontrolled, axial and coronal through the LV mask's centre, LV
    contour in red."""
    from vcm.plots import Panel, image_grid, mask_centre, planes

    cols = ("real", "reconstruction", "controlled", "uncontrolled")
    grid: list[list[Panel]] = []
    for row in rows:
        centre = mask_centre(row["lv"])
        masks = planes(row["lv"].astype(float), centre)[:2]
        axial, coronal = [], []
        for name in cols:
            title = f"{row['subject']} {name}"
            dice = row.get(f"dice_{name}")
            if dice is not None:
                title += f"\nLV Dice {dice:.2f}"
            image = planes(row[name], centre)
            axial.append(Panel(image[0], title, contour=masks[0]))
            coronal.append(Panel(image[1], "coronal", contour=masks[1]))
        grid += [axial, coronal]
    image_grid(path, grid, figsize=(10, 3.2 * 2 * len(rows) * 0.62), dpi=90)


NOISE_ERROR_STEPS = (50, 200, 400, 600, 800, 950)


@torch.no_grad()
def noise_error(
    model: nn.Module,
    method: str,
    backbone: nn.Module,
    z0: torch.Tensor,
    conditions: Mapping[str, torch.Tensor],
    cov: torch.Tensor,
    timesteps: Sequence[int] = NOISE_ERROR_STEPS,
    repeats: int = 4,
    seed: int = 0,
) -> list[dict[str, float]]:
    """The training objective on held-out subjects, per noise level: the noise-prediction MSE of the controlled
    model and of the backbone alone, on the same noisy latents, and their ratio (< 1: the conditions help).

    A far less noisy measure of what a short training learned than the Dice of a few samples; the large ``t``
    are the steps that lay out the anatomy.

    Args:
        model: the control module; ``method`` its kind (``vcm`` or ``controlnet``).
        backbone: the frozen backbone.
        z0: clean diffusion latents (B, C, *latent grid), i.e. scaled autoencoder latents.
        conditions: name -> float condition batch (B, ...); ``cov`` (B, 1, n_covariates).
        timesteps: the DDPM steps to measure at.
        repeats: noise draws per step.
        seed: the draws' generator seed.
    """
    g = torch.Generator().manual_seed(seed)
    alphas = ddpm_scheduler().alphas_cumprod.to(z0.device)
    features = model.encode(conditions) if method == "vcm" else None
    cond = model.condition_input(conditions) if method != "vcm" else None
    rows = []
    for step in timesteps:
        t = torch.full((z0.shape[0],), int(step), device=z0.device)
        own = base = 0.0
        for _ in range(repeats):
            noise = torch.randn(z0.shape, generator=g).to(z0.device)
            z_t = add_noise(z0, noise, t, alphas)
            eps_t = backbone.eps(z_t, t, cov)
            if method == "vcm":
                eps = modulate(eps_t, *model.forward_from_features(z_t, eps_t, t, features))
            else:
                eps = model(backbone, z_t, t, cov, cond)
            own += F.mse_loss(eps.float(), noise).item() / repeats
            base += F.mse_loss(eps_t.float(), noise).item() / repeats
        rows.append({"t": int(step), "controlled": own, "backbone": base, "ratio": own / base})
    return rows


@dataclass
class _Validation:
    """The first validation subjects of ``dataset.h5``, ready to sample from."""

    index: np.ndarray  # positions in the dataset, sorted
    subjects: list[str]
    conditions: dict[str, torch.Tensor]  # name -> float (B, C, *grid) on the sampling device
    cov: torch.Tensor  # (B, 1, n_covariates)
    real: np.ndarray  # (B, *grid) float32
    lv: np.ndarray | None  # (B, *grid) bool, when the dataset has the LV condition
    affine: np.ndarray

    def seed(self, base: int, i: int) -> int:
        """The noise seed of sample ``i``: ``base * 1_000_003 + dataset index``."""
        return base * 1_000_003 + int(self.index[i])


def _read_validation(
    dataset: str | Path, names: Sequence[str], n_subjects: int, device: torch.device | str
) -> _Validation:
    with DatasetFile(dataset) as data:
        val = data.split("val")[:n_subjects]
        if val.size == 0:
            raise StageError(f"{dataset}: /splits/val is empty: nothing to preview")
        n_sem = data.n_semantic
        return _Validation(
            index=val,
            subjects=data.subjects(val),
            conditions={
                n: condition_tensor(n, torch.from_numpy(data.conditions(n, val)), n_sem).to(device)
                for n in names
            },
            lv=data.conditions("lv", val)[:, 0] > 0 if data.has_condition("lv") else None,
            real=np.asarray(data.images(val)[:, 0], dtype=np.float32),
            cov=torch.from_numpy(data.covariates(val)).unsqueeze(1).to(device),
            affine=data.affine,
        )


def _sample(
    model: nn.Module,
    method: str,
    backbone: nn.Module,
    val: _Validation,
    sampler: str,
    steps: int,
    seed: int,
    progress: bool,
    control_scale: float = 1.0,
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """The controlled and uncontrolled samples from the same noise, and the decoded posterior mean of the real
    image (what the autoencoder keeps of the real anatomy); also the diffusion latents of the real images."""
    device = val.cov.device
    factor = backbone.downsample_factor
    latent = (backbone.latent_channels, *(s // factor for s in val.real.shape[1:]))
    noise = noise_from_seeds([val.seed(seed, i) for i in range(len(val.index))], latent, device=device)
    bar = tqdm(total=2 * steps, desc=f"preview {sampler}", unit="step", disable=not progress)
    tick = lambda i, n: bar.update(1)  # noqa: E731
    images = {
        name: sample_images(
            control, method, backbone, val.conditions, val.cov, noise, sampler, steps, tick, control_scale
        )
        for name, control in (("controlled", model), ("uncontrolled", None))
    }
    bar.close()
    mu, _ = backbone.encode(torch.from_numpy(val.real[:, None]).to(device))
    z0 = mu * backbone.scale_factor
    images["reconstruction"] = backbone.decode(z0)[:, 0].float().cpu().numpy()
    return images, z0


def _lv_segmenter(
    val: _Validation, template_dir: str | Path | None, segmenter_path: str | Path | None
) -> tuple[str | None, Callable[[np.ndarray, Path], np.ndarray] | None]:
    """How the previews are segmented for the LV Dice: the QC segmenter, else the atlas, else not at all."""
    method = "segmenter" if segmenter_path else "atlas" if template_dir is not None else None
    if method is None:
        return None, None
    from vcm.evaluation.segmenters import make_segmenter
    from vcm.qc import QCSettings

    grid = Grid.from_affine(val.real.shape[1:], val.affine)
    return method, make_segmenter({}, QCSettings(backend=method), template_dir, grid, segmenter_path)


def _write_subjects(
    out_dir: Path,
    val: _Validation,
    images: Mapping[str, np.ndarray],
    seed: int,
    segment: Callable[[np.ndarray, Path], np.ndarray] | None,
    lv_labels: Sequence[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write each subject's images (and LV mask); return the montage rows and the per-subject metrics."""
    from vcm.io import save_nifti

    rows, per_subject = [], []
    for i, (subject, index) in enumerate(zip(val.subjects, val.index, strict=True)):
        lv = val.lv[i] if val.lv is not None else None
        row: dict[str, Any] = {
            "subject": subject,
            "real": val.real[i],
            "lv": lv if lv is not None else np.zeros(val.real.shape[1:], bool),
        }
        record: dict[str, Any] = {"subject": subject, "index": int(index), "seed": val.seed(seed, i)}
        save_nifti(out_dir / f"{subject}_real.nii.gz", val.real[i], val.affine, np.float32)
        if lv is not None:
            save_nifti(out_dir / f"{subject}_lv.nii.gz", lv, val.affine, np.uint8)
        for name in ("controlled", "uncontrolled", "reconstruction"):
            path = out_dir / f"{subject}_{name}.nii.gz"
            save_nifti(path, images[name][i], val.affine, np.float32)
            row[name] = images[name][i]
            if segment is not None and lv is not None:
                labels = segment(images[name][i], path)
                record[f"dice_{name}"] = row[f"dice_{name}"] = mask_dice(
                    mask_of(labels, tuple(lv_labels)), lv
                )
        rows.append(row)
        per_subject.append(record)
    return rows, per_subject


@torch.no_grad()
def preview(
    model: nn.Module,
    meta: Mapping[str, Any],
    backbone: nn.Module,
    dataset: str | Path,
    out_dir: str | Path,
    n_subjects: int = 2,
    steps: int = 200,
    sampler: str = "ddim",
    seed: int = 0,
    template_dir: str | Path | None = None,
    lv_labels: Sequence[int] = (4, 43),
    device: torch.device | str = "cpu",
    progress: bool = True,
    segmenter_path: str | Path | None = None,
    control_scale: float = 1.0,
) -> dict[str, Any]:
    """Controlled vs uncontrolled previews of a few validation subjects, from the same noise.

    Writes ``<out_dir>/<subject>_{controlled,uncontrolled,reconstruction,real,lv}.nii.gz`` (grid affine),
    ``preview.png`` (LV-mask contour on the images) and ``preview_metrics.json``: the LV Dice of each
    generated image's segmentation against the condition mask (the QC segmenter when ``segmenter_path`` is
    given, else the atlas, :func:`~vcm.prep.segmentation.segment_atlas`, when ``template_dir`` is), and of the
    autoencoder's reconstruction of the real image: the ceiling
    any control can reach through this autoencoder. VCM's condition features are computed once per sample.

    Args:
        model: the trained control module (VCM or :class:`~vcm.models.controlnet.ControlNetControl`).
        meta: ``vcm.pt`` metadata (``method``, ``condition_set``).
        backbone: the frozen backbone the model was trained on.
        dataset: ``dataset.h5`` (``/splits/val``, conditions, covariates, ``grid_affine``).
        out_dir: the preview folder.
        n_subjects: first validation subjects to preview.
        steps: sampling steps.
        sampler: ``ddim`` or ``dpmpp_2m`` (:data:`~vcm.diffusion.SAMPLERS`).
        seed: subject ``i`` of the dataset gets the noise of seed ``seed * 1_000_003 + i``.
        template_dir: the template (``t1_head.nii.gz``, ``labels.nii.gz``) for the atlas Dice.
        segmenter_path: the QC segmenter (``segmenter.pt``) for the Dice; with neither, no Dice.
        lv_labels: FreeSurfer labels of the LV in the atlas segmentation.
        device: where to sample.
        progress: tqdm bar.
        control_scale: multiplies the control at every sampling step (``cohort.control_scale``).

    Returns:
        the metrics written to ``preview_metrics.json``.
    """
    from vcm.io import write_json

    start = time.perf_counter()
    out_dir = Path(out_dir)
    names = [n for g in meta["condition_groups"] for n, _ in g]
    model = model.to(device).eval()
    val = _read_validation(dataset, names, n_subjects, device)
    images, z0 = _sample(model, meta["method"], backbone, val, sampler, steps, seed, progress, control_scale)
    sample_s = time.perf_counter() - start
    errors = noise_error(model, meta["method"], backbone, z0, val.conditions, val.cov, seed=seed)
    dice_method, segment = _lv_segmenter(val, template_dir, segmenter_path)
    rows, per_subject = _write_subjects(out_dir, val, images, seed, segment, lv_labels)
    _montage(out_dir / "preview.png", rows)

    def mean(key: str) -> float | None:
        values = [r[key] for r in per_subject if key in r]
        return float(np.mean(values)) if values else None

    metrics = {
        "method": meta["method"],
        "condition_set": meta.get("condition_set"),
        "sampler": sampler,
        "steps": int(steps),
        "control_scale": float(control_scale),
        "subjects": per_subject,
        "lv_dice_controlled": mean("dice_controlled"),
        "lv_dice_uncontrolled": mean("dice_uncontrolled"),
        "lv_dice_reconstruction": mean("dice_reconstruction"),
        "dice_method": dice_method,
        "noise_error": errors,
        "sampling_seconds": round(sample_s, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(out_dir / "preview_metrics.json", metrics)
    return metrics


def write_disabled_preview(folder: str | Path) -> None:
    """Previews switched off: still write the files the workflow declares (``preview_metrics.json``,
    ``preview.png``), saying so."""
    from vcm.io import write_json
    from vcm.plots import text_figure

    folder = Path(folder)
    write_json(
        folder / "preview_metrics.json",
        {"subjects": 0, "note": "previews disabled (training.preview.subjects: 0)"},
    )
    text_figure(folder / "preview.png", "previews disabled (training.preview.subjects: 0)")


def preview_summary(folder: str | Path, metrics: Mapping[str, Any]) -> str:
    """What a stage prints after :func:`preview`: the LV Dice and the held-out noise-error ratios."""
    dc, du = metrics["lv_dice_controlled"], metrics["lv_dice_uncontrolled"]
    dice = (
        f"LV Dice controlled {dc:.3f} vs uncontrolled {du:.3f} "
        f"(autoencoder reconstruction of the real image: {metrics['lv_dice_reconstruction']:.3f})"
        if dc is not None
        else "no Dice (no template)"
    )
    lines = [
        f"{folder}: {len(metrics['subjects'])} subjects at {metrics['sampler']}-{metrics['steps']}, {dice}"
    ]
    if metrics.get("noise_error"):
        ratios = ", ".join(f"t={r['t']} {r['ratio']:.3f}" for r in metrics["noise_error"])
        lines.append(
            f"  held-out noise-prediction error, controlled / backbone alone (< 1: the conditions help): {ratios}"
        )
    return "\n".join(lines)
