"""Tests of the project's plotting module (vcm.plots): the figures are written, atomically, as PNGs."""

from __future__ import annotations

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest

import vcm.plots
from vcm.io import atomic_path
from vcm.plots import (
    Panel,
    image_grid,
    loss_curve,
    mask_centre,
    pass_fail_histograms,
    planes,
    text_figure,
    three_plane_montage,
)

PNG_MAGIC = b"\x89PNG"


def test_loss_curve_with_a_held_out_loss(tmp_path):
    steps = np.arange(1, 121)
    loss_curve(
        tmp_path / "loss.png",
        steps,
        1 / steps,
        "ae losses",
        label="train l1",
        held_out=([40, 80, 120], [0.05, 0.02, 0.01]),
        held_out_label="held-out val_l1",
    )
    loss_curve(tmp_path / "plain.png", steps, 1 / steps, "plain")  # no held-out loss, as vcm.training draws
    for name in ("loss.png", "plain.png"):
        assert (tmp_path / name).read_bytes()[:4] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "plain.png"]  # no temporary left


def test_three_plane_montage_of_several_volumes(tmp_path):
    rng = np.random.default_rng(0)
    panels = [(f"volume {i}", rng.uniform(0, 1, (8, 10, 6))) for i in range(3)]  # an odd count: a half row
    three_plane_montage(tmp_path / "montage.png", panels, "three volumes", per_row=2)
    assert (tmp_path / "montage.png").read_bytes()[:4] == PNG_MAGIC


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plots module saves, kept open for inspection (they are written as usual)."""
    figures = []

    def keep(fig, path, dpi="figure"):
        figures.append(fig)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)

    monkeypatch.setattr(vcm.plots, "save_figure", keep)
    yield figures
    for fig in figures:
        plt.close(fig)


@pytest.mark.parametrize(
    ("mask_at", "centre"), [((slice(2, 5), slice(1, 2), slice(3, 6)), [3, 1, 4]), (None, [4, 5, 3])]
)
def test_mask_centre_is_the_centroid_else_the_middle(mask_at, centre):
    mask = np.zeros((8, 10, 6), bool)
    if mask_at is not None:
        mask[mask_at] = True
    assert mask_centre(mask) == centre
    axial, coronal, sagittal = planes(np.zeros((8, 10, 6)), centre)
    assert (axial.shape, coronal.shape, sagittal.shape) == ((10, 8), (6, 8), (6, 10))


def test_image_grid_draws_every_panel_with_its_overlays(tmp_path, drawn):
    rng = np.random.default_rng(0)
    mask = np.zeros((10, 8), bool)
    mask[3:6, 2:5] = True
    labels = np.where(mask, 2, 0)
    rows = [
        [
            Panel(rng.uniform(0, 1, (10, 8)), "a", labels, mask),
            Panel(rng.uniform(0, 1, (10, 8)), "b", contour=mask),
        ],
        [Panel(rng.uniform(0, 1, (10, 8)), "failed", title_colour="r")],  # a short row: one empty cell
    ]
    colours = [(0, 0, 0, 0), (1, 0, 0, 1), (0, 0, 1, 1)]
    image_grid(tmp_path / "grid.png", rows, (4, 4), "two rows", label_colours=colours, dpi=50)
    assert (tmp_path / "grid.png").read_bytes()[:4] == PNG_MAGIC
    assert mpimg.imread(tmp_path / "grid.png").shape[:2] == (200, 200)
    (fig,) = drawn
    axes = fig.axes
    assert len(axes) == 4 and fig._suptitle.get_text() == "two rows"
    assert [ax.get_title() for ax in axes] == ["a", "b", "failed", ""]
    assert [len(ax.images) for ax in axes] == [2, 1, 1, 0]  # the label map over the first image only
    assert [len(ax.collections) > 0 for ax in axes] == [True, True, False, False]  # the outlines
    assert axes[2].title.get_color() == "r"


def test_image_grid_needs_colours_for_labels(tmp_path):
    panel = Panel(np.zeros((4, 4)), labels=np.ones((4, 4), int))
    with pytest.raises(ValueError, match="label_colours"):
        image_grid(tmp_path / "grid.png", [[panel]], (2, 2))


def test_pass_fail_histograms_one_axes_per_metric(tmp_path, drawn):
    passed = np.array([True, True, False, True])
    metrics = {
        "dice": np.array([0.9, 0.8, 0.4, np.nan]),
        "attempts": np.array([1.0, 1.0, 3.0, 2.0]),
        "hd95": np.array([2.0, 3.0, 9.0, 4.0]),
        "assd": np.array([1.0, 1.0, 2.0, 1.0]),
    }
    pass_fail_histograms(tmp_path / "qc.png", metrics, passed, "qc", {"dice": 0.7}, integer=("attempts",))
    pass_fail_histograms(tmp_path / "empty.png", {}, passed, "qc", empty_note="nothing measured")
    assert all((tmp_path / n).read_bytes()[:4] == PNG_MAGIC for n in ("qc.png", "empty.png"))
    full, empty = drawn
    assert len(full.axes) == 6  # 4 metrics, three a row
    assert [ax.get_title() for ax in full.axes[:4]] == ["dice (1 undefined)", "attempts", "hd95", "assd"]
    assert [ax.axison for ax in full.axes] == [True] * 4 + [False] * 2
    assert len(full.axes[1].patches) == 2 * 3  # attempts 1..3: one bin per value, passed and failed stacked
    assert full.axes[0].get_legend_handles_labels()[1] == ["passed", "failed", "threshold 0.7"]
    assert [t.get_text() for t in empty.axes[0].texts] == ["nothing measured"]


def test_text_figure_says_its_text(tmp_path, drawn):
    text_figure(tmp_path / "note.png", "previews disabled")
    assert mpimg.imread(tmp_path / "note.png").shape[:2] == (100, 400)
    assert [t.get_text() for t in drawn[0].texts] == ["previews disabled"]
