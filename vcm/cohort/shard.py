"""One shard of a condition set's synthetic cohort: planned, sampled, checked, retried and written.

:func:`generate_shard` makes the subjects ``K·shard_size … min((K+1)·shard_size, size) − 1`` in named steps:
load the control module and its backbone (:func:`_load_control`), check that the dataset fits them
(:func:`_check_inputs`), sign what a subject depends on (:func:`_signature`), then :class:`_ShardRun` plans
batches of subjects (:func:`~vcm.cohort.sources.plan_subject`), samples them
(:class:`~vcm.cohort.sampler.CohortSampler`), QCs them (:mod:`vcm.qc`) and screens them for copies of the real
training subjects (:mod:`vcm.privacy`) on worker threads while the next batch samples, retries a failing
sample (a possible copy included) from the next attempt's seed — with a redrawn source and anatomy under
``cohort.retry_new_anatomy`` — and writes each finished subject's folder
(:mod:`vcm.cohort.subjects`). ``shard.h5`` comes last (:func:`vcm.cohort.store.write_shard`): a shard folder
without it is incomplete, and a rerun keeps the complete subjects whose signature matches. Its
``step_seconds`` attribute says where the time went (:data:`STEPS`; ``python -m vcm.bench cohort`` reads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import pickle
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vcm.cohort.design import Design
from vcm.cohort.plan import CohortSettings, noise_seed, shard_range, subject_id
from vcm.cohort.sampler import CohortSampler
from vcm.cohort.sources import DatasetSource, SubjectPlan, plan_subject
from vcm.cohort.store import SHARD_FILE, write_shard
from vcm.cohort.subjects import (
    FORMAT_VERSION,
    Attempt,
    attempt_image,
    complete_record,
    write_inputs,
    write_subject,
)
from vcm.errors import StageError
from vcm.evaluation.segmenters import Segmenter, make_segmenter
from vcm.grid import Grid
from vcm.io import provenance, sha256_file
from vcm.labels import mask_of, semantic_map
from vcm.models.build import load_model
from vcm.privacy import PrivacyResult, PrivacySettings, RealSubjects
from vcm.qc import QCResult, QCSettings, evaluate, reference_ranges, volume_check
from vcm.stage import resolve_device

__all__ = ["STEPS", "generate_shard"]

logger = logging.getLogger(__name__)

STEPS = ("setup", "planning", "sampling", "decode", "qc", "writing")
"""The steps whose seconds ``shard.h5`` records (``step_seconds``), summed over threads: setup (models,
dataset, QC backend, reference ranges), planning the subjects (sources, new anatomies), sampling the latents,
decoding them, QC (the attempt's NIfTI, re-segmentation, checks, privacy screen) and writing the subject
files (not ``shard.h5``, written after it is measured). QC and writing run beside sampling when
``cohort.qc_workers`` > 0, so the steps can add up to more than the wall time."""

# (subject index, attempt): one sample to draw
_Job = tuple[int, int]


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
    start = time.perf_counter()
    settings = CohortSettings.from_config(cfg)
    qc_settings = QCSettings.from_config(cfg)
    privacy = PrivacySettings.from_config(cfg)
    device = resolve_device(device)
    out_dir = Path(out_dir)
    indices = shard_range(int(shard), settings.size, settings.shard_size)
    control = _load_control(model_path, bundle, condset, device)
    data = DatasetSource(dataset, cfg)
    try:
        wanted, train_split = _check_inputs(data, control, dataset, model_path)
        design = Design.from_config(cfg)
        grid = Grid.from_affine(data.grid, data.affine)
        screen = _privacy_screen(privacy, dataset, data, train_split)
        run = _ShardRun(
            out_dir,
            data,
            data.source_indices(settings.sources, train_split),
            settings,
            qc_settings,
            seg_fn=segmenter or make_segmenter(cfg, qc_settings, template_dir, grid, segmenter_path),
            ranges=reference_ranges(dataset, data.split(train_split), qc_settings.intensity_percentiles),
            uses_skull="skull" in wanted,
            signature=_signature(
                cfg, settings, qc_settings, privacy, control, segmenter_path, data, condset, design
            ),
            privacy=screen,
            design=design,
            device=device,
            stop_after=stop_after,
        )
        sampler = CohortSampler(
            control.model,
            control.meta["method"],
            control.backbone,
            data.grid,
            settings.sampler,
            settings.steps,
            settings.batch_size,
            settings.decode_chunk,
            data.n_semantic,
            device,
            settings.control_scale,
        )
        run.seconds["setup"] = time.perf_counter() - start
        if not run.run(sampler, indices, f"shard {int(shard):05d}", progress):
            return None
        attrs = _shard_attrs(cfg, control, model_path, dataset, condset, shard, device, start, run)
        baseline = (privacy, screen[1].baseline()) if screen is not None else None
        return write_shard(
            out_dir, indices, data.names, data, run.signature, attrs, run.ranges, qc_settings, baseline
        )
    finally:
        data.close()


# --- inputs ------------------------------------------------------------------------------------------------


@dataclass
class _Control:
    """The trained control module on its frozen backbone, and their checksums."""

    model: nn.Module
    meta: dict[str, Any]
    backbone: nn.Module
    model_sha: str
    bundle_sha: str


def _load_control(model_path: str | Path, bundle: str | Path, condset: str, device: torch.device) -> _Control:
    """Load ``vcm.pt`` and its backbone bundle; check that they belong together and to ``condset``."""
    from vcm.latents import bundle_sha256
    from vcm.models.backbone import load_bundle

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
    return _Control(model, meta, backbone, model_sha, bundle_sha)


def _check_inputs(
    data: DatasetSource, control: _Control, dataset: str | Path, model_path: str | Path
) -> tuple[list[str], str]:
    """The model's condition names and its training split, once the dataset has both and fits the backbone."""
    meta, factor = control.meta, control.backbone.downsample_factor
    wanted = [n for g in meta["condition_groups"] for n, _ in g]
    missing = [n for n in wanted if n not in data.names]
    if missing:
        raise StageError(
            f"{dataset}: no condition {missing[0]!r} for the model (have: {', '.join(data.names)})"
        )
    if any(s % factor for s in data.grid):
        raise StageError(f"grid {data.grid} is not divisible by the backbone's factor {factor}")
    train_split = f"train_{meta['training_size']}" if "training_size" in meta else None
    if train_split is None or not data.has_split(train_split):
        raise StageError(f"{model_path}: no training size recorded, or {dataset} lacks its split")
    return wanted, train_split


def _privacy_screen(
    privacy: PrivacySettings, dataset: str | Path, data: DatasetSource, train_split: str
) -> tuple[PrivacySettings, RealSubjects] | None:
    """The privacy screen's settings and the model's real training subjects (``None`` when it is off)."""
    if not privacy.enabled:
        return None
    split = data.split(train_split)
    return privacy, RealSubjects.from_dataset(dataset, split, privacy.spacing_mm, data.spacing)


def _signature(
    cfg: Mapping[str, Any],
    settings: CohortSettings,
    qc_settings: QCSettings,
    privacy: PrivacySettings,
    control: _Control,
    segmenter_path: str | Path | None,
    data: DatasetSource,
    condset: str,
    design: Design,
) -> str:
    """The hash of everything a subject's files depend on: a complete subject with it is kept by a rerun."""
    parts = {
        "format": FORMAT_VERSION,
        "cohort": settings.signature_parts(),
        "qc": asdict(qc_settings),
        "privacy": asdict(privacy),
        "segmentation": cfg.get("segmentation"),
        "conditions": cfg.get("conditions"),
        "model": control.model_sha,
        "bundle": control.bundle_sha,
        "qc_segmenter": sha256_file(segmenter_path) if segmenter_path else None,
        "dataset": {"config_sha256": data.config_sha256, "subjects": data.subjects},
        "condset": condset,
        "design": design.signature(),  # the CSV targets' contents too
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _shard_attrs(
    cfg: Mapping[str, Any],
    control: _Control,
    model_path: str | Path,
    dataset: str | Path,
    condset: str,
    shard: int,
    device: torch.device,
    start: float,
    run: _ShardRun,
) -> dict[str, str]:
    """Provenance of ``shard.h5``: inputs and their checksums, the device, the time taken (and per step)."""
    from vcm.config import dump_config

    sample_s = run.seconds["sampling"] + run.seconds["decode"]
    return provenance(
        dump_config(dict(cfg)),
        model=str(model_path),
        model_sha256=control.model_sha,
        bundle_sha256=control.bundle_sha,
        dataset=str(dataset),
        condition_set=condset,
        shard=f"{int(shard):05d}",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        seconds=round(time.perf_counter() - start, 2),
        sampling_seconds_per_sample=round(sample_s / run.samples, 3) if run.samples else "",
        step_seconds=json.dumps({k: round(v, 3) for k, v in run.seconds.items()}),
    )


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


# --- the subjects in flight --------------------------------------------------------------------------------


class _ShardRun:
    """The subjects of one shard in flight: their plans, sampled batches, QC attempts and retries.

    QC (segmentation, metrics: CPU) and file writing of batch k run on ``cohort.qc_workers`` threads, one
    subject each, while batch k + 1 samples. Only the order of batches changes: a sample depends on its own
    seed alone, so the files do not. Retries go first, so a subject finishes before new ones start.
    """

    def __init__(
        self,
        out_dir: Path,
        data: DatasetSource,
        sources: np.ndarray,
        settings: CohortSettings,
        qc_settings: QCSettings,
        *,
        seg_fn: Segmenter,
        ranges: Mapping[str, np.ndarray],
        uses_skull: bool,
        signature: str,
        privacy: tuple[PrivacySettings, RealSubjects] | None,
        device: torch.device,
        stop_after: int | None,
        design: Design | None = None,
    ) -> None:
        self.out_dir, self.data, self.sources = out_dir, data, sources
        self.settings, self.qc_settings = settings, qc_settings
        self.seg_fn, self.ranges, self.uses_skull = seg_fn, ranges, uses_skull
        self.signature, self.device, self.stop_after = signature, device, stop_after
        self.privacy, self.design = privacy, design
        # per (subject, plan draw), its label map's Dice with each real one
        self.label_dice: dict[tuple[int, int], np.ndarray] = {}
        self.pending: deque[_Job] = deque()
        self.plans: dict[int, SubjectPlan] = {}  # each subject's current plan
        self.tries: dict[int, list[Attempt]] = {}  # touched only by _check(), one batch at a time
        self.finished = 0
        self.samples = 0
        self.seconds = dict.fromkeys(STEPS, 0.0)  # summed over threads (_timed)
        self._seconds_lock = threading.Lock()
        self.procs: ProcessPoolExecutor | None = None
        self.bar: tqdm | None = None

    def run(self, sampler: CohortSampler, indices: range, desc: str, progress: bool) -> bool:
        """Make the subjects of ``indices`` that are not complete; ``False`` when stopped early."""
        # an older shard.h5 would make this folder look complete while it is being (re)made
        (self.out_dir / SHARD_FILE).unlink(missing_ok=True)
        names = self.data.names
        todo = [
            i for i in indices if complete_record(self.out_dir / subject_id(i), self.signature, names) is None
        ]
        if len(todo) < len(indices):
            logger.info(
                "%s: %d of %d subjects already complete", self.out_dir, len(indices) - len(todo), len(indices)
            )
        self.bar = tqdm(
            total=len(indices),
            initial=len(indices) - len(todo),
            desc=desc,
            unit="subject",
            disable=not progress,
        )
        self.pending.extend((i, 0) for i in todo)
        workers = self.settings.qc_workers
        pool = ThreadPoolExecutor(workers, thread_name_prefix="qc") if workers else None
        # antspyx keeps the GIL while it registers (measured: a QC thread then overlapped nothing), so a
        # segmenter that pickles (the atlas backend) runs in as many worker processes; the threads wait on them
        if pool is not None and _picklable(self.seg_fn):
            self.procs = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._loop(sampler, pool)
        finally:
            for executor in (pool, self.procs):
                if executor is not None:
                    executor.shutdown(wait=True, cancel_futures=True)
            self.bar.close()

    def _loop(self, sampler: CohortSampler, pool: ThreadPoolExecutor | None) -> bool:
        """Sample batch k + 1 while batch k is checked; ``False`` when ``stop_after`` subjects are done."""
        inflight: tuple[list[_Job], list[Future]] | None = None
        while self.pending or inflight is not None:
            if inflight is None and self._stopping():
                return False
            batch = [self.pending.popleft() for _ in range(min(self.settings.batch_size, len(self.pending)))]
            seeds, images = self._sample(sampler, batch) if batch else ([], [])
            if inflight is not None:
                self._settle(inflight[0], [f.result() for f in inflight[1]])
                inflight = None
                if self._stopping():
                    return False  # the batch just sampled is dropped, as by a killed job
            if batch:
                jobs = list(zip(batch, seeds, images, strict=True))
                if pool is None:
                    self._settle(batch, [self._check(i, a, seed, image) for (i, a), seed, image in jobs])
                else:
                    futures = [pool.submit(self._check, i, a, seed, image) for (i, a), seed, image in jobs]
                    inflight = (batch, futures)
        return True

    def _stopping(self) -> bool:
        return self.stop_after is not None and self.finished >= self.stop_after

    @contextlib.contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        """Add the block's wall seconds to ``seconds[step]`` (QC threads add theirs too)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._seconds_lock:
                self.seconds[step] += time.perf_counter() - t0

    def _draw(self, attempt: int) -> int:
        """The plan draw an attempt samples: a new one per retry under ``cohort.retry_new_anatomy``."""
        return attempt if self.settings.retry_new_anatomy else 0

    def _sample(self, sampler: CohortSampler, batch: list[_Job]) -> tuple[list[int], np.ndarray]:
        """Plan the batch's new subjects and redrawn retries (their label map and conditions written), then
        sample it."""
        for i, a in batch:
            draw = self._draw(a)
            if i not in self.plans or self.plans[i].draw != draw:
                with self._timed("planning"):
                    plan = self.plans[i] = plan_subject(
                        i, self.settings, self.data, self.sources, self.design, draw
                    )
                with self._timed("writing"):
                    write_inputs(self.out_dir / plan.subject, plan, self.data.affine)
        seeds = [noise_seed(self.settings.seed, i, a) for i, a in batch]
        with self._timed("sampling"):
            z = sampler.latents(
                [self.plans[i].conditions for i, _ in batch],
                np.stack([self.plans[i].covariates for i, _ in batch]),
                seeds,
            )
            if self.device.type == "cuda":  # the queued steps are sampling's, not the decoder's
                torch.cuda.synchronize(self.device)
        with self._timed("decode"):
            images = sampler.decode(z)
        self.samples += len(batch)
        return seeds, images

    def _check(self, i: int, a: int, seed: int, image: np.ndarray) -> _Job | None:
        """QC one sampled subject; write it when it is finished, else return its retry (a QC thread)."""
        plan = self.plans[i]
        folder = self.out_dir / plan.subject
        with self._timed("qc"), attempt_image(folder, a, image, self.data.affine) as work:
            procs, segment = self.procs, self.seg_fn
            seg = segment(image, work) if procs is None else procs.submit(segment, image, work).result()
            seg = np.asarray(seg, dtype=np.uint16)
            result = self._qc(plan, image, seg)
            screen = self._screen(plan, image)
        if screen is not None and screen.possible_copy:  # fails like any QC check, so it is resampled
            result = QCResult(result.metrics, False, [*result.reasons, screen.reason])
        attempts = self.tries.setdefault(i, [])  # one subject is never checked twice at once
        attempts.append(Attempt(plan, a, seed, result, image, seg, screen))
        logger.info(
            "%s attempt %d of %d (%s): %s",
            plan.subject,
            a + 1,
            self.qc_settings.max_tries,
            f"{'new anatomy of ' if plan.new_anatomy else ''}{plan.source_subject}",
            f"passed (LV Dice {result.metrics['dice']:.3f})"
            if result.passed
            else "failed: " + "; ".join(result.reasons),
        )
        if result.passed or a + 1 >= self.qc_settings.max_tries:
            with self._timed("writing"):
                write_subject(folder, self.tries.pop(i), self.signature, self.data.affine, self.device)
            for draw in range(a + 1):
                self.label_dice.pop((i, draw), None)
            return None
        return (i, a + 1)

    def _qc(self, plan: SubjectPlan, image: np.ndarray, seg: np.ndarray) -> QCResult:
        """The QC of a sample against the conditions it was made from."""
        conds, data = plan.conditions, self.data
        result = evaluate(
            image,
            seg,
            conds["lv"] > 0 if "lv" in conds else mask_of(plan.label, data.lv_labels),
            conds["semantics"] if "semantics" in conds else semantic_map(plan.label),
            self.qc_settings,
            data.spacing,
            self.ranges,
            conds["skull"].astype(np.float32) if self.uses_skull else None,
            data.lv_labels,
        )
        target = plan.targets[2] if plan.targets is not None and plan.designed[2] else None
        volumes, reasons = volume_check(
            seg,
            plan.label,
            plan.covariates_raw[2:4],
            data.lv_labels,
            target,
            self.qc_settings.target_tolerance,
        )
        return QCResult(
            {**result.metrics, **volumes}, result.passed and not reasons, result.reasons + reasons
        )

    def _screen(self, plan: SubjectPlan, image: np.ndarray) -> PrivacyResult | None:
        """The privacy screen of a sample (``None`` when off); its label map's Dice is computed once."""
        if self.privacy is None:
            return None
        settings, reals = self.privacy
        key = (plan.index, plan.draw)
        if key not in self.label_dice:
            self.label_dice[key] = reals.label_dices(plan.label)
        return reals.screen(image, self.label_dice[key], settings.max_similarity)

    def _settle(self, batch: Sequence[_Job], outcomes: Sequence[_Job | None]) -> None:
        """Book a checked batch: retries go first, so a subject finishes before new ones start."""
        for (i, _), retry in zip(batch, outcomes, strict=True):
            if retry is None:
                del self.plans[i]
                self.finished += 1
                self.bar.update(1)
        self.pending.extendleft(reversed([r for r in outcomes if r is not None]))
