"""The ``cohort`` benchmark: QC-passed labelled subjects per hour of ``generate-shard`` per sampler and steps.

Each variant makes the same first ``--subjects`` synthetic subjects of one condition set with
:func:`vcm.cohort.shard.generate_shard`, the engine of the ``generate_shard`` stage, into a temporary folder:
the finished run's config with ``cohort.sampler`` and ``cohort.steps`` set to the variant's and the cohort cut
to one shard of exactly these subjects (in memory; same seeds, same QC, same privacy screen). All variants
run in one process after a warm-up per sampler (one subject, one step) that takes the one-off costs. Variants:

* ``before``: DDIM at 200 steps, the paper's sampler and the old default;
* ``after``: the config's own ``cohort.sampler`` / ``cohort.steps``;
* ``SAMPLER:STEPS``, e.g. ``dpmpp_2m:20``.

Per variant: the wall seconds of the call and per subject; the engine's own split per subject (``shard.h5``'s
``step_seconds``, :data:`vcm.cohort.shard.STEPS`: setup, planning, sampling, decode, QC, writing; summed over
threads: with ``cohort.qc_workers`` > 0, QC and writing run beside sampling and the parts can add up to more
than the wall time; writing ``shard.h5`` itself is in the wall time only); attempts per subject; the QC pass
rate (subjects that passed within ``qc.max_tries``); the median LV Dice of the kept samples; labelled
subjects (passed QC or flagged) and QC-passed subjects per hour of this machine (subjects or passed / wall
seconds × 3600) and their ratios to the first variant's.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from vcm.bench.common import add_run_arguments, run_inputs, write_result
from vcm.errors import StageError

__all__ = ["BEFORE", "Variant", "add_parser", "bench_cohort", "parse_variants", "run", "variant_config"]


class Variant(NamedTuple):
    """A sampler and step count to make the cohort with, and its name in the table."""

    name: str
    sampler: str
    steps: int


BEFORE = Variant("before", "ddim", 200)
"""The paper's sampler and step count, the default before ``cohort.sampler`` / ``cohort.steps`` existed."""


def parse_variants(text: str, cfg: Mapping[str, Any]) -> list[Variant]:
    """``"before,after,dpmpp_2m:20"`` -> the variants; ``after``: the config's ``cohort.sampler`` / ``steps``.

    Raises:
        StageError: an item is neither ``before``, ``after`` nor ``SAMPLER:STEPS``.
    """
    out = []
    for item in (t.strip() for t in text.split(",")):
        if item == "before":
            out.append(BEFORE)
        elif item == "after":
            out.append(Variant("after", cfg["cohort"]["sampler"], int(cfg["cohort"]["steps"])))
        elif item.count(":") == 1 and item.split(":")[1].isdigit():
            sampler, steps = item.split(":")
            out.append(Variant(f"{sampler}-{steps}", sampler, int(steps)))
        elif item:
            raise StageError(f"--variants: expected before, after or SAMPLER:STEPS, got {item!r}")
    if not out:
        raise StageError("--variants: no variant given")
    return out


def variant_config(cfg: Mapping[str, Any], sampler: str, steps: int, n_subjects: int) -> dict[str, Any]:
    """The config with ``cohort.sampler`` / ``cohort.steps`` set and a cohort of one shard of ``n_subjects``.

    Raises:
        ConfigError: the sampler or step count is not one the schema allows.
    """
    from vcm.config import validate_config

    out = copy.deepcopy(dict(cfg))
    out["cohort"].update(sampler=sampler, steps=int(steps), size=int(n_subjects), shard_size=int(n_subjects))
    return validate_config(out)


def _row(variant: Variant, summary: Mapping[str, Any], wall: float) -> dict[str, Any]:
    """The table's row of one variant from its ``shard.h5`` summary and the wall seconds of the call."""
    from vcm.cohort.shard import STEPS

    n, passed = summary["subjects"], summary["passed"]
    parts = summary["step_seconds"]
    return {
        "variant": variant.name,
        "sampler": variant.sampler,
        "steps": variant.steps,
        "subjects": n,
        "passed": passed,
        "attempts_per_subject": summary["samples"] / n,
        "qc_pass_rate": passed / n,
        "lv_dice_median": summary["dice_median"],
        "wall_s": wall,
        "s_per_subject": wall / n,
        **{f"s_{step}": parts.get(step, math.nan) / n for step in STEPS},
        "subjects_per_hour": n / wall * 3600,
        "passed_per_hour": passed / wall * 3600,
    }


