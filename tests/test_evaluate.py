"""Evaluation (vcm.evaluation): metric values on hand-made volumes, the MS-SSIM scale choice, FID 3D with a
local MedicalNet-format checkpoint (and the one-line message without one), the per-model stage on a tiny
backbone and VCM, and the gathered tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.fixtures import make_bundle, make_dataset, make_vcm
from vcm.cli import main
from vcm.config import load_config, validate_config
from vcm.errors import StageError
from vcm.evaluation.fid import fid_3d, load_medicalnet, medicalnet_features
from vcm.evaluation.metrics import (
    alignment_metrics,
    image_metrics,
    ms_ssim_scales,
    ms_ssim_weights,
    skull_dist,
)
from vcm.evaluation.run import evaluate_model
from vcm.evaluation.settings import EvalSettings
from vcm.mask_edit import VARIANTS, edited_masks, mask_edit_check
from vcm.models.build import load_model

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def cube(shape=(20, 20, 20), lo=(5, 5, 5), size=5) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + size) for a in lo)] = True
    return m


# --- metrics on hand-made volumes --------------------------------------------------------------------------


def test_alignment_metrics_on_cubes():
    a = cube()
    assert alignment_metrics(a, a, 2.0) == {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    shifted = cube(lo=(7, 5, 5))  # 2 voxels along x: overlap 3x5x5 of 5x5x5
    m = alignment_metrics(shifted, a, 2.0)
    assert m["dice"] == pytest.approx(2 * 75 / 250)
    assert m["hd95"] == pytest.approx(4.0)  # the end faces lie exactly 2 voxels = 4 mm apart
    assert 0.0 < m["assd"] < 4.0  # the side faces coincide
    assert alignment_metrics(shifted, a, (2.0, 1.0, 1.0))["hd95"] == pytest.approx(4.0)
    empty = alignment_metrics(np.zeros_like(a), a, 2.0)
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95"]) and math.isnan(empty["assd"])


def test_ms_ssim_scales_keep_the_coarsest_scale_at_least_the_kernel():
    assert ms_ssim_scales((40, 56, 40), 7) == 3  # demo: 40 -> 20 -> 10 >= 7 (a 4th would be 5)
    assert ms_ssim_scales((160, 224, 160), 7) == 5  # BrainLDM: ... -> 10
    assert ms_ssim_scales((160, 224, 160), 11) == 4  # 10 < 11 at the 5th scale
    assert ms_ssim_scales((16, 16, 16), 7) == 2
    with pytest.raises(StageError, match="'evaluation.ssim_kernel': a 9-voxel window does not fit"):
        ms_ssim_scales((8, 8, 8), 9)
    w = ms_ssim_weights(3)
    assert sum(w) == pytest.approx(1.0) and w[1] / w[0] == pytest.approx(0.2856 / 0.0448)
    assert ms_ssim_weights(5) == pytest.approx((0.0448, 0.2856, 0.3001, 0.2363, 0.1333), abs=1e-4)


def test_ssim_and_ms_ssim_on_the_demo_grid():
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in (40, 56, 40)], indexing="ij")
    head = np.clip(1.0 - np.sqrt(x**2 + y**2 + z**2), 0, 1).astype(np.float32)
    noisy = np.clip(head + 0.2 * rng.standard_normal(head.shape), 0, 1).astype(np.float32)
    same = image_metrics(head[None], head[None])  # default kernel 7 and the scales the grid allows
    assert same["ssim"][0] == pytest.approx(1.0, abs=1e-5) and same["ms_ssim"][0] == pytest.approx(
        1.0, abs=1e-5
    )
    worse = image_metrics(np.stack([noisy, 1 - head]), np.stack([head, head]))
    assert worse["ssim"].shape == (2,) and (worse["ssim"] < 0.9).all() and (worse["ms_ssim"] < 1).all()
    assert worse["ssim"][1] < worse["ssim"][0]  # the inverted image is the least similar


def test_skull_dist_inside_the_skull_support():
    skull = np.zeros((8, 8, 8), np.float32)
    skull[0] = 0.5  # the skull image: one slab
    synth = np.full((8, 8, 8), 0.9, np.float32)  # elsewhere the synthetic image does not count
    synth[0] = 0.7
    assert skull_dist(synth, skull) == pytest.approx(0.04)
    assert skull_dist(skull, skull) == 0.0
    assert math.isnan(skull_dist(synth, np.zeros_like(skull)))


# --- FID 3D ------------------------------------------------------------------------------------------------


def medicalnet_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random ResNet-10 in MedicalNet's release format: ``{"state_dict": {"module.<key>": ...}}`` plus its
    segmentation head (which the feature extractor ignores)."""
    from monai.networks.nets import resnet10

    torch.manual_seed(seed)
    net = resnet10(
        spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False
    )
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(32, 512, 2, 2, 2)
    torch.save({"epoch": 1, "state_dict": state}, path)
    return path


