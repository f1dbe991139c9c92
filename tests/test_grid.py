import numpy as np
import pytest

from vcm.grid import MNI_BRAIN_CENTER_MM, Grid


@pytest.mark.parametrize(
    ("name", "shape", "spacing"), [("demo", (40, 56, 40), 4.0), ("brainldm", (160, 224, 160), 1.0)]
)
def test_presets_share_the_field_of_view(name, shape, spacing):
    grid = Grid.from_config(name)
    assert grid.shape == shape and grid.spacing_mm == spacing
    fov = np.asarray(shape) * spacing
    np.testing.assert_allclose(fov, [160, 224, 160])


def test_affine_is_las_and_centred():
    grid = Grid.from_config("demo")
    aff = grid.affine
    assert aff[0, 0] < 0 and aff[1, 1] > 0 and aff[2, 2] > 0
    centre = aff @ np.r_[(np.asarray(grid.shape) - 1) / 2, 1.0]
    np.testing.assert_allclose(centre[:3], MNI_BRAIN_CENTER_MM)
    coords = grid.world_coords()
    np.testing.assert_allclose(coords[:, 0, 0, 0], aff[:3, 3])


def test_ants_reference_round_trips_the_affine():
    import ants

    grid = Grid((8, 10, 12), 3.0, (1.0, 2.0, 3.0))
    ref = grid.reference_image()
    assert ref.shape == (8, 10, 12)
    np.testing.assert_allclose(ants.to_nibabel_nifti(ref).affine, grid.affine, atol=1e-5)
