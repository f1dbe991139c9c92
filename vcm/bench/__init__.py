"""Benchmarks (not tests): ``python -m vcm.bench <name>`` prints figures measured in one run.

* ``dag``: how long ``snakemake -n`` takes to build the DAG for a large manifest (default 1 000 subjects),
  with the input-check checkpoint already done, so the whole per-subject DAG is listed.
* ``register``: seconds per subject of the register stage on the demo grid and at 1 mm.
* ``sample``: seconds per synthetic volume of three samplers on the same inputs, in one process: the naive
  loop (batch 1, VCM's condition encoder at every step, fp32), the production sampler of ``generate-shard``
  (batched, encoder features once per sample, bf16 on CUDA) and the backbone alone (the floor: same steps,
  same batching, no VCM); their ratios, peak memory and how far the naive and production images differ.
  ``--scale demo`` (default) uses the shipped tiny backbone on the demo grid; ``--scale brainldm`` builds
  BrainLDM's networks (the model-zoo bundle's definitions) and the paper's VCM with random weights on the
  160×224×160 grid, for a GPU.
* ``train``: seconds and peak memory of one VCM training step (eq. 4, AdamW, bf16 autocast on CUDA) per batch
  size, at either scale, with or without activation checkpointing of the full-resolution encoders.
* ``labels``: the LV Dice ceilings of :mod:`vcm.label_fidelity` (QC segmenter on real and autoencoder images;
  the atlas backend).
* ``steps``: label fidelity against sampling steps on a finished run's trained model: for DDIM and DPM-Solver++
  2M at 10 … 200 steps, the LV Dice of the QC segmenter on the samples, their SSIM to the DDIM-200 image from
  the same noise and the seconds per volume; the fewest steps per sampler within 0.01 LV Dice of DDIM-200
  (the rule for ``cohort.sampler`` / ``cohort.steps``). CSV, PNG plot and JSON.
* ``cohort``: QC-passed labelled subjects per hour of ``generate-shard`` on a finished run, before
  (DDIM-200) and after (the config's ``cohort.sampler`` / ``cohort.steps``) or any ``SAMPLER:STEPS``, in one
  process: the same subjects made by the stage's engine per variant; wall seconds per subject split into
  setup, planning, sampling, decode, QC and writing (the engine's ``step_seconds``), attempts per subject, QC
  pass rate, the ratio of subjects per hour to the first variant's. CSV and JSON.

``bench/gpu.sh`` runs the BrainLDM-scale benchmarks in one go on a GPU machine.

The package: one module per benchmark family (:mod:`~vcm.bench.dag`, :mod:`~vcm.bench.registration`,
:mod:`~vcm.bench.sampling`, :mod:`~vcm.bench.train_step`, :mod:`~vcm.bench.labels`, :mod:`~vcm.bench.steps`,
:mod:`~vcm.bench.cohort`), each with its ``bench_*`` function, its sub-command's options (``add_parser``) and
its printout (``run``); the random networks that ``sample`` and ``train`` time in :mod:`~vcm.bench.networks`;
a finished run's inputs, timing, peak memory and writing a result in :mod:`~vcm.bench.common`; the dispatch
in :mod:`~vcm.bench.__main__`.
"""

from __future__ import annotations

__all__: list[str] = []
