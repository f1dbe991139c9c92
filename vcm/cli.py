"""Command line: ``python -m vcm <stage> [options]``.

Every Snakemake rule is a thin shell over one of these stages, and every stage can be run by hand.
Stages are imported lazily so that ``python -m vcm --help`` stays fast and a stage's heavy imports
(torch, ants) are paid only by the stage that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from vcm.errors import StageError

# stage name -> "module:function"; the function takes argv (list[str]) and returns an exit code.
STAGES: dict[str, str] = {
    "demo": "vcm.prep.demo:cli",
    "template": "vcm.prep.template:cli",
    "check-inputs": "vcm.prep.inputs:cli",
    "register": "vcm.prep.registration:cli",
    "segment": "vcm.prep.segmentation:cli",
    "register-segment": "vcm.prep.register_segment:cli",
    "conditions": "vcm.prep.conditions:cli",
    "subject-gates": "vcm.prep.exclusion:cli",
    "dataset": "vcm.dataset:cli",
    "manifest": "vcm.intake.cli:cli",
    "train-backbone": "vcm.backbone_training.cli:cli",
    "train-segmenter": "vcm.train_segmenter:cli",
    "preview": "vcm.training.cli:preview_cli",
    "encode-latents": "vcm.latents:cli",
    "train-vcm": "vcm.training.cli:cli",
    "generate-shard": "vcm.cohort.cli:cli",
    "merge-cohort": "vcm.cohort.cli:merge_cli",
    "evaluate": "vcm.evaluation.cli:cli",
    "eval-tables": "vcm.evaluation.cli:tables_cli",
    "tstr": "vcm.tstr:cli",
    "mask-edit": "vcm.mask_edit:cli",
    "cohort-figures": "vcm.cohort.figures:figures_cli",
    "summary": "vcm.report:cli",
}


# read by NumPy's BLAS (and MKL, OpenMP) once, when it loads
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas_threads(argv: list[str]) -> None:
    """Give NumPy's BLAS a stage's ``--threads``, before the stage imports NumPy (and to the workers it spawns).

    Snakemake sets these variables for its jobs; a stage run by hand must agree with it, because the BLAS sums
    in another order when it loads with another thread count (the privacy screen's similarities moved in the
    7th digit between ``generate-shard`` by hand and by the workflow). Limiting it later does not undo that.
    """
    # only --threads, as the stage's parser spells it; the stage's own parser reads (and reports) the rest
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", default=None)
    threads = parser.parse_known_args(argv)[0].threads
    if threads is not None and threads.isdigit() and int(threads) > 0:
        os.environ.update({name: threads for name in BLAS_THREAD_VARIABLES})


def _usage() -> str:
    names = "\n".join(f"  {name}" for name in STAGES)
    return f"usage: python -m vcm <stage> [options]\n\nstages:\n{names}\n\n'python -m vcm <stage> --help' for a stage's options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from vcm import __version__

        print(__version__)
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"vcm: unknown stage '{stage}'\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_blas_threads(rest)
    module_name, func_name = STAGES[stage].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except StageError as err:
        print(f"vcm {stage}: error: {err}", file=sys.stderr)
        return 1
