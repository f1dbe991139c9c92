import numpy as np
import pytest

from vcm.labels import semantic_map
from vcm.prep.conditions import axial_lowres, load_ranges, scale_covariates, skull_image


def test_axial_lowres_averages_slabs_along_z():
    img = np.zeros((2, 2, 8), np.float32)
    img[..., ::2] = 1.0  # alternating slices: a 2-voxel slab averages to 0.5
    low = axial_lowres(img, spacing_mm=1.0, slice_mm=2.0)
    assert low.shape == img.shape
    np.testing.assert_allclose(low, 0.5, atol=1e-6)
    np.testing.assert_array_equal(axial_lowres(img, spacing_mm=4.0, slice_mm=4.0), img)


def test_axial_lowres_keeps_smooth_signal_and_loses_detail():
    z = np.linspace(0, 1, 32)
    img = np.broadcast_to(z, (3, 3, 32)).astype(np.float32) + 0.3 * np.sin(np.arange(32) * np.pi / 2)
    low = axial_lowres(img, 1.0, 8.0)
    assert np.abs(low - np.broadcast_to(z, img.shape)).mean() < 0.1
    assert np.abs(low - img).mean() > 0.1


def test_skull_image_is_outside_the_brain_and_inside_the_head():
    labels = np.zeros((32, 32, 32), np.uint16)
    labels[10:22, 10:22, 10:22] = 2
    img = np.zeros((32, 32, 32), np.float32)
    img[4:28, 4:28, 4:28] = 0.5
    img[10:22, 10:22, 10:22] = 0.9
    skull = skull_image(img, labels, 1.0, margin_mm=2.0)
    assert skull[16, 16, 16] == 0 and skull[11, 16, 16] == 0 and skull[8, 16, 16] == 0  # brain and margin
    assert skull[5, 16, 16] == pytest.approx(0.5) and skull[1, 16, 16] == 0  # shell kept, air not


def test_covariates_scale_and_clip(tmp_path):
    ranges = load_ranges("resources/covariate_ranges.yaml")
    scaled, clipped = scale_covariates(
        {"sex": 1.0, "age": 63.0, "lv_volume": 6995.68, "brain_volume": 2e6}, ranges
    )
    assert scaled == pytest.approx([1.0, 0.5, 0.0, 1.0])
    assert clipped == ["brain_volume"]


def test_semantic_map_has_the_paper_classes():
    labels = np.array([0, 24, 2, 41, 3, 42, 4, 43, 14, 10, 18, 17, 16, 999], np.uint16)
    assert semantic_map(labels).tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 4, 5, 6, 7, 8, 0]
