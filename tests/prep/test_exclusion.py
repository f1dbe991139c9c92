"""Exclusions: a stage that raises or fails a gate excludes its subject, never stops the run; later stages pass
the subject through; subject-gates gathers the outcomes into excluded.csv and passed.csv."""

import errno

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.fixtures import head_labels
from vcm.cli import main
from vcm.errors import StageError
from vcm.grid import Grid
from vcm.io import read_json, save_nifti, write_json
from vcm.prep.exclusion import (
    EXCLUDED_COLUMNS,
    Exclusion,
    read_status,
    require_passed,
    run_subject_stage,
    status_path,
    write_status,
)
from vcm.prep.gates import Failure

PNG_MAGIC = b"\x89PNG"


def _outputs(folder):
    return [folder / "t1.nii.gz", folder / "registration.json", folder / "registration.png"]


def test_a_stage_that_raises_excludes_the_subject_and_logs_the_traceback(tmp_path, capsys):
    outputs = _outputs(tmp_path)

    def work():
        save_nifti(outputs[0], np.ones((4, 4, 4)), np.eye(4))  # written before the failure: kept
        raise ValueError("boom\nsecond line")

    status = tmp_path / "status" / "register.json"
    exclusion = run_subject_stage("s1", "register", work, status=status, outputs=outputs)
    assert exclusion == Exclusion("s1", "register", ("error",), "ValueError: boom")
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise ValueError("boom' in err
    assert err.strip().endswith("subject s1: excluded at register: ValueError: boom")
    assert nib.load(outputs[0]).shape == (4, 4, 4)
    assert outputs[1].stat().st_size == 0  # a placeholder no reader takes for data
    assert outputs[2].read_bytes().startswith(PNG_MAGIC)  # a picture that says why
    assert read_status(status) == exclusion
    assert read_json(status) == {
        "subject": "s1",
        "stage": "register",
        "status": "excluded",
        "excluded_at": "register",
        "gates": ["error"],
        "reason": "ValueError: boom",
    }


def test_a_stage_error_is_its_one_line_and_a_failed_gate_keeps_the_outputs(tmp_path, capsys):
    def fails():
        raise StageError("t1 file x.nii.gz is all zero")

    status = tmp_path / "a.json"
    exclusion = run_subject_stage("s1", "register", fails, status=status, outputs=[tmp_path / "t1.nii.gz"])
    assert exclusion.reason == "t1 file x.nii.gz is all zero" and exclusion.gates == ("error",)
    assert "Traceback" not in capsys.readouterr().err

    def gated():
        write_json(tmp_path / "volumes.json", {"lv_mm3": 0.0})
        return [Failure("lv_volume", "LV volume 0.0 mL"), Failure("structures", "missing lateral ventricles")]

    exclusion = run_subject_stage(
        "s2", "segment", gated, status=tmp_path / "b.json", outputs=[tmp_path / "volumes.json"]
    )
    assert exclusion.gates == ("lv_volume", "structures")
    assert exclusion.line == "subject s2: excluded at segment: LV volume 0.0 mL; missing lateral ventricles"
    assert read_json(tmp_path / "volumes.json") == {"lv_mm3": 0.0}


def test_a_passed_stage_records_it_and_stale_outputs_never_survive(tmp_path):
    out = tmp_path / "labels.nii.gz"
    out.write_bytes(b"from an earlier run")
    assert run_subject_stage("s1", "segment", lambda: [], status=tmp_path / "ok.json", outputs=[]) is None
    assert read_json(tmp_path / "ok.json") == {"subject": "s1", "stage": "segment", "status": "passed"}

    def crash():
        raise RuntimeError("no labels this time")

    run_subject_stage("s1", "segment", crash, status=tmp_path / "s.json", outputs=[out])
    assert out.stat().st_size == 0  # the earlier run's file is gone, not taken for this run's


def test_an_excluded_subject_passes_through_the_next_stages(tmp_path):
    first = Exclusion("s1", "register", ("template_similarity",), "correlation with the template 0.05")
    write_status(tmp_path / "register.json", "s1", "register", first)
    called = []
    outputs = [tmp_path / "labels.nii.gz", tmp_path / "volumes.json"]
    exclusion = run_subject_stage(
        "s1",
        "segment",
        lambda: called.append(1) or [],
        status=tmp_path / "segment.json",
        outputs=outputs,
        previous=tmp_path / "register.json",
    )
    assert not called and exclusion == first
    assert all(p.stat().st_size == 0 for p in outputs)
    assert read_json(tmp_path / "segment.json")["stage"] == "segment"
    assert read_status(tmp_path / "segment.json") == first  # the first exclusion, carried on


@pytest.mark.parametrize("error", [MemoryError(), OSError(errno.ENOSPC, "No space left on device")])
def test_errors_of_the_machine_still_fail_the_job(tmp_path, error):
    def work():
        raise error

    with pytest.raises(type(error)):
        run_subject_stage("s1", "register", work, status=tmp_path / "s.json", outputs=[])
    assert not (tmp_path / "s.json").exists()


def test_a_missing_or_foreign_status_is_an_error(tmp_path):
    with pytest.raises(StageError, match="status file .* not found"):
        read_status(tmp_path / "none.json")
    write_json(tmp_path / "other.json", {"lv_mm3": 1})
    with pytest.raises(StageError, match="is not a stage status"):
        read_status(tmp_path / "other.json")


def _prep_with_outcomes(root):
    """Four subjects that passed the input checks: s1 and s4 passed, s2 excluded at register (carried to
    conditions), s3 excluded at segment; and one input-check exclusion."""
    prep = root / "prep"
    outcomes = {
        "s1": None,
        "s2": Exclusion("s2", "register", ("template_similarity", "affine_determinant"), "NCC 0.01; det 27"),
        "s3": Exclusion("s3", "segment", ("error",), "KeyError: 'lv_mm3'"),
        "s4": None,
    }
    for sid, exclusion in outcomes.items():
        write_status(status_path(prep, sid, "conditions"), sid, "conditions", exclusion)
    subjects = pd.DataFrame({"subject": list(outcomes), "t1": [f"/d/{s}.nii.gz" for s in outcomes]})
    subjects["age"], subjects["sex"] = 60.0, "F"
    subjects.to_csv(root / "subjects.csv", index=False)
    inputs = pd.DataFrame(
        [["bad", "check_inputs", "file", "t1 file /d/bad.nii.gz not found", "/d/bad.nii.gz"]],
        columns=list(EXCLUDED_COLUMNS),
    )
    inputs.to_csv(root / "inputs_excluded.csv", index=False)
    return prep


def test_subject_gates_writes_every_exclusion_and_the_passed_subjects(tmp_path, capsys):
    prep = _prep_with_outcomes(tmp_path)
    args = ["subject-gates", "--subjects", str(tmp_path / "subjects.csv")]
    args += ["--inputs-excluded", str(tmp_path / "inputs_excluded.csv"), "--prep-dir", str(prep)]
    args += ["--excluded", str(tmp_path / "excluded.csv"), "--passed", str(tmp_path / "passed.csv")]
    assert main(args) == 0
    excluded = pd.read_csv(tmp_path / "excluded.csv")
    assert list(excluded.columns) == list(EXCLUDED_COLUMNS)
    assert excluded.values.tolist() == [
        ["bad", "check_inputs", "file", "t1 file /d/bad.nii.gz not found", "/d/bad.nii.gz"],
        ["s2", "register", "template_similarity, affine_determinant", "NCC 0.01; det 27", "/d/s2.nii.gz"],
        ["s3", "segment", "error", "KeyError: 'lv_mm3'", "/d/s3.nii.gz"],
    ]
    passed = pd.read_csv(tmp_path / "passed.csv")
    assert passed["subject"].tolist() == ["s1", "s4"] and list(passed.columns) == [
        "subject",
        "t1",
        "age",
        "sex",
    ]
    out = capsys.readouterr()
    assert "subject s3: excluded at segment: KeyError: 'lv_mm3'" in out.err
    assert "subject bad:" not in out.err  # check_inputs logged its own
    assert (
        "2 subject(s) passed every gate, 3 excluded (1 at check_inputs, 1 at register, 1 at segment)"
        in out.out
    )


def test_an_excluded_subject_cannot_enter_the_dataset(tmp_path):
    prep = _prep_with_outcomes(tmp_path)
    require_passed(prep, "s1")
    require_passed(prep, "handmade")  # no statuses: a folder prepared by hand
    with pytest.raises(StageError, match="subject s2: excluded at register: NCC 0.01; det 27; it cannot go"):
        require_passed(prep, "s2")


# --- the real stages' command lines on injected faults ------------------------------------------------------


def _config(tmp_path, **overrides):
    from tests.conftest import REPO

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(overrides)
    cfg["conditions"]["covariate_ranges"] = str(REPO / "resources" / "covariate_ranges.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _identity_registration(reg_dir):
    """A registration folder whose transform is the identity (the native label map is on the grid already)."""
    import ants

    reg_dir.mkdir(parents=True, exist_ok=True)
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    ants.write_transform(tx, str(reg_dir / "fwd_0GenericAffine.mat"))
    files = ["fwd_0GenericAffine.mat"]
    write_json(reg_dir / "registration.json", {"affine_determinant": 1.0, "fwdtransforms": files})
    write_status(reg_dir / "status" / "register.json", "s1", "register", None)


def test_segment_excludes_a_label_map_without_ventricles(tmp_path, capsys):
    grid = Grid.from_config("demo")
    prep = tmp_path / "prep" / "s1"
    _identity_registration(prep)
    save_nifti(tmp_path / "seg.nii.gz", head_labels(ventricles=False), grid.affine, np.uint16)
    write_json(tmp_path / "s1.json", {"subject": "s1", "seg": str(tmp_path / "seg.nii.gz")})
    config = _config(tmp_path, segmentation={"backend": "precomputed"})
    args = [
        "segment",
        "--config",
        str(config),
        "--subject",
        "s1",
        "--t1",
        "unused",
        "--meta",
        str(tmp_path / "s1.json"),
    ]
    args += ["--reg-dir", str(prep), "--template-dir", "unused", "--out-dir", str(prep)]
    args += [
        "--status",
        str(prep / "status" / "segment.json"),
        "--previous-status",
        str(prep / "status" / "register.json"),
    ]
    assert main(args) == 0  # the job completes
    exclusion = read_status(prep / "status" / "segment.json")
    assert exclusion.stage == "segment" and exclusion.gates == ("lv_volume", "structures")
    assert "missing lateral ventricles" in exclusion.reason
    assert "subject s1: excluded at segment: LV volume 0.0 mL" in capsys.readouterr().err
    assert nib.load(prep / "labels.nii.gz").shape == grid.shape  # what it made stays for inspection


def test_conditions_that_raise_exclude_the_subject_with_the_traceback(tmp_path, capsys):
    grid = Grid.from_config("demo")
    save_nifti(tmp_path / "t1.nii.gz", np.random.default_rng(0).random(grid.shape), grid.affine)
    (tmp_path / "labels.nii.gz").write_bytes(b"not a nifti")  # a segmentation's output gone bad
    write_json(tmp_path / "volumes.json", {"lv_mm3": 2e4, "brain_mm3": 1.2e6})
    write_status(tmp_path / "segment.json", "s1", "segment", None)
    out = tmp_path / "conditions"
    args = [
        "conditions",
        "--config",
        str(_config(tmp_path)),
        "--subject",
        "s1",
        "--t1",
        str(tmp_path / "t1.nii.gz"),
    ]
    args += ["--labels", str(tmp_path / "labels.nii.gz"), "--volumes", str(tmp_path / "volumes.json")]
    args += [
        "--age",
        "60",
        "--sex",
        "F",
        "--out-dir",
        str(out),
        "--status",
        str(tmp_path / "conditions.json"),
    ]
    args += ["--previous-status", str(tmp_path / "segment.json")]
    assert main(args) == 0
    exclusion = read_status(tmp_path / "conditions.json")
    assert exclusion.stage == "conditions" and exclusion.gates == ("error",)
    assert exclusion.reason.startswith("ImageFileError: ")
    err = capsys.readouterr().err
    assert (
        "Traceback (most recent call last)" in err
        and "subject s1: excluded at conditions: ImageFileError" in err
    )
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        ["covariates.json", "lv.nii.gz", "brain.nii.gz", "semantics.nii.gz", "skull.nii.gz"]
        + ["lowres_4mm.nii.gz", "lowres_8mm.nii.gz"]
    )
    assert all(p.stat().st_size == 0 for p in out.iterdir())  # placeholders only
