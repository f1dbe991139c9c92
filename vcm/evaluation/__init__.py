"""Evaluation of a trained control module on the validation subjects (paper §4, Tab. 1 and 2).

For every validation subject of ``dataset.h5`` the model generates one image from its conditions
(*controlled*: VCM or ControlNet on the frozen backbone) and the backbone generates one from the same initial
noise and the same covariates without any control (*uncontrolled*, the paper's "BrainLDM" row). Both are
scored against the subject:

* **alignment** (paper: DSC, HD95, ASSD): the condition's LV mask against the LV of the synthetic image's
  segmentation (the cohort QC's backend unless ``evaluation.segmentation`` says otherwise: ``atlas``, the
  offline default, or ``synthseg``), with MONAI's
  :class:`~monai.metrics.DiceMetric`, :class:`~monai.metrics.HausdorffDistanceMetric` (95th percentile) and
  :class:`~monai.metrics.SurfaceDistanceMetric` (symmetric, i.e. ASSD), distances in mm. A segmentation
  without any LV has no surface: its HD95/ASSD are left out of the mean and counted in ``n_empty``;
* **skull-dist** (paper, sets with a skull condition): MSE between the real skull image (``/cond/skull``)
  and the synthetic image inside the skull image's support (the cohort QC's definition);
* **SSIM and MS-SSIM** (MONAI :class:`~monai.metrics.SSIMMetric`, :class:`~monai.metrics.MultiScaleSSIMMetric`)
  of the synthetic image against the subject's real image, data range 1. Small grids constrain the window:
  every MS-SSIM scale halves the grid and the window must still fit the coarsest one. The defaults are a
  Gaussian window of 7 voxels (σ 1.5) and as many of the standard 5 scales as keep the coarsest scale at least
  7 voxels wide (and satisfy MONAI's own size check): on the demo's 40×56×40 grid that is **3 scales**
  (40 → 20 → 10 voxels), at BrainLDM's 160×224×160 all 5 (… → 10). With fewer than 5 scales the standard
  weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) are truncated and renormalised. The window (28 mm at 4 mm
  voxels, 7 mm at 1 mm) is in voxels, so values are comparable only between runs on the same grid;
* **FID 3D** (paper, with MedicalNet features): only when ``evaluation.medicalnet_weights`` names a local
  MedicalNet checkpoint (e.g. ``resnet_10_23dataset.pth`` / ``resnet_50_23dataset.pth`` from the MedicalNet
  release or MONAI's Hugging Face mirror ``TencentMedicalNet/MedicalNet-Resnet10``). vcm never downloads it
  (the compute nodes it is written for have no internet): fetch it on a connected machine and give its path.
  Without the key the column stays empty and the stage says so in one line; a key naming a missing or
  unreadable file stops the stage at once, before any sampling. Features: the global average pool of MONAI's
  3-D ResNet (the network MONAI loads MedicalNet weights into), depth inferred from the checkpoint, on each
  image z-scored over its non-zero voxels. FID of the synthetic set against the real validation images
  (:func:`vcm.evaluation.fid.fid_3d`, exact for few samples and many features); with a few dozen subjects it is dominated by the
  covariance estimate; the paper (appendix C) warns that it
  misleads on medical images anyway: read the anatomical metrics first.

Outputs (``--out results/eval/<method>/<set>_n<size>.csv``): the table (per method, mean and sample sd of each
metric over the subjects, FID 3D as one value; the model's trainable ``parameters``, and its
``training_steps`` and ``seconds_per_step`` from its ``loss.csv``), ``<stem>_subjects.csv`` (every subject and method) and
``<stem>.json`` (settings, scales, notes). ``python -m vcm eval-tables`` gathers the per-model tables into
``results/eval/table.md`` and ``table.html`` (per set and size the backbone once, every method and each
method's paired difference from it) and the TSTR tables into ``results/eval/tstr.csv``.

Cost on the demo (4 validation subjects, one thread of a busy 2-core machine): 3.5-4.5 min per model at
DDIM-50, most of it in the 8 atlas registrations (controlled and uncontrolled per subject); the uncontrolled
half is the same for every model (same noise, covariates and backbone) but is recomputed per model job.

The package, one concept a module (import the modules directly; this package imports nothing):

* :mod:`vcm.evaluation.settings`: :class:`~vcm.evaluation.settings.EvalSettings`, the ``evaluation`` section;
* :mod:`vcm.evaluation.segmenters`: the re-segmentation backends that QC, evaluation, previews and the
  mask-edit check share;
* :mod:`vcm.evaluation.metrics`: alignment, skull-dist, SSIM and MS-SSIM of one image;
* :mod:`vcm.evaluation.fid`: MedicalNet features and FID 3D;
* :mod:`vcm.evaluation.run`: the engine, :func:`~vcm.evaluation.run.evaluate_model` (sample, score, write);
* :mod:`vcm.evaluation.tables`: the summary with bootstrap intervals and the paired-difference row, and the
  gathered tables;
* :mod:`vcm.evaluation.cli`: the stages ``evaluate`` and ``eval-tables``.
"""

from __future__ import annotations

__all__: list[str] = []