def test_fid_matches_the_closed_form_and_monai():
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((50, 3)))
    b = torch.from_numpy(rng.standard_normal((40, 3)) * [1.0, 2.0, 0.5] + 0.3)
    assert fid_3d(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    assert fid_3d(a + shift, a) == pytest.approx(9.0, rel=1e-9)  # same covariance: |shift|^2
    assert fid_3d(b, a) == pytest.approx(float(FIDMetric()(b, a)), rel=1e-6)
    few = torch.from_numpy(rng.standard_normal((4, 512)))  # few subjects, many features: still finite
    assert np.isfinite(fid_3d(few, few + 0.1)) and fid_3d(few, few + 0.1) == pytest.approx(512 * 0.01)
    assert math.isnan(fid_3d(a[:1], a))


def test_medicalnet_checkpoint_loads_and_gives_features(tmp_path):
    net = load_medicalnet(medicalnet_checkpoint(tmp_path / "resnet_10_23dataset.pth"))
    assert net.depth == 10
    images = np.random.default_rng(0).random((3, 16, 16, 16)).astype(np.float32)
    feats = medicalnet_features(net, images)
    assert feats.shape == (3, 512) and torch.isfinite(feats).all()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(StageError, match=r"bad.pth is not a MedicalNet ResNet checkpoint \(") as err:
        load_medicalnet(bad)
    assert "\n" not in str(err.value)


def test_absent_medicalnet_weights_are_one_line_not_a_crash(tmp_path, capsys):
    missing = tmp_path / "resnet_10_23dataset.pth"
    args = [
        "evaluate",
        "--config",
        str(REPO / "config" / "config.yaml"),
        "--dataset",
        "d.h5",
        "--model",
        "m.pt",
    ]
    args += ["--bundle", "b", "--out", str(tmp_path / "e.csv"), "--medicalnet-weights", str(missing)]
    assert main(args) == 1  # checked before anything is sampled
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        f"vcm evaluate: error: config key 'evaluation.medicalnet_weights': file not found: {missing}"
    )
    assert "cannot be downloaded" in err[0]
    cfg = load_config(REPO / "config" / "config.yaml")
    assert EvalSettings.from_config(cfg).medicalnet_weights is None  # not configured: FID 3D is skipped


def test_settings_follow_the_qc_segmentation_backend():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert EvalSettings.from_config(cfg).segmentation == "segmenter"  # the QC U-Net by default
    cfg["qc"]["backend"] = "synthseg"
    assert EvalSettings.from_config(cfg).segmentation == "synthseg"
    cfg["qc"]["backend"] = "atlas"
    assert EvalSettings.from_config(cfg).segmentation == "atlas"
    assert (
        EvalSettings.from_config(
            validate_config({**cfg, "evaluation": {"segmentation": "synthseg"}})
        ).segmentation
        == "synthseg"
    )
    assert EvalSettings.from_config(cfg).steps == cfg["cohort"]["steps"]
    # the evaluation samples as the cohort does unless told otherwise
    assert EvalSettings.from_config(cfg).control_scale == cfg["cohort"]["control_scale"] == 2.0
    own = validate_config({**cfg, "evaluation": {"control_scale": 1.0}})
    assert EvalSettings.from_config(own).control_scale == 1.0
    with pytest.raises(StageError, match="'evaluation.ssim_kernel': expected an odd size"):
        EvalSettings.from_config(cfg, ssim_kernel=8)
    with pytest.raises(StageError, match="unknown key 'kernel' under 'evaluation'"):
        EvalSettings.from_config(validate_config({**cfg, "evaluation": {"kernel": 7}}))


# --- the stage on a tiny backbone ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    dataset, bundle = make_dataset(root / "dataset.h5"), make_bundle(root / "bundle")
    models = {}
    for condset, groups in (("lv", [[("lv", 1)]]), ("two", [[("lv", 1), ("brain", 1)], [("skull", 1)]])):
        models[condset] = make_vcm(root / condset / "vcm.pt", groups, bundle, condset)
    return {"dataset": dataset, "bundle": bundle, **models}


