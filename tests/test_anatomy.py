"""Volume-targeted ventricle deformations (vcm.anatomy) on a synthetic two-ventricle box."""

from __future__ import annotations

import numpy as np
import pytest

from vcm.anatomy import expansion_velocity, lattice_displacement, solve_ventricle_field


@pytest.fixture(scope="module")
def box():
    shape, spacing = (40, 40, 40), 2.0
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -39.0
    x, y, z = np.meshgrid(*[np.arange(s) * spacing - 39.0 for s in shape], indexing="ij")
    left = ((x + 10) / 5) ** 2 + (y / 14) ** 2 + (z / 5) ** 2 < 1
    right = ((x - 10) / 5) ** 2 + (y / 14) ** 2 + (z / 5) ** 2 < 1
    return affine, left, right


@pytest.mark.parametrize("factor", [0.6, 1.0, 2.5])
def test_reaches_the_target_volume_by_growing_or_shrinking(box, factor):
    affine, left, right = box
    lv = (left | right).astype(np.float32)
    start = lv.sum() * 8.0
    field = solve_ventricle_field(lv, lv, affine, factor * start)
    assert field.lv_mm3 == pytest.approx(factor * start, rel=0.03)
    assert np.sign(field.strength) == np.sign(factor - 1) or factor == 1.0
    corner = field.displacement(np.array([[-38.0], [-38.0], [-38.0]]))
    assert np.abs(corner).max() < 0.05  # the push is local: far tissue does not move
    assert np.all(field.displacement(np.array([[500.0], [0.0], [0.0]])) == 0)  # outside the box


def test_weights_steer_which_ventricle_grows(box):
    affine, left, right = box
    lv = (left | right).astype(np.float32)
    field = solve_ventricle_field(left * 3.0 + right * 0.3, lv, affine, 2.0 * lv.sum() * 8.0)
    # where does each ventricle end up: sample the deformed mask through the field
    pts = np.stack(np.meshgrid(*[np.arange(40) * 2.0 - 39.0] * 3, indexing="ij")).reshape(3, -1)
    src = pts + field.displacement(pts)
    vox = np.rint((src + 39.0) / 2.0).astype(int).clip(0, 39)
    grown_left = left[tuple(vox)].sum()
    grown_right = right[tuple(vox)].sum()
    assert grown_left > 1.5 * grown_right


def test_velocity_is_unit_peak_and_errors_on_no_ventricle():
    w = np.zeros((10, 10, 10))
    w[4:6, 4:6, 4:6] = 1
    v = expansion_velocity(w, 2.0)
    assert np.sqrt((v**2).sum(0)).max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no ventricle"):
        expansion_velocity(np.zeros((5, 5, 5)), 2.0)


def test_lattice_displacement_is_the_same_field_on_any_grid():
    pts = np.random.default_rng(0).uniform(-60, 60, (3, 50))
    a = lattice_displacement(np.random.default_rng(3), pts, 24.0, 2.5)
    b = lattice_displacement(np.random.default_rng(3), pts[:, :10], 24.0, 2.5)
    np.testing.assert_allclose(a[:, :10], b)
    assert 0.5 < a.std() < 5.0
