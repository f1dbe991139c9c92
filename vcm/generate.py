"""Mass production of labelled synthetic subjects with QC: one shard per job, then one merged cohort.

``generate-shard`` makes the synthetic subjects ``K·shard_size … min((K+1)·shard_size, size) − 1`` of a
condition set's cohort. For each subject (global index ``i``):

1. **Condition source** (depends on ``(cohort.seed, i)`` only): a real subject of ``cohort.sources`` (by
   default the model's training split), visited in seeded balanced rounds (every source once before any
   twice); with probability ``cohort.new_anatomy_fraction`` a **new anatomy**: the source's label map warped
   by a random smooth deformation (nearest label), its skull and low-resolution images warped linearly, and
   the LV / brain / semantic conditions re-derived from the warped labels (:mod:`vcm.labels`). Covariates
   are the source's; a new anatomy's LV and brain volumes are scaled by the warped / original voxel counts.
2. **Sampling** with the trained control module on the frozen backbone: DDIM, batched
   (``cohort.batch_size``), VCM's time-free condition features computed once per sample, bf16 autocast on
   CUDA only, the full-resolution passes (condition encoder, decoder) in chunks of ``cohort.decode_chunk``
   samples so that a 24 GB GPU suffices at the BrainLDM grid. The initial noise of attempt ``a`` comes from
   a seed derived from ``(cohort.seed, i, a)`` only.
3. **QC** (:mod:`vcm.qc`): re-segmentation, LV Dice/HD95/ASSD, skull-dist, per-structure intensities. A
   failing sample is regenerated from the next attempt's seed, up to ``qc.max_tries`` samples; a subject
   that never passes keeps its best attempt (fewest failed checks, then highest Dice) with
   ``passed = False``.

Same config, same cohort, whatever the shard size: every batch is padded to exactly ``cohort.batch_size``
samples and every full-resolution chunk to exactly ``cohort.decode_chunk`` (padding rows are zeros and are
discarded). A sample's values then do not depend on which other samples share its batch, so on CPU a
subject is byte-identical whether it is made in a shard of 2 or of 3, or in a resumed run (tested); on GPU
the same holds for a given device and library versions. Changing the batch or chunk size changes results
within floating-point tolerance.

Outputs in ``--out-dir`` (``results/cohorts/<set>/shards/<K>``), per subject ``syn-<i:05d>/``:
``image.nii.gz``, ``label.nii.gz`` (the source's or the warped label map), ``seg.nii.gz`` (the QC
re-segmentation), ``<condition>.nii.gz`` per condition, all with the grid affine, and ``subject.json``
(source, seeds, covariates, QC of every attempt), written atomically and last: a subject folder without it
is incomplete and is redone. ``shard.h5`` (same layout as ``cohort.h5``) is written atomically after every
subject: a shard folder without it is incomplete; a rerun keeps the complete subjects whose settings
signature matches and makes the rest.

``merge-cohort`` concatenates the shards into ``cohort.h5`` (DESIGN.md contract: ``/subjects``, ``/image``
N×1×D×H×W, ``/label`` N×D×H×W, ``/cond/<name>`` N×1×D×H×W, ``/covariates`` N×4, ``/seed``,
``/source_subject``, ``/new_anatomy``, ``/qc/<metric>``, ``/qc/passed``, ``/qc/attempts``; also ``/index``,
``/seg``, ``/source_index``, ``/covariates_raw``, ``/intensity/<structure>`` (the image's median intensity per
semantic class, next to ``/qc_reference/{low,high}``, the real range) and ``/attempts/<field>``, one row per QC
attempt), with
provenance attributes, plus ``manifest.csv`` (one row per subject: NIfTI paths relative to the manifest,
source, seed, covariates, QC) and ``qc.csv`` (one row per attempt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn
from tqdm import tqdm

from vcm.diffusion import ddim_sample, ddim_scheduler, noise_from_seeds
from vcm.errors import StageError
from vcm.evaluation.segmenters import Segmenter, make_segmenter
from vcm.grid import Grid
from vcm.io import atomic_path, load_nifti, provenance, save_nifti, sha256_file, write_json
from vcm.labels import brain_mask, mask_of, semantic_map
from vcm.models.build import load_model
from vcm.models.conditions import condition_tensor, semantic_classes
from vcm.qc import QCResult, QCSettings, evaluate, reference_ranges

__all__ = [
    "CohortSampler",
    "CohortSettings",
    "SubjectPlan",
    "cli",
    "generate_shard",
    "merge_cli",
    "merge_cohort",
    "noise_seed",
    "plan_subject",
    "shard_ids",
    "shard_range",
    "smooth_displacement",
    "subject_id",
]

logger = logging.getLogger(__name__)

SHARD_FILE = "shard.h5"
SUBJECT_FILE = "subject.json"
COHORT_FILE = "cohort.h5"
FORMAT_VERSION = 1
# independent random streams of SeedSequence([seed, stream, ...])
_STREAM_NOISE, _STREAM_ANATOMY, _STREAM_SOURCES = 0, 1, 2


# --- settings and seeds ------------------------------------------------------------------------------------


@dataclass
class CohortSettings:
    """The config's ``cohort`` section (absent keys take these defaults).

    Args:
        size: synthetic subjects in the cohort.
        shard_size: subjects per shard (one job each).
        ddim_steps: DDIM steps.
        new_anatomy_fraction: probability that a subject gets a deformed (new) anatomy.
        seed: base seed; every subject's randomness derives from ``(seed, index[, attempt])``.
        batch_size: samples per DDIM batch (partial batches are padded to this size).
        decode_chunk: samples per full-resolution pass (condition encoder, autoencoder decoder).
        sources: real subjects that lend their conditions: ``train`` (the model's training split), ``val``,
            ``all``. Conditions of validation subjects would leak into a train-on-synthetic evaluation on
            them, hence the default.
        deform_max_mm: largest displacement of a new anatomy's deformation.
        deform_smoothness_mm: spacing of the deformation's random control points (its correlation length).
        qc_workers: threads that QC and write the subjects of a batch while the next batch samples (one
            subject each; 0: QC inline, after each batch). A sample depends only on its own seed, so the cohort
            is identical whatever the number (tested). A GPU node's spare cores hide the CPU-bound QC.
    """

    size: int = 32
    shard_size: int = 16
    ddim_steps: int = 200
    new_anatomy_fraction: float = 0.5
    seed: int = 0
    batch_size: int = 4
    decode_chunk: int = 1
    sources: tuple[str, ...] = ("train",)
    deform_max_mm: float = 8.0
    deform_smoothness_mm: float = 32.0
    qc_workers: int = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CohortSettings:
        section = dict(cfg.get("cohort", {}))
        known = set(cls.__dataclass_fields__)
        out = cls(**{k: v for k, v in section.items() if k in known})
        out.sources = tuple([out.sources] if isinstance(out.sources, str) else out.sources)
        bad = [s for s in out.sources if s not in ("train", "val", "all")]
        if bad or not out.sources:
            raise StageError(
                f"config key 'cohort.sources': expected a list of train, val, all; got {out.sources!r}"
            )
        for key in ("size", "shard_size", "ddim_steps", "batch_size", "decode_chunk"):
            if int(getattr(out, key)) < 1:
                raise StageError(f"config key 'cohort.{key}': expected >= 1, got {getattr(out, key)}")
        if int(out.qc_workers) < 0:
            raise StageError(f"config key 'cohort.qc_workers': expected >= 0, got {out.qc_workers}")
        return out

    def signature_parts(self) -> dict[str, Any]:
        """What a subject's data depends on (not the cohort or shard size, which only say which subjects)."""
        return {k: v for k, v in asdict(self).items() if k not in ("size", "shard_size", "qc_workers")}


def n_shards(size: int, shard_size: int) -> int:
    return math.ceil(size / shard_size)


def shard_ids(size: int, shard_size: int) -> list[str]:
    """Stable shard ids ``00000``, ``00001``, …"""
    return [f"{k:05d}" for k in range(n_shards(size, shard_size))]


def shard_range(shard: int, size: int, shard_size: int) -> range:
    """Global subject indices of shard ``shard``."""
    if not 0 <= shard < n_shards(size, shard_size):
        raise StageError(
            f"shard {shard} does not exist: cohort.size {size} / shard_size {shard_size} makes {n_shards(size, shard_size)} shards"
        )
    return range(shard * shard_size, min((shard + 1) * shard_size, size))


def subject_id(index: int) -> str:
    return f"syn-{index:05d}"


def _seed_from(*entropy: int) -> int:
    """A 63-bit seed from integers (NumPy's SeedSequence hashing: nearby inputs give unrelated seeds)."""
    a, b = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint32)
    return int((int(a) << 32 | int(b)) & 0x7FFF_FFFF_FFFF_FFFF)


