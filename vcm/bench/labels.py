"""The ``labels`` benchmark: LV Dice ceilings of the QC segmenter (real and autoencoder images) and of the
atlas backend, measured by :mod:`vcm.label_fidelity`.

Besides the means it counts the images that reach QC's Dice threshold: a control module that reproduced each
validation subject's reconstruction exactly would pass that share of first attempts, so it bounds the cohort's
QC pass rate through this backbone and segmenter. ``--against`` scores a second bundle (a retrained backbone)
on the same subjects and states the paired difference of the reconstructions' Dice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

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
    lab.add_argument("--dice-min", type=float, default=0.7, help="QC's LV Dice threshold (qc.dice_min)")
    lab.add_argument(
        "--volume-tolerance",
        type=float,
        default=0.15,
        help="QC's LV-volume tolerance (qc.target_tolerance), here against the true volume",
    )
    lab.add_argument(
        "--against", type=Path, default=None, help="a second bundle, paired on the same subjects"
    )
    lab.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "bench_labels.json")
    return lab


def reaching(summary: dict, dice_min: float, tolerance: float) -> dict:
    """``summary`` (a :mod:`vcm.label_fidelity` summary) with how many of its images reach ``dice_min``, how many
    have a segmented LV volume within ``tolerance`` of the true one, and how many pass both."""
    dice = np.asarray(summary["values"], dtype=float) >= dice_min
    volume = np.abs(np.asarray(summary["volume_ratios"], dtype=float) - 1) <= tolerance
    return {
        **summary,
        "dice_min": dice_min,
        "volume_tolerance": tolerance,
        "reaching": int(dice.sum()),
        "volume_within": int(volume.sum()),
        "both": int((dice & volume).sum()),
    }


def _counts(v: dict) -> str:
    return (
        f"{v['reaching']} of {v['n']} at >= {v['dice_min']:g}, {v['volume_within']} with the LV volume within "
        f"{v['volume_tolerance']:.0%} of the truth, {v['both']} both"
    )


def run(args: argparse.Namespace) -> None:
    """Measure the ceilings of the parsed ``args``, print one line each and write the JSON."""
    from vcm.label_fidelity import atlas_dice, autoencoder_ceiling
    from vcm.stats import paired_difference

    r = autoencoder_ceiling(args.dataset, args.bundle, args.segmenter)
    for key in ("real", "reconstruction"):
        r[key] = reaching(r[key], args.dice_min, args.volume_tolerance)
    if args.against is not None:
        other = reaching(
            autoencoder_ceiling(args.dataset, args.against, args.segmenter)["reconstruction"],
            args.dice_min,
            args.volume_tolerance,
        )
        mean, low, high = paired_difference(other["values"], r["reconstruction"]["values"])
        r["against"] = {
            "bundle": str(args.against),
            "reconstruction": other,
            "paired_difference": [mean, low, high],
        }
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
                + (f"; {_counts(v)}" if "reaching" in v else "")
            )
    if "against" in r:
        v, (mean, low, high) = r["against"]["reconstruction"], r["against"]["paired_difference"]
        print(
            f"LV Dice, reconstructions through {args.against}: {v['mean']:.3f} [95% CI {v['ci95'][0]:.3f}, "
            f"{v['ci95'][1]:.3f}]; {_counts(v)}; "
            f"paired difference {mean:+.3f} [{low:+.3f}, {high:+.3f}]"
        )
    write_result(args.out, r)
