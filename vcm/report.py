"""What a person looks at after a run: cohort figures and ``results/summary.md``.

* ``python -m vcm cohort-figures``: per synthetic cohort, ``cohort_montage.png`` (3-plane views of a few
  synthetic subjects with their label map overlaid and the LV condition outlined), ``qc_hist.png``
  (histograms of every QC metric, passed and failed subjects apart, with the pass rate) and
  ``privacy_hist.png`` (each synthetic subject's similarity to its nearest real training subject beside the
  real-to-real baseline, :mod:`vcm.privacy`);
* ``python -m vcm summary``: ``results/summary.md``, the run in one page: dataset size and splits, the
  trained models (steps, final loss, time, loss curve and preview), the evaluation table (controlled vs
  uncontrolled), the TSTR Dice, each cohort's size and QC pass rate, its privacy screen, and links to every
  figure.

``snakemake --report results/report.html`` gathers the same figures and tables into one HTML file (the
rules wrap them in ``report()`` with captions from ``workflow/report/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from vcm.cohort.store import open_cohort, read_privacy
from vcm.dataset_store import DatasetFile
from vcm.errors import StageError

__all__ = [
    "cli",
    "cohort_montage",
    "cohort_stats",
    "figures_cli",
    "privacy_histogram",
    "privacy_stats",
    "qc_histograms",
    "qc_thresholds",
    "write_summary",
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
    cohort: str | Path, out: str | Path, n_subjects: int = 6, lv_labels: Sequence[int] = (4, 43)
) -> list[str]:
    """3-plane views (axial, coronal, sagittal through the LV's centre) of the first ``n_subjects`` QC-passed
    synthetic subjects (failed ones fill in, marked, when too few passed): the image, the label map as
    translucent semantic classes, the LV condition outlined in red.

    Returns:
        the subjects shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from vcm.io import atomic_path
    from vcm.labels import mask_of, semantic_map
    from vcm.plots import _planes

    with open_cohort(cohort) as h5:
        passed = _qc_passed(h5)
        order = [*np.flatnonzero(passed), *np.flatnonzero(~passed)][:n_subjects]
        if not order:
            raise StageError(f"{cohort}: no subjects to show")
        rows = sorted(int(i) for i in order)  # h5py reads increasing indices
        subjects = _strings(h5["subjects"][rows])
        images = np.asarray(h5["image"][rows][:, 0], dtype=np.float32)
        labels = np.asarray(h5["label"][rows])
        source = _strings(h5["source_subject"][rows]) if "source_subject" in h5 else [""] * len(rows)
        new = np.asarray(h5["new_anatomy"][rows], bool) if "new_anatomy" in h5 else np.zeros(len(rows), bool)
        dice = np.asarray(h5["qc/dice"][rows], float) if "qc/dice" in h5 else np.full(len(rows), np.nan)
        ok = passed[rows]
    cmap = ListedColormap(SEMANTIC_COLOURS)
    fig, axes = plt.subplots(len(rows), 3, figsize=(8.4, 2.9 * len(rows)), squeeze=False)
    for r in range(len(rows)):
        lv = mask_of(labels[r], tuple(lv_labels))
        centre = [
            int(round(c.mean())) if c.size else s // 2 for c, s in zip(np.nonzero(lv), lv.shape, strict=True)
        ]
        # the LVs lie either side of the midline: the sagittal plane goes through the first one, not between
        first = np.nonzero(labels[r] == lv_labels[0])[0]
        if first.size:
            centre[0] = int(round(first.mean()))
        sem = semantic_map(labels[r])
        for c, (img, seg, mask) in enumerate(
            zip(
                _planes(images[r], tuple(centre)),
                _planes(sem, tuple(centre)),
                _planes(lv.astype(float), tuple(centre)),
                strict=True,
            )
        ):
            ax = axes[r, c]
            ax.imshow(img, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow(seg, origin="lower", cmap=cmap, vmin=0, vmax=8, alpha=0.3, interpolation="nearest")
            if mask.any() and not mask.all():
                ax.contour(mask, levels=[0.5], colors="r", linewidths=0.8)
            ax.set_axis_off()
        title = f"{subjects[r]}  from {source[r] or '?'}{' (new anatomy)' if new[r] else ''}"
        if np.isfinite(dice[r]):
            title += f"  QC Dice {dice[r]:.2f}"
        if not ok[r]:
            title += "  QC FAILED"
        axes[r, 1].set_title(title, fontsize=8, color="k" if ok[r] else "r")
    fig.suptitle(
        f"{Path(cohort).parent.name}: synthetic subjects, labels overlaid, LV condition in red", fontsize=9
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.9 * len(rows))))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return subjects