def noise_seed(base: int, index: int, attempt: int = 0) -> int:
    """The initial-noise seed of subject ``index``'s attempt ``attempt`` (0 = first try)."""
    return _seed_from(base, _STREAM_NOISE, index, attempt)


# --- condition sources and new anatomies -------------------------------------------------------------------


def smooth_displacement(
    shape: Sequence[int], spacing_mm: float, max_mm: float, smoothness_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """A random smooth displacement field (3, *shape) in voxels, largest displacement ``max_mm``.

    Gaussian random vectors on a control grid ``smoothness_mm`` apart, interpolated with cubic B-splines.
    """
    shape = tuple(int(s) for s in shape)
    step = smoothness_mm / spacing_mm  # control-point spacing in voxels
    coarse = [int(math.ceil((s - 1) / step)) + 3 for s in shape]  # one spare point on each side
    control = rng.standard_normal((3, *coarse))
    coords = np.stack(np.meshgrid(*[np.arange(s) / step + 1.0 for s in shape], indexing="ij"))
    field = np.stack([ndi.map_coordinates(c, coords, order=3, mode="nearest") for c in control])
    largest = float(np.sqrt((field**2).sum(axis=0)).max())
    return (field * (max_mm / spacing_mm / max(largest, 1e-12))).astype(np.float32)


def warp(volume: np.ndarray, displacement: np.ndarray, order: int) -> np.ndarray:
    """``volume(x + d(x))``: nearest (``order=0``, labels) or linear (``order=1``, images) resampling."""
    coords = np.indices(volume.shape, dtype=np.float32) + displacement
    out = ndi.map_coordinates(volume, coords, order=order, mode="nearest", prefilter=False)
    return out.astype(volume.dtype, copy=False)


@dataclass
class SubjectPlan:
    """Everything a synthetic subject is made from (a function of the config, the dataset and its index)."""

    index: int
    source_index: int
    source_subject: str
    new_anatomy: bool
    label: np.ndarray
    conditions: dict[str, np.ndarray]
    covariates: np.ndarray
    covariates_raw: np.ndarray

    @property
    def subject(self) -> str:
        return subject_id(self.index)


class DatasetSource:
    """Read access to the real subjects of ``dataset.h5`` that lend conditions.

    Args:
        dataset: ``dataset.h5``.
        cfg: the validated config (``conditions``).
    """

    def __init__(self, dataset: str | Path, cfg: Mapping[str, Any]) -> None:
        if not Path(dataset).is_file():
            raise StageError(f"dataset not found: {dataset}")
        self.path = Path(dataset)
        self.h5 = h5py.File(dataset, "r")
        for key in ("image", "label", "cond", "covariates", "subjects"):
            if key not in self.h5:
                raise StageError(f"{dataset}: no /{key} (rebuild dataset.h5)")
        if "grid_affine" not in self.h5.attrs:
            raise StageError(f"{dataset}: no grid_affine attribute (rebuild dataset.h5)")
        self.subjects = [s.decode() if isinstance(s, bytes) else str(s) for s in self.h5["subjects"][:]]
        self.names = sorted(self.h5["cond"])
        self.grid = tuple(int(s) for s in self.h5["image"].shape[2:])
        self.affine = np.asarray(self.h5.attrs["grid_affine"], dtype=float)
        self.spacing = float(np.abs(self.affine[:3, :3]).max(axis=0).mean())
        self.n_semantic = semantic_classes(self.h5)
        self.image_dtype = self.h5["image"].dtype
        self.lv_labels = tuple(cfg.get("conditions", {}).get("lv_labels", (4, 43)))
        self.has_raw = "covariates_raw" in self.h5
        self.ranges_file = cfg.get("conditions", {}).get("covariate_ranges")

    def close(self) -> None:
        self.h5.close()

    def split(self, name: str) -> np.ndarray:
        if f"splits/{name}" not in self.h5:
            have = ", ".join(sorted(self.h5["splits"])) if "splits" in self.h5 else "none"
            raise StageError(f"{self.path}: no split '{name}' (have: {have})")
        return np.sort(np.asarray(self.h5[f"splits/{name}"][:], dtype=np.int64))

    def source_indices(self, sources: Sequence[str], train_split: str) -> np.ndarray:
        parts = []
        for s in sources:
            parts.append(
                np.arange(len(self.subjects))
                if s == "all"
                else self.split(train_split if s == "train" else "val")
            )
        out = np.unique(np.concatenate(parts))
        if out.size == 0:
            raise StageError(f"{self.path}: cohort.sources {list(sources)} select no subjects")
        return out

    def dtype(self, name: str) -> np.dtype:
        return self.h5[f"cond/{name}"].dtype

    def read(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Label map, conditions (stored dtypes), scaled and raw covariates of real subject ``index``."""
        label = np.asarray(self.h5["label"][index], dtype=np.uint16)
        conds = {n: np.asarray(self.h5[f"cond/{n}"][index, 0]) for n in self.names}
        cov = np.asarray(self.h5["covariates"][index], dtype=np.float32)
        raw = (
            np.asarray(self.h5["covariates_raw"][index], dtype=np.float64)
            if self.has_raw
            else np.full(4, np.nan)
        )
        return label, conds, cov, raw


def _ranges_path(path: str | None) -> Path:
    from vcm.config import REPO_ROOT

    p = Path(path or "resources/covariate_ranges.yaml")
    return p if p.is_file() or p.is_absolute() else REPO_ROOT / p


def plan_subject(
    index: int, settings: CohortSettings, data: DatasetSource, sources: np.ndarray
) -> SubjectPlan:
    """The condition source of synthetic subject ``index`` (deterministic in ``(settings.seed, index)``)."""
    from vcm.prep.conditions import load_ranges, scale_covariates

    n = len(sources)
    rnd, pos = divmod(index, n)  # balanced rounds: every source once per round, in a seeded order
    order = np.random.default_rng(np.random.SeedSequence([settings.seed, _STREAM_SOURCES, rnd])).permutation(
        n
    )
    src = int(sources[order[pos]])
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, _STREAM_ANATOMY, index]))
    new = bool(rng.random() < settings.new_anatomy_fraction)
    label, conds, cov, raw = data.read(src)
    if new:
        disp = smooth_displacement(
            label.shape, data.spacing, settings.deform_max_mm, settings.deform_smoothness_mm, rng
        )
        warped = warp(label, disp, 0)
        out = {}
        for name, x in conds.items():
            if name == "lv":
                out[name] = mask_of(warped, data.lv_labels).astype(x.dtype)
            elif name == "brain":
                out[name] = brain_mask(warped).astype(x.dtype)
            elif name == "semantics":
                out[name] = semantic_map(warped).astype(x.dtype)
            elif np.issubdtype(x.dtype, np.integer):
                out[name] = warp(x, disp, 0)
            else:  # skull, low-res images: linear, rounded to the stored dtype (what the model will see)
                out[name] = warp(x.astype(np.float32), disp, 1).astype(x.dtype)
        if not data.has_raw:
            raise StageError(
                f"{data.path}: no /covariates_raw to recompute a new anatomy's volumes (rebuild dataset.h5)"
            )
        raw = raw.copy()
        for k, fn in ((2, lambda lab: mask_of(lab, data.lv_labels)), (3, brain_mask)):
            before, after = int(fn(label).sum()), int(fn(warped).sum())
            raw[k] = raw[k] * after / before if before else after * data.spacing**3
        ranges = load_ranges(_ranges_path(data.ranges_file))
        scaled, _ = scale_covariates(
            dict(zip(("sex", "age", "lv_volume", "brain_volume"), raw.tolist(), strict=True)), ranges
        )
        cov = np.asarray(scaled, dtype=np.float32)
        label, conds = warped, out
    return SubjectPlan(index, src, data.subjects[src], new, label, conds, cov, raw)


# --- sampling ----------------------------------------------------------------------------------------------


class _Features:
    """Stands in for VCM in :func:`~vcm.diffusion.ddim_sample`: precomputed (chunked) features, VCM's head."""

    def __init__(self, vcm: nn.Module, features: torch.Tensor | None) -> None:
        self.vcm, self.features = vcm, features

    def encode(self, conditions: Any, keep: Any = None) -> torch.Tensor | None:
        return self.features

    def forward_from_features(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vcm.forward_from_features(*args)


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` over fixed-size chunks of ``x`` (the last one zero-padded to ``chunk``, its padding dropped).

    Fixed sizes keep every sample's result independent of how many samples there are.
    """
    outs = []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        n = part.shape[0]
        if n < chunk:
            part = torch.cat([part, part.new_zeros((chunk - n, *part.shape[1:]))])
        outs.append(fn(part)[:n])
    return torch.cat(outs)


class CohortSampler:
    """Batched DDIM sampling with a trained control module on the frozen backbone, then chunked decoding.

    Every DDIM batch holds exactly ``batch_size`` samples and every full-resolution pass exactly ``chunk``
    (zero padding, discarded), so that a sample's result never depends on its batch-mates or their number.

    Args:
        model: the control module (:class:`~vcm.models.vcm.VCM` or :class:`~vcm.models.controlnet.ControlNetControl`);
            ``None`` samples the backbone alone.
        method: ``vcm`` or ``controlnet`` (``vcm.pt`` metadata).
        backbone: the frozen :class:`~vcm.models.backbone.Backbone`.
        grid: the image grid.
        ddim_steps: DDIM steps.
        batch_size: every batch is padded to this many samples.
        chunk: samples per full-resolution pass (condition encoder, decoder).
        n_semantic: semantic classes (one-hot channels).
        device: where to sample; bf16 autocast on CUDA only.
    """

    def __init__(
        self,
        model: nn.Module | None,
        method: str,
        backbone: nn.Module,
        grid: Sequence[int],
        ddim_steps: int,
        batch_size: int,
        chunk: int = 1,
        n_semantic: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval() if model is not None else None
        self.method = method
        self.backbone = backbone.to(self.device).eval()
        self.grid = tuple(int(s) for s in grid)
        self.ddim_steps = int(ddim_steps)
        self.batch_size = int(batch_size)
        self.chunk = int(chunk)
        self.n_semantic = n_semantic
        groups = getattr(model, "groups", ()) if model is not None else ()
        self.names: tuple[str, ...] = tuple(n for g in groups for n, _ in g)
        factor = backbone.downsample_factor
        self.latent_shape = (backbone.latent_channels, *(s // factor for s in self.grid))

    @property
    def autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _pad(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.batch_size
        n = x.shape[0]
        return x if n == size else torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])

    def condition_batch(self, conditions: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Network inputs (float, one-hot semantics; on CPU) of the samples' stored condition volumes."""
        out = {}
        for name in self.names:
            x = torch.from_numpy(np.stack([np.asarray(c[name]) for c in conditions])[:, None])
            out[name] = condition_tensor(name, x, self.n_semantic)
        return out

    def features(self, cond: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """VCM's time-free features of the samples, ``chunk`` samples per encoder pass."""
        n = next(iter(cond.values())).shape[0]
        parts = []
        for start in range(0, n, self.chunk):
            part = {
                k: self._pad(v[start : start + self.chunk], self.chunk).to(self.device)
                for k, v in cond.items()
            }
            parts.append(self.model.encode(part)[: min(self.chunk, n - start)])
        return torch.cat(parts)

    @torch.no_grad()
    def latents(
        self,
        conditions: Sequence[Mapping[str, np.ndarray]],
        covariates: np.ndarray,
        seeds: Sequence[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Denoised diffusion latents of up to ``batch_size`` samples.

        Args:
            conditions: per sample, name -> condition volume (stored dtype, no channel axis).
            covariates: (n, 4) scaled covariates.
            seeds: per sample, the initial-noise seed.
            progress: called as ``progress(step, total)`` after every DDIM step.
        """
        n = len(seeds)
        if not 0 < n <= self.batch_size or len(conditions) != n or len(covariates) != n:
            raise ValueError(f"expected 1..{self.batch_size} samples with conditions, covariates and seeds")
        noise = self._pad(noise_from_seeds(seeds, self.latent_shape)).to(self.device)
        cov = self._pad(torch.as_tensor(np.asarray(covariates, np.float32)).reshape(n, 1, -1)).to(self.device)
        scheduler = ddim_scheduler(self.ddim_steps)

        def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.backbone.eps(z, t, cov)

        with self.autocast:
            if self.model is None:  # the backbone alone
                return ddim_sample(eps_fn, noise, scheduler, progress=progress)[:n]
            cond = self.condition_batch(conditions)
            if self.method == "vcm":
                # padding rows get zero features: their results are discarded, so they need no encoder pass
                feats = _Features(self.model, self._pad(self.features(cond)))
                return ddim_sample(eps_fn, noise, scheduler, feats, {}, progress=progress)[:n]
            cn_cond = self._pad(self.model.condition_input(cond)).to(self.device)
            return ddim_sample(
                lambda z, t: self.model(self.backbone, z, t, cov, cn_cond),
                noise,
                scheduler,
                progress=progress,
            )[:n]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Images (n, *grid) in [0, 1], float32, decoded ``chunk`` samples at a time."""
        with self.autocast:
            x = in_chunks(lambda part: self.backbone.decode(part).float().clamp(0, 1), z, self.chunk)
        return x[:, 0].cpu().numpy().astype(np.float32)

    def sample(
        self,
        conditions: Sequence[Mapping[str, np.ndarray]],
        covariates: np.ndarray,
        seeds: Sequence[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Images of up to ``batch_size`` samples: :meth:`latents` then :meth:`decode`."""
        return self.decode(self.latents(conditions, covariates, seeds, progress))


# --- one shard ---------------------------------------------------------------------------------------------


def _signature(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON; read back as NaN
    return x


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _complete(folder: Path, signature: str, names: Sequence[str]) -> dict[str, Any] | None:
    """The subject's record when its folder is complete and made with these settings, else ``None``."""
    path = folder / SUBJECT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = ["image", "label", "seg", *names]
    if record.get("signature") != signature or not all((folder / f"{f}.nii.gz").is_file() for f in files):
        return None
    return record


@dataclass
class _Attempt:
    attempt: int
    seed: int
    qc: QCResult
    image: np.ndarray
    seg: np.ndarray

    def rank(self) -> tuple[int, float]:
        dice = self.qc.metrics.get("dice", 0.0)
        return (self.qc.n_failed, -(dice if math.isfinite(dice) else -1.0))


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def generate_shard(
    cfg: Mapping[str, Any],
    dataset: str | Path,
    model_path: str | Path,
    bundle: str | Path,
    condset: str,
    shard: int,
    out_dir: str | Path,
    template_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    segmenter: Segmenter | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    segmenter_path: str | Path | None = None,
) -> Path | None:
    """Make (or finish) one shard of a condition set's cohort; write ``shard.h5`` last.

    Args:
        cfg: the validated config.
        dataset: ``dataset.h5``.
        model_path: the trained ``vcm.pt`` of the condition set.
        bundle: the backbone bundle the model was trained on.
        condset: the condition set (must be the model's).
        shard: shard number ``K``.
        out_dir: the shard folder.
        template_dir: the template, for the ``atlas`` QC backend.
        device: default CUDA when available.
        segmenter: replaces the configured QC backend (tests).
        stop_after: stop, without ``shard.h5`` (as a killed job would), at the first batch boundary after this
            many subjects were finished in this call; rerun to finish.
        progress: tqdm bar.
        segmenter_path: the trained QC segmenter (``segmenter.pt``), for the ``segmenter`` QC backend.

    Returns:
        ``shard.h5``, or ``None`` when stopped early.
    """
    from vcm.config import dump_config
    from vcm.latents import bundle_sha256
    from vcm.models.backbone import load_bundle

    start = time.perf_counter()
    settings = CohortSettings.from_config(cfg)
    qc_settings = QCSettings.from_config(cfg)
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    out_dir = Path(out_dir)
    indices = shard_range(int(shard), settings.size, settings.shard_size)
    model, meta = load_model(model_path, device)
    if meta.get("condition_set") not in (None, condset):
        raise StageError(
            f"{model_path} was trained for condition set '{meta['condition_set']}', not '{condset}'"
        )
    bundle_sha = bundle_sha256(bundle)
    if meta.get("backbone_sha256") and meta["backbone_sha256"] != bundle_sha:
        raise StageError(f"{model_path} was trained on another backbone bundle than {bundle}")
    model_sha = sha256_file(model_path)
    backbone = load_bundle(bundle, scale_factor=meta.get("scale_factor"), device=device)
    data = DatasetSource(dataset, cfg)
    try:
        names = data.names
        wanted = [n for g in meta["condition_groups"] for n, _ in g]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise StageError(
                f"{dataset}: no condition {missing[0]!r} for the model (have: {', '.join(names)})"
            )
        if any(s % backbone.downsample_factor for s in data.grid):
            raise StageError(
                f"grid {data.grid} is not divisible by the backbone's factor {backbone.downsample_factor}"
            )
        train_split = f"train_{meta['training_size']}" if "training_size" in meta else None
        if train_split is None or f"splits/{train_split}" not in data.h5:
            raise StageError(f"{model_path}: no training size recorded, or {dataset} lacks its split")
        sources = data.source_indices(settings.sources, train_split)
        grid = Grid.from_affine(data.grid, data.affine)
        seg_fn = segmenter or make_segmenter(cfg, qc_settings, template_dir, grid, segmenter_path)
        ranges = reference_ranges(dataset, data.split(train_split), qc_settings.intensity_percentiles)
        uses_skull = "skull" in wanted
        with h5py.File(dataset, "r") as h5:
            dataset_id = {"config_sha256": str(h5.attrs.get("config_sha256", "")), "subjects": data.subjects}
        signature = _signature(
            {
                "format": FORMAT_VERSION,
                "cohort": settings.signature_parts(),
                "qc": asdict(qc_settings),
                "segmentation": cfg.get("segmentation"),
                "conditions": cfg.get("conditions"),
                "model": model_sha,
                "bundle": bundle_sha,
                "qc_segmenter": sha256_file(segmenter_path) if segmenter_path else None,
                "dataset": dataset_id,
                "condset": condset,
            }
        )
        sampler = CohortSampler(
            model,
            meta["method"],
            backbone,
            data.grid,
            settings.ddim_steps,
            settings.batch_size,
            settings.decode_chunk,
            data.n_semantic,
            device,
        )
        # an older shard.h5 would make this folder look complete while it is being (re)made
        (out_dir / SHARD_FILE).unlink(missing_ok=True)
        todo = [i for i in indices if _complete(out_dir / subject_id(i), signature, names) is None]
        if len(todo) < len(indices):
            logger.info(
                "%s: %d of %d subjects already complete", out_dir, len(indices) - len(todo), len(indices)
            )
        bar = tqdm(
            total=len(indices),
            initial=len(indices) - len(todo),
            desc=f"shard {int(shard):05d}",
            unit="subject",
            disable=not progress,
        )
        pending: deque[tuple[int, int]] = deque((i, 0) for i in todo)
        plans: dict[int, SubjectPlan] = {}
        tries: dict[int, list[_Attempt]] = {}  # touched only by check(), one batch at a time
        finished = 0
        sample_s = 0.0
        samples = 0

        def check(i: int, a: int, seed: int, image: np.ndarray) -> tuple[int, int] | None:
            """QC one sampled subject; write it when it is finished, else return its retry (a QC thread)."""
            plan = plans[i]
            folder = out_dir / plan.subject
            work = folder / f".attempt{a}.nii.gz"  # the file the segmentation backend reads
            save_nifti(work, image, data.affine, np.float32)
            try:
                seg = seg_fn(image, work) if procs is None else procs.submit(seg_fn, image, work).result()
                seg = np.asarray(seg, dtype=np.uint16)
            finally:
                work.unlink(missing_ok=True)
            result = evaluate(
                image,
                seg,
                plan.conditions["lv"] > 0 if "lv" in plan.conditions else mask_of(plan.label, data.lv_labels),
                plan.conditions["semantics"] if "semantics" in plan.conditions else semantic_map(plan.label),
                qc_settings,
                data.spacing,
                ranges,
                plan.conditions["skull"].astype(np.float32) if uses_skull else None,
                data.lv_labels,
            )
            attempts = tries.setdefault(i, [])  # one subject is never checked twice at once
            attempts.append(_Attempt(a, seed, result, image, seg))
            logger.info(
                "%s attempt %d of %d: %s",
                plan.subject,
                a + 1,
                qc_settings.max_tries,
                f"passed (LV Dice {result.metrics['dice']:.3f})"
                if result.passed
                else "failed: " + "; ".join(result.reasons),
            )
            if result.passed or a + 1 >= qc_settings.max_tries:
                _finish(folder, plan, tries.pop(i), signature, data, device)
                return None
            return (i, a + 1)

        def settle(batch: list[tuple[int, int]], outcomes: list[tuple[int, int] | None]) -> None:
            """Book a checked batch: retries go first, so a subject finishes before new ones start."""
            nonlocal finished
            for (i, _), retry in zip(batch, outcomes, strict=True):
                if retry is None:
                    del plans[i]
                    finished += 1
                    bar.update(1)
            pending.extendleft(reversed([r for r in outcomes if r is not None]))

        def stopping() -> bool:
            return stop_after is not None and finished >= stop_after

        # QC (segmentation, metrics: CPU) and file writing of batch k run on `qc_workers` threads, one subject
        # each, while batch k + 1 samples. Only the order of batches changes: a sample depends on its own seed
        # alone, so the files do not.
        pool = (
            ThreadPoolExecutor(settings.qc_workers, thread_name_prefix="qc") if settings.qc_workers else None
        )
        # antspyx keeps the GIL while it registers (measured: a QC thread then overlapped nothing), so a
        # segmenter that pickles (the atlas backend) runs in as many worker processes; the threads wait on them
        procs = (
            ProcessPoolExecutor(settings.qc_workers, mp_context=multiprocessing.get_context("spawn"))
            if pool is not None and _picklable(seg_fn)
            else None
        )
        inflight: tuple[list[tuple[int, int]], list[Future]] | None = None
        try:
            while pending or inflight is not None:
                if inflight is None and stopping():
                    bar.close()
                    return None
                batch = [pending.popleft() for _ in range(min(settings.batch_size, len(pending)))]
                if batch:
                    for i, _ in batch:
                        if i not in plans:  # conditions and label map, written once per subject
                            plan = plans[i] = plan_subject(i, settings, data, sources)
                            folder = out_dir / plan.subject
                            for stale in folder.glob(".*"):  # temp files of a killed run
                                stale.unlink()
                            save_nifti(folder / "label.nii.gz", plan.label, data.affine, np.uint16)
                            for name, x in plan.conditions.items():
                                save_nifti(
                                    folder / f"{name}.nii.gz",
                                    x,
                                    data.affine,
                                    np.uint8 if x.dtype == np.uint8 else np.float32,
                                )
                    t0 = time.perf_counter()
                    seeds = [noise_seed(settings.seed, i, a) for i, a in batch]
                    images = sampler.sample(
                        [plans[i].conditions for i, _ in batch],
                        np.stack([plans[i].covariates for i, _ in batch]),
                        seeds,
                    )
                    sample_s += time.perf_counter() - t0
                    samples += len(batch)
                if inflight is not None:
                    settle(inflight[0], [f.result() for f in inflight[1]])
                    inflight = None
                    if stopping():
                        bar.close()  # the batch just sampled is dropped, as by a killed job
                        return None
                if batch:
                    jobs = list(zip(batch, seeds, images, strict=True))
                    if pool is None:
                        settle(batch, [check(i, a, seed, image) for (i, a), seed, image in jobs])
                    else:
                        inflight = (
                            batch,
                            [pool.submit(check, i, a, seed, image) for (i, a), seed, image in jobs],
                        )
        finally:
            for executor in (pool, procs):
                if executor is not None:
                    executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
        shard_path = _write_shard(
            out_dir,
            indices,
            names,
            data,
            signature,
            provenance(
                dump_config(dict(cfg)),
                model=str(model_path),
                model_sha256=model_sha,
                bundle_sha256=bundle_sha,
                dataset=str(dataset),
                condition_set=condset,
                shard=f"{int(shard):05d}",
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                seconds=round(time.perf_counter() - start, 2),
                sampling_seconds_per_sample=round(sample_s / samples, 3) if samples else "",
            ),
            ranges,
            qc_settings,
        )
    finally:
        data.close()
    return shard_path


def _finish(
    folder: Path,
    plan: SubjectPlan,
    attempts: list[_Attempt],
    signature: str,
    data: DatasetSource,
    device: torch.device,
) -> None:
    """Write the kept attempt's image and segmentation, then ``subject.json`` (the completion mark)."""
    passed = [t for t in attempts if t.qc.passed]
    kept = passed[0] if passed else min(attempts, key=_Attempt.rank)
    save_nifti(folder / "image.nii.gz", kept.image, data.affine, np.float32)
    save_nifti(folder / "seg.nii.gz", kept.seg, data.affine, np.uint16)
    record = {
        "format": FORMAT_VERSION,
        "subject": plan.subject,
        "index": plan.index,
        "source_subject": plan.source_subject,
        "source_index": plan.source_index,
        "new_anatomy": plan.new_anatomy,
        "seed": kept.seed,
        "attempt": kept.attempt,
        "attempts": len(attempts),
        "passed": kept.qc.passed,
        "covariates": plan.covariates.tolist(),
        "covariates_raw": plan.covariates_raw.tolist(),
        "qc": kept.qc.metrics,
        "tries": [
            {
                "attempt": t.attempt,
                "seed": t.seed,
                "passed": t.qc.passed,
                "kept": t is kept,
                "reasons": "; ".join(t.qc.reasons),
                **t.qc.metrics,
            }
            for t in attempts
        ],
        "device": device.type,
        "signature": signature,
    }
    write_json(folder / SUBJECT_FILE, _json_safe(record))


def _h5_kwargs(shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"track_times": False}  # no timestamps: identical content, identical datasets
    if len(shape) > 1 and np.dtype(dtype).kind != "O":
        kw.update(chunks=(1, *shape[1:]), compression="gzip", compression_opts=4, shuffle=True)
    return kw


def _write_shard(
    out_dir: Path,
    indices: range,
    names: Sequence[str],
    data: DatasetSource,
    signature: str,
    attrs: Mapping[str, str],
    ranges: Mapping[str, np.ndarray],
    qc_settings: QCSettings,
) -> Path:
    """``shard.h5`` from the complete subject folders (atomically)."""

    records = [json.loads((out_dir / subject_id(i) / SUBJECT_FILE).read_text()) for i in indices]
    n, grid = len(records), data.grid
    metrics = sorted({k for r in records for k in r["qc"]})
    tries = [t for r in records for t in r["tries"]]
    try_keys = sorted({k for t in tries for k in t} - {"attempt", "seed", "passed", "kept", "reasons"})
    path = out_dir / SHARD_FILE
    strings = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:

        def put(key: str, value: Any, dtype: Any = None) -> None:
            value = np.asarray(value, dtype=dtype)
            h5.create_dataset(
                key,
                data=value,
                dtype=strings if value.dtype.kind in "OU" else value.dtype,
                **_h5_kwargs(value.shape, value.dtype),
            )

        def volume(key: str, shape: Sequence[int], dtype: Any) -> h5py.Dataset:
            return h5.create_dataset(key, (n, *shape), dtype=dtype, **_h5_kwargs((n, *shape), dtype))

        put("subjects", np.array([r["subject"] for r in records], dtype=object))
        put("index", [r["index"] for r in records], np.int64)
        image = volume("image", (1, *grid), data.image_dtype)
        label = volume("label", grid, np.uint16)
        seg = volume("seg", grid, np.uint16)
        conds = {name: volume(f"cond/{name}", (1, *grid), data.dtype(name)) for name in names}
        for k, r in enumerate(records):
            folder = out_dir / r["subject"]
            image[k, 0] = load_nifti(folder / "image.nii.gz")[0].astype(data.image_dtype)
            label[k] = load_nifti(folder / "label.nii.gz", np.uint16)[0]
            seg[k] = load_nifti(folder / "seg.nii.gz", np.uint16)[0]
            for name, ds in conds.items():
                ds[k, 0] = load_nifti(folder / f"{name}.nii.gz", np.float32)[0].astype(ds.dtype)
        if "semantics" in conds:
            conds["semantics"].attrs["classes"] = data.h5["cond/semantics"].attrs.get("classes", [])
        put("covariates", [r["covariates"] for r in records], np.float32)
        put("covariates_raw", [r["covariates_raw"] for r in records], np.float64)
        h5["covariates"].attrs["order"] = ["sex", "age", "lv_volume", "brain_volume"]
        put("seed", [r["seed"] for r in records], np.int64)
        put("source_subject", np.array([r["source_subject"] for r in records], dtype=object))
        put("source_index", [r["source_index"] for r in records], np.int64)
        put("new_anatomy", [r["new_anatomy"] for r in records], bool)
        for m in metrics:  # per-structure medians apart: /qc holds the checks' metrics
            key = f"intensity/{m.removeprefix('median_')}" if m.startswith("median_") else f"qc/{m}"
            put(key, [_nan(r["qc"].get(m)) for r in records], np.float64)
        put("qc/passed", [r["passed"] for r in records], bool)
        put("qc/attempts", [r["attempts"] for r in records], np.int64)
        put("attempts/index", [r["index"] for r in records for _ in r["tries"]], np.int64)
        put("attempts/attempt", [t["attempt"] for t in tries], np.int64)
        put("attempts/seed", [t["seed"] for t in tries], np.int64)
        put("attempts/passed", [t["passed"] for t in tries], bool)
        put("attempts/kept", [t["kept"] for t in tries], bool)
        put("attempts/reasons", np.array([t["reasons"] for t in tries], dtype=object))
        for m in try_keys:
            put(f"attempts/{m}", [_nan(t.get(m)) for t in tries], np.float64)
        put("qc_reference/low", ranges["low"], np.float64)
        put("qc_reference/high", ranges["high"], np.float64)
        h5["qc_reference"].attrs["classes"] = [str(c) for c in ranges["classes"]]
        h5.attrs["grid_affine"] = data.affine
        h5.attrs["grid_shape"] = list(grid)
        h5.attrs["grid_spacing_mm"] = data.spacing
        h5.attrs["signature"] = signature
        h5.attrs["qc_settings"] = json.dumps(asdict(qc_settings))
        h5.attrs["first_index"] = indices.start
        for key, value in attrs.items():
            h5.attrs[key] = value
    return path


# --- merge -------------------------------------------------------------------------------------------------


def merge_cohort(
    cfg: Mapping[str, Any], shards: Sequence[str | Path], out_dir: str | Path, condset: str | None = None
) -> dict[str, Path]:
    """Concatenate shard files into ``cohort.h5`` and write ``manifest.csv`` and ``qc.csv`` (all atomically).

    Args:
        cfg: the validated config.
        shards: the ``shard.h5`` files (any order; sorted by their first subject).
        out_dir: the cohort folder; the manifest's paths are relative to it.
        condset: the condition set, checked against the shards'.

    Raises:
        StageError: a missing or incomplete shard, shards made with different settings, or subjects missing
            from or repeated in ``0 … cohort.size − 1``.
    """
    import pandas as pd

    from vcm.config import dump_config

    settings = CohortSettings.from_config(cfg)
    out_dir = Path(out_dir)
    opened = []
    for p in shards:
        if not Path(p).is_file():
            raise StageError(f"shard file not found: {p} (run generate-shard first)")
        try:
            opened.append((Path(p), h5py.File(p, "r")))
        except OSError as err:
            raise StageError(f"{p}: not a readable HDF5 file ({str(err).splitlines()[0]})") from None
    try:
        if not opened:
            raise StageError("no shard files given")
        opened.sort(key=lambda ph: int(ph[1].attrs["first_index"]))
        first = opened[0][1]
        for p, h5 in opened:
            for key in ("signature", "model_sha256", "condition_set"):
                if h5.attrs.get(key) != first.attrs.get(key):
                    raise StageError(f"{p}: made with a different {key} than {opened[0][0]}; rerun its shard")
        if condset is not None and first.attrs.get("condition_set") != condset:
            raise StageError(
                f"{opened[0][0]}: shards of condition set {first.attrs.get('condition_set')!r}, not {condset!r}"
            )
        index = np.concatenate([h5["index"][:] for _, h5 in opened])
        expected = np.arange(settings.size)
        if index.shape != expected.shape or not np.array_equal(index, expected):
            raise StageError(
                f"the shards hold subjects {_ranges_text(index)}, expected 0-{settings.size - 1} (cohort.size {settings.size})"
            )
        keys: list[str] = []
        first.visititems(lambda k, o: keys.append(k) if isinstance(o, h5py.Dataset) else None)
        per_subject = [k for k in keys if not k.startswith(("attempts/", "qc_reference/"))]
        n = len(index)
        path = out_dir / COHORT_FILE
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
            for key in keys:
                src = first[key]
                if key.startswith("qc_reference/"):
                    out.create_dataset(key, data=src[:], track_times=False)
                    continue
                total = n if key in per_subject else sum(h5[key].shape[0] for _, h5 in opened)
                shape = (total, *src.shape[1:])
                ds = out.create_dataset(key, shape, dtype=src.dtype, **_h5_kwargs(shape, src.dtype))
                for name, value in src.attrs.items():
                    ds.attrs[name] = value
                at = 0
                for p, h5 in opened:
                    if key not in h5:
                        raise StageError(f"{p}: no /{key} (a shard from another version; rerun it)")
                    part = h5[key]
                    for s in range(
                        0, part.shape[0], 1 if part.ndim > 2 else part.shape[0] or 1
                    ):  # volumes one by one
                        block = part[s : s + (1 if part.ndim > 2 else part.shape[0])]
                        ds[at : at + len(block)] = block
                        at += len(block)
            for name, value in first["qc_reference"].attrs.items():
                out["qc_reference"].attrs[name] = value
            for key in ("grid_affine", "grid_shape", "grid_spacing_mm", "signature", "qc_settings"):
                out.attrs[key] = first.attrs[key]
            shard_info = [
                {
                    k: str(h5.attrs.get(k, ""))
                    for k in (
                        "shard",
                        "host",
                        "device",
                        "seconds",
                        "sampling_seconds_per_sample",
                        "slurm_job_id",
                        "slurm_array_job_id",
                        "slurm_array_task_id",
                        "vcm_git_sha",
                    )
                }
                for _, h5 in opened
            ]
            attrs = provenance(
                dump_config(dict(cfg)),
                model=first.attrs.get("model", ""),
                model_sha256=first.attrs.get("model_sha256", ""),
                bundle_sha256=first.attrs.get("bundle_sha256", ""),
                dataset=first.attrs.get("dataset", ""),
                condition_set=first.attrs.get("condition_set", ""),
                n_subjects=n,
                n_passed=int(np.sum([h5["qc/passed"][:].sum() for _, h5 in opened])),
                shards=json.dumps(shard_info),
            )
            for key, value in attrs.items():
                out.attrs[key] = value
        manifest, qc_table = _tables(opened, out_dir)
        with atomic_path(out_dir / "manifest.csv") as tmp:
            pd.DataFrame(manifest).to_csv(tmp, index=False)
        with atomic_path(out_dir / "qc.csv") as tmp:
            pd.DataFrame(qc_table).to_csv(tmp, index=False)
    finally:
        for _, h5 in opened:
            h5.close()
    return {"cohort": path, "manifest": out_dir / "manifest.csv", "qc": out_dir / "qc.csv"}


def _ranges_text(index: np.ndarray) -> str:
    if index.size == 0:
        return "none"
    return f"{index.min()}-{index.max()} ({index.size} subjects, {len(np.unique(index))} distinct)"


def _tables(opened: Sequence[tuple[Path, h5py.File]], out_dir: Path) -> tuple[list[dict], list[dict]]:
    """Rows of ``manifest.csv`` (one per subject) and ``qc.csv`` (one per QC attempt)."""
    manifest, qc_rows = [], []
    for p, h5 in opened:
        folder = p.parent
        subjects = [s.decode() if isinstance(s, bytes) else str(s) for s in h5["subjects"][:]]
        metrics = sorted(k for k in h5["qc"] if k not in ("passed", "attempts"))
        intensity = list(h5["intensity"]) if "intensity" in h5 else []
        names = sorted(h5["cond"])
        for k, sid in enumerate(subjects):
            sdir = folder / sid

            def rel(name: str, sdir: Path = sdir) -> str:
                return os.path.relpath(sdir / f"{name}.nii.gz", out_dir)

            cov, raw = h5["covariates"][k], h5["covariates_raw"][k]
            row: dict[str, Any] = {
                "subject": sid,
                "index": int(h5["index"][k]),
                "image": rel("image"),
                "t1": rel("image"),  # with age and sex: a valid vcm input manifest
                "age": float(raw[1]) if np.isfinite(raw[1]) else None,
                "sex": ("M" if cov[0] >= 0.5 else "F"),
                "label": rel("label"),
                "resegmentation": rel("seg"),
                **{f"cond_{n}": rel(n) for n in names},
                "source_subject": h5["source_subject"].asstr()[k],
                "new_anatomy": bool(h5["new_anatomy"][k]),
                "seed": int(h5["seed"][k]),
                "attempts": int(h5["qc/attempts"][k]),
                "passed": bool(h5["qc/passed"][k]),
                **{
                    f"cov_{n}": float(v)
                    for n, v in zip(("sex", "age", "lv_volume", "brain_volume"), cov, strict=True)
                },
                "lv_volume_mm3": float(raw[2]),
                "brain_volume_mm3": float(raw[3]),
                **{m: float(h5[f"qc/{m}"][k]) for m in metrics},
                **{f"median_{c}": float(h5[f"intensity/{c}"][k]) for c in intensity},
                "shard": str(h5.attrs.get("shard", folder.name)),
            }
            manifest.append(row)
        a = h5["attempts"]
        fields = sorted(k for k in a if k not in ("index", "attempt", "seed", "passed", "kept", "reasons"))
        for j in range(a["index"].shape[0]):
            qc_rows.append(
                {
                    "subject": subject_id(int(a["index"][j])),
                    "index": int(a["index"][j]),
                    "attempt": int(a["attempt"][j]) + 1,
                    "seed": int(a["seed"][j]),
                    "passed": bool(a["passed"][j]),
                    "kept": bool(a["kept"][j]),
                    **{m: float(a[m][j]) for m in fields},
                    "reasons": a["reasons"].asstr()[j],
                }
            )
    return manifest, qc_rows


# --- command line ------------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    """``python -m vcm generate-shard``: one shard of synthetic subjects with QC."""
    from vcm.config import load_config

    parser = argparse.ArgumentParser(prog="python -m vcm generate-shard", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--model", required=True, help="the condition set's vcm.pt")
    parser.add_argument("--bundle", required=True, help="backbone bundle folder")
    parser.add_argument("--condition-set", required=True)
    parser.add_argument("--shard", required=True, help="shard number or id (00003)")
    parser.add_argument("--template-dir", default=None, help="template (atlas QC backend)")
    parser.add_argument("--segmenter", default=None, help="segmenter.pt (segmenter QC backend)")
    parser.add_argument("--out-dir", required=True, help="the shard folder")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N subjects (no shard.h5)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shard = int(args.shard)
    except ValueError:
        raise StageError(f"--shard: expected a shard number, got {args.shard!r}") from None
    cfg = load_config(args.config)
    if args.condition_set not in cfg["condition_sets"]:
        raise StageError(
            f"unknown condition set '{args.condition_set}' (config 'condition_sets': {', '.join(cfg['condition_sets'])})"
        )
    path = generate_shard(
        cfg,
        args.dataset,
        args.model,
        args.bundle,
        args.condition_set,
        shard,
        args.out_dir,
        template_dir=args.template_dir,
        device=args.device,
        stop_after=args.stop_after,
        segmenter_path=args.segmenter,
    )
    if path is None:
        print(f"{args.out_dir}: stopped early; rerun to finish the shard")
        return 0
    with h5py.File(path, "r") as h5:
        passed, attempts = h5["qc/passed"][:], h5["qc/attempts"][:]
        dice = h5["qc/dice"][:]
        print(
            f"{path}: {len(passed)} subjects, {int(passed.sum())} passed QC ({int(attempts.sum())} samples drawn), "
            f"LV Dice median {np.nanmedian(dice):.3f}, {h5.attrs.get('sampling_seconds_per_sample', '?')} s sampling per sample"
        )
    return 0


def merge_cli(argv: list[str]) -> int:
    """``python -m vcm merge-cohort``: shards -> ``cohort.h5``, ``manifest.csv``, ``qc.csv``."""
    from vcm.config import load_config

    parser = argparse.ArgumentParser(
        prog="python -m vcm merge-cohort", description=merge_cohort.__doc__.splitlines()[0]
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--condition-set", default=None)
    parser.add_argument("--shards", nargs="+", required=True, help="shard.h5 files")
    parser.add_argument("--out-dir", required=True, help="the cohort folder")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    out = merge_cohort(cfg, args.shards, args.out_dir, args.condition_set)
    with h5py.File(out["cohort"], "r") as h5:
        n, passed = len(h5["subjects"]), int(h5["qc/passed"][:].sum())
        print(
            f"{out['cohort']}: {n} subjects from {len(args.shards)} shards, {passed} passed QC ({n - passed} flagged)"
        )
    return 0
