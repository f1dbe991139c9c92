"""Mass production of labelled synthetic subjects with QC: one shard per job, then one merged cohort.

``generate-shard`` makes the synthetic subjects ``K·shard_size … min((K+1)·shard_size, size) − 1`` of a
condition set's cohort. For each subject (global index ``i``):

1. **Condition source** (depends on ``(cohort.seed, i)`` only): a real subject of ``cohort.sources`` (by
   default the model's training split), visited in seeded balanced rounds (every source once before any
   twice); with probability ``cohort.new_anatomy_fraction`` a **new anatomy**: the source's label map warped
   by a random smooth deformation (nearest label), its skull and low-resolution images warped linearly, and
   the LV / brain / semantic conditions re-derived from the warped labels (:mod:`vcm.labels`). Covariates
   are the source's; a new anatomy's LV and brain volumes are scaled by the warped / original voxel counts.
   With a ``cohort.design`` (:mod:`vcm.cohort.design`) the subject's targets are drawn from its own stream and
   the label map is **steered** to the LV / brain targets (:mod:`vcm.cohort.steer`: a ventricle push and a
   head scale), its conditions re-derived; the covariates are then the design's age and sex and the steered
   label map's volumes.
2. **Sampling** with the trained control module on the frozen backbone: ``cohort.sampler`` (DDIM or
   DPM-Solver++ 2M) at ``cohort.steps`` steps, batched (``cohort.batch_size``), VCM's time-free condition features computed once per sample, bf16 autocast on
   CUDA only, the full-resolution passes (condition encoder, decoder) in chunks of ``cohort.decode_chunk``
   samples so that a 24 GB GPU suffices at the BrainLDM grid. The initial noise of attempt ``a`` comes from
   a seed derived from ``(cohort.seed, i, a)`` only.
3. **QC** (:mod:`vcm.qc`): re-segmentation, LV Dice/HD95/ASSD, skull-dist, per-structure intensities; then
   the privacy screen (:mod:`vcm.privacy`): a sample whose brain correlates with a real training subject's
   above ``qc.privacy.max_similarity`` is a possible copy and fails like a QC failure. A failing sample is regenerated from the next attempt's seed, up to ``qc.max_tries`` samples; a subject
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

The modules, one concept each:

* :mod:`vcm.cohort.plan`: the settings, which subjects a shard holds, the seeds (no heavy imports: the
  Snakefile asks it for the shard ids).
* :mod:`vcm.cohort.design`: ``cohort.design``, the covariate targets drawn per subject.
* :mod:`vcm.cohort.sources`: the real subject that lends a synthetic one its conditions, or the new anatomy
  warped from it, steered to its design targets.
* :mod:`vcm.cohort.steer`: a label map deformed to an LV and brain volume.
* :mod:`vcm.cohort.sampler`: batched sampling and chunked decoding.
* :mod:`vcm.cohort.subjects`: a subject folder's files (NIfTIs and ``subject.json``, the completion mark).
* :mod:`vcm.cohort.store`: the HDF5 files (``shard.h5``, ``cohort.h5``) and the tables next to them; every
  other module reads them through it.
* :mod:`vcm.cohort.shard`: ``generate_shard``, the loop of sampling, QC and retries.
* :mod:`vcm.cohort.cli`: the ``generate-shard`` and ``merge-cohort`` command lines.
"""

from __future__ import annotations

__all__: list[str] = []
