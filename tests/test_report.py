"""Cohort figures (vcm.cohort.figures) and summary.md (vcm.report) on a tiny cohort, fake models and evaluation tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch

from tests.fixtures import make_cohort, make_real
from vcm.cli import main
from vcm.cohort.figures import (
    cohort_montage,
    cohort_stats,
    privacy_histogram,
    privacy_stats,
    qc_histograms,
    qc_thresholds,
)
from vcm.evaluation.tables import summarise
from vcm.report import write_summary

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A results folder with the files the summary reads."""
    root = tmp_path_factory.mktemp("results")
    cohort = make_cohort(root / "cohorts" / "lv")
    dataset = make_real(root / "dataset.h5")
    model = root / "models" / "lv" / "n2" / "vcm.pt"
    model.parent.mkdir(parents=True)
    meta = {"method": "vcm", "condition_set": "lv", "training_size": 2, "steps": 40, "final_loss": 0.0123}
    torch.save({**meta, "model": {}}, model)
    (model.parent / "loss.png").write_bytes(b"png")
    (model.parent / "loss.csv").write_text(
        "step,loss,lr,elapsed_s\n20,0.02,0.001,45.00\n40,0.0123,0.001,90.00\n"
    )
    (model.parent / "preview").mkdir()
    errors = [
        {"t": t, "controlled": 0.9 * r, "backbone": r, "ratio": 0.9} for t, r in ((400, 0.1), (950, 0.01))
    ]
    metrics = {"lv_dice_controlled": 0.81, "lv_dice_uncontrolled": 0.72, "lv_dice_reconstruction": 0.9}
    (model.parent / "preview" / "preview_metrics.json").write_text(
        json.dumps({**metrics, "noise_error": errors})
    )
    per_subject = pd.DataFrame(
        {
            "method": ["vcm", "vcm", "uncontrolled", "uncontrolled"],
            "subject": ["a", "b", "a", "b"],
            "dice": [0.8, 0.9, 0.5, 0.6],
            "hd95": [4.0, 6.0, 10.0, 12.0],
            "assd": [1.0, 1.0, 3.0, 3.0],
            "skull_dist": [float("nan")] * 4,
            "ssim": [0.7, 0.8, 0.6, 0.6],
            "ms_ssim": [0.8, 0.8, 0.7, 0.7],
            "seg_lv_voxels": [10, 12, 0, 9],
        }
    )
    table = summarise(per_subject)
    table.insert(0, "condition_set", "lv")
    table.insert(1, "training_size", 2)
    evaluation = root / "eval" / "lv_n2.csv"
    evaluation.parent.mkdir()
    table.to_csv(evaluation, index=False)
    settings = {"sampler": "dpmpp_2m", "steps": 15, "control_scale": 2.0}
    evaluation.with_suffix(".json").write_text(json.dumps({"settings": settings}))
    tstr = root / "eval" / "tstr.csv"
    pd.DataFrame(
        {
            "train_data": ["synthetic", "real"],
            "source": ["lv", "train_4"],
            "n_train": [4, 4],
            "labels": ["lv", "lv"],
            "steps": [40, 40],
            "dice_mean": [0.712, 0.845],
            "dice_sd": [0.02, 0.01],
            "dice_ci_low": [0.69, 0.83],
            "dice_ci_high": [0.73, 0.86],
        }
    ).to_csv(tstr, index=False)
    return {
        "root": root,
        "cohort": cohort,
        "dataset": dataset,
        "model": model,
        "eval": evaluation,
        "tstr": tstr,
    }


def test_summarise_means_sds_and_empty_segmentations():
    per_subject = pd.DataFrame(
        {"method": ["vcm", "vcm", "uncontrolled"], "dice": [0.8, 0.6, 0.5], "hd95": [2.0, float("nan"), 3.0]}
    )
    per_subject["seg_lv_voxels"] = [5, 0, 4]
    table = summarise(per_subject, {"vcm": 12.5})
    assert list(table["method"]) == ["vcm", "uncontrolled"] and list(table["n"]) == [2, 1]
    assert table.loc[0, "dice_mean"] == pytest.approx(0.7) and table.loc[0, "dice_sd"] == pytest.approx(
        0.141421, rel=1e-5
    )
    assert table.loc[0, "hd95_mean"] == 2.0 and table.loc[0, "n_empty"] == 1  # NaN left out, counted
    assert table.loc[1, "dice_sd"] == 0.0 and table.loc[0, "fid3d"] == 12.5 and pd.isna(table.loc[1, "fid3d"])


