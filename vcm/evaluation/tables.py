"""The evaluation's tables: per-method summaries with bootstrap intervals, the paired-difference row, and
the gathered tables for people (``table.md``, ``table.html``, ``tstr.csv``).

:func:`summarise` turns the per-subject rows of one model into its table (mean, sample sd and a bootstrap 95 %
interval per metric and method, and the paired controlled − uncontrolled difference); :func:`display_table`,
:func:`tstr_display` and :func:`markdown_table` format such tables, and :func:`write_tables` gathers the
per-model evaluation tables and the per-cohort TSTR tables of a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "LABELS",
    "METHOD_NAMES",
    "METRICS",
    "display_table",
    "markdown_table",
    "side_by_side",
    "summarise",
    "tstr_display",
    "write_tables",
]

METRICS = ("dice", "hd95", "assd", "skull_dist", "ssim", "ms_ssim")
"""The per-subject metric columns, in table order."""

LABELS = {
    "dice": "DSC ↑",
    "hd95": "HD95 (mm) ↓",
    "assd": "ASSD (mm) ↓",
    "skull_dist": "skull-dist ↓",
    "ssim": "SSIM ↑",
    "ms_ssim": "MS-SSIM ↑",
    "fid3d": "FID 3D ↓",
}
"""Column headings of the tables for people, with the better direction."""

METHOD_NAMES = {"vcm": "VCM", "controlnet": "ControlNet", "uncontrolled": "backbone (uncontrolled)"}
"""Row names of the tables for people."""


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarise(
    per_subject: pd.DataFrame, fid: Mapping[str, float] | None = None, seed: int = 0
) -> pd.DataFrame:
    """Mean, sample sd and bootstrap 95 % interval of every metric per method, and the paired difference.

    Args:
        per_subject: one row per subject and method (``method``, ``subject`` and the metric columns).
        fid: FID 3D per method (one value each, not a mean).
        seed: the bootstrap's seed.

    Returns:
        one row per method (the controlled method, then ``uncontrolled``): ``method``, ``n`` and, per metric,
        ``<metric>_mean``, ``<metric>_sd``, ``<metric>_ci_low``, ``<metric>_ci_high``; ``n_empty``
        (segmentations without an LV: no HD95/ASSD) and ``fid3d``. With two methods a last row ``difference``
        holds, per metric, the mean over subjects of controlled - uncontrolled and its interval (paired).
    """
    from vcm.stats import bootstrap_ci, paired_difference

    def stats(metric: str, mean: float, sd: float, low: float, high: float) -> dict[str, float]:
        return {
            f"{metric}_mean": mean,
            f"{metric}_sd": sd,
            f"{metric}_ci_low": low,
            f"{metric}_ci_high": high,
        }

    rows = []
    for method, group in per_subject.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "n": len(group)}
        for metric in METRICS:
            if metric in group and group[metric].notna().any():
                mean, sd, _ = _mean_sd(group[metric].tolist())
                row.update(stats(metric, mean, sd, *bootstrap_ci(group[metric].to_numpy(float), seed=seed)))
            else:
                row.update(stats(metric, *(math.nan,) * 4))
        row["n_empty"] = int((group["seg_lv_voxels"] == 0).sum()) if "seg_lv_voxels" in group else 0
        row["fid3d"] = (fid or {}).get(method, math.nan)
        rows.append(row)
    methods = list(dict.fromkeys(per_subject["method"]))
    if len(methods) == 2 and "subject" in per_subject:
        both = per_subject.groupby("subject")["method"].nunique() == 2
        paired = per_subject[per_subject["subject"].isin(both[both].index)]
        order = paired.loc[paired["method"] == methods[0], "subject"]  # the bootstrap resamples in this order
        row = {"method": "difference", "n": int(both.sum()), "n_empty": 0, "fid3d": math.nan}
        for metric in METRICS:
            if metric not in paired:
                row.update(stats(metric, *(math.nan,) * 4))
                continue
            wide = paired.pivot(index="subject", columns="method", values=metric).loc[order]
            mean, low, high = paired_difference(
                wide[methods[0]].to_numpy(float), wide[methods[1]].to_numpy(float), seed=seed
            )
            row.update(stats(metric, mean, math.nan, low, high))
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean: float, sd: float | None = None, digits: int = 3) -> str:
    if mean is None or not np.isfinite(mean):
        return "–"
    if sd is None or not np.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _fmt_ci(mean: float, low: float | None, high: float | None, digits: int = 3) -> str:
    """``mean [low, high]``; a signed mean for differences."""
    if mean is None or not np.isfinite(mean):
        return "–"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _fmt_parameters(n: float | None) -> str:
    """A parameter count as the paper writes it (``45.19 M``), ``k`` below a million."""
    if n is None or not np.isfinite(n):
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _row_name(r: Mapping[str, Any]) -> str:
    """``VCM``, ``ControlNet``, ``backbone (uncontrolled)`` or ``Δ VCM − backbone`` (the paired difference)."""
    if r["method"] != "difference":
        return METHOD_NAMES.get(r["method"], r["method"])
    model = r.get("model")
    if not isinstance(model, str):  # a table of before methods were named in it
        return "Δ controlled − uncontrolled"
    return f"Δ {METHOD_NAMES.get(model, model)} − backbone"


def side_by_side(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The rows of per-model tables, per condition set × training size: the uncontrolled backbone once, then
    every method's controlled row, then every method's paired difference from the backbone.

    Every method's evaluation samples the backbone from the same noise and covariates, so its uncontrolled
    rows are the same: the first is kept.
    """
    df = pd.concat(tables, ignore_index=True)
    if "training_size" not in df:
        df["training_size"] = math.nan
    kind = df["method"].map(lambda m: 0 if m == "uncontrolled" else 2 if m == "difference" else 1)
    df = df.assign(_kind=kind, _order=range(len(df)))
    groups = df.groupby(["condition_set", "training_size"], sort=False, dropna=False)
    parts = []
    for _, group in groups:
        group = group.sort_values(["_kind", "_order"], kind="stable")
        parts.append(group[(group["_kind"] != 0) | ~group["_kind"].duplicated()])
    return pd.concat(parts, ignore_index=True).drop(columns=["_kind", "_order"])