def qc_histograms(
    cohort: str | Path, out: str | Path, thresholds: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Histograms of every numeric ``/qc/<metric>`` of a cohort, passed and failed subjects stacked, with the
    configured thresholds drawn (e.g. ``{"dice": qc.dice_min}``).

    Returns:
        the cohort's QC statistics (:func:`cohort_stats`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vcm.io import atomic_path

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
    thresholds = dict(thresholds or {})
    n = max(1, len(metrics))
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, metrics.items(), strict=False):
        finite = np.isfinite(values)
        data = [values[finite & passed], values[finite & ~passed]]
        if name == "attempts":
            top = int(np.nanmax(values)) if finite.any() else 1
            bins = np.arange(0.5, top + 1.5)
        else:
            bins = 20 if finite.sum() > 1 else 1
        ax.hist(data, bins=bins, stacked=True, color=["tab:green", "tab:red"], label=["passed", "failed"])
        if name in thresholds:
            ax.axvline(thresholds[name], color="k", ls="--", lw=1, label=f"threshold {thresholds[name]:g}")
        missing = int((~finite).sum())
        ax.set_title(f"{name}" + (f" ({missing} undefined)" if missing else ""), fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_axis_off()
    if metrics:
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles[:2], names[:2], loc="upper right", fontsize=7)
    else:
        axes.flat[0].text(0.5, 0.5, "no QC metrics in the cohort", ha="center", va="center")
    fig.suptitle(
        f"{Path(cohort).parent.name}: QC of {stats['n']} subjects, {stats['passed']} passed ({100 * stats['pass_rate']:.0f} %)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 0.93, 0.95))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
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


def _privacy_rows(cohorts: Sequence[str | Path]) -> list[str]:
    lines = [
        "| cohort | nearest-real similarity: median / max | possible copies | real-to-real baseline: "
        "median / max | threshold |",
        "| --- | --- | --- | --- | --- |",
    ]
    for path in cohorts:
        p = privacy_stats(path)
        if p is not None:
            lines.append(
                f"| {Path(path).parent.name} | {p['median']:.3f} / {p['max']:.3f} | {p['flagged']} / {p['n']} "
                f"| {p['baseline_median']:.3f} / {p['baseline_max']:.3f} ({p['baseline_n']} subjects) "
                f"| {p['max_similarity']:g} |"
            )
    return lines if len(lines) > 2 else []


# --- summary.md ----------------------------------------------------------------------------------------------


def _link(path: str | Path, base: Path) -> str:
    return os.path.relpath(Path(path), base).replace(os.sep, "/")


def _model_rows(models: Sequence[str | Path], base: Path) -> list[str]:
    import torch

    lines = [
        "| condition set | # train | method | steps | final loss | train time | preview LV Dice: controlled / "
        "uncontrolled / AE ceiling | held-out ε error vs backbone, t = 400 / 600 / 800 / 950 | figures |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in models:
        path = Path(path)
        try:
            meta = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a foreign file: say which, in one line
            raise StageError(f"{path}: not a vcm model file ({type(err).__name__})") from None
        figures = [
            f"[{name}]({_link(path.parent / rel, base)})"
            for name, rel in (("loss", "loss.png"), ("preview", "preview/preview.png"))
            if (path.parent / rel).is_file()
        ]
        loss = meta.get("final_loss")
        seconds = meta.get("train_seconds")
        dice = error = "–"
        metrics_path = path.parent / "preview" / "preview_metrics.json"
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
            keys = ("lv_dice_controlled", "lv_dice_uncontrolled", "lv_dice_reconstruction")
            if all(metrics.get(k) is not None for k in keys):
                dice = " / ".join(f"{metrics[k]:.3f}" for k in keys)
            ratios = {r["t"]: r["ratio"] for r in metrics.get("noise_error", [])}
            if ratios:
                error = " / ".join(f"{ratios[t]:.3f}" if t in ratios else "–" for t in (400, 600, 800, 950))
        lines.append(
            f"| {meta.get('condition_set', '?')} | {meta.get('training_size', '?')} | {meta.get('method', '?')} "
            f"| {meta.get('steps', '?')} | {f'{loss:.4f}' if loss is not None else '–'} "
            f"| {f'{seconds / 60:.1f} min' if seconds is not None else '–'} | {dice} | {error} "
            f"| {' '.join(figures) or '–'} |"
        )
    return lines


def _cohort_section(cohorts: Sequence[str | Path], base: Path) -> list[str]:
    """The cohorts' table (size, QC, figures) and their privacy screens, for ``summary.md``."""
    parts: list[str] = []
    if cohorts:
        lines = [
            "| cohort | subjects | QC passed | mean attempts | new anatomies | mean QC Dice | figures |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for path in cohorts:
            s = cohort_stats(path)
            folder = Path(path).parent
            links = [
                f"[{f.stem}]({_link(f, base)})"
                for f in (folder / "cohort_montage.png", folder / "qc_hist.png", folder / "privacy_hist.png")
                if f.is_file()
            ]
            dice = s.get("dice_mean")
            lines.append(
                f"| {folder.name} | {s['n']} | {s['passed']} / {s['n']} ({100 * s['pass_rate']:.0f} %) "
                f"| {s.get('attempts_mean', float('nan')):.2f} | {s.get('new_anatomy', '–')} "
                f"| {f'{dice:.3f}' if dice is not None and np.isfinite(dice) else '–'} | {' '.join(links) or '–'} |"
            )
        parts.append("\n".join(lines) + "\n")
        privacy = _privacy_rows(cohorts)
        if privacy:
            parts.append(
                "### Privacy screen\n\nEach synthetic subject's intensity correlation inside the brain with its "
                "nearest real training subject, beside each real training subject's with its nearest other one; "
                "a possible copy fails QC (`vcm.privacy`).\n\n" + "\n".join(privacy) + "\n"
            )
    else:
        parts.append("_no cohorts_\n")
    return parts


def write_summary(
    out: str | Path,
    dataset: str | Path | None = None,
    models: Sequence[str | Path] = (),
    eval_csvs: Sequence[str | Path] = (),
    tstr_csv: str | Path | None = None,
    cohorts: Sequence[str | Path] = (),
    figures: Sequence[str | Path] = (),
    segmenter_json: str | Path | None = None,
    mask_edits: Sequence[str | Path] = (),
) -> str:
    """Write ``summary.md``: dataset, models, evaluation, TSTR, cohorts and QC, figures (links relative to it).

    Args:
        out: the markdown file.
        dataset: ``dataset.h5``.
        models: the models' ``vcm.pt`` (their ``loss.png`` and preview are linked when present).
        eval_csvs: per-model evaluation tables (:mod:`vcm.evaluation`).
        tstr_csv: the gathered TSTR table.
        cohorts: ``cohort.h5`` files (their ``cohort_montage.png`` / ``qc_hist.png`` are linked when present).
        figures: any other figures to link.
        segmenter_json: the QC segmenter's report (``segmenter.json``).
        mask_edits: the mask-edit checks (:mod:`vcm.mask_edit`) of the models.

    Returns:
        the text written.
    """
    from vcm import __version__
    from vcm.evaluation.tables import display_table, markdown_table, tstr_display
    from vcm.io import git_sha, write_text

    out = Path(out)
    base = out.parent
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"# vcm run summary\n\nvcm {__version__} ({git_sha()}), written {when}.\n"]

    parts.append("## Dataset\n")
    if dataset is not None and Path(dataset).is_file():
        with DatasetFile(dataset) as data:
            n, shape, spacing = len(data), data.grid_shape, data.spacing_mm
            splits, conds = data.split_sizes(), data.condition_names()
        grid = f"{'×'.join(map(str, shape))} grid" + (f" at {spacing:g} mm" if spacing is not None else "")
        split_text = ", ".join(f"{k} ({v})" for k, v in sorted(splits.items())) or "none"
        parts.append(
            f"`{_link(dataset, base)}`: **{n} subjects** on the {grid}; splits: {split_text}; "
            f"conditions: {', '.join(conds) or 'none'}.\n"
        )
    else:
        parts.append("_no dataset_\n")

    parts.append("## Models\n")
    parts.append("\n".join(_model_rows(models, base)) + "\n" if models else "_no models_\n")

    if segmenter_json is not None and Path(segmenter_json).is_file():
        seg = json.loads(Path(segmenter_json).read_text())
        lv = seg["lv_dice"]
        parts.append("## QC segmenter\n")
        parts.append(
            f"The re-segmentation of synthetic images: a MONAI U-Net trained on {seg['n_train']} real training "
            f"subjects ({seg['training']['steps']} steps). LV Dice on the {seg['n_val']} real validation subjects "
            f"**{lv['mean']:.3f}** [95 % CI {lv['ci95'][0]:.3f}, {lv['ci95'][1]:.3f}]; "
            f"{seg['seconds_per_volume_1_thread'] * 1000:.0f} ms per volume on one thread "
            f"(`{_link(segmenter_json, base)}`).\n"
        )
    parts.append("## Evaluation\n")
    if eval_csvs:
        parts.append(
            "Controlled (the trained module) vs uncontrolled (the backbone alone, same noise and covariates), "
            "mean [bootstrap 95 % interval] over the validation subjects; Δ is the paired difference "
            "(`results/eval/`).\n\n" + markdown_table(display_table([pd.read_csv(p) for p in eval_csvs]))
        )
    else:
        parts.append("_not evaluated_\n")

    for path in mask_edits:
        edit = json.loads(Path(path).read_text())
        e = edit["summary"]
        parts.append(f"### Mask edit: `{_link(path, base)}`\n")
        parts.append(
            f"Each of {e['subjects']} validation subjects sampled from the same noise and covariates with its LV "
            f"mask eroded, kept and dilated by one voxel (mask ×{e['mask_volume_ratio_dilated_to_original']:.2f}): "
            f"the segmented LV volume follows the edits in **{e['volume_follows_edits']:.0%}** of subjects "
            f"(×{e['seg_volume_ratio_dilated_to_original']:.2f} when dilated); Dice with the edited mask "
            + ", ".join(f"{v} {d:.3f}" for v, d in e["dice_to_variant"].items())
            + f"; the added ring is darker by {e['ring_darkening']:.3f}.\n"
        )
    parts.append("## Train on synthetic, test on real (TSTR)\n")
    if tstr_csv is not None and Path(tstr_csv).is_file():
        tstr = pd.read_csv(tstr_csv)
        parts.append(
            "Dice of a small U-Net on the real validation subjects, trained on the synthetic cohort or on the "
            "real training subset with the same budget.\n\n" + markdown_table(tstr_display(tstr))
        )
    else:
        parts.append("_not run_\n")

    parts.append("## Cohorts and QC\n")
    parts.extend(_cohort_section(cohorts, base))

    if figures:
        parts.append("## Figures\n")
        parts.append("\n".join(f"- [{Path(f).name}]({_link(f, base)})" for f in figures) + "\n")
    text = "\n".join(parts)
    write_text(out, text)
    return text


def qc_thresholds(qc: Mapping[str, Any]) -> dict[str, float]:
    """The QC thresholds that are set, by metric: ``dice_min`` -> ``dice``, ``hd95_max_mm`` -> ``hd95``, ..."""
    out = {}
    for key, value in qc.items():
        for suffix in ("_min_mm", "_max_mm", "_min", "_max"):
            if key.endswith(suffix) and isinstance(value, int | float) and not isinstance(value, bool):
                out[key.removesuffix(suffix)] = float(value)
                break
    return out


# --- command line ------------------------------------------------------------------------------------------


def figures_cli(argv: list[str]) -> int:
    """``python -m vcm cohort-figures``: the montage and the QC histograms of one cohort."""
    from vcm.config import load_config

    parser = argparse.ArgumentParser(prog="python -m vcm cohort-figures", description=figures_cli.__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cohort", required=True, help="cohort.h5")
    parser.add_argument("--montage", required=True, help="cohort_montage.png")
    parser.add_argument("--qc-hist", required=True, help="qc_hist.png")
    parser.add_argument("--privacy-hist", default=None, help="privacy_hist.png (the privacy screen)")
    parser.add_argument("--subjects", type=int, default=6, help="subjects in the montage")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    lv_labels = cfg["conditions"]["lv_labels"]
    thresholds = qc_thresholds(cfg["qc"])
    shown = cohort_montage(args.cohort, args.montage, args.subjects, lv_labels)
    stats = qc_histograms(args.cohort, args.qc_hist, thresholds)
    if args.privacy_hist is not None:
        screen = privacy_histogram(args.cohort, args.privacy_hist)
        print(f"{args.privacy_hist}: " + (f"{screen['flagged']} possible copies" if screen else "screen off"))
    print(
        f"{args.montage}: {len(shown)} subjects; {args.qc_hist}: {stats['passed']} / {stats['n']} passed QC "
        f"({100 * stats['pass_rate']:.0f} %)"
    )
    return 0


def cli(argv: list[str]) -> int:
    """``python -m vcm summary``: results/summary.md."""
    parser = argparse.ArgumentParser(prog="python -m vcm summary", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="(accepted for symmetry with the other stages)")
    parser.add_argument("--dataset", default=None, help="dataset.h5")
    parser.add_argument("--models", nargs="*", default=[], help="vcm.pt files")
    parser.add_argument("--eval", nargs="*", default=[], help="per-model evaluation CSVs")
    parser.add_argument("--tstr", default=None, help="the gathered tstr.csv")
    parser.add_argument("--cohorts", nargs="*", default=[], help="cohort.h5 files")
    parser.add_argument("--figures", nargs="*", default=[], help="other figures to link")
    parser.add_argument("--segmenter-json", default=None, help="the QC segmenter's segmenter.json")
    parser.add_argument("--mask-edit", nargs="*", default=[], help="mask-edit JSONs")
    parser.add_argument("--out", required=True, help="results/summary.md")
    args = parser.parse_args(argv)
    for path in [*args.models, *args.eval, *args.cohorts]:
        if not Path(path).is_file():
            raise StageError(f"file not found: {path}")
    write_summary(
        args.out,
        args.dataset,
        args.models,
        args.eval,
        args.tstr,
        args.cohorts,
        args.figures,
        args.segmenter_json,
        args.mask_edit,
    )
    print(f"{args.out}: written")
    return 0