def fake_segment(image: np.ndarray) -> np.ndarray:
    """A stand-in segmenter: LV (4) on the 3 % brightest voxels (ties broken by position), white matter (2)
    elsewhere: never empty, whatever a random backbone decodes."""
    order = np.argsort(image, axis=None, kind="stable")
    labels = np.full(image.size, 2, np.uint16)
    labels[order[-max(1, image.size * 3 // 100) :]] = 4
    return labels.reshape(image.shape)


def test_stage_tables_controlled_vs_uncontrolled(tmp_path, files):
    cfg = load_config(REPO / "config" / "config.yaml")
    settings = EvalSettings.from_config(cfg, steps=3, batch_size=1)
    out = tmp_path / "eval" / "two_n2.csv"
    table = evaluate_model(
        cfg,
        files["dataset"],
        files["two"],
        files["bundle"],
        out,
        settings=settings,
        segment=fake_segment,
        progress=False,
    )
    assert list(table["method"]) == ["vcm", "uncontrolled", "difference"]
    assert list(table["control"]) == ["controlled", "uncontrolled", "controlled - uncontrolled (paired)"]
    assert (
        list(table["n"]) == [2, 2, 2]
        and (table["condition_set"] == "two").all()
        and (table["training_size"] == 2).all()
    )
    for metric in ("dice", "hd95", "assd", "skull_dist", "ssim", "ms_ssim"):
        assert table[f"{metric}_mean"].notna().all(), metric
    assert table["dice_mean"][:2].between(0, 1).all() and table["ssim_mean"][:2].between(-1, 1).all()
    assert table["fid3d"].isna().all()  # no MedicalNet weights configured
    # the controlled row's training cost: its trainable parameters (no loss.csv beside this model: no timing)
    model, _ = load_model(files["two"])
    assert table.loc[0, "parameters"] == sum(p.numel() for p in model.parameters())
    assert table["parameters"][1:].isna().all() and table["seconds_per_step"].isna().all()
    # the paired difference row: controlled - uncontrolled per subject, with its bootstrap interval
    diff = table.loc[2, "ssim_mean"]
    assert diff == pytest.approx(table.loc[0, "ssim_mean"] - table.loc[1, "ssim_mean"], abs=1e-6)
    assert table.loc[2, "ssim_ci_low"] <= diff <= table.loc[2, "ssim_ci_high"]
    assert table.loc[0, "dice_ci_low"] <= table.loc[0, "dice_mean"] <= table.loc[0, "dice_ci_high"]
    assert (table["segmentation"] == settings.segmentation).all()
    subjects = pd.read_csv(tmp_path / "eval" / "two_n2_subjects.csv")
    assert len(subjects) == 4 and list(subjects["subject"]) == ["sub-04", "sub-05"] * 2
    # the table is the mean and sd of the per-subject rows
    vcm_rows = subjects[subjects["method"] == "vcm"]
    assert table.loc[0, "dice_mean"] == pytest.approx(vcm_rows["dice"].mean(), rel=1e-5)
    assert table.loc[0, "ssim_sd"] == pytest.approx(vcm_rows["ssim"].std(ddof=1), rel=1e-4)
    # same noise and covariates: the uncontrolled rows do not depend on the model
    lv = evaluate_model(
        cfg,
        files["dataset"],
        files["lv"],
        files["bundle"],
        tmp_path / "lv_n2.csv",
        settings=settings,
        segment=fake_segment,
        progress=False,
    )
    assert lv.loc[1, "ssim_mean"] == pytest.approx(table.loc[1, "ssim_mean"], rel=1e-6)
    assert lv.loc[0, "ssim_mean"] != pytest.approx(table.loc[0, "ssim_mean"], rel=1e-6)
    assert lv["skull_dist_mean"].isna().all()  # no skull condition in the set
    info = json.loads((tmp_path / "lv_n2.json").read_text())
    assert info["ms_ssim_scales"] == 2 and info["ssim_kernel"] == 7  # 16³ grid: 16 -> 8 >= 7
    assert any("FID 3D skipped" in n for n in info["notes"]) and any("skull-dist" in n for n in info["notes"])


def test_stage_with_fid_3d(tmp_path, files):
    cfg = load_config(REPO / "config" / "config.yaml")
    weights = medicalnet_checkpoint(tmp_path / "resnet_10_23dataset.pth")
    settings = EvalSettings.from_config(cfg, steps=2, medicalnet_weights=str(weights))
    table = evaluate_model(
        cfg,
        files["dataset"],
        files["lv"],
        files["bundle"],
        tmp_path / "lv.csv",
        settings=settings,
        segment=fake_segment,
        progress=False,
    )
    assert (table["fid3d"][:2] >= -1e-6).all()  # two subjects: a rank-1 covariance, still a finite distance
    assert json.loads((tmp_path / "lv.json").read_text())["medicalnet_depth"] == 10


def test_cli_with_atlas_segmentation_and_tables(tmp_path, files, template_dir, capsys):
    out = tmp_path / "eval" / "lv_n2.csv"
    config = tmp_path / "atlas.yaml"
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["qc"]["backend"] = "atlas"
    config.write_text(yaml.safe_dump(raw))
    args = ["evaluate", "--config", str(config), "--dataset", str(files["dataset"])]
    args += [
        "--model",
        str(files["lv"]),
        "--bundle",
        str(files["bundle"]),
        "--template-dir",
        str(template_dir),
    ]
    assert main([*args, "--out", str(out), "--subjects", "1", "--steps", "2", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "FID 3D: skipped (evaluation.medicalnet_weights not set" in text
    assert (
        "| lv | 2 | VCM | atlas | 1 |" in text and "| lv | 2 | backbone (uncontrolled) | atlas | 1 |" in text
    )
    table = pd.read_csv(out)
    assert list(table["n"]) == [1, 1, 1] and table["dice_mean"][:2].between(0, 1).all()
    # gather: two model tables and two TSTR tables whose real rows are the same network
    other = table.assign(condition_set="two", training_size=10)
    other.to_csv(tmp_path / "eval" / "two_n10.csv", index=False)
    tstr = pd.DataFrame(
        {
            "train_data": ["synthetic", "real"],
            "source": ["lv", "train_20"],
            "n_train": [30, 20],
            "labels": ["lv", "lv"],
            "steps": [300, 300],
            "seconds": [90.0, 88.0],
            "final_loss": [0.2, 0.1],
            "n_val": [4, 4],
            "dice_mean": [0.71, 0.8],
            "dice_sd": [0.05, 0.02],
            "dice_ci_low": [0.65, 0.78],
            "dice_ci_high": [0.76, 0.82],
        }
    )
    tstr.to_csv(tmp_path / "t_lv.csv", index=False)
    tstr.assign(source=["two", "train_20"], seconds=[91.0, 87.0]).to_csv(tmp_path / "t_two.csv", index=False)
    md, html, tstr_out = tmp_path / "table.md", tmp_path / "table.html", tmp_path / "tstr.csv"
    assert (
        main(
            [
                "eval-tables",
                "--eval",
                str(out),
                str(tmp_path / "eval" / "two_n10.csv"),
                "--tstr",
                str(tmp_path / "t_lv.csv"),
                str(tmp_path / "t_two.csv"),
                "--md",
                str(md),
                "--html",
                str(html),
                "--tstr-out",
                str(tstr_out),
            ]
        )
        == 0
    )
    text = md.read_text()
    assert "| condition set | # train | method | segmenter | n | DSC ↑ |" in text
    assert (
        "| lv | 2 | VCM | atlas | 1 |" in text
        and "| two | 10 | backbone (uncontrolled) | atlas | 1 |" in text
    )
    assert "| lv | 2 | Δ VCM − backbone | atlas | 1 |" in text
    assert "skull-dist" not in text and "FID 3D" not in text  # empty everywhere: dropped
    assert "| synthetic | lv | 30 | lv | 300 | 0.710 [0.650, 0.760] |" in text
    assert "<table" in html.read_text() and "Train on synthetic" in html.read_text()
    gathered = pd.read_csv(tstr_out)
    assert list(gathered["source"]) == ["lv", "train_20", "two"]  # the real row once
    capsys.readouterr()
    assert main(["eval-tables", "--eval", str(tmp_path / "none.csv"), "--md", str(md)]) == 1
    assert (
        capsys.readouterr().err.strip() == f"vcm eval-tables: error: file not found: {tmp_path / 'none.csv'}"
    )


# --- the mask-edit check -----------------------------------------------------------------------------------


def test_edited_masks_shrink_keep_and_grow_inside_the_brain():
    lv = np.zeros((9, 9, 9), bool)
    lv[3:6, 3:6, 3:6] = True
    brain = np.zeros_like(lv)
    brain[1:8, 1:8, 1:7] = True
    masks = edited_masks(lv, brain)
    assert masks["eroded"].sum() == 1 and masks["original"].sum() == 27
    assert (masks["eroded"] <= masks["original"]).all() and (masks["original"] <= masks["dilated"]).all()
    assert not (masks["dilated"] & ~brain).any() and masks["dilated"].sum() > 27


def test_mask_edit_samples_three_variants_from_the_same_noise(files):
    cfg = load_config(REPO / "config" / "config.yaml")
    result = mask_edit_check(cfg, files["dataset"], files["two"], files["bundle"], fake_segment, 2, 2)
    rows = pd.DataFrame(result["rows"])
    assert len(rows) == 6 and list(rows["variant"][:3]) == ["eroded", "original", "dilated"]
    assert (rows.groupby("subject")["mask_voxels"].apply(lambda v: v.is_monotonic_increasing)).all()
    s = result["summary"]
    assert s["subjects"] == 2 and 0 <= s["volume_follows_edits"] <= 1
    assert s["mask_volume_ratio_dilated_to_original"] > 1 and set(s["dice_to_variant"]) == set(VARIANTS)
    again = mask_edit_check(cfg, files["dataset"], files["two"], files["bundle"], fake_segment, 2, 2)
    assert again["rows"] == result["rows"]  # same noise, same images


def test_training_cost_reads_the_seconds_per_step_beside_the_model(tmp_path):
    from vcm.evaluation.run import training_cost

    net = torch.nn.Linear(3, 2)  # 8 parameters
    net.bias.requires_grad_(False)  # not trained: not counted
    model_path = tmp_path / "vcm.pt"
    cost = training_cost(net, model_path)
    assert (
        cost["parameters"] == 6
        and math.isnan(cost["seconds_per_step"])
        and math.isnan(cost["training_steps"])
    )
    (tmp_path / "loss.csv").write_text("step,loss,lr,elapsed_s\n1,0.5,1e-3,2.00\n40,0.4,1e-3,50.00\n")
    cost = training_cost(net, model_path)
    assert cost["seconds_per_step"] == pytest.approx(1.25) and cost["training_steps"] == 40


def _model_table(method, condset, controlled, parameters, seconds, steps=None):
    """A per-model table as ``evaluate`` writes it: ``method`` against the uncontrolled backbone (dice 0.5, 0.6)."""
    from vcm.evaluation.tables import summarise

    per_subject = pd.DataFrame(
        {
            "subject": ["a", "b", "a", "b"],
            "method": [method, method, "uncontrolled", "uncontrolled"],
            "dice": [*controlled, 0.5, 0.6],
        }
    )
    table = summarise(per_subject)
    table.insert(0, "condition_set", condset)
    table.insert(1, "training_size", 10)
    table.insert(2, "model", method)
    table["parameters"] = [parameters, math.nan, math.nan]
    table["seconds_per_step"] = [seconds, math.nan, math.nan]
    if steps is not None:  # tables written before the steps were recorded have no column
        table["training_steps"] = [steps, math.nan, math.nan]
    return table


def test_the_table_lists_every_method_beside_the_backbone_once():
    from vcm.evaluation.tables import display_table

    tables = [
        _model_table("vcm", "lv", [0.8, 0.9], 45_190_000, 0.36, 1800),
        _model_table("controlnet", "lv", [0.7, 0.7], 181_000_000, 0.9, 600),
        _model_table("vcm", "two", [0.6, 0.7], 45_880_000, 0.4),
    ]
    shown = display_table(tables)
    assert list(shown["method"]) == [
        "backbone (uncontrolled)",
        "VCM",
        "ControlNet",
        "Δ VCM − backbone",
        "Δ ControlNet − backbone",
        "backbone (uncontrolled)",
        "VCM",
        "Δ VCM − backbone",
    ]
    assert list(shown["condition set"]) == ["lv"] * 5 + ["two"] * 3
    assert list(shown["parameters"][:3]) == ["–", "45.19 M", "181.00 M"]
    assert list(shown["s / training step"][:3]) == ["–", "0.36", "0.9"]
    assert list(shown["training steps"]) == ["–", "1,800", "600", "–", "–", "–", "–", "–"]
    assert shown["DSC ↑"][0].startswith("0.550") and shown["DSC ↑"][2].startswith("0.700")
    assert shown["DSC ↑"][4].startswith("0.150")  # ControlNet − backbone, paired


@pytest.mark.parametrize(
    ("extra", "networks"), [({}, None), ({"repeats": [4], "dice_seed_sd": [0.0123]}, "4 (0.012)")]
)
def test_tstr_display_names_the_networks_averaged(extra, networks):
    from vcm.evaluation.tables import tstr_display

    row = {"train_data": ["real"], "source": ["train_4"], "n_train": [4], "labels": ["lv"], "steps": [300]}
    shown = tstr_display(
        pd.DataFrame({**row, "dice_mean": [0.8], "dice_ci_low": [0.7], "dice_ci_high": [0.9], **extra})
    )
    assert shown["Dice on real val ↑ [95% CI]"].tolist() == ["0.800 [0.700, 0.900]"]
    column = "networks (sd of their Dice)"
    assert (shown[column].tolist() == [networks]) if networks else column not in shown
