"""The DAG benchmark builds the whole per-subject DAG (it broke once when rules gained an input)."""

import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from vcm.bench.common import REPO
from vcm.bench.dag import bench_dag


def test_the_snakefile_imports_no_heavy_library():
    """The DAG's cost: the vcm modules the workflow imports load no image, HDF5, SciPy or torch library."""
    smk = [*REPO.glob("workflow/Snakefile"), *REPO.glob("workflow/rules/*.smk")]
    modules = sorted({m for f in smk for m in re.findall(r"^from (vcm[\w.]*) import", f.read_text(), re.M)})
    assert "vcm.config" in modules and "vcm.prep.manifest" in modules
    heavy = ("torch", "monai", "scipy", "h5py", "nibabel", "matplotlib", "ants", "skimage")
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint(*sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert not [m for m in loaded.stdout.split() if m.partition(".")[0] in heavy]


@pytest.mark.workflow
def test_bench_dag_lists_two_jobs_per_subject(tmp_path):
    t1 = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(t1))
    result = bench_dag(20, t1, cohort_size=100)
    assert result["per_subject_jobs"] == 40  # register_segment and conditions
    assert result["shard_jobs"] == 7 and result["profile"] == "profiles/slurm"  # ceil(100 / 16) shards
    assert result["seconds"] > 0 and result["cpu_seconds"] > 0
    # the SLURM plugin's controller probe is timed on its own wherever scontrol exists
    assert (result["slurm_probe_seconds"] is None) == (shutil.which("scontrol") is None)


def test_bench_sample_random_demo_networks_naive_equals_production(tmp_path):
    from vcm.bench.sampling import bench_sample

    r = bench_sample(None, None, None, "lv_brain_skull", 2, 2, 200, "tiny", 1, "cpu", repeats=3)
    assert r["scale"] == "demo" and r["grid"] == [40, 56, 40] and r["latent"] == [3, 10, 14, 10]
    assert r["repeats"] == 3
    assert r["notes"] == ["random backbone weights", "random VCM weights"]
    assert set(r["samplers"]) == {"naive", "production", "floor"}
    assert all(s["wall_s_per_volume"] > 0 and s["peak_memory_mb"] > 0 for s in r["samplers"].values())
    # the production path reorders work, not results; random VCM heads make it differ from the floor
    assert r["within_tolerance"] and r["max_abs_diff_naive_vs_production"] < 1e-3
    assert r["vcm_effect_max_abs"] > 1e-2


@pytest.mark.parametrize(("checkpointing", "prior_bank"), [(False, False), (True, False), (False, True)])
def test_bench_train_reports_each_batch_size(checkpointing, prior_bank):
    from vcm.bench.train_step import bench_train

    r = bench_train(
        "demo", [1, 2], 1, "lv_brain_skull", "tiny", checkpointing, 1, "cpu", prior_bank=prior_bank
    )
    assert [row["batch_size"] for row in r["batches"]] == [1, 2]
    assert all(row["s_per_step"] > 0 and row["peak_memory_mb"] > 0 for row in r["batches"])
    assert r["activation_checkpointing"] is checkpointing and r["precision"] == "fp32"
    assert r["prior_bank"] is prior_bank
    assert r["vcm_parameters_M"] == 0.57


def test_bench_train_reports_a_batch_that_does_not_fit_and_goes_on():
    """The CPU allocator's failure is a plain RuntimeError; the row says out of memory and the next batch runs."""
    from vcm.bench.train_step import bench_train

    r = bench_train("demo", [10**9, 1], 1, "lv_brain_skull", "tiny", False, 1, "cpu")
    big, small = r["batches"]
    assert "can't allocate memory" in big["out_of_memory"] and "s_per_step" not in big
    assert small["batch_size"] == 1 and small["s_per_step"] > 0


