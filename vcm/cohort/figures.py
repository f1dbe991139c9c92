"""The cohort's figures (``python -m vcm cohort-figures``), per synthetic cohort.

``cohort_montage.png`` (3-plane views of a few synthetic subjects with their label map overlaid and the LV
condition outlined), ``qc_hist.png`` (histograms of every QC metric, passed and failed subjects apart, with
the pass rate) and ``privacy_hist.png`` (each synthetic subject's similarity to its nearest real training
subject beside the real-to-real baseline, :mod:`vcm.privacy`), and for ``cohort.design``
(:mod:`vcm.cohort.design`) ``design.png`` (per covariate the targets' histogram beside the label maps' and the
re-segmented images' values, with two-sample Kolmogorov-Smirnov statistics, ``scipy.stats.ks_2samp``),
``design.json`` (those statistics) and ``design_montage.png`` (subjects from the smallest to the largest LV);
the statistics behind them feed the summary (:mod:`vcm.report`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vcm.cohort.store import open_cohort, read_privacy
from vcm.errors import StageError
from vcm.stage import stage_parser

__all__ = [
    "cohort_montage",
    "cohort_stats",
    "design_histograms",
    "design_stats",
    "figures_cli",
    "privacy_histogram",
    "privacy_stats",
    "qc_histograms",
    "qc_thresholds",
]

SEMANTIC_COLOURS = [  # background transparent, then the 8 classes of vcm.labels.SEMANTIC_CLASSES
    (0, 0, 0, 0),
    (0.35, 0.6, 1.0, 1),  # csf
    (0.95, 0.95, 0.8, 1),  # white matter
    (0.9, 0.5, 0.3, 1),  # grey matter
    (0.1, 0.3, 1.0, 1),  # ventricles
    (0.8, 0.2, 0.8, 1),  # deep grey matter
    (1.0, 0.8, 0.1, 1),  # amygdala
    (0.2, 0.8, 0.3, 1),  # hippocampus
    (0.6, 0.4, 0.2, 1),  # brain-stem
]


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _qc_passed(h5: h5py.File) -> np.ndarray:
    n = len(h5["subjects"])
    return np.asarray(h5["qc/passed"][:], dtype=bool) if "qc/passed" in h5 else np.ones(n, bool)


def cohort_montage(
    cohort: str | Path,
    out: str | Path,
    n_subjects: int = 6,
    lv_labels: Sequence[int] = (4, 43),
    by_lv: bool = False,
) -> list[str]:
    """3-plane views (axial, coronal, sagittal through the LV's centre) of the first ``n_subjects`` QC-passed
    synthetic subjects (failed ones fill in, marked, when too few passed): the bare image with the LV condition
    outlined in red (so the eye judges whether the ventricles sit under it), then the same views with the label
    map as translucent semantic classes. With ``by_lv``: subjects at evenly spaced
    ranks of the label map's LV volume, shown from the smallest to the largest.

    Returns:
        the subjects shown.
    """
    from vcm.labels import mask_of, semantic_map
    from vcm.plots import Panel, image_grid, mask_centre, planes

    with open_cohort(cohort) as h5:
        passed = _qc_passed(h5)
        order = [*np.flatnonzero(passed), *np.flatnonzero(~passed)][:n_subjects]
        if not order:
            raise StageError(f"{cohort}: no subjects to show")
        rows = sorted(int(i) for i in order)  # h5py reads increasing indices
        if by_lv:
            lv = np.asarray(h5["covariates_raw"][:, 2], float)
            ranked = np.argsort(lv, kind="stable")
            picks = np.unique(np.round(np.linspace(0, len(lv) - 1, min(n_subjects, len(lv)))).astype(int))
            rows = sorted(int(ranked[p]) for p in picks)
        subjects = _strings(h5["subjects"][rows])
        images = np.asarray(h5["image"][rows][:, 0], dtype=np.float32)
        labels = np.asarray(h5["label"][rows])
        source = _strings(h5["source_subject"][rows]) if "source_subject" in h5 else [""] * len(rows)
        new = np.asarray(h5["new_anatomy"][rows], bool) if "new_anatomy" in h5 else np.zeros(len(rows), bool)
        dice = np.asarray(h5["qc/dice"][rows], float) if "qc/dice" in h5 else np.full(len(rows), np.nan)
        ok = passed[rows]
        volumes = np.asarray(h5["covariates_raw"][rows, 2], float) if by_lv else None
    grid = []
    for r in np.argsort(volumes, kind="stable") if by_lv else range(len(rows)):
        lv = mask_of(labels[r], tuple(lv_labels))
        centre = mask_centre(lv)
        # the LVs lie either side of the midline: the sagittal plane goes through the first one, not between
        first = np.nonzero(labels[r] == lv_labels[0])[0]
        if first.size:
            centre[0] = int(round(first.mean()))
        title = f"{subjects[r]}  from {source[r] or '?'}{' (new anatomy)' if new[r] else ''}"
        if volumes is not None:
            title += f"  LV {volumes[r] / 1000:.0f} mL"
        if np.isfinite(dice[r]):
            title += f"  QC Dice {dice[r]:.2f}"
        if not ok[r]:
            title += "  QC FAILED"
        views = list(
            zip(
                planes(images[r], centre),
                planes(semantic_map(labels[r]), centre),
                planes(lv.astype(float), centre),
                strict=True,
            )
        )
        colour = "k" if ok[r] else "r"
        # the bare image under the LV condition's outline first (what the module drew), then the label map
        grid.append(  # the title over the first coronal view
            [
                Panel(img, title if c == 1 else "", None, mask, colour)
                for c, (img, _, mask) in enumerate(views)
            ]
            + [Panel(img, "", sem, mask, colour) for img, sem, mask in views]
        )
    image_grid(
        out,
        grid,
        figsize=(14.4, 2.5 * len(rows)),
        title=f"{Path(cohort).parent.name}: synthetic subjects"
        + (" by LV volume" if by_lv else "")
        + ": the image with the LV condition in red, then its labels overlaid",
        label_colours=SEMANTIC_COLOURS,
        panel_title_size=8,
        dpi=80,
    )
    return subjects


def qc_histograms(
    cohort: str | Path, out: str | Path, thresholds: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Histograms of every numeric ``/qc/<metric>`` of a cohort, passed and failed subjects stacked, with the
    configured thresholds drawn (e.g. ``{"dice": qc.dice_min}``).

    Returns:
        the cohort's QC statistics (:func:`cohort_stats`).
    """
    from vcm.plots import pass_fail_histograms

    stats = cohort_stats(cohort)
    with open_cohort(cohort) as h5:
        passed = _qc_passed(h5)
        metrics = {}
        if "qc" in h5:
            for name, ds in h5["qc"].items():
                if name == "passed" or not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
                    continue
                if ds.dtype.kind in "fiu" and len(ds) == len(passed):
                    metrics[name] = np.asarray(ds[:], dtype=float)
    title = (
        f"{Path(cohort).parent.name}: QC of {stats['n']} subjects, {stats['passed']} passed "
        f"({100 * stats['pass_rate']:.0f} %)"
    )
    pass_fail_histograms(
        out,
        metrics,
        passed,
        title,
        thresholds,
        integer=("attempts",),
        empty_note="no QC metrics in the cohort",
    )
    return stats


def cohort_stats(cohort: str | Path) -> dict[str, Any]:
    """Size, QC pass rate, attempts, share of new anatomies and mean QC metrics of a cohort."""
    with open_cohort(cohort) as h5:
        passed = _qc_passed(h5)
        n = len(passed)
        out: dict[str, Any] = {
            "n": n,
            "passed": int(passed.sum()),
            "pass_rate": float(passed.mean()) if n else float("nan"),
            "grid": list(h5["image"].shape[2:]),
        }
        if "qc/attempts" in h5:
            attempts = np.asarray(h5["qc/attempts"][:], float)
            out["attempts_mean"], out["attempts_max"] = float(attempts.mean()), int(attempts.max())
        if "new_anatomy" in h5:
            out["new_anatomy"] = int(np.asarray(h5["new_anatomy"][:], bool).sum())
        for name in ("dice", "hd95", "assd", "skull_dist"):
            if f"qc/{name}" in h5:
                values = np.asarray(h5[f"qc/{name}"][:], float)
                out[f"{name}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out


def privacy_stats(cohort: str | Path) -> dict[str, Any] | None:
    """The privacy screen of a cohort in numbers (``None`` when it was off): the synthetic subjects' nearest-real
    similarity (median, max), how many were flagged, the real-to-real baseline (median, max), the threshold."""
    screen = read_privacy(cohort)
    if screen is None:
        return None
    sim, base = screen["similarity"], screen["baseline"]

    def stat(fn: Any, v: np.ndarray) -> float:
        return float(fn(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")

    return {
        "n": len(sim),
        "median": stat(np.median, sim),
        "max": stat(np.max, sim),
        "flagged": int(np.sum(screen["possible_copy"])),
        "baseline_n": len(base),
        "baseline_median": stat(np.median, base),
        "baseline_max": stat(np.max, base),
        "max_similarity": screen["max_similarity"],
    }


def privacy_histogram(cohort: str | Path, out: str | Path) -> dict[str, Any] | None:
    """The synthetic subjects' nearest-real similarities beside the real-to-real baseline (a note when the
    screen was off).

    Returns:
        :func:`privacy_stats`.
    """
    from vcm.plots import similarity_histogram

    screen = read_privacy(cohort)
    stats = privacy_stats(cohort)
    title = f"{Path(cohort).parent.name}: privacy screen"
    if screen is None or stats is None:
        similarity_histogram(out, None, None, None, title)
        return None
    title += f", {stats['flagged']} of {stats['n']} possible copies"
    similarity_histogram(out, screen["similarity"], screen["baseline"], screen["max_similarity"], title)
    return stats


def design_stats(cohort: str | Path) -> dict[str, dict[str, Any]]:
    """Target vs achieved per covariate of a cohort (``{}`` for a cohort made before ``cohort.design``).

    Returns:
        per covariate ``designed`` (has a target of its own), ``target``, ``label`` (the label map's values,
        given to the backbone) and, for the volumes, ``image`` (the re-segmented image's) arrays; the median
        ratio to the target and the two-sample KS statistic (``scipy.stats.ks_2samp``) of each against the
        targets (``ks_label``, ``ks_image``, ``median_ratio_label``, ``median_ratio_image``).
    """
    from scipy.stats import ks_2samp

    from vcm.cohort.design import COVARIATES

    out: dict[str, dict[str, Any]] = {}
    with open_cohort(cohort) as h5:
        if "design" not in h5:
            return out
        raw = np.asarray(h5["covariates_raw"][:], float)
        for k, name in enumerate(COVARIATES):
            target = np.asarray(h5[f"design/target_{name}"][:], float)
            entry: dict[str, Any] = {
                "designed": bool(np.any(h5[f"design/designed_{name}"][:])),
                "target": target,
                "label": raw[:, k],
            }
            short = name.removesuffix("_volume")
            if f"qc/image_{short}_volume" in h5:
                entry["image"] = np.asarray(h5[f"qc/image_{short}_volume"][:], float)
            for kind in ("label", "image"):
                if kind in entry:
                    ok = np.isfinite(entry[kind]) & np.isfinite(target)
                    entry[f"ks_{kind}"] = (
                        float(ks_2samp(target[ok], entry[kind][ok]).statistic) if ok.any() else float("nan")
                    )
                    nonzero = ok & (target != 0)  # sex: 0 = female, no ratio
                    ratio = entry[kind][nonzero] / target[nonzero]
                    entry[f"median_ratio_{kind}"] = float(np.median(ratio)) if ratio.size else float("nan")
            out[name] = entry
    return out


def design_histograms(cohort: str | Path, out: str | Path) -> dict[str, dict[str, float]]:
    """``design.png``: per covariate the targets beside the label maps' and the re-segmented images' values,
    each panel titled with its KS statistics.

    Returns:
        per covariate the numbers of :func:`design_stats` (no arrays): what ``design.json`` holds.
    """
    from vcm.plots import target_histograms, text_figure

    stats = design_stats(cohort)
    if not stats:
        text_figure(out, f"{Path(cohort).parent.name}: no cohort.design records")
        return {}
    units = {"age": 1.0, "sex": 1.0, "lv_volume": 1000.0, "brain_volume": 1000.0}
    panels = []
    for name, s in stats.items():
        u = units[name]
        sets = {"target": s["target"] / u, "label map": s["label"] / u}
        if "image" in s:
            sets["re-segmented image"] = s["image"] / u
        ks = ", ".join(f"KS {kind} {s[f'ks_{kind}']:.2f}" for kind in ("label", "image") if f"ks_{kind}" in s)
        unit = " (mL)" if u > 1 else ""
        panels.append((f"{name}{unit}{'' if s['designed'] else ' [source]'}\n{ks}", sets))
    target_histograms(out, panels, f"{Path(cohort).parent.name}: cohort.design, target vs achieved")
    return {
        name: {
            k: (bool(v) if k == "designed" else float(v))
            for k, v in s.items()
            if not isinstance(v, np.ndarray)
        }
        for name, s in stats.items()
    }


def qc_thresholds(qc: Mapping[str, Any]) -> dict[str, float]:
    """The QC thresholds that are set, by metric: ``dice_min`` -> ``dice``, ``hd95_max_mm`` -> ``hd95``, ..."""
    out = {}
    for key, value in qc.items():
        for suffix in ("_min_mm", "_max_mm", "_min", "_max"):
            if key.endswith(suffix) and isinstance(value, int | float) and not isinstance(value, bool):
                out[key.removesuffix(suffix)] = float(value)
                break
    return out


def figures_cli(argv: list[str]) -> int:
    """``python -m vcm cohort-figures``: the montage and the QC histograms of one cohort."""
    from vcm.config import load_config

    parser = stage_parser("cohort-figures", figures_cli.__doc__)
    parser.add_argument("--cohort", required=True, help="cohort.h5")
    parser.add_argument("--montage", required=True, help="cohort_montage.png")
    parser.add_argument("--qc-hist", required=True, help="qc_hist.png")
    parser.add_argument("--privacy-hist", default=None, help="privacy_hist.png (the privacy screen)")
    parser.add_argument("--subjects", type=int, default=6, help="subjects in the montage")
    parser.add_argument("--design", default=None, help="design.png (cohort.design: target vs achieved)")
    parser.add_argument("--design-json", default=None, help="design.json (its KS statistics)")
    parser.add_argument("--design-montage", default=None, help="design_montage.png (sorted by LV volume)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    lv_labels = cfg["conditions"]["lv_labels"]
    thresholds = qc_thresholds(cfg["qc"])
    shown = cohort_montage(args.cohort, args.montage, args.subjects, lv_labels)
    stats = qc_histograms(args.cohort, args.qc_hist, thresholds)
    if args.privacy_hist is not None:
        screen = privacy_histogram(args.cohort, args.privacy_hist)
        print(f"{args.privacy_hist}: " + (f"{screen['flagged']} possible copies" if screen else "screen off"))
    if args.design is not None:
        design = design_histograms(args.cohort, args.design)
        if args.design_json is not None:
            from vcm.io import write_json

            write_json(args.design_json, design)
        ks = ", ".join(f"{k} KS {v['ks_label']:.2f}" for k, v in design.items() if v["designed"])
        print(f"{args.design}: {ks or 'no design targets'}")
    if args.design_montage is not None:
        cohort_montage(args.cohort, args.design_montage, args.subjects, lv_labels, by_lv=True)
    print(
        f"{args.montage}: {len(shown)} subjects; {args.qc_hist}: {stats['passed']} / {stats['n']} passed QC "
        f"({100 * stats['pass_rate']:.0f} %)"
    )
    return 0
