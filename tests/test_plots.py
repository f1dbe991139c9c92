"""Tests of the project's plotting module (vcm.plots): the figures are written, atomically, as PNGs."""

from __future__ import annotations

import numpy as np

from vcm.plots import loss_curve, three_plane_montage

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