def test_gpu_script_smoke_on_cpu_writes_every_result(tmp_path):
    """bench/gpu.sh runs blind on a lent GPU, once: its CPU smoke mode runs the same commands on a small grid."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "bench/gpu.sh", str(tmp_path)], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {
        "env.json",
        "log.txt",
        "sample_b1.json",
        "sample_b2.json",
        "profile_sample_b2.txt",
        "train.json",
        "train_checkpointing.json",
    }
    train = json.loads((tmp_path / "train_checkpointing.json").read_text())
    assert train["scale"] == "brainldm" and train["backbone_diffusion_parameters_M"] == 553.17
    assert train["activation_checkpointing"] and [b["batch_size"] for b in train["batches"]] == [2, 2]
    sample = json.loads((tmp_path / "sample_b1.json").read_text())
    assert sample["within_tolerance"] and sample["vcm_parameters_M"] > 40
    parts = json.loads((tmp_path / "sample_b2.json").read_text())["profile"]
    assert set(parts) == {"backbone", "vcm", "scheduler"} and parts["backbone"] > parts["scheduler"] > 0
    table = (tmp_path / "profile_sample_b2.txt").read_text()
    assert table.startswith("one production run: 2 volumes x 2 steps on cpu") and "aten::" in table


def test_bench_command_line_lists_every_benchmark(capsys):
    """``python -m vcm.bench --help``: one sub-command per benchmark family, in the documented order."""
    from vcm.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "{dag,register,sample,train,layout,labels,steps,cohort}" in capsys.readouterr().out


def test_layout_benchmark_times_both_layouts_and_names_an_unknown_case(tmp_path, capsys):
    import argparse

    from vcm.bench.layout import bench_layout, run

    r = bench_layout(["decoder_train", "segmenter_train"], repeats=1, threads=1)
    assert [row["case"] for row in r["cases"]] == ["decoder_train", "segmenter_train"]
    for row in r["cases"]:
        assert row["s_default"] > 0 and row["s_channels_last"] > 0
        assert row["ratio"] == pytest.approx(row["s_default"] / row["s_channels_last"], rel=0.01)
    args = argparse.Namespace(cases=["vcm_train", "gpu_magic"], repeats=1, threads=1, out=tmp_path / "b.json")
    with pytest.raises(SystemExit, match="--cases: unknown gpu_magic"):
        run(args)


# --- steps: label fidelity against sampling steps ------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A results folder as a finished run leaves it: dataset.h5 (with label maps, which a cohort is planned
    from), one vcm.pt, the QC segmenter; and its bundle."""
    from tests.fixtures import make_bundle, make_labelled_dataset, make_vcm
    from vcm.models.segmenter import SegmenterSpec, build_segmenter, save_segmenter

    root = tmp_path_factory.mktemp("finished")
    results = root / "results"
    results.mkdir()
    make_labelled_dataset(results / "dataset.h5")  # validation subjects sub-04, sub-05
    bundle = make_bundle(root / "bundle")
    make_vcm(results / "models" / "vcm" / "lv" / "n2" / "vcm.pt", [[("lv", 1)]], bundle, "lv")
    spec = SegmenterSpec(channels=[4, 8], strides=[2], num_res_units=0)
    save_segmenter(results / "models" / "qc_segmenter" / "segmenter.pt", build_segmenter(spec), spec, {})
    return results, bundle


def test_bench_steps_writes_a_row_per_setting_and_the_plot(finished_run, capsys, one_thread):
    import json

    import pandas as pd

    from vcm.bench.__main__ import main
    from vcm.bench.common import REPO

    results, bundle = finished_run
    args = ["steps", "--results", str(results), "--config", str(REPO / "config" / "config.yaml")]
    args += ["--bundle", str(bundle), "--steps", "2,3", "--subjects", "2", "--reference-steps", "4"]
    assert main(args) == 0
    table = pd.read_csv(results / "benchmarks" / "bench_steps.csv")
    assert list(table.columns) == [
        "sampler",
        "steps",
        "n",
        "lv_dice",
        "lv_dice_sd",
        "lv_dice_diff",
        "lv_dice_diff_ci_low",
        "lv_dice_diff_ci_high",
        "ssim_to_reference",
        "ssim_sd",
        "s_per_volume",
    ]
    # both samplers at 2 and 3 steps, and the DDIM reference (4 steps) that every image is compared with
    assert list(zip(table["sampler"], table["steps"], strict=True)) == [
        ("ddim", 2),
        ("ddim", 3),
        ("ddim", 4),
        ("dpmpp_2m", 2),
        ("dpmpp_2m", 3),
    ]
    assert (
        (table["n"] == 2).all() and table["lv_dice"].between(0, 1).all() and (table["s_per_volume"] > 0).all()
    )
    reference = table.iloc[2]
    assert reference["ssim_to_reference"] == pytest.approx(1.0) and reference["lv_dice_diff"] == 0.0
    assert (table.drop(index=2)["ssim_to_reference"] < 1.0).all()  # fewer steps, another image
    subjects = pd.read_csv(results / "benchmarks" / "bench_steps_subjects.csv")
    assert len(subjects) == 10 and set(subjects["subject"]) == {"sub-04", "sub-05"}
    png = results / "benchmarks" / "bench_steps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((results / "benchmarks" / "bench_steps.json").read_text())
    assert set(info["fewest_steps"]) == {"ddim", "dpmpp_2m"} and info["subjects"] == ["sub-04", "sub-05"]
    out = capsys.readouterr().out
    assert "| sampler | steps | n | lv_dice |" in out and "within 0.01 LV Dice of DDIM-4" in out


