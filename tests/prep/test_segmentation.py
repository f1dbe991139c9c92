"""Segmentation backends: the SynthSeg wiring (with a stand-in executable), precomputed and atlas."""

import os
import stat
import sys
import textwrap

import numpy as np
import pytest

from vcm.config import validate_config
from vcm.errors import StageError
from vcm.io import load_nifti, read_json
from vcm.labels import LATERAL_VENTRICLES, mask_of
from vcm.prep.demo import build_demo
from vcm.prep.registration import register
from vcm.prep.segmentation import label_volumes, segment, synthseg_volumes


@pytest.fixture(scope="module")
def demo_subject(tmp_path_factory, template_dir):
    """One demo subject, registered to the demo grid."""
    root = tmp_path_factory.mktemp("demo")
    build_demo(root, n_subjects=1, seed=5)
    from vcm.grid import Grid

    register(
        root / "sub-001" / "t1.nii.gz",
        template_dir / "t1_head.nii.gz",
        Grid.from_config("demo"),
        root / "reg",
        "Affine",
        2.0,
    )
    return root


def _stand_in_synthseg(folder, labels_path):
    """An executable with mri_synthseg's flags that copies known labels and writes a --vol CSV."""
    script = folder / "mri_synthseg"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import argparse, shutil
            p = argparse.ArgumentParser()
            p.add_argument("--i"); p.add_argument("--o"); p.add_argument("--vol"); p.add_argument("--threads")
            p.add_argument("--robust", action="store_true"); p.add_argument("--cpu", action="store_true")
            a = p.parse_args()
            shutil.copy({str(labels_path)!r}, a.o)
            with open(a.vol, "w") as f:
                f.write("subject,total intracranial,left lateral ventricle,right lateral ventricle,left cerebral white matter\\n")
                f.write(a.i + ",1500000,11000.5,12000.25,250000\\n")
            with open(a.o + ".args", "w") as f:
                f.write(" ".join(k for k, v in vars(a).items() if v is True))
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_synthseg_backend_runs_the_command_and_parses_volumes(
    tmp_path, monkeypatch, demo_subject, template_dir
):
    _stand_in_synthseg(tmp_path, demo_subject / "sub-001" / "labels.nii.gz")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = validate_config({"segmentation": {"backend": "synthseg", "synthseg": {"robust": True}}})
    out = tmp_path / "seg"
    vol = segment(
        cfg,
        "sub-001",
        str(demo_subject / "sub-001" / "t1.nii.gz"),
        None,
        demo_subject / "reg",
        template_dir,
        out,
    )
    assert vol["lv_mm3"] == pytest.approx(23000.75)
    assert vol["total_intracranial_mm3"] == 1500000
    assert vol["labels_mm3"][2] == 250000
    assert (out / "synthseg" / "synthseg.nii.gz.args").read_text().split() == ["robust", "cpu"]
    # Same transform and interpolation as the precomputed backend: identical grid labels.
    cfg_pre = validate_config({"segmentation": {"backend": "precomputed"}})
    segment(
        cfg_pre,
        "sub-001",
        "",
        str(demo_subject / "sub-001" / "labels.nii.gz"),
        demo_subject / "reg",
        template_dir,
        tmp_path / "pre",
    )
    a, _ = load_nifti(out / "labels.nii.gz", np.int32)
    b, _ = load_nifti(tmp_path / "pre" / "labels.nii.gz", np.int32)
    assert a.shape == (40, 56, 40) and np.array_equal(a, b)
    assert read_json(out / "volumes.json")["backend"] == "synthseg"


def test_missing_synthseg_is_a_clear_error(tmp_path, demo_subject, template_dir):
    cfg = validate_config(
        {"segmentation": {"backend": "synthseg", "synthseg": {"command": "no-such-synthseg"}}}
    )
    with pytest.raises(StageError) as err:
        segment(cfg, "sub-001", "t1.nii.gz", None, demo_subject / "reg", template_dir, tmp_path)
    message = str(err.value)
    assert "'no-such-synthseg' not found" in message and "segmentation.backend: atlas" in message


