import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from vcm.prep.inputs import ManifestError, check_inputs, check_volume, read_manifest


def _nifti(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), str(path))
    return path


def _manifest(tmp_path, rows, columns=("subject", "t1", "age", "sex")):
    df = pd.DataFrame(rows, columns=list(columns))
    path = tmp_path / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def test_manifest_paths_resolve_against_its_folder_and_sex_is_normalised(tmp_path):
    path = _manifest(tmp_path, [["s1", "a/t1.nii.gz", 70, "female"], ["s2", "/abs/t1.nii", "61.5", "1"]])
    df = read_manifest(path)
    assert df["t1"].tolist() == [str(tmp_path / "a/t1.nii.gz"), "/abs/t1.nii"]
    assert df["sex"].tolist() == ["F", "M"]
    assert df["age"].tolist() == [70.0, 61.5]


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [
        ([["s1", "x", 70]], ("subject", "t1", "age"), "missing required column(s) sex"),
        ([["s1", "x", 70, "F"], ["s1", "y", 60, "M"]], None, "duplicate subject id(s) s1"),
        ([["s 1", "x", 70, "F"]], None, "subject id 's 1' is not file-name safe"),
        ([["s1", "x", 70, "X"]], None, "subject s1: sex 'X' is not F/M"),
        ([["s1", "x", "old", "F"]], None, "subject s1: age 'old' is not a number"),
    ],
)
def test_structural_manifest_errors_stop_with_one_line(tmp_path, rows, columns, message):
    path = _manifest(tmp_path, rows, columns or ("subject", "t1", "age", "sex"))
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_check_volume_names_each_problem(tmp_path):
    ok = _nifti(tmp_path / "ok.nii.gz", np.ones((4, 4, 4)))
    assert check_volume(ok) is None
    assert check_volume(_nifti(tmp_path / "single.nii.gz", np.ones((4, 4, 4, 1)))) is None
    assert "not found" in check_volume(tmp_path / "absent.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file")
    assert "unreadable" in check_volume(garbage)
    assert "4-D" in check_volume(_nifti(tmp_path / "four.nii.gz", np.ones((4, 4, 4, 3))))
    assert "empty" in check_volume(_nifti(tmp_path / "empty.nii.gz", np.ones((4, 0, 4))))
    assert "all zero" in check_volume(_nifti(tmp_path / "zero.nii.gz", np.zeros((4, 4, 4))))
    nan = np.ones((4, 4, 4))
    nan[1, 1, 1] = np.nan
    assert "NaN" in check_volume(_nifti(tmp_path / "nan.nii.gz", nan))
    truncated = tmp_path / "truncated.nii"
    _nifti(truncated, np.ones((16, 16, 16)))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    assert "unreadable" in check_volume(truncated)


def test_check_inputs_excludes_bad_subjects_and_keeps_the_rest(tmp_path):
    _nifti(tmp_path / "good.nii.gz", np.ones((4, 4, 4)))
    _nifti(tmp_path / "zero.nii.gz", np.zeros((4, 4, 4)))
    path = _manifest(
        tmp_path,
        [["a", "good.nii.gz", 70, "F"], ["b", "zero.nii.gz", 60, "M"], ["c", "none.nii.gz", 50, "M"]],
    )
    ok, bad = check_inputs(path, backend="atlas")
    assert ok["subject"].tolist() == ["a"]
    assert bad["subject"].tolist() == ["b", "c"]
    assert "all zero" in bad.iloc[0]["reason"] and "not found" in bad.iloc[1]["reason"]


def test_precomputed_backend_needs_a_seg_column(tmp_path):
    _nifti(tmp_path / "good.nii.gz", np.ones((4, 4, 4)))
    path = _manifest(tmp_path, [["a", "good.nii.gz", 70, "F"]])
    with pytest.raises(ManifestError, match="needs a 'seg' column"):
        check_inputs(path, backend="precomputed")