def test_cohort_figures(tmp_path, run):
    shown = cohort_montage(run["cohort"], tmp_path / "montage.png", n_subjects=3)
    assert shown == ["syn-00000", "syn-00002", "syn-00003"]  # QC-passed subjects first
    assert (
        cohort_montage(run["cohort"], tmp_path / "all.png", n_subjects=6)[1] == "syn-00001"
    )  # failed fill in
    height, width, _ = mpimg.imread(tmp_path / "montage.png").shape
    assert width > 1.5 * height > 800  # three rows of six views (image with outline, then labels)
    stats = qc_histograms(run["cohort"], tmp_path / "qc.png", {"dice": 0.7})
    assert (tmp_path / "qc.png").stat().st_size > 10_000
    assert stats["n"] == 6 and stats["passed"] == 4 and stats["pass_rate"] == pytest.approx(4 / 6)
    assert stats["attempts_max"] == 3 and stats["new_anatomy"] == 3


def test_qc_thresholds_from_the_config():
    qc = {"dice_min": 0.7, "max_tries": 3, "hd95_max_mm": 8, "assd_max_mm": None, "skull_dist_max": 0.02}
    assert qc_thresholds(qc) == {"dice": 0.7, "hd95": 8.0, "skull_dist": 0.02}


def test_figures_cli(tmp_path, run, capsys):
    montage, hist = tmp_path / "cohort_montage.png", tmp_path / "qc_hist.png"
    args = [
        "cohort-figures",
        "--config",
        str(REPO / "config" / "config.yaml"),
        "--cohort",
        str(run["cohort"]),
    ]
    assert main([*args, "--montage", str(montage), "--qc-hist", str(hist), "--subjects", "2"]) == 0
    assert montage.is_file() and hist.is_file()
    assert "4 / 6 passed QC (67 %)" in capsys.readouterr().out
    assert (
        main(
            [
                "cohort-figures",
                "--config",
                str(REPO / "config" / "config.yaml"),
                "--cohort",
                "no.h5",
                "--montage",
                str(montage),
                "--qc-hist",
                str(hist),
            ]
        )
        == 1
    )
    assert capsys.readouterr().err.strip() == "vcm cohort-figures: error: cohort file not found: no.h5"


def test_summary_has_every_table_and_links(run):
    root = run["root"]
    cohort_montage(run["cohort"], run["cohort"].parent / "cohort_montage.png", 2)
    qc_histograms(run["cohort"], run["cohort"].parent / "qc_hist.png")
    out = root / "summary.md"
    args = [
        "summary",
        "--dataset",
        str(run["dataset"]),
        "--models",
        str(run["model"]),
        "--eval",
        str(run["eval"]),
    ]
    args += ["--tstr", str(run["tstr"]), "--cohorts", str(run["cohort"]), "--out", str(out)]
    assert main(args) == 0
    text = out.read_text()
    assert "**8 subjects** on the 16×16×16 grid; splits: train_2 (2), train_4 (4), val (2)" in text
    assert (
        "| lv | 2 | vcm | 40 | 0.0123 | 1.5 min | 0.810 / 0.720 / 0.900 | 0.900 / – / – / 0.900 "
        "| [loss](models/lv/n2/loss.png) |" in text
    )
    assert "| condition set | # train | method | n | DSC ↑ | HD95 (mm) ↓ |" in text
    assert "Sampled with dpmpp_2m at 15 steps, control scale 2 (`cohort.control_scale`)." in text
    assert "| lv | 2 | VCM | 2 | 0.850 [0.800, 0.900] |" in text  # mean [bootstrap 95 % interval]
    assert "| lv | 2 | backbone (uncontrolled) | 2 | 0.550 [0.500, 0.600] |" in text
    assert "| lv | 2 | Δ controlled − uncontrolled | 2 | 0.300 [0.300, 0.300] |" in text  # paired
    assert (
        "| synthetic | lv | 4 | lv | 40 | 0.712 [0.690, 0.730] |" in text
        and "| real | train_4 | 4 | lv | 40 | 0.845 [0.830, 0.860] |" in text
    )
    assert "| lv | 6 | 4 / 6 (67 %) | 1.67 | 3 |" in text
    assert "[cohort_montage](cohorts/lv/cohort_montage.png) [qc_hist](cohorts/lv/qc_hist.png)" in text
    assert cohort_stats(run["cohort"])["dice_mean"] == pytest.approx(
        float(pd.read_csv(run["cohort"].parent / "qc.csv")["dice"].mean())
    )