def test_precomputed_volumes_are_native(tmp_path, demo_subject, template_dir):
    cfg = validate_config({"segmentation": {"backend": "precomputed"}})
    native, affine = load_nifti(demo_subject / "sub-001" / "labels.nii.gz", np.int32)
    vol = segment(
        cfg,
        "sub-001",
        "",
        str(demo_subject / "sub-001" / "labels.nii.gz"),
        demo_subject / "reg",
        template_dir,
        tmp_path,
    )
    voxel = abs(np.linalg.det(affine[:3, :3]))
    assert vol["lv_mm3"] == pytest.approx(mask_of(native, LATERAL_VENTRICLES).sum() * voxel)


def test_atlas_backend_finds_the_ventricles(tmp_path, demo_subject, template_dir):
    cfg = validate_config({})
    vol = segment(cfg, "sub-001", "", None, demo_subject / "reg", template_dir, tmp_path)
    labels, _ = load_nifti(tmp_path / "labels.nii.gz", np.int32)
    truth = segment(
        validate_config({"segmentation": {"backend": "precomputed"}}),
        "sub-001",
        "",
        str(demo_subject / "sub-001" / "labels.nii.gz"),
        demo_subject / "reg",
        template_dir,
        tmp_path / "truth",
    )
    ref, _ = load_nifti(tmp_path / "truth" / "labels.nii.gz", np.int32)
    a, b = mask_of(labels, LATERAL_VENTRICLES), mask_of(ref, LATERAL_VENTRICLES)
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.7, dice
    assert vol["lv_mm3"] == pytest.approx(truth["lv_mm3"], rel=0.3)


def test_label_volumes_and_synthseg_csv(tmp_path):
    labels = np.zeros((4, 4, 4), np.uint16)
    labels[0] = 4
    labels[1, :2] = 24
    labels[2] = 2
    vol = label_volumes(labels, 2.0)
    assert vol["lv_mm3"] == 32.0 and vol["brain_mm3"] == 64.0 and vol["labels_mm3"][24] == 16.0
    csv = tmp_path / "v.csv"
    csv.write_text(
        "subject,total intracranial,left lateral ventricle,right lateral ventricle,CSF,brain-stem\ns,9,1,2,4,8\n"
    )
    parsed = synthseg_volumes(csv)
    assert parsed["lv_mm3"] == 3 and parsed["brain_mm3"] == 11 and parsed["labels_mm3"][16] == 8


def test_register_segment_runs_both_stages_in_one_process(tmp_path, demo_subject, template_dir):
    """The workflow's per-subject job: registration then segmentation, each with its own status file."""
    from vcm.cli import main
    from vcm.grid import Grid
    from vcm.io import write_json
    from vcm.prep.exclusion import read_status

    subject = demo_subject / "sub-001"
    write_json(tmp_path / "meta.json", {"seg": str(subject / "labels.nii.gz")})
    out = tmp_path / "prep"
    args = ["register-segment", "--config", "config/config.yaml", "--subject", "sub-001"]
    args += ["--t1", str(subject / "t1.nii.gz"), "--meta", str(tmp_path / "meta.json")]
    args += ["--template-dir", str(template_dir), "--out-dir", str(out)]
    args += ["--register-status", str(out / "status" / "register.json")]
    args += ["--segment-status", str(out / "status" / "segment.json")]
    assert main(args) == 0
    assert read_status(out / "status" / "register.json") is None
    assert read_json(out / "status" / "segment.json")["stage"] == "segment"
    assert read_status(out / "status" / "segment.json") is None
    labels, _ = load_nifti(out / "labels.nii.gz", np.int32)
    assert labels.shape == Grid.from_config("demo").shape
    native, affine = load_nifti(subject / "labels.nii.gz", np.int32)
    lv_native = mask_of(native, LATERAL_VENTRICLES).sum() * abs(np.linalg.det(affine[:3, :3]))
    assert read_json(out / "volumes.json")["lv_mm3"] == pytest.approx(lv_native)
    assert (out / "registration.json").is_file() and (out / "registration.png").stat().st_size > 10_000
