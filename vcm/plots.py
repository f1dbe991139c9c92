"""Pictures people would rather look at than read: 3-plane views with overlays, montages of 3-plane views,
grids of labelled slices with label maps and outlines, training loss curves, QC histograms (passed and failed
subjects apart), the privacy screen's similarity histograms, a figure that only says something.

The only module of vcm that imports matplotlib: every figure writer draws through it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vcm.io import atomic_path  # noqa: E402

__all__ = [
    "Panel",
    "image_grid",
    "loss_curve",
    "mask_centre",
    "pass_fail_histograms",
    "planes",
    "save_figure",
    "similarity_histogram",
    "target_histograms",
    "text_figure",
    "three_plane",
    "three_plane_montage",
]


def planes(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """The axial, coronal and sagittal slices of ``vol`` through voxel ``centre``, transposed for display with
    ``origin="lower"`` (anterior/superior up).

    Args:
        vol: a 3-D volume (x, y, z).
        centre: the voxel (i, j, k) the three planes pass through.
    """
    i, j, k = centre
    return [vol[:, :, k].T, vol[:, j, :].T, vol[i, :, :].T]


def mask_centre(mask: np.ndarray) -> list[int]:
    """The voxel nearest the centroid of a binary volume, per axis (the volume's middle on an empty mask): where
    :func:`planes` should cut to show a structure."""
    return [
        int(round(c.mean())) if c.size else s // 2 for c, s in zip(np.nonzero(mask), mask.shape, strict=True)
    ]


def three_plane(
    path: str | Path,
    image: np.ndarray,
    title: str,
    contour: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    centre: tuple[int, int, int] | None = None,
) -> None:
    """Save a PNG with axial, coronal and sagittal slices of ``image``.

    Args:
        path: the PNG to write (atomically).
        image: 3-D intensity volume (LAS or RAS axes; x, y, z order).
        title: figure title.
        contour: optional binary volume drawn as a red outline (e.g. the template brain, a mask).
        labels: optional label volume drawn as a translucent colour overlay.
        centre: voxel through which the planes pass; defaults to the volume centre.
    """
    centre = centre or tuple(s // 2 for s in image.shape)  # type: ignore[assignment]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    lo, hi = np.percentile(image, [0.5, 99.5])
    for n, ax in enumerate(axes):
        ax.imshow(
            planes(image, centre)[n], origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest"
        )
        if labels is not None:
            lab = planes(labels, centre)[n].astype(float)
            ax.imshow(
                np.ma.masked_equal(lab % 20, 0),
                origin="lower",
                cmap="tab20",
                alpha=0.35,
                interpolation="nearest",
            )
        if contour is not None:
            con = planes(contour.astype(float), centre)[n]
            if con.any() and not con.all():
                ax.contour(con, levels=[0.5], colors="r", linewidths=0.7)
        ax.set_axis_off()
    for ax, name in zip(axes, ("axial", "coronal", "sagittal"), strict=True):
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def three_plane_montage(
    path: str | Path, panels: Sequence[tuple[str, np.ndarray]], title: str, per_row: int = 2
) -> None:
    """Save a PNG of the central axial, coronal and sagittal slices of several volumes, ``per_row`` a row.

    Args:
        path: the PNG to write (atomically).
        panels: (label, volume) pairs; volumes of one shape, intensities in [0, 1] (shown on that range).
        title: figure title.
        per_row: volumes per row of the figure.
    """
    rows = math.ceil(len(panels) / per_row)
    vol0 = panels[0][1]
    widths = [vol0.shape[0], vol0.shape[0], vol0.shape[1]] * per_row
    fig, axes = plt.subplots(
        rows,
        3 * per_row,
        figsize=(2.1 * per_row * 3 * 0.9, 2.3 * rows),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for n, (label, vol) in enumerate(panels):
        r, c = divmod(n, per_row)
        i, j, k = (s // 2 for s in vol.shape)
        for p, plane in enumerate(planes(vol, (i, j, k))):
            axes[r, 3 * c + p].imshow(
                plane, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest"
            )
        axes[r, 3 * c].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


@dataclass(frozen=True)
class Panel:
    """One picture of :func:`image_grid`: a 2-D slice (as :func:`planes` gives it) with optional overlays.

    Attributes:
        image: the slice's intensities, shown in grey on [0, 1].
        title: the picture's title; none when empty.
        labels: optional integer class map, drawn translucently in the grid's ``label_colours``.
        contour: optional binary mask, outlined in red.
        title_colour: the title's colour (e.g. red for a subject that failed QC).
    """

    image: np.ndarray
    title: str = ""
    labels: np.ndarray | None = None
    contour: np.ndarray | None = None
    title_colour: str = "k"


def image_grid(
    path: str | Path,
    panels: Sequence[Sequence[Panel]],
    figsize: tuple[float, float],
    title: str | None = None,
    *,
    label_colours: Sequence[tuple[float, float, float, float]] | None = None,
    label_alpha: float = 0.3,
    panel_title_size: float = 7,
    dpi: float = 80,
) -> None:
    """Save a PNG of slices in a grid, one row of ``panels`` a row of the figure, each with its title, label map
    and red outline.

    Args:
        path: the PNG to write (atomically).
        panels: the rows of pictures; a short row leaves its last cells empty.
        figsize: the figure's (width, height) in inches.
        title: optional figure title (9 pt, with 0.3 inch kept free above the grid for it).
        label_colours: the colour of each label value 0, 1, ... (RGBA; alpha 0 leaves the value
            transparent); needed when a panel has ``labels``.
        label_alpha: the label maps' opacity.
        panel_title_size: the pictures' title size in points.
        dpi: the PNG's resolution.
    """
    fig, axes = plt.subplots(len(panels), max(map(len, panels)), figsize=figsize, squeeze=False)
    cmap = ListedColormap(label_colours) if label_colours is not None else None
    for ax in axes.flat:
        ax.set_axis_off()
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            ax = axes[r, c]
            ax.imshow(panel.image, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if panel.labels is not None:
                if cmap is None:
                    raise ValueError("image_grid: a panel has labels but no label_colours were given")
                top = len(label_colours) - 1  # type: ignore[arg-type]
                ax.imshow(
                    panel.labels,
                    origin="lower",
                    cmap=cmap,
                    vmin=0,
                    vmax=top,
                    alpha=label_alpha,
                    interpolation="nearest",
                )
            mask = panel.contour
            if mask is not None and mask.any() and not mask.all():  # a contour needs both sides
                ax.contour(mask.astype(float), levels=[0.5], colors="r", linewidths=0.8)
            if panel.title:
                ax.set_title(panel.title, fontsize=panel_title_size, color=panel.title_colour)
    if title:
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figsize[1]))
    else:
        fig.tight_layout()
    save_figure(fig, path, dpi=dpi)


def loss_curve(
    path: str | Path,
    steps: Sequence[int],
    loss: Sequence[float],
    title: str,
    *,
    label: str = "loss",
    held_out: tuple[Sequence[int], Sequence[float]] | None = None,
    held_out_label: str = "held-out loss",
) -> None:
    """Save a PNG of a training loss per step (log scale) with its running mean over about 1/50 of the run.

    Args:
        path: the PNG to write (atomically).
        steps: the step of each loss value.
        loss: the loss values (positive).
        title: figure title.
        label: the legend's name of ``loss``.
        held_out: optional (steps, values) of a held-out loss, drawn as points over the training loss.
        held_out_label: the legend's name of ``held_out``.
    """
    steps_a, loss_a = np.asarray(steps), np.asarray(loss)
    window = max(1, len(loss_a) // 50)
    smooth = np.convolve(loss_a, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps_a, loss_a, lw=0.5, alpha=0.4, label=label)
    ax.plot(steps_a[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    if held_out is not None and len(held_out[0]):
        ax.plot(*held_out, "o-", color="C3", ms=3, lw=1, label=held_out_label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def similarity_histogram(
    path: str | Path,
    synthetic: np.ndarray | None,
    baseline: np.ndarray | None,
    threshold: float | None,
    title: str,
) -> None:
    """Save a PNG of the synthetic subjects' nearest-real similarities beside the real-to-real baseline.

    Args:
        path: the PNG to write (atomically).
        synthetic: each synthetic subject's similarity to its nearest real training subject (``None``: the
            privacy screen was off, said in the figure).
        baseline: each real training subject's similarity to its nearest other one.
        threshold: the possible-copy threshold, drawn as a dashed line.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    if synthetic is None:
        ax.text(0.5, 0.5, "privacy screen off (qc.privacy.enabled)", ha="center", va="center")
        ax.set_axis_off()
    else:
        groups = [
            ("real to nearest other real", baseline, "tab:blue"),
            ("synthetic to nearest real", synthetic, "tab:orange"),
        ]
        finite = [np.asarray(v, float)[np.isfinite(v)] for _, v, _ in groups if v is not None]
        values = np.concatenate([*finite, [threshold]] if threshold is not None else finite)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        bins = np.linspace(lo - 0.01, min(1.0, hi) + 0.01, 31)
        for label, v, colour in groups:
            if v is not None:
                v = np.asarray(v, float)
                ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.6, color=colour, label=f"{label} ({v.size})")
        if threshold is not None:
            ax.axvline(threshold, color="k", ls="--", lw=1, label=f"possible copy > {threshold:g}")
        ax.set_xlabel("intensity correlation inside the brain")
        ax.set_ylabel("subjects")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def pass_fail_histograms(
    path: str | Path,
    metrics: Mapping[str, np.ndarray],
    passed: np.ndarray,
    title: str,
    thresholds: Mapping[str, float] | None = None,
    *,
    integer: Collection[str] = (),
    empty_note: str = "no values",
) -> None:
    """Save a PNG of one histogram per metric, up to three a row, passed and failed subjects stacked (green, red),
    each metric's threshold drawn as a dashed line and its undefined (NaN) values counted in its title.

    Args:
        path: the PNG to write (atomically).
        metrics: name -> one value per subject.
        passed: whether each subject passed.
        title: figure title.
        thresholds: name -> threshold, for the metrics that have one.
        integer: the metrics with whole values (e.g. attempts), given one bin per value.
        empty_note: what the figure says when there are no metrics.
    """
    thresholds = dict(thresholds or {})
    n = max(1, len(metrics))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, metrics.items(), strict=False):
        finite = np.isfinite(values)
        data = [values[finite & passed], values[finite & ~passed]]
        if name in integer:
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
        axes.flat[0].text(0.5, 0.5, empty_note, ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.95))
    save_figure(fig, path, dpi=80)