def test_summary_counts_exclusions_per_stage_and_gate(tmp_path):
    excluded = tmp_path / "excluded.csv"
    pd.DataFrame(
        [
            ["bad-nan", "check_inputs", "file", "t1 file x contains NaN or infinite values", "x"],
            ["tiny", "check_inputs", "field_of_view, voxel_count", "t1 field of view 4 × 4 × 4 mm, …", "t"],
            ["noise", "register", "template_similarity", "correlation with the template 0.012, under …", "n"],
            ["big", "register", "affine_determinant", "affine determinant 27 (×3.00 per axis), …", "b"],
            ["crash", "segment", "error", "KeyError: 'lv_mm3'", "c"],
            ["bad-sex", "check_inputs", "manifest", "sex 'X' is not F/M (or 0/1, female/male)", "s"],
        ],
        columns=["subject", "stage", "gate", "reason", "t1"],
    ).to_csv(excluded, index=False)
    text = write_summary(tmp_path / "summary.md", excluded=excluded)
    assert "**6 subjects excluded** during preparation (`excluded.csv`;" in text
    rows = [line for line in text.splitlines() if line.startswith("| check_inputs") or line.startswith("| r")]
    rows += [line for line in text.splitlines() if line.startswith("| segment")]
    assert rows == [
        "| check_inputs | field_of_view | 1 | tiny: t1 field of view 4 × 4 × 4 mm, … |",
        "| check_inputs | file | 1 | bad-nan: t1 file x contains NaN or infinite values |",
        "| check_inputs | manifest | 1 | bad-sex: sex 'X' is not F/M (or 0/1, female/male) |",
        "| check_inputs | voxel_count | 1 | tiny: t1 field of view 4 × 4 × 4 mm, … |",
        "| register | affine_determinant | 1 | big: affine determinant 27 (×3.00 per axis), … |",
        "| register | template_similarity | 1 | noise: correlation with the template 0.012, under … |",
        "| segment | error | 1 | crash: KeyError: 'lv_mm3' |",
    ]
    pd.DataFrame(columns=["subject", "stage", "gate", "reason", "t1"]).to_csv(excluded, index=False)
    assert "No subject was excluded during preparation (`excluded.csv` is empty)." in write_summary(
        tmp_path / "summary.md", excluded=excluded
    )


def test_summary_shows_the_qc_failure_rate_per_attempt_and_the_failed_checks(tmp_path, run):
    cohort = tmp_path / "cohorts" / "lv" / "cohort.h5"
    cohort.parent.mkdir(parents=True)
    shutil.copy(run["cohort"], cohort)
    pd.DataFrame(
        {
            "subject": ["syn-00000", "syn-00001", "syn-00001", "syn-00002", "syn-00003", "syn-00004"],
            "attempt": [1, 1, 2, 1, 1, 1],
            "passed": [True, False, False, False, True, False],
            "reasons": [
                "",
                "dice 0.612 < 0.7; intensity outside the real range: csf, white_matter",
                "dice 0.650 < 0.7; possible copy of sub-01",
                "possible copy of sub-02; LV volume -25% off its target (> 15%)",
                "",
                "LV volume +53% off its target (> 15%)",  # one check, whatever the sign of the miss
            ],
        }
    ).to_csv(cohort.parent / "qc.csv", index=False)
    text = write_summary(tmp_path / "summary.md", cohorts=[cohort])
    assert "| figures | QC failed attempts | failed checks |" in text
    assert (
        "| 4 / 6 (67 %) | dice 2, possible copy 2, LV volume 2, intensity outside the real range 1 |" in text
    )
    # the fixture's qc.csv: one row per subject, no reasons
    assert "| 2 / 6 (33 %) | – |" in write_summary(tmp_path / "fixture.md", cohorts=[run["cohort"]])


def test_summary_without_results_yet(tmp_path):
    text = write_summary(tmp_path / "summary.md")
    assert (
        "_no dataset_" in text
        and "_no models_" in text
        and "_not evaluated_" in text
        and "_no cohorts_" in text
    )


def _with_privacy(cohort: Path, folder: Path) -> Path:
    """A copy of the fixture cohort with a privacy screen: subject 2 a possible copy of sub-01."""
    folder.mkdir(parents=True)
    path = folder / "cohort.h5"
    shutil.copy(cohort, path)
    with h5py.File(path, "a") as h5:
        h5["privacy/nearest_similarity"] = [0.70, 0.72, 0.99, 0.75, 0.74, 0.71]
        h5["privacy/possible_copy"] = [False, False, True, False, False, False]
        h5["privacy/nearest_real"] = np.array(
            ["sub-00", "sub-01", "sub-01", "sub-02", "sub-00", "sub-01"], object
        )
        h5["privacy_reference/similarity"] = [0.78, 0.80, 0.76, 0.80]
        h5["privacy_reference"].attrs["max_similarity"] = 0.9
    return path