def test_fewest_steps_within_the_tolerance_of_the_reference():
    import pandas as pd

    from vcm.bench.steps import fewest_steps

    table = pd.DataFrame(
        {
            "sampler": ["ddim"] * 3 + ["dpmpp_2m"] * 3 + ["other"],
            "steps": [10, 50, 200, 10, 15, 20, 10],
            "lv_dice_diff": [-0.05, -0.005, 0.0, 0.03, 0.008, -0.011, -0.5],
        }
    )
    # within either way: a higher Dice than the reference's (dpmpp_2m at 10) has not converged to it either
    assert fewest_steps(table) == {"ddim": 50, "dpmpp_2m": 15, "other": None}
    assert fewest_steps(table, tolerance=0.03)["dpmpp_2m"] == 10


# --- cohort: QC-passed subjects per hour of generate-shard ----------------------------------------------------


def test_bench_cohort_reports_subjects_per_hour_per_variant(finished_run, tmp_path, capsys, one_thread):
    """Two subjects, DDIM at 3 steps then the config's own sampler (DPM-Solver++ 2M, 2 steps), through the
    stage's engine: one row each, the columns documented, per-hour figures positive and passed / wall × 3600."""
    import json

    import pandas as pd
    import yaml

    from vcm.bench.__main__ import main
    from vcm.cohort.shard import STEPS
    from vcm.config import load_config

    results, bundle = finished_run
    cfg = load_config(REPO / "config" / "config.yaml")
    cfg["cohort"].update(sampler="dpmpp_2m", steps=2, batch_size=2, qc_workers=0)  # no process to spawn
    cfg["qc"].update(dice_min=0.0, intensity_outliers_max=None)  # a random QC segmenter: every sample passes
    cfg["cohort"]["design"] = {}  # ... and no LV-volume target its random segmentation would miss
    cfg["conditions"]["covariate_ranges"] = str(REPO / "resources" / "covariate_ranges.yaml")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench" / "cohort.csv"
    args = ["cohort", "--results", str(results), "--config", str(config), "--bundle", str(bundle)]
    args += ["--variants", "ddim:3,after", "--subjects", "2", "--work-dir", str(tmp_path), "--out", str(out)]
    assert main(args) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == [
        "variant",
        "sampler",
        "steps",
        "subjects",
        "passed",
        "attempts_per_subject",
        "qc_pass_rate",
        "lv_dice_median",
        "wall_s",
        "s_per_subject",
        *[f"s_{step}" for step in STEPS],
        "subjects_per_hour",
        "passed_per_hour",
        "subjects_ratio",
        "passed_ratio",
    ]
    assert table[["variant", "sampler", "steps"]].values.tolist() == [
        ["ddim-3", "ddim", 3],
        ["after", "dpmpp_2m", 2],
    ]
    assert (table["subjects"] == 2).all() and (table["passed"] == 2).all()
    assert (table["attempts_per_subject"] == 1.0).all() and (table["qc_pass_rate"] == 1.0).all()
    assert (table["passed_per_hour"] > 0).all() and (
        table["subjects_per_hour"] == table["passed_per_hour"]
    ).all()
    assert table["passed_per_hour"].to_numpy() == pytest.approx(
        table["passed"] / table["wall_s"] * 3600, rel=1e-5
    )
    assert table["passed_ratio"].to_numpy() == pytest.approx(
        table["passed_per_hour"] / table["passed_per_hour"].iloc[0], rel=1e-5
    )
    parts = table[[f"s_{step}" for step in STEPS]]
    assert (parts > 0).all().all()
    assert table["s_per_subject"].to_numpy() == pytest.approx(table["wall_s"] / 2, rel=1e-5)
    assert list(tmp_path.glob("vcm-bench-cohort-*")) == []  # the shards were temporary
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["condition_set"] == "lv" and [r["variant"] for r in info["rows"]] == ["ddim-3", "after"]
    assert info["rows"][1]["passed_per_hour"] == pytest.approx(table["passed_per_hour"][1], rel=1e-5)
    printed = capsys.readouterr().out
    assert (
        "| variant | sampler | steps | subjects | passed |" in printed
        and "after (dpmpp_2m-2): 2/2 passed" in printed
    )


def test_cohort_variants_before_after_and_named():
    from vcm.bench.cohort import Variant, parse_variants
    from vcm.errors import StageError

    cfg = {"cohort": {"sampler": "dpmpp_2m", "steps": 20}}
    assert parse_variants("before,after, ddim:50", cfg) == [
        Variant("before", "ddim", 200),
        Variant("after", "dpmpp_2m", 20),
        Variant("ddim-50", "ddim", 50),
    ]
    with pytest.raises(StageError, match="--variants: expected before, after or SAMPLER:STEPS, got 'ddim'"):
        parse_variants("before,ddim", cfg)
