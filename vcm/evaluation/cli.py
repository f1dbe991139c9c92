"""The evaluation's command lines: ``python -m vcm evaluate`` (one model's table) and ``python -m vcm
eval-tables`` (the gathered tables); each parses, calls its engine and prints."""

from __future__ import annotations

from pathlib import Path

from vcm.errors import StageError
from vcm.stage import configure_runtime, stage_parser

__all__ = ["cli", "tables_cli"]


def cli(argv: list[str]) -> int:
    """``python -m vcm evaluate``: the paper's table for one trained model."""
    import vcm.evaluation
    from vcm.config import load_config
    from vcm.diffusion import SAMPLERS
    from vcm.evaluation.run import evaluate_model
    from vcm.evaluation.settings import EvalSettings
    from vcm.evaluation.tables import display_table, markdown_table

    parser = stage_parser("evaluate", vcm.evaluation.__doc__, threads=True, device=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--model", required=True, help="vcm.pt")
    parser.add_argument("--bundle", required=True, help="backbone bundle folder")
    parser.add_argument("--template-dir", default=None, help="template (atlas segmentation of the images)")
    parser.add_argument("--segmenter", default=None, help="segmenter.pt (segmenter backend)")
    parser.add_argument("--out", required=True, help="results/eval/<method>/<set>_n<size>.csv")
    parser.add_argument("--subjects", type=int, default=None, help="first N validation subjects")
    parser.add_argument(
        "--sampler", choices=SAMPLERS, default=None, help="default evaluation.sampler / cohort.sampler"
    )
    parser.add_argument("--steps", type=int, default=None, help="default evaluation.steps / cohort.steps")
    parser.add_argument("--medicalnet-weights", default=None, help="local MedicalNet checkpoint (FID 3D)")
    args = parser.parse_args(argv)
    device = configure_runtime(args)
    cfg = load_config(args.config)
    settings = EvalSettings.from_config(
        cfg,
        subjects=args.subjects,
        sampler=args.sampler,
        steps=args.steps,
        medicalnet_weights=args.medicalnet_weights,
    )
    if settings.medicalnet_weights is None:
        print(
            "FID 3D: skipped (evaluation.medicalnet_weights not set; MedicalNet weights are never downloaded)"
        )
    table = evaluate_model(
        cfg,
        args.dataset,
        args.model,
        args.bundle,
        args.out,
        args.template_dir,
        settings,
        device,
        segmenter_path=args.segmenter,
    )
    print(markdown_table(display_table([table])), end="")
    print(f"{args.out}: {int(table['n'].iloc[0])} validation subjects at {settings.sampler}-{settings.steps}")
    return 0


def tables_cli(argv: list[str]) -> int:
    """``python -m vcm eval-tables``: gather evaluation and TSTR tables into table.md / table.html / tstr.csv."""
    from vcm.evaluation.tables import write_tables

    parser = stage_parser("eval-tables", tables_cli.__doc__, config=False)
    parser.add_argument("--eval", nargs="*", default=[], help="per-model evaluation CSVs")
    parser.add_argument("--tstr", nargs="*", default=[], help="per-cohort TSTR CSVs")
    parser.add_argument("--md", required=True, help="results/eval/table.md")
    parser.add_argument("--html", default=None, help="results/eval/table.html (for the report)")
    parser.add_argument("--tstr-out", default=None, help="results/eval/tstr.csv")
    args = parser.parse_args(argv)
    for path in [*args.eval, *args.tstr]:
        if not Path(path).is_file():
            raise StageError(f"file not found: {path}")
    print(write_tables(args.eval, args.tstr, args.md, args.html, args.tstr_out), end="")
    return 0
