"""The command lines of the cohort's two stages: ``generate-shard`` (one shard) and ``merge-cohort``.

Thin shells over :func:`vcm.cohort.shard.generate_shard` and :func:`vcm.cohort.store.merge_cohort`: parse,
call the engine, print one line read back from the file written.
"""

from __future__ import annotations

import vcm.cohort
from vcm.cohort.shard import generate_shard
from vcm.cohort.store import merge_cohort, read_qc_summary
from vcm.errors import StageError
from vcm.stage import configure_runtime, stage_parser

__all__ = ["cli", "merge_cli"]


def cli(argv: list[str]) -> int:
    """``python -m vcm generate-shard``: one shard of synthetic subjects with QC."""
    from vcm.config import load_config

    parser = stage_parser("generate-shard", vcm.cohort.__doc__, threads=True, device=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--model", required=True, help="the condition set's vcm.pt")
    parser.add_argument("--bundle", required=True, help="backbone bundle folder")
    parser.add_argument("--condition-set", required=True)
    parser.add_argument("--shard", required=True, help="shard number or id (00003)")
    parser.add_argument("--template-dir", default=None, help="template (atlas QC backend)")
    parser.add_argument("--segmenter", default=None, help="segmenter.pt (segmenter QC backend)")
    parser.add_argument("--out-dir", required=True, help="the shard folder")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N subjects (no shard.h5)")
    args = parser.parse_args(argv)
    device = configure_runtime(args)
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
        device=device,
        stop_after=args.stop_after,
        segmenter_path=args.segmenter,
    )
    if path is None:
        print(f"{args.out_dir}: stopped early; rerun to finish the shard")
        return 0
    s = read_qc_summary(path)
    print(
        f"{path}: {s['subjects']} subjects, {s['passed']} passed QC ({s['samples']} samples drawn), "
        f"LV Dice median {s['dice_median']:.3f}, {s['sampling_seconds_per_sample']} s sampling per sample"
    )
    return 0


def merge_cli(argv: list[str]) -> int:
    """``python -m vcm merge-cohort``: shards -> ``cohort.h5``, ``manifest.csv``, ``qc.csv``."""
    from vcm.config import load_config

    parser = stage_parser("merge-cohort", merge_cohort.__doc__)
    parser.add_argument("--condition-set", default=None)
    parser.add_argument("--shards", nargs="+", required=True, help="shard.h5 files")
    parser.add_argument("--out-dir", required=True, help="the cohort folder")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    out = merge_cohort(cfg, args.shards, args.out_dir, args.condition_set)
    s = read_qc_summary(out["cohort"])
    n, passed = s["subjects"], s["passed"]
    print(
        f"{out['cohort']}: {n} subjects from {len(args.shards)} shards, {passed} passed QC ({n - passed} flagged)"
    )
    return 0
