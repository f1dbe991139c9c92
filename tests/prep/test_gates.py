"""The quality gates on injected faults: a 4×4×4 volume, a scaled-by-3 affine, a label map without ventricles."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.fixtures import head_labels
from vcm.config import validate_config
from vcm.labels import LATERAL_VENTRICLES
from vcm.prep.gates import (
    GateSettings,
    input_failures,
    registration_failures,
    required_structures,
    segmentation_failures,
)
from vcm.prep.inputs import check_inputs, checked_manifest
from vcm.prep.registration import affine_determinant
from vcm.prep.segmentation import label_volumes

GATES = GateSettings.from_config(validate_config({}))


def _gates(**changes):
    return GateSettings.from_config(validate_config({"data": {"gates": changes}}))


@pytest.mark.parametrize(
    ("shape", "zooms", "gates"),
    [
        ((92, 116, 100), (2.0, 2.0, 2.0), []),  # the demo's native T1s: 184 × 232 × 200 mm
        ((40, 56, 40), (4.0, 4.0, 4.0), []),  # the demo grid (a cohort's manifest is a valid input)
        ((4, 4, 4), (1.0, 1.0, 1.0), ["field_of_view", "voxel_count"]),
        ((4, 4, 4), (50.0, 50.0, 50.0), ["voxel_count"]),  # a large field of view of 64 voxels
        ((256, 256, 40), (1.0, 1.0, 1.0), ["field_of_view"]),  # a 40 mm slab
    ],
)
def test_input_gates(shape, zooms, gates):
    assert [f.gate for f in input_failures(shape, zooms, GATES)] == gates


def test_a_4x4x4_volume_is_excluded_at_check_inputs_with_its_gates(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "tiny.nii.gz"))
    head = nib.Nifti1Image(np.ones((92, 116, 100), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(head, str(tmp_path / "head.nii.gz"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject,t1,age,sex\ntiny,tiny.nii.gz,60,F\nhead,head.nii.gz,61,M\n")
    table = checked_manifest(manifest, "atlas", gates=GATES).set_index("subject")
    assert table.loc["tiny", "gate"] == "field_of_view, voxel_count"
    assert table.loc["tiny", "reason"] == (
        "t1 field of view 4 × 4 × 4 mm, under data.gates.min_fov_mm = 100 mm; "
        "t1 64 voxels, under data.gates.min_voxels = 32768"
    )
    assert pd.isna(table.loc["head", "reason"]) and pd.isna(table.loc["head", "gate"])
    ok, bad = check_inputs(manifest, "atlas", gates=GATES)
    assert ok["subject"].tolist() == ["head"] and bad["subject"].tolist() == ["tiny"]
    # null thresholds: not checked (and no gates at all without settings)
    assert check_inputs(manifest, "atlas", gates=_gates(min_fov_mm=None, min_voxels=None))[1].empty
    assert check_inputs(manifest, "atlas")[1].empty


def _ants_affine(tmp_path, scale):
    """An ANTs affine transform file (what registration writes) that scales by ``scale`` per axis."""
    import ants

    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    tx.set_parameters([scale, 0, 0, 0, scale, 0, 0, 0, scale, 1.0, 2.0, 3.0])
    path = str(tmp_path / "fwd_0GenericAffine.mat")
    ants.write_transform(tx, path)
    return path


@pytest.mark.parametrize(
    ("scale", "ncc", "gates"),
    [
        (1.0, 0.7, []),
        (0.9, 0.45, []),  # the demo's heads: determinant 0.60-1.02, correlation 0.45-0.66
        (3.0, 0.7, ["affine_determinant"]),  # a header whose voxel size is 3 times too large
        (1 / 3, 0.7, ["affine_determinant"]),
        (1.0, 0.05, ["template_similarity"]),  # a noise volume
        (1.0, float("nan"), ["template_similarity"]),
        (3.0, -0.004, ["template_similarity", "affine_determinant"]),
    ],
)
def test_registration_gates(tmp_path, scale, ncc, gates):
    det = affine_determinant([_ants_affine(tmp_path, scale)])
    assert det == pytest.approx(scale**3, rel=1e-6)
    failures = registration_failures(ncc, det, GATES)
    assert [f.gate for f in failures] == gates
    if "affine_determinant" in gates:
        assert failures[-1].reason == (
            f"affine determinant {scale**3:.3g} (×{scale:.2f} per axis), outside "
            "data.gates.affine_determinant [0.4, 2.5]"
        )
    assert registration_failures(ncc, det, _gates(min_template_ncc=None, affine_determinant=None)) == []


def test_a_label_map_without_ventricles_is_excluded_at_segment():
    cfg = validate_config({"condition_sets": {"lv_brain_skull": [["lv", "brain"], ["skull"]]}})
    structures = required_structures(cfg)
    assert structures == {"lateral ventricles": (4, 43), "brain": None}
    good = head_labels()
    vol = label_volumes(good, 64.0, LATERAL_VENTRICLES)
    assert 1 < vol["lv_mm3"] / 1000 < 250 and 600 < vol["brain_mm3"] / 1000 < 2200
    assert segmentation_failures(vol, good, structures, GATES) == []
    empty = head_labels(ventricles=False)
    failures = segmentation_failures(label_volumes(empty, 64.0), empty, structures, GATES)
    assert [f.gate for f in failures] == ["lv_volume", "structures"]
    assert failures[0].reason == "LV volume 0.0 mL, outside data.gates.lv_ml [1, 250]"
    assert failures[1].reason.startswith("missing lateral ventricles (under data.gates.min_structure_voxels")
    # the structures gate alone, when the LV range is off
    assert [
        f.gate for f in segmentation_failures(vol | {"lv_mm3": 0.0}, empty, structures, _gates(lv_ml=None))
    ] == ["structures"]


def test_brain_volume_outside_its_range_is_excluded():
    labels = head_labels()
    failures = segmentation_failures(label_volumes(labels, 8.0), labels, {}, GATES)  # a 2 mm brain: 1/8
    assert [f.gate for f in failures] == ["brain_volume"]
    assert (
        failures[0].reason.startswith("brain volume ")
        and "outside data.gates.brain_ml [600, 2200]" in failures[0].reason
    )


def test_required_structures_follow_the_condition_sets():
    def needed(sets, **conditions):
        return required_structures(validate_config({"condition_sets": sets, "conditions": conditions}))

    assert needed({"a": [["lowres_4mm"]], "b": [["t2"]]}) == {}
    assert needed({"a": [["skull"]]}) == {"brain": None}
    assert needed({"a": [["lv"]]}, lv_labels=[4, 43, 5, 44]) == {"lateral ventricles": (4, 43, 5, 44)}
    semantics = needed({"a": [["semantics"]]})
    assert list(semantics) == [
        "csf",
        "white matter",
        "grey matter",
        "ventricles",
        "deep grey matter",
        "amygdala",
        "hippocampus",
        "brain stem",
    ]
    labels = head_labels()  # no deep grey matter, amygdala, hippocampus or brain stem
    failures = segmentation_failures(label_volumes(labels, 64.0), labels, semantics, GATES)
    assert failures[0].reason.startswith("missing deep grey matter, amygdala, hippocampus, brain stem (")