def bench_cohort(
    cfg: Mapping[str, Any],
    results: str | Path,
    bundle: str | Path,
    model_path: str | Path,
    condset: str,
    variants: Sequence[Variant] = (BEFORE,),
    n_subjects: int = 16,
    device: str | None = None,
    work_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Make ``condset``'s first ``n_subjects`` with ``generate_shard`` once per variant; time each run.

    Args:
        cfg: the run's validated config (its QC, privacy screen and cohort settings but sampler, steps, size).
        results: the finished run's results folder (``dataset.h5``, ``models/qc_segmenter/segmenter.pt`` for
            the ``segmenter`` QC backend, ``template/`` for the ``atlas`` one).
        bundle: the backbone bundle the model was trained on.
        model_path: the condition set's trained ``vcm.pt``.
        condset: the condition set (the model's).
        variants: sampler and steps per variant, the first is the ratio's reference.
        n_subjects: subjects per variant.
        device: where to sample (default CUDA when available).
        work_dir: where the temporary shard folders go (default the system's temporary folder).
        progress: called with a line after every variant.

    Returns:
        one row per variant: the counts, rates and seconds described in the module docstring, and
        ``subjects_ratio`` and ``passed_ratio``, its subjects and QC-passed subjects per hour over the first
        variant's (NaN when the first passed none).
    """
    from vcm.cohort.shard import generate_shard
    from vcm.cohort.store import read_qc_summary

    results = Path(results)
    segmenter = results / "models" / "qc_segmenter" / "segmenter.pt"
    kwargs = {
        "template_dir": results / "template",
        "device": device,
        "progress": False,
        "segmenter_path": segmenter if cfg["qc"]["backend"] == "segmenter" else None,
    }
    inputs = (results / "dataset.h5", model_path, bundle, condset, 0)
    if work_dir is not None:  # a folder the user names need not exist yet
        Path(work_dir).mkdir(parents=True, exist_ok=True)

    def make(vcfg: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The shard's QC summary and the wall seconds of the engine's call."""
        with tempfile.TemporaryDirectory(prefix="vcm-bench-cohort-", dir=work_dir) as tmp:
            start = time.perf_counter()
            path = generate_shard(vcfg, *inputs, Path(tmp) / "shard", **kwargs)
            wall = time.perf_counter() - start
            return read_qc_summary(path), wall

    # warm-up, one subject and step per sampler: one-off costs (imports, first kernels) are no variant's
    for sampler in dict.fromkeys(v.sampler for v in variants):
        make(variant_config(cfg, sampler, 1, 1))
    rows = []
    for v in variants:
        summary, wall = make(variant_config(cfg, v.sampler, v.steps, n_subjects))
        rows.append(_row(v, summary, wall))
        if progress is not None:
            r = rows[-1]
            progress(
                f"{v.name} ({v.sampler}-{v.steps}): {r['passed']}/{r['subjects']} passed QC in {wall:.1f} s, "
                f"{r['subjects_per_hour']:.1f} subjects ({r['passed_per_hour']:.1f} passed) per hour"
            )
    table = pd.DataFrame(rows)
    for what in ("subjects", "passed"):
        first = table[f"{what}_per_hour"].iloc[0]
        table[f"{what}_ratio"] = table[f"{what}_per_hour"] / first if first > 0 else math.nan
    return table


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``cohort`` sub-command and its options."""
    p = sub.add_parser("cohort", help="QC-passed synthetic subjects per hour of generate-shard, per sampler")
    add_run_arguments(p)
    p.add_argument(
        "--condition-set",
        default=None,
        help="default the model's folder: models/<method>/<set>/n<size>/vcm.pt",
    )
    p.add_argument("--variants", default="before,after", help="comma-separated: before, after, SAMPLER:STEPS")
    p.add_argument("--subjects", type=int, default=16, help="synthetic subjects per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--work-dir", type=Path, default=None, help="temporary shard folders (default: system's)")
    p.add_argument(
        "--out", type=Path, default=None, help="CSV (default <results>/benchmarks/bench_cohort.csv)"
    )
    return p


def run(args: argparse.Namespace) -> None:
    """Run the benchmark of the parsed ``args``; print the table; write CSV and JSON."""
    import json
    import os

    import torch

    from vcm.evaluation.tables import markdown_table
    from vcm.io import atomic_path

    torch.set_num_threads(args.threads)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))  # as the stage's rule
    cfg, bundle, model = run_inputs(args)
    condset = args.condition_set or model.parent.parent.name
    variants = parse_variants(args.variants, cfg)
    table = bench_cohort(
        cfg, args.results, bundle, model, condset, variants, args.subjects, args.device, args.work_dir, print
    )
    out = args.out or args.results / "benchmarks" / "bench_cohort.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    print(markdown_table(table.round(3)), end="")
    info = {
        "model": str(model),
        "bundle": str(bundle),
        "condition_set": condset,
        "subjects": args.subjects,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "cohort": {k: cfg["cohort"][k] for k in ("batch_size", "decode_chunk", "qc_workers", "seed")},
        "qc": {k: cfg["qc"][k] for k in ("backend", "max_tries", "dice_min")},
        "rows": json.loads(table.to_json(orient="records")),  # NaN as null: strict JSON
    }
    write_result(out.with_suffix(".json"), info)
    print(f"written: {out}")
