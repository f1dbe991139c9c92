"""Registration recovers a known affine; outputs land on the grid in [0, 1]."""

import numpy as np
import pytest

from vcm.grid import Grid
from vcm.io import load_nifti, read_json, save_nifti
from vcm.prep.registration import normalise_intensity, register, transforms_of

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _known_affine(rng):
    """A template->native point mapping (RAS mm): rotation up to 8 deg, scale 0.9-1.1, shift up to 10 mm."""
    from vcm.prep.demo import _rotation

    lin = _rotation(np.deg2rad(rng.uniform(-8, 8, 3))) @ np.diag(rng.uniform(0.9, 1.1, 3))
    mat = np.eye(4)
    mat[:3, :3], mat[:3, 3] = lin, rng.uniform(-10, 10, 3)
    return mat


def _ants_affine_ras(mat_file):
    """The 4x4 RAS matrix of an ANTs affine .mat (which maps LPS fixed points to LPS moving points)."""
    import ants

    tx = ants.read_transform(mat_file)
    params, centre = np.asarray(tx.parameters), np.asarray(tx.fixed_parameters)
    a, t = params[:9].reshape(3, 3), params[9:]
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = a, t + centre - a @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


@pytest.mark.parametrize("seed, working_spacing_mm", [(3, 2.0), (3, 4.0)])  # 4.0: the demo grid's spacing
def test_register_recovers_a_known_affine(tmp_path, template_dir, seed, working_spacing_mm):
    rng = np.random.default_rng(seed)
    head, tpl_affine = load_nifti(template_dir / "t1_head.nii.gz")
    truth = _known_affine(rng)
    # The "native" image: the template seen through the known mapping, on a 2 mm native grid.
    native_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    native_affine[:3, 3] = [-100.0, -130.0, -80.0]
    from scipy import ndimage as ndi

    from vcm.prep.template import world_grid

    shape = (100, 120, 100)
    q = world_grid(shape, native_affine).reshape(3, -1)
    inv = np.linalg.inv(truth)
    p = inv[:3, :3] @ q + inv[:3, 3:4]
    vox = np.linalg.inv(tpl_affine)[:3, :3] @ p + np.linalg.inv(tpl_affine)[:3, 3:4]
    native = ndi.map_coordinates(head, vox, order=1).reshape(shape) * 500
    save_nifti(tmp_path / "native.nii.gz", native, native_affine)

    grid = Grid.from_config("demo")
    info = register(
        tmp_path / "native.nii.gz",
        template_dir / "t1_head.nii.gz",
        grid,
        tmp_path / "reg",
        "Affine",
        working_spacing_mm,
    )
    est = _ants_affine_ras(transforms_of(tmp_path / "reg")[0])
    # Mean displacement error over the template brain's voxels (mm).
    labels, _ = load_nifti(template_dir / "labels.nii.gz")
    pts = np.argwhere(labels[::4, ::4, ::4] > 0) * 4
    world = (tpl_affine[:3, :3] @ pts.T + tpl_affine[:3, 3:4]).T
    err = np.linalg.norm(
        (world @ est[:3, :3].T + est[:3, 3]) - (world @ truth[:3, :3].T + truth[:3, 3]), axis=1
    )
    assert err.mean() < 1.0, f"mean displacement error {err.mean():.2f} mm"
    assert info["affine_determinant"] == pytest.approx(abs(np.linalg.det(truth[:3, :3])), rel=0.02)

    data, affine = load_nifti(tmp_path / "reg" / "t1.nii.gz")
    assert data.shape == grid.shape and np.allclose(affine, grid.affine)
    assert data.min() >= 0.0 and data.max() == pytest.approx(1.0)
    assert info["ncc_with_template"] > 0.9
    assert read_json(tmp_path / "reg" / "registration.json")["transform"] == "Affine"
    assert (tmp_path / "reg" / "xfm" / "fwd_0GenericAffine.mat").is_file()


def test_normalise_intensity_clips_and_scales():
    data = np.concatenate([np.zeros(100), np.linspace(1, 100, 1000), [1e6]])
    out = normalise_intensity(data, (0.0, 99.5))
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.sum(out == 1.0) > 1  # the outlier and the top 0.5 % are clipped


def test_correlation_is_nan_without_evidence():
    from vcm.prep.registration import correlation

    a = np.arange(64, dtype=float).reshape(4, 4, 4)
    inside = np.ones(a.shape, bool)
    assert correlation(a, 2 * a + 1, inside) == pytest.approx(1.0)
    assert np.isnan(correlation(a, np.zeros_like(a), inside))  # a constant image
    assert np.isnan(correlation(a, a, np.zeros_like(inside)))  # nothing inside


def test_a_noise_volume_is_excluded_at_register(tmp_path, template_dir, capsys):
    """Fault injection through the stage's command line: noise of a head's size reads cleanly, registers to
    something, and fails the template-similarity gate; the job completes and records why."""
    from vcm.cli import main
    from vcm.prep.exclusion import read_status

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-96.0, -130.0, -80.0]
    noise = np.random.default_rng(0).random((64, 80, 64)) * 500  # 192 × 240 × 192 mm
    save_nifti(tmp_path / "noise.nii.gz", noise, affine)
    out = tmp_path / "prep" / "noise"
    args = ["register", "--config", "config/config.yaml", "--subject", "noise"]
    args += ["--t1", str(tmp_path / "noise.nii.gz"), "--template-dir", str(template_dir)]
    args += ["--out-dir", str(out), "--status", str(out / "status" / "register.json")]
    assert main(args) == 0
    exclusion = read_status(out / "status" / "register.json")
    assert exclusion.stage == "register" and "template_similarity" in exclusion.gates
    info = read_json(out / "registration.json")
    assert abs(info["ncc_in_brain"]) < 0.2
    assert f"correlation with the template {info['ncc_in_brain']:.3f}, under" in exclusion.reason
    assert "subject noise: excluded at register: correlation with the template" in capsys.readouterr().err
    assert (out / "registration.png").stat().st_size > 10_000  # the failed registration, to look at
