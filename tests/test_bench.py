"""The DAG benchmark builds the whole per-subject DAG (it broke once when rules gained an input)."""

import nibabel as nib
import numpy as np
import pytest

from vcm.bench.dag import bench_dag


@pytest.mark.workflow
def test_bench_dag_lists_three_jobs_per_subject(tmp_path):
    t1 = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(t1))
    result = bench_dag(20, t1, cohort_size=100)
    assert result["per_subject_jobs"] == 60
    assert result["shard_jobs"] == 7 and result["profile"] == "profiles/slurm"  # ceil(100 / 16) shards
    assert result["seconds"] > 0 and result["cpu_seconds"] > 0


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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bench_train_reports_each_batch_size(checkpointing):
    from vcm.bench.train_step import bench_train

    r = bench_train("demo", [1, 2], 1, "lv_brain_skull", "tiny", checkpointing, 1, "cpu")
    assert [row["batch_size"] for row in r["batches"]] == [1, 2]
    assert all(row["s_per_step"] > 0 and row["peak_memory_mb"] > 0 for row in r["batches"])
    assert r["activation_checkpointing"] is checkpointing and r["precision"] == "fp32"
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
        "train.json",
        "train_checkpointing.json",
    }
    train = json.loads((tmp_path / "train_checkpointing.json").read_text())
    assert train["scale"] == "brainldm" and train["backbone_diffusion_parameters_M"] == 553.17
    assert train["activation_checkpointing"] and [b["batch_size"] for b in train["batches"]] == [2, 2]
    sample = json.loads((tmp_path / "sample_b1.json").read_text())
    assert sample["within_tolerance"] and sample["vcm_parameters_M"] > 40


def test_bench_command_line_lists_every_benchmark(capsys):
    """``python -m vcm.bench --help``: one sub-command per benchmark family, in the documented order."""
    from vcm.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "{dag,register,sample,train,labels,steps}" in capsys.readouterr().out


# --- steps: label fidelity against sampling steps ------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A results folder as a finished run leaves it: dataset.h5, one vcm.pt, the QC segmenter; and its bundle."""
    from tests.fixtures import make_bundle, make_dataset, make_vcm
    from vcm.models.segmenter import SegmenterSpec, build_segmenter, save_segmenter

    root = tmp_path_factory.mktemp("finished")
    results = root / "results"
    results.mkdir()
    make_dataset(results / "dataset.h5")  # validation subjects sub-04, sub-05
    bundle = make_bundle(root / "bundle")
    make_vcm(results / "models" / "lv" / "n2" / "vcm.pt", [[("lv", 1)]], bundle, "lv")
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