def display_table(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The paper-style table (its Table 1) of several per-model tables: per condition set and training size the
    uncontrolled backbone, each method and each method's paired difference from the backbone, with
    ``mean [95 % interval]`` cells, the trainable parameters, the training steps and the seconds per training
    step; columns that are empty everywhere are dropped."""
    if not tables:
        return pd.DataFrame()
    df = side_by_side(tables)
    rows = []
    for _, r in df.iterrows():
        row = {
            "condition set": r["condition_set"],
            "# train": int(r["training_size"]) if pd.notna(r["training_size"]) else "",
            "method": _row_name(r),
            "n": int(r["n"]),
        }
        for metric in METRICS:
            digits = 2 if metric in ("hd95", "assd") else 4 if metric == "skull_dist" else 3
            row[LABELS[metric]] = _fmt_ci(
                r.get(f"{metric}_mean"), r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high"), digits
            )
        row[LABELS["fid3d"]] = _fmt(r.get("fid3d"), None, 2)
        row["parameters"] = _fmt_parameters(r.get("parameters"))
        steps = r.get("training_steps")  # absent from tables written before it was recorded
        row["training steps"] = f"{int(steps):,}" if steps is not None and np.isfinite(steps) else "–"
        seconds = r.get("seconds_per_step")
        row["s / training step"] = f"{seconds:.3g}" if seconds is not None and np.isfinite(seconds) else "–"
        rows.append(row)
    out = pd.DataFrame(rows)
    if "segmentation" in df:
        out.insert(3, "segmenter", df["segmentation"].fillna("").tolist())
    empty = [c for c in out.columns if (out[c] == "–").all()]
    return out.drop(columns=empty)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    if df.empty:
        return "_no rows_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.tolist()) + " |")
    return "\n".join(lines) + "\n"


def tstr_display(tstr: pd.DataFrame) -> pd.DataFrame:
    """The TSTR table for people: where the network was trained, on how many subjects, its real-val Dice."""
    if tstr.empty:
        return tstr
    out = pd.DataFrame(
        {
            "trained on": tstr["train_data"],
            "source": tstr["source"],
            "# train": tstr["n_train"],
            "labels": tstr["labels"],
            "steps": tstr["steps"],
            "Dice on real val ↑ [95% CI]": [
                _fmt_ci(m, lo, hi)
                for m, lo, hi in zip(
                    tstr["dice_mean"],
                    tstr.get("dice_ci_low", tstr["dice_mean"] * np.nan),
                    tstr.get("dice_ci_high", tstr["dice_mean"] * np.nan),
                    strict=True,
                )
            ],
        }
    )
    if "repeats" in tstr:  # tstr.repeats > 1: each subject's Dice is the mean of that many networks
        out.insert(
            5,
            "networks (sd of their Dice)",
            [
                "1" if pd.isna(r) else f"{int(r)} ({sd:.3f})"
                for r, sd in zip(tstr["repeats"], tstr["dice_seed_sd"], strict=True)  # written together
            ],
        )
    return out


def write_tables(
    eval_csvs: Sequence[str | Path],
    tstr_csvs: Sequence[str | Path],
    md: str | Path,
    html: str | Path | None = None,
    tstr_out: str | Path | None = None,
) -> str:
    """Gather per-model evaluation tables and per-cohort TSTR tables into ``table.md`` (+ HTML, ``tstr.csv``).

    The real-data TSTR rows are identical in every per-cohort table (same network, data, seed and budget):
    they are kept once.
    """
    from vcm.io import atomic_path, write_text

    tables = [pd.read_csv(p) for p in eval_csvs]
    evaluation = display_table(tables)
    tstr = pd.concat([pd.read_csv(p) for p in tstr_csvs], ignore_index=True) if tstr_csvs else pd.DataFrame()
    if not tstr.empty:  # the real rows of every cohort's table are the same network: keep one
        tstr = tstr.drop_duplicates(subset=["train_data", "source", "labels", "steps"]).reset_index(drop=True)
    text = "# Evaluation\n\n"
    text += (
        "Every trained method (VCM, the ControlNet baseline) and the uncontrolled backbone (same noise and "
        "covariates), mean [bootstrap 95 % interval] over the validation subjects; a Δ row is a method's paired "
        "difference from the backbone; parameters are the trainable ones, seconds per training step from the "
        "model's loss.csv.\n\n"
    )
    text += markdown_table(evaluation)
    if not tstr.empty:
        text += "\n## Train on synthetic, test on real (TSTR)\n\n" + markdown_table(tstr_display(tstr))
    write_text(md, text)
    if html is not None:
        style = "<style>table{border-collapse:collapse;font-family:sans-serif;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}</style>"
        body = f"<h3>Evaluation: every method and the uncontrolled backbone (mean [bootstrap 95 % interval] over the validation subjects; Δ = a method's paired difference from the backbone)</h3>{evaluation.to_html(index=False, border=0)}"
        if not tstr.empty:
            body += f"<h3>Train on synthetic, test on real (TSTR)</h3>{tstr_display(tstr).to_html(index=False, border=0)}"
        write_text(
            html,
            f"<!DOCTYPE html><html><head><meta charset='utf-8'>{style}</head><body>{body}</body></html>\n",
        )
    if tstr_out is not None:
        with atomic_path(tstr_out) as tmp:
            tstr.to_csv(tmp, index=False, float_format="%.6g")
    return text