def test_privacy_screen_figure_and_summary(tmp_path, run, capsys):
    cohort = _with_privacy(run["cohort"], tmp_path / "cohorts" / "lv")
    stats = privacy_histogram(cohort, cohort.parent / "privacy_hist.png")
    assert stats == privacy_stats(cohort)
    assert stats["n"] == 6 and stats["flagged"] == 1 and stats["max"] == pytest.approx(0.99)
    assert stats["median"] == pytest.approx(0.73) and stats["baseline_max"] == pytest.approx(0.80)
    assert (cohort.parent / "privacy_hist.png").stat().st_size > 10_000
    text = write_summary(tmp_path / "summary.md", cohorts=[cohort])
    assert "### Privacy screen" in text
    assert "| lv | 0.730 / 0.990 | 1 / 6 | 0.790 / 0.800 (4 subjects) | 0.9 |" in text
    assert "[privacy_hist](cohorts/lv/privacy_hist.png) |" in text
    # without a screen: a figure that says so, no table
    assert privacy_histogram(run["cohort"], tmp_path / "off.png") is None and (tmp_path / "off.png").is_file()
    assert privacy_stats(run["cohort"]) is None
    assert "Privacy screen" not in write_summary(tmp_path / "summary_off.md", cohorts=[run["cohort"]])
    args = ["cohort-figures", "--config", str(REPO / "config" / "config.yaml"), "--cohort", str(cohort)]
    out = tmp_path / "cli"
    args += [
        "--montage",
        str(out / "m.png"),
        "--qc-hist",
        str(out / "q.png"),
        "--privacy-hist",
        str(out / "p.png"),
    ]
    out.mkdir()
    assert main(args) == 0 and (out / "p.png").is_file()
    assert "p.png: 1 possible copies" in capsys.readouterr().out


def test_design_figures_and_summary_table(tmp_path, run, capsys):
    """design.png/json hold the KS of targets against the label maps' and images' values; the montage sorted by
    LV volume; summary.md tabulates the designed covariates only."""
    from scipy.stats import ks_2samp

    folder = tmp_path / "cohorts" / "lv"
    shutil.copytree(run["cohort"].parent, folder)
    cohort = folder / "cohort.h5"
    target = np.array([30, 40, 50, 60, 70, 80], float) * 1000
    label = target * np.array([1.0, 1.01, 0.99, 1.0, 1.02, 0.98])
    image = target * np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    with h5py.File(cohort, "a") as h5:
        n = len(h5["subjects"])
        raw = np.stack([np.arange(n) % 2, np.full(n, 70.0), label, np.full(n, 1.3e6)], axis=1)
        h5["covariates_raw"] = raw
        for k, name in enumerate(("sex", "age", "lv_volume", "brain_volume")):
            h5[f"design/target_{name}"] = target if name == "lv_volume" else raw[:, k]
            h5[f"design/designed_{name}"] = np.full(n, name == "lv_volume")
        h5["qc/image_lv_volume"] = image
        h5["qc/image_brain_volume"] = np.full(n, 1.3e6)
    args = ["cohort-figures", "--config", str(REPO / "config" / "config.yaml"), "--cohort", str(cohort)]
    args += ["--montage", str(folder / "cohort_montage.png"), "--qc-hist", str(folder / "qc_hist.png")]
    args += ["--design", str(folder / "design.png"), "--design-json", str(folder / "design.json")]
    args += ["--design-montage", str(folder / "design_montage.png"), "--subjects", "3"]
    assert main(args) == 0
    assert "design.png: lv_volume KS 0.17" in capsys.readouterr().out
    stats = json.loads((folder / "design.json").read_text())
    assert stats["lv_volume"]["ks_label"] == pytest.approx(ks_2samp(target, label).statistic)
    assert stats["lv_volume"]["ks_image"] == pytest.approx(ks_2samp(target, image).statistic)
    assert stats["lv_volume"]["median_ratio_image"] == pytest.approx(0.75)
    assert not stats["age"]["designed"] and stats["age"]["ks_label"] == 0.0
    assert cohort_montage(cohort, folder / "by_lv.png", 3, by_lv=True) == [
        "syn-00000",
        "syn-00002",
        "syn-00005",
    ]
    out = tmp_path / "summary.md"
    assert (
        main(["summary", "--dataset", str(run["dataset"]), "--cohorts", str(cohort), "--out", str(out)]) == 0
    )
    text = out.read_text()
    assert "| lv | lv_volume (mL) | 55 | 54.8 / 0.17 | 41.5 / 0.33 |" in text
    assert "| lv | age" not in text and "[design](cohorts/lv/design.png)" in text