def target_histograms(
    path: str | Path, panels: Sequence[tuple[str, Mapping[str, np.ndarray]]], title: str
) -> None:
    """Save a PNG of one panel per covariate, each overlaying the histograms of its named value sets
    (e.g. target, label map, re-segmented image) on shared bins.

    Args:
        path: the PNG to write (atomically).
        panels: (panel title, {legend label: values}) per panel; NaNs are left out.
        title: figure title.
    """
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 3.0), squeeze=False)
    colours = ("tab:grey", "tab:blue", "tab:orange")
    for ax, (name, sets) in zip(axes[0], panels, strict=False):
        finite = {k: np.asarray(v, float)[np.isfinite(v)] for k, v in sets.items()}
        values = np.concatenate([v for v in finite.values()] or [np.zeros(0)])
        if values.size == 0:
            ax.text(0.5, 0.5, "no values", ha="center", va="center")
            ax.set_axis_off()
            continue
        lo, hi = float(values.min()), float(values.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 16)
        for (label, v), colour in zip(finite.items(), colours, strict=False):
            ax.hist(v, bins=bins, alpha=0.5, color=colour, label=f"{label} ({v.size})")
        ax.set_title(name, fontsize=8)
        ax.set_ylabel("subjects")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def text_figure(path: str | Path, text: str, figsize: tuple[float, float] = (4, 1)) -> None:
    """Save a PNG that only says ``text`` (centred), for a figure a workflow declares but has nothing to show.

    Args:
        path: the PNG to write (atomically).
        text: what the figure says.
        figsize: the figure's (width, height) in inches.
    """
    fig = plt.figure(figsize=figsize)
    fig.text(0.5, 0.5, text, ha="center", va="center")
    save_figure(fig, path)


def save_figure(fig: Figure, path: str | Path, dpi: float | str = "figure") -> None:
    """Write ``fig`` to ``path`` atomically (a temporary name, then a rename) and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
