"""The ``labels`` benchmark: LV Dice ceilings of the QC segmenter (real and autoencoder images) and of the
atlas backend, measured by :mod:`vcm.label_fidelity`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vcm.bench.common import REPO, write_result

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``labels`` sub-command and its options."""
    lab = sub.add_parser(
        "labels", help="LV Dice ceilings: QC segmenter on real and autoencoder images; atlas"
    )
    lab.add_argument("--dataset", type=Path, default=REPO / "results" / "dataset.h5")
    lab.add_argument("--bundle", type=Path, default=REPO / "resources" / "backbone" / "demo")
    lab.add_argument(
        "--segmenter", type=Path, default=REPO / "results" / "models" / "qc_segmenter" / "segmenter.pt"
    )
    lab.add_argument("--prep-dir", type=Path, default=REPO / "results" / "prep")
    lab.add_argument("--template-dir", type=Path, default=REPO / "results" / "template")
    lab.add_argument(
        "--atlas-subjects", type=int, default=8, help="validation subjects for the atlas (0: skip)"
    )
    lab.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "bench_labels.json")
    return lab


def run(args: argparse.Namespace) -> None:
    """Measure the ceilings of the parsed ``args``, print one line each and write the JSON."""
    from vcm.label_fidelity import atlas_dice, autoencoder_ceiling

    r = autoencoder_ceiling(args.dataset, args.bundle, args.segmenter)
    if args.atlas_subjects:
        r.update(atlas_dice(args.dataset, args.prep_dir, args.template_dir, args.atlas_subjects))
    for key, name in (
        ("real", "QC segmenter on the real images"),
        ("reconstruction", "QC segmenter on the autoencoder's reconstructions (the control ceiling)"),
        ("atlas_lv_dice", "atlas backend on the real images"),
    ):
        if key in r:
            v = r[key]
            print(
                f"LV Dice, {name}: {v['mean']:.3f} [95% CI {v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}], n = {v['n']}"
            )
    write_result(args.out, r)
