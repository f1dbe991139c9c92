"""Pictures people would rather look at than read: 3-plane views with overlays, montages of 3-plane views,
training loss curves, the privacy screen's similarity histograms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vcm.io import atomic_path  # noqa: E402

__all__ = ["loss_curve", "save_figure", "similarity_histogram", "three_plane", "three_plane_montage"]


def _planes(vol: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    # Axial, coronal, sagittal in radiological-free display: rows = anterior/superior up.
    i, j, k = centre
    return [vol[:, :, k].T, vol[:, j, :].T, vol[i, :, :].T]


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
            _planes(image, centre)[n], origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest"
        )
        if labels is not None:
            lab = _planes(labels, centre)[n].astype(float)
            ax.imshow(
                np.ma.masked_equal(lab % 20, 0),
                origin="lower",
                cmap="tab20",
                alpha=0.35,
                interpolation="nearest",
            )
        if contour is not None:
            con = _planes(contour.astype(float), centre)[n]
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
        for p, plane in enumerate(_planes(vol, (i, j, k))):
            axes[r, 3 * c + p].imshow(
                plane, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest"
            )
        axes[r, 3 * c].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


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


def save_figure(fig: Figure, path: str | Path, dpi: float | str = "figure") -> None:
    """Write ``fig`` to ``path`` atomically (a temporary name, then a rename) and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
