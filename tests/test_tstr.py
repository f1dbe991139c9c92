"""Train on synthetic, test on real (vcm.tstr) on a 16³ phantom task a tiny U-Net learns in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.fixtures import make_cohort, make_real
from vcm.cli import main
from vcm.config import load_config, validate_config
from vcm.errors import StageError
from vcm.tstr import TstrSettings, run_tstr

REPO = Path(__file__).resolve().parent.parent
FAST = {"steps": 40, "lr": 1e-2, "channels": [4, 8, 16], "batch_size": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tstr")
    return {"cohort": make_cohort(root / "cohorts" / "lv"), "dataset": make_real(root / "dataset.h5")}


@pytest.fixture
def tcfg() -> dict:
    cfg = load_config(REPO / "config" / "config.yaml")
    cfg["training"]["sizes"] = [2, 4]
    return cfg


def test_three_arms_with_dice_and_the_real_network_learns_the_easy_task(tmp_path, files, tcfg):
    settings = TstrSettings.from_config(tcfg, **FAST)
    assert settings.real_split == "train_4"  # the largest training size by default
    out = tmp_path / "tstr" / "lv.csv"
    table = run_tstr(tcfg, files["dataset"], files["cohort"], out, settings, progress=False)
    assert pd.read_csv(out).shape == table.shape
    assert list(table["train_data"]) == ["synthetic", "real", "real+synthetic", "synthetic_all"]
    assert list(table["source"]) == ["lv", "train_4", "train_4+lv", "lv"]
    assert list(table["n_train"]) == [4, 4, 8, 6]  # QC-passed synthetic subjects only, then all of them
    assert list(table["steps"]) == [40] * 4 and list(table["n_val"]) == [2] * 4
    assert table["dice_mean"].between(0, 1).all()
    assert table.loc[1, "dice_mean"] > 0.5  # the real-trained network on the phantom task
    assert (table["dice_ci_low"] <= table["dice_mean"]).all() and (
        table["dice_mean"] <= table["dice_ci_high"]
    ).all()
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["classes"] == ["lv"] and info["settings"]["steps"] == 40
    assert info["results"]["synthetic"]["n_total"] == info["results"]["synthetic_all"]["n_total"] == 6
    assert info["results"]["real"]["subjects"] == ["sub-06", "sub-07"]
    assert len(info["results"]["real"]["per_class"][0]) == 1


def test_the_qc_ignored_arm_is_left_out_when_asked_or_when_qc_is_ignored_anyway(tmp_path, files, tcfg):
    for change in ({"qc_ignored_arm": False}, {"passed_only": False}):
        settings = TstrSettings.from_config(tcfg, **{**FAST, "steps": 2, **change})
        table = run_tstr(
            tcfg, files["dataset"], files["cohort"], tmp_path / "t.csv", settings, progress=False
        )
        assert list(table["train_data"]) == ["synthetic", "real", "real+synthetic"]
        assert table.loc[0, "n_train"] == (4 if change.get("passed_only", True) else 6)


def test_same_seed_same_result(tmp_path, files, tcfg):
    settings = TstrSettings.from_config(tcfg, **{**FAST, "steps": 3})
    a = run_tstr(tcfg, files["dataset"], files["cohort"], tmp_path / "a.csv", settings, progress=False)
    b = run_tstr(tcfg, files["dataset"], files["cohort"], tmp_path / "b.csv", settings, progress=False)
    pd.testing.assert_series_equal(a["dice_mean"], b["dice_mean"])


def test_repeats_average_each_subjects_dice_over_the_seeds_networks(tmp_path, files, tcfg):
    """tstr.repeats = 2 scores each subject with the mean of the networks of seeds 0 and 1, each trained as a
    single run of that seed would be."""
    fast = {**FAST, "steps": 6, "qc_ignored_arm": False}
    paths = {name: tmp_path / f"{name}.csv" for name in ("both", "seed0", "seed1")}
    both = TstrSettings.from_config(tcfg, **fast, repeats=2)
    table = run_tstr(tcfg, files["dataset"], files["cohort"], paths["both"], both, progress=False)
    for seed in (0, 1):
        single = TstrSettings.from_config(tcfg, **fast, seed=seed)
        run_tstr(tcfg, files["dataset"], files["cohort"], paths[f"seed{seed}"], single, progress=False)
    info = {name: json.loads(p.with_suffix(".json").read_text())["results"] for name, p in paths.items()}
    for arm in ("synthetic", "real", "real+synthetic"):
        seeds = [np.asarray(info[f"seed{s}"][arm]["dice"]) for s in (0, 1)]
        np.testing.assert_allclose(info["both"][arm]["dice"], (seeds[0] + seeds[1]) / 2, rtol=1e-6)
        assert [r["seed"] for r in info["both"][arm]["repeats"]] == [0, 1]
        assert info["both"][arm]["repeats"][1]["dice_mean"] == pytest.approx(seeds[1].mean())
    assert list(table["repeats"]) == [2, 2, 2] and (table["dice_seed_sd"] >= 0).all()
    assert "repeats" not in pd.read_csv(paths["seed0"]).columns  # one network: the table as before


def test_semantic_classes_and_minutes_cap(tmp_path, files, tcfg):
    settings = TstrSettings.from_config(
        tcfg, **{**FAST, "steps": 500, "labels": "semantics", "minutes": 1e-4}
    )
    table = run_tstr(tcfg, files["dataset"], files["cohort"], tmp_path / "s.csv", settings, progress=False)
    assert (table["steps"] < 500).all() and (table["steps"] >= 1).all()  # the wall-clock cap stopped both
    assert table["dice_mean"].between(0, 1).all()
    info = json.loads((tmp_path / "s.json").read_text())
    assert len(info["classes"]) == 8 and len(info["results"]["real"]["per_class"][0]) == 8


def test_settings_errors(tcfg):
    with pytest.raises(StageError, match="'tstr.labels': expected lv or semantics"):
        TstrSettings.from_config(tcfg, labels="tissue")
    with pytest.raises(StageError, match="unknown key 'step' under 'tstr'"):
        TstrSettings.from_config(validate_config({**tcfg, "tstr": {"step": 3}}))
    assert TstrSettings.from_config(validate_config({**tcfg, "tstr": {"steps": 7}})).steps == 7


def test_cli_prints_both_rows_and_one_line_errors(tmp_path, files, capsys):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["training"]["sizes"] = [2, 4]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["tstr", "--config", str(config), "--dataset", str(files["dataset"]), "--device", "cpu"]
    out = tmp_path / "t.csv"
    assert main([*args, "--cohort", str(files["cohort"]), "--out", str(out), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "TSTR synthetic (lv, 4 subjects, 2 steps" in text and "TSTR real (train_4, 4 subjects" in text
    assert "TSTR real+synthetic (train_4+lv, 8 subjects" in text
    assert out.is_file()
    assert main([*args, "--cohort", str(tmp_path / "none.h5"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vcm tstr: error: cohort file not found: {tmp_path / 'none.h5'}"]
