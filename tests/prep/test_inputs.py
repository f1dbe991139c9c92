import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from vcm.prep.inputs import check_inputs, check_volume
from vcm.prep.manifest import ManifestError, read_manifest


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
    ],
)
def test_structural_manifest_errors_stop_with_one_line(tmp_path, rows, columns, message):
    path = _manifest(tmp_path, rows, columns or ("subject", "t1", "age", "sex"))
    for strict in (False, True):
        with pytest.raises(ManifestError) as err:
            read_manifest(path, strict=strict)
        assert message in str(err.value) and str(path) in str(err.value)


def test_unreadable_csv_stops(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"subject,t1,age,sex\n\xff\xfe,x,1,F\n")
    with pytest.raises(ManifestError, match="not a readable CSV"):
        read_manifest(path)


# Row-level problems: (age, sex) as written in the CSV, and the reason that names the column.
ROW_PROBLEMS = [
    ("", "F", "age is missing"),
    ("old", "F", "age 'old' is not a number"),
    ("-3", "F", "age '-3' is negative"),
    ("70", "", "sex is missing"),
    ("70", "X", "sex 'X' is not F/M (or 0/1, female/male)"),
]


def _raw_manifest(tmp_path, age, sex):
    path = tmp_path / "manifest.csv"
    path.write_text(f"subject,t1,age,sex\ns1,good.nii.gz,61,M\ns2,good.nii.gz,{age},{sex}\n")
    return path


@pytest.mark.parametrize(("age", "sex", "reason"), ROW_PROBLEMS)
def test_row_problem_is_returned_as_that_rows_reason(tmp_path, age, sex, reason):
    df = read_manifest(_raw_manifest(tmp_path, age, sex))
    assert df["subject"].tolist() == ["s1", "s2"]
    assert df["reason"].tolist() == [None, reason]
    assert df.loc[0, "age"] == 61.0 and df.loc[0, "sex"] == "M"


@pytest.mark.parametrize(("age", "sex", "reason"), ROW_PROBLEMS)
def test_check_inputs_excludes_a_row_problem_and_keeps_the_rest(tmp_path, age, sex, reason):
    _nifti(tmp_path / "good.nii.gz", np.ones((4, 4, 4)))
    ok, bad = check_inputs(_raw_manifest(tmp_path, age, sex), backend="atlas")
    assert ok["subject"].tolist() == ["s1"] and "reason" not in ok.columns
    assert list(bad.columns) == ["subject", "t1", "reason"]
    assert bad["subject"].tolist() == ["s2"] and bad["reason"].tolist() == [reason]
    assert bad["t1"].tolist() == [str(tmp_path / "good.nii.gz")]


@pytest.mark.parametrize(("age", "sex", "reason"), ROW_PROBLEMS)
def test_strict_mode_stops_on_a_row_problem_with_one_line(tmp_path, age, sex, reason):
    path = _raw_manifest(tmp_path, age, sex)
    _nifti(tmp_path / "good.nii.gz", np.ones((4, 4, 4)))
    for check in (lambda: read_manifest(path, strict=True), lambda: check_inputs(path, "atlas", strict=True)):
        with pytest.raises(ManifestError) as err:
            check()
        assert str(err.value) == f"manifest {path}: subject s2: {reason}"


def test_a_row_with_several_problems_names_them_all(tmp_path):
    df = read_manifest(_raw_manifest(tmp_path, "-1", "X"))
    assert df["reason"][1] == "age '-1' is negative; sex 'X' is not F/M (or 0/1, female/male)"
    empty = tmp_path / "empty_cells.csv"
    empty.write_text("subject,t1,age,sex\na,x,,\n")  # whole columns empty: no string values at all
    assert read_manifest(empty)["reason"].tolist() == ["age is missing; sex is missing"]


def test_age_zero_and_sex_codes_are_usable(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("subject,t1,age,sex\na,x,0,0\nb,x, 7.5 , male \nc,x,80,f\n")
    df = read_manifest(path, strict=True)
    assert df["reason"].isna().all()
    assert df["age"].tolist() == [0.0, 7.5, 80.0] and df["sex"].tolist() == ["F", "M", "F"]


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


def test_an_empty_t1_cell_is_excluded_not_a_crash(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("subject,t1,age,sex\na,,70,F\n")
    ok, bad = check_inputs(path, backend="atlas")
    assert ok.empty and bad["reason"].tolist() == ["no t1 path given"]


def test_precomputed_backend_needs_a_seg_column(tmp_path):
    _nifti(tmp_path / "good.nii.gz", np.ones((4, 4, 4)))
    path = _manifest(tmp_path, [["a", "good.nii.gz", 70, "F"]])
    with pytest.raises(ManifestError, match="needs a 'seg' column"):
        check_inputs(path, backend="precomputed")
