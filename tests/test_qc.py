"""QC of synthetic subjects (vcm.qc): alignment metrics on hand-made masks, skull-dist, intensity ranges."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from scipy import ndimage as ndi

from vcm.errors import StageError
from vcm.evaluation.segmenters import make_segmenter
from vcm.qc import (
    QCSettings,
    evaluate,
    reference_ranges,
    segmentation_metrics,
    skull_dist,
    structure_medians,
)

CLASSES = ["background", "csf", "white_matter", "grey_matter", "ventricles"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cube(shift: int = 0, shape=(16, 16, 16)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[4 + shift : 12 + shift, 4:12, 4:12] = True
    return m


def brute_assd(a: np.ndarray, b: np.ndarray, spacing: float) -> float:
    """Symmetric mean surface distance, surfaces as MONAI defines them (mask minus its erosion)."""
    ea, eb = a ^ ndi.binary_erosion(a), b ^ ndi.binary_erosion(b)
    da = ndi.distance_transform_edt(~eb, sampling=spacing)[ea]
    db = ndi.distance_transform_edt(~ea, sampling=spacing)[eb]
    return float(np.concatenate([da, db]).mean())


def test_metrics_on_shifted_cubes():
    ref, pred = cube(), cube(shift=2)
    m = segmentation_metrics(pred, ref, spacing=2.0)
    assert m["dice"] == pytest.approx(0.75)  # 6 of 8 slabs overlap
    assert m["hd95"] == pytest.approx(4.0)  # 2 voxels of 2 mm
    assert m["assd"] == pytest.approx(brute_assd(pred, ref, 2.0), rel=1e-6)
    assert 0 < m["assd"] < m["hd95"]
    same = segmentation_metrics(ref, ref, spacing=2.0)
    assert same == {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    # per-axis spacing: the shift is along axis 0
    assert segmentation_metrics(pred, ref, spacing=(3.0, 1.0, 1.0))["hd95"] == pytest.approx(6.0)


def test_empty_masks_are_defined_not_warnings():
    empty = np.zeros((8, 8, 8), bool)
    assert segmentation_metrics(empty, empty, 1.0) == {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    one = segmentation_metrics(empty, cube(shape=(16, 16, 16))[:8, :8, :8], 1.0)
    assert one["dice"] == 0.0 and math.isnan(one["hd95"]) and math.isnan(one["assd"])
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_metrics(empty, cube(), 1.0)


def test_skull_dist_and_structure_medians():
    skull = np.zeros((4, 4, 4), np.float32)
    skull[0] = 0.5
    image = skull + 0.1  # off by 0.1 everywhere; only the skull support counts
    image[2] = 0.9
    assert skull_dist(image, skull) == pytest.approx(0.01)
    assert math.isnan(skull_dist(image, np.zeros_like(skull)))
    sem = np.zeros((4, 4, 4), np.uint8)
    sem[1], sem[2] = 1, 2
    image = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    med = structure_medians(image, sem, 3)
    assert med[0] == pytest.approx(np.median(image[1])) and med[1] == pytest.approx(np.median(image[2]))
    assert math.isnan(med[2])  # class 3 absent


def make_real(path, n=5):
    """Real subjects whose CSF median is 0.2 + 0.01 i and WM median 0.75 (class 3, 4 absent in some)."""
    sem = np.zeros((n, 1, 6, 6, 6), np.uint8)
    image = np.zeros((n, 1, 6, 6, 6), np.float16)
    for i in range(n):
        sem[i, 0, :2], sem[i, 0, 2:4] = 1, 2
        image[i, 0, :2], image[i, 0, 2:4] = 0.2 + 0.01 * i, 0.75
    with h5py.File(path, "w") as h5:
        h5["image"], h5["cond/semantics"] = image, sem
        h5["cond/semantics"].attrs["classes"] = CLASSES
    return path


def test_reference_ranges_and_intensity_check(tmp_path):
    ds = make_real(tmp_path / "real.h5")
    ranges = reference_ranges(ds, [0, 1, 2, 3, 4], (0.0, 100.0))
    assert list(ranges["classes"]) == CLASSES[1:]
    np.testing.assert_allclose(ranges["low"][:2], [0.2, 0.75], atol=1e-3)
    np.testing.assert_allclose(ranges["high"][:2], [0.24, 0.75], atol=1e-3)
    assert np.isnan(ranges["low"][2:]).all()  # absent everywhere: not checked
    sem = np.asarray(h5py.File(ds)["cond/semantics"][0, 0])
    lv, seg = np.zeros(sem.shape, bool), np.zeros(sem.shape, np.uint16)  # no LV anywhere: Dice 1
    good = np.where(sem == 1, 0.22, np.where(sem == 2, 0.75, 0.0)).astype(np.float32)
    settings = QCSettings(intensity_margin=0.0, intensity_outliers_max=0)  # MAISI's exact rule
    r = evaluate(good, seg, lv, sem, settings, 1.0, ranges)
    assert r.passed and r.metrics["intensity_outliers"] == 0
    assert r.metrics["median_csf"] == pytest.approx(0.22)
    bad = np.where(sem == 1, 0.5, good)  # CSF too bright
    r = evaluate(bad, seg, lv, sem, settings, 1.0, ranges)
    assert not r.passed and r.metrics["intensity_outliers"] == 1 and "csf" in r.reasons[0]
    wide = QCSettings(intensity_margin=10.0, intensity_outliers_max=0)  # 10 widths either side: 0.5 is in
    assert evaluate(bad, seg, lv, sem, wide, 1.0, ranges).passed
    assert evaluate(bad, seg, lv, sem, QCSettings(intensity_outliers_max=None), 1.0, ranges).passed
    # the defaults let one structure miss, not two
    assert evaluate(bad, seg, lv, sem, QCSettings(), 1.0, ranges).passed
    worse = np.where(sem == 2, 0.2, bad)
    r = evaluate(worse, seg, lv, sem, QCSettings(), 1.0, ranges)
    assert not r.passed and r.metrics["intensity_outliers"] == 2


def test_evaluate_thresholds_and_reasons():
    ref = cube()
    seg = np.where(cube(shift=2), 4, 0).astype(np.uint16)  # LV label 4, Dice 0.75
    sem = np.zeros(ref.shape, np.uint8)
    image = np.zeros(ref.shape, np.float32)
    r = evaluate(image, seg, ref, sem, QCSettings(dice_min=0.7), 2.0)
    assert r.passed and r.metrics["dice"] == pytest.approx(0.75) and math.isnan(r.metrics["skull_dist"])
    r = evaluate(image, seg, ref, sem, QCSettings(dice_min=0.8, hd95_max_mm=3.0), 2.0)
    assert not r.passed and r.n_failed == 2
    assert r.reasons[0].startswith("dice 0.750 < 0.8") and r.reasons[1].startswith("hd95 4.00 mm > 3")
    skull = np.zeros(ref.shape, np.float32)
    skull[0] = 1.0
    r = evaluate(image, seg, ref, sem, QCSettings(skull_dist_max=0.5), 2.0, skull=skull)
    assert r.metrics["skull_dist"] == pytest.approx(1.0) and not r.passed
    # the right-hemisphere LV label counts too; other labels do not
    assert (
        evaluate(image, np.where(ref, 43, 2).astype(np.uint16), ref, sem, QCSettings(), 2.0).metrics["dice"]
        == 1.0
    )


def test_settings_from_config(cfg, tmp_path):
    s = QCSettings.from_config(cfg)
    assert s.dice_min == cfg["qc"]["dice_min"] and s.max_tries == cfg["qc"]["max_tries"]
    assert s.backend == "segmenter" and s.intensity_outliers_max == 1 and s.intensity_margin == 0.25
    cfg["qc"]["backend"] = "synthseg"
    assert QCSettings.from_config(cfg).backend == "synthseg"
    cfg["qc"]["backend"] = "nnunet"
    with pytest.raises(StageError, match="qc.backend"):
        QCSettings.from_config(cfg)
    with pytest.raises(StageError, match="needs the template"):
        make_segmenter({}, QCSettings(backend="atlas"), tmp_path, None)
    with pytest.raises(StageError, match="needs the trained QC segmenter"):
        make_segmenter({}, QCSettings(backend="segmenter"), tmp_path, None)
