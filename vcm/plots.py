"""Pictures people would rather look at than read: 3-plane views with overlays, training loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vcm.io import atomic_path  # noqa: E402

__all__ = ["loss_curve", "three_plane"]


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def loss_curve(path: str | Path, steps: Sequence[int], loss: Sequence[float], title: str) -> None:
    """Save a PNG of a training loss per step (log scale) with its running mean over about 1/50 of the run.

    Args:
        path: the PNG to write (atomically).
        steps: the step of each loss value.
        loss: the loss values (positive).
        title: figure title.
    """
    steps_a, loss_a = np.asarray(steps), np.asarray(loss)
    window = max(1, len(loss_a) // 50)
    smooth = np.convolve(loss_a, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps_a, loss_a, lw=0.5, alpha=0.4, label="loss")
    ax.plot(steps_a[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
