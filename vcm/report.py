"""What a person reads after a run: ``results/summary.md`` (``python -m vcm summary``).

The run in one page: dataset size and splits, the subjects preparation excluded (how many per stage and
gate, and why), the trained models (steps, final loss, time, loss curve and preview), the evaluation table
(controlled vs uncontrolled), the TSTR Dice, each cohort's size, QC pass rate and failure rate per attempt
with the checks that failed, its privacy screen, and links to every figure (the cohort figures:
:mod:`vcm.cohort.figures`).

``snakemake --report results/report.html`` gathers the same figures and tables into one HTML file (the
rules wrap them in ``report()`` with captions from ``workflow/report/``).
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vcm.cohort.figures import cohort_stats, design_stats, privacy_stats
from vcm.dataset_store import DatasetFile
from vcm.errors import StageError
from vcm.prep.exclusion import STAGES
from vcm.stage import stage_parser

__all__ = ["cli", "write_summary"]


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


def _design_rows(cohorts: Sequence[str | Path]) -> list[str]:
    """Per cohort and covariate with a ``cohort.design`` target: medians and KS statistics of what was reached."""
    lines = [
        "| cohort | covariate | target median | label map: median / KS | re-segmented image: median / KS |",
        "| --- | --- | --- | --- | --- |",
    ]

    def fmt(v: np.ndarray, scale: float) -> str:
        v = v[np.isfinite(v)]
        return f"{np.median(v) / scale:.3g}" if v.size else "–"

    for path in cohorts:
        for name, d in design_stats(path).items():
            if not d["designed"]:
                continue
            scale = 1000.0 if name.endswith("volume") else 1.0
            unit = " (mL)" if scale > 1 else ""
            image = f"{fmt(d['image'], scale)} / {d['ks_image']:.2f}" if "image" in d else "–"
            lines.append(
                f"| {Path(path).parent.name} | {name}{unit} | {fmt(d['target'], scale)} "
                f"| {fmt(d['label'], scale)} / {d['ks_label']:.2f} | {image} |"
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
        seconds = _train_seconds(path.parent / "loss.csv")
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


def _train_seconds(loss_csv: Path) -> float | None:
    """The training time at the last logged step (``loss.csv``'s elapsed seconds); None without a row."""
    if not loss_csv.is_file():
        return None
    elapsed = pd.read_csv(loss_csv)["elapsed_s"]
    return float(elapsed.iloc[-1]) if len(elapsed) else None


def _cohort_section(cohorts: Sequence[str | Path], base: Path) -> list[str]:
    """The cohorts' table (size, QC, figures) and their privacy screens, for ``summary.md``."""
    parts: list[str] = []
    if cohorts:
        lines = [
            "| cohort | subjects | QC passed | mean attempts | new anatomies | mean QC Dice | figures "
            "| QC failed attempts | failed checks |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for path in cohorts:
            s = cohort_stats(path)
            folder = Path(path).parent
            links = [
                f"[{f.stem}]({_link(f, base)})"
                for f in (
                    folder / "cohort_montage.png",
                    folder / "qc_hist.png",
                    folder / "privacy_hist.png",
                    folder / "design.png",
                    folder / "design_montage.png",
                )
                if f.is_file()
            ]
            dice = s.get("dice_mean")
            lines.append(
                f"| {folder.name} | {s['n']} | {s['passed']} / {s['n']} ({100 * s['pass_rate']:.0f} %) "
                f"| {s.get('attempts_mean', float('nan')):.2f} | {s.get('new_anatomy', '–')} "
                f"| {f'{dice:.3f}' if dice is not None and np.isfinite(dice) else '–'} | {' '.join(links) or '–'} "
                f"| {_qc_failures(folder / 'qc.csv')} |"
            )
        parts.append("\n".join(lines) + "\n")
        design = _design_rows(cohorts)
        if design:
            parts.append(
                "### Cohort design: target vs achieved\n\nPer covariate with a `cohort.design` target: the "
                "targets' median, the label maps' (given to the backbone) and the re-segmented images' median, "
                "each with its two-sample Kolmogorov-Smirnov statistic against the targets (`design.png`).\n\n"
                + "\n".join(design)
                + "\n"
            )
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


def _check_name(reason: str) -> str:
    """The check a QC reason names, without its values: ``dice 0.61 < 0.7`` -> ``dice``, ``possible copy of
    sub-01`` -> ``possible copy``, ``intensity outside the real range: csf`` -> ``intensity outside the real range``,
    ``LV volume +53% off its target (> 15%)`` -> ``LV volume``."""
    return re.split(r"\s+[-+\d.<>]|:|\s+of\s", reason.strip(), maxsplit=1)[0]


def _qc_failures(qc_csv: Path) -> str:
    """A cohort's QC failure rate over every attempt (``qc.csv``, one row per attempt) and the checks that
    failed, most frequent first: ``2 / 8 (25 %) | dice 2, possible copy 1``."""
    if not qc_csv.is_file():
        return "– | –"
    table = pd.read_csv(qc_csv)
    failed = ~table["passed"].astype(bool)
    checks: collections.Counter[str] = collections.Counter()
    if "reasons" in table.columns:
        for reasons in table.loc[failed, "reasons"].dropna().astype(str):
            checks.update({_check_name(r) for r in reasons.split("; ") if r.strip()})
    rate = f"{failed.sum()} / {len(table)} ({100 * failed.mean():.0f} %)" if len(table) else "–"
    return f"{rate} | {', '.join(f'{name} {n}' for name, n in checks.most_common()) or '–'}"


def _exclusion_rows(excluded_csv: str | Path | None, base: Path) -> list[str]:
    """How many subjects preparation excluded, per stage and gate, and why (``excluded.csv``)."""
    if excluded_csv is None or not Path(excluded_csv).is_file():
        return []
    table = pd.read_csv(excluded_csv, dtype={"subject": str})
    link = f"`{_link(excluded_csv, base)}`"
    if table.empty:
        return [f"No subject was excluded during preparation ({link} is empty).\n"]
    if "stage" not in table.columns:  # an excluded.csv from before the gates: the input checks'
        table = table.assign(stage=STAGES[0], gate="")
    table["gate"] = table["gate"].fillna("").astype(str).str.split(", ")
    rows = table.explode("gate")
    order = {stage: i for i, stage in enumerate(STAGES)}
    lines = [
        f"**{len(table)} subjects excluded** during preparation ({link}; each one's rule log says "
        "`subject <id>: excluded at <stage>: <reason>`). A subject that failed several gates of a stage "
        "counts under each:\n",
        "| stage | gate | subjects | for example |",
        "| --- | --- | --- | --- |",
    ]
    groups = sorted(rows.groupby(["stage", "gate"]), key=lambda g: (order.get(g[0][0], len(order)), g[0][1]))
    for (stage, gate), group in groups:
        first = group.iloc[0]
        lines.append(
            f"| {stage} | {gate or '–'} | {len(group)} | {first['subject']}: {str(first['reason']).replace('|', '/')} |"
        )
    return ["\n".join(lines) + "\n"]


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
    excluded: str | Path | None = None,
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
        excluded: ``excluded.csv``, the subjects preparation excluded (stage, gate, reason).

    Returns:
        the text written.
    """
    from vcm import __version__
    from vcm.io import git_sha, write_text

    out = Path(out)
    base = out.parent
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"# vcm run summary\n\nvcm {__version__} ({git_sha()}), written {when}.\n"]
    parts += _dataset_section(dataset, base)
    parts += _exclusion_rows(excluded, base)
    parts.append("## Models\n")
    parts.append("\n".join(_model_rows(models, base)) + "\n" if models else "_no models_\n")
    parts += _segmenter_section(segmenter_json, base)
    parts += _evaluation_section(eval_csvs, mask_edits, base)
    parts += _tstr_section(tstr_csv)
    parts.append("## Cohorts and QC\n")
    parts.extend(_cohort_section(cohorts, base))
    if figures:
        parts.append("## Figures\n")
        parts.append("\n".join(f"- [{Path(f).name}]({_link(f, base)})" for f in figures) + "\n")
    text = "\n".join(parts)
    write_text(out, text)
    return text


def _dataset_section(dataset: str | Path | None, base: Path) -> list[str]:
    parts = ["## Dataset\n"]
    if dataset is None or not Path(dataset).is_file():
        return [*parts, "_no dataset_\n"]
    with DatasetFile(dataset) as data:
        n, shape, spacing = len(data), data.grid_shape, data.spacing_mm
        splits, conds = data.split_sizes(), data.condition_names()
    grid = f"{'×'.join(map(str, shape))} grid" + (f" at {spacing:g} mm" if spacing is not None else "")
    split_text = ", ".join(f"{k} ({v})" for k, v in sorted(splits.items())) or "none"
    return [
        *parts,
        f"`{_link(dataset, base)}`: **{n} subjects** on the {grid}; splits: {split_text}; "
        f"conditions: {', '.join(conds) or 'none'}.\n",
    ]


def _segmenter_section(segmenter_json: str | Path | None, base: Path) -> list[str]:
    if segmenter_json is None or not Path(segmenter_json).is_file():
        return []
    seg = json.loads(Path(segmenter_json).read_text())
    lv = seg["lv_dice"]
    return [
        "## QC segmenter\n",
        f"The re-segmentation of synthetic images: a MONAI U-Net trained on {seg['n_train']} real training "
        f"subjects ({seg['training']['steps']} steps). LV Dice on the {seg['n_val']} real validation subjects "
        f"**{lv['mean']:.3f}** [95 % CI {lv['ci95'][0]:.3f}, {lv['ci95'][1]:.3f}]; "
        f"{seg['seconds_per_volume_1_thread'] * 1000:.0f} ms per volume on one thread "
        f"(`{_link(segmenter_json, base)}`).\n",
    ]


def _sampling_note(eval_csvs: Sequence[str | Path]) -> str:
    """How the evaluation sampled, from the settings its ``<stem>.json`` records beside each table."""
    notes = []
    for path in eval_csvs:
        info = Path(path).with_suffix(".json")
        if info.is_file():
            s = json.loads(info.read_text())["settings"]
            notes.append(
                f" Sampled with {s['sampler']} at {s['steps']} steps, control scale {s.get('control_scale', 1.0):g}"
                " (`cohort.control_scale`)."
            )
    return "".join(dict.fromkeys(notes))


def _evaluation_section(
    eval_csvs: Sequence[str | Path], mask_edits: Sequence[str | Path], base: Path
) -> list[str]:
    from vcm.evaluation.tables import display_table, markdown_table

    parts = ["## Evaluation\n"]
    if eval_csvs:
        parts.append(
            "Each trained method (`training.methods`) vs the uncontrolled backbone (same noise and covariates), "
            "mean [bootstrap 95 % interval] over the validation subjects; a Δ row is the method's paired "
            "difference from the backbone (`results/eval/<method>/`)."
            + _sampling_note(eval_csvs)
            + "\n\n"
            + markdown_table(display_table([pd.read_csv(p) for p in eval_csvs]))
        )
    else:
        parts.append("_not evaluated_\n")
    for path in mask_edits:
        e = json.loads(Path(path).read_text())["summary"]
        parts.append(f"### Mask edit: `{_link(path, base)}`\n")
        parts.append(
            f"Each of {e['subjects']} validation subjects sampled from the same noise and covariates with its LV "
            f"mask eroded, kept and dilated by one voxel (mask ×{e['mask_volume_ratio_dilated_to_original']:.2f}): "
            f"the segmented LV volume follows the edits in **{e['volume_follows_edits']:.0%}** of subjects "
            f"(×{e['seg_volume_ratio_dilated_to_original']:.2f} when dilated); Dice with the edited mask "
            + ", ".join(f"{v} {d:.3f}" for v, d in e["dice_to_variant"].items())
            + f"; the added ring is darker by {e['ring_darkening']:.3f}.\n"
        )
    return parts


def _tstr_section(tstr_csv: str | Path | None) -> list[str]:
    from vcm.evaluation.tables import markdown_table, tstr_display

    parts = ["## Train on synthetic, test on real (TSTR)\n"]
    if tstr_csv is None or not Path(tstr_csv).is_file():
        return [*parts, "_not run_\n"]
    return [
        *parts,
        "Dice of a small U-Net on the real validation subjects, trained on the synthetic cohort or on the "
        "real training subset with the same budget.\n\n"
        + markdown_table(tstr_display(pd.read_csv(tstr_csv))),
    ]


# --- command line ------------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    """``python -m vcm summary``: results/summary.md."""
    parser = stage_parser("summary", __doc__, config=False)
    parser.add_argument("--config", default=None, help="(accepted for symmetry with the other stages)")
    parser.add_argument("--dataset", default=None, help="dataset.h5")
    parser.add_argument("--models", nargs="*", default=[], help="vcm.pt files")
    parser.add_argument("--eval", nargs="*", default=[], help="per-model evaluation CSVs")
    parser.add_argument("--tstr", default=None, help="the gathered tstr.csv")
    parser.add_argument("--cohorts", nargs="*", default=[], help="cohort.h5 files")
    parser.add_argument("--figures", nargs="*", default=[], help="other figures to link")
    parser.add_argument("--segmenter-json", default=None, help="the QC segmenter's segmenter.json")
    parser.add_argument("--mask-edit", nargs="*", default=[], help="mask-edit JSONs")
    parser.add_argument("--excluded", default=None, help="excluded.csv (subject, stage, gate, reason)")
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
        args.excluded,
    )
    print(f"{args.out}: written")
    return 0
