"""The study preset config/brainldm.yaml: complete, the paper's settings, and its whole DAG through the SLURM
profile (a dry run: no bundle, no SynthSeg, nothing submitted)."""

import copy

import nibabel as nib
import numpy as np
import pytest
import yaml
from snakemake.utils import update_config

from vcm.bench.common import REPO
from vcm.config import load_config, validate_config

PRESET = REPO / "config" / "brainldm.yaml"


def _raw(path):
    return yaml.safe_load(path.read_text())


def test_the_preset_is_valid_and_nothing_of_the_demo_leaks_into_it():
    """Snakemake merges --configfile over config/config.yaml key by key: the preset must set every key the
    demo's config sets, or a study would train with a demo setting it never asked for."""
    preset = load_config(PRESET)
    merged = copy.deepcopy(_raw(REPO / "config" / "config.yaml"))
    update_config(merged, _raw(PRESET))
    assert validate_config(merged) == preset


def test_the_preset_holds_the_papers_settings():
    cfg = load_config(PRESET)
    t = cfg["training"]
    assert cfg["grid"] == "brainldm" and cfg["backbone"]["kind"] == "brainldm"
    assert cfg["backbone"]["scale_factor"] == pytest.approx(0.8963)
    assert cfg["segmentation"]["backend"] == "synthseg" and cfg["evaluation"]["segmentation"] == "synthseg"
    assert t["methods"] == ["vcm", "controlnet"] and t["sizes"] == [10, 50, 500]
    assert (t["lr"], t["batch_size"], t["l1_scale"], t["min_lr_ratio"]) == (5e-5, 16, 1.0, 0.1)
    assert (t["loss_weighting"], t["noise_draws"], t["timesteps"], t["flip"]) == ("none", 1, "uniform", True)
    assert (t["prior_reuse"], t["grad_clip_norm"], t["ema_decay"]) == (1, None, None)
    assert (cfg["cohort"]["sampler"], cfg["cohort"]["steps"], cfg["cohort"]["control_scale"]) == (
        "ddim",
        200,
        1.0,
    )
    assert cfg["cohort"]["size"] == 10_000


@pytest.mark.parametrize(
    ("groups", "millions"), [([[("lv", 1)]], 45.02), ([[("lv", 1), ("brain", 1)], [("skull", 1)]], 45.38)]
)
def test_the_preset_builds_the_papers_vcm(groups, millions):
    """At BrainLDM scale (3 latent channels, factor 8): the paper's 45.19 M / 45.88 M, within the head's
    documented difference (docs/architecture.md, Models)."""
    from vcm.models.vcm import VCM

    widths = load_config(PRESET)["training"]["vcm"]
    model = VCM(spatial_dims=3, latent_channels=3, condition_groups=groups, levels=3, **widths)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


@pytest.mark.workflow
def test_the_whole_study_dag_dry_runs_through_the_slurm_profile(tmp_path):
    """30 subjects whose input checks have run; a bundle folder with empty model files (a dry run reads none)."""
    from vcm.bench.dag import dry_run_jobs, fake_checked_inputs

    t1 = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(t1))
    manifest, results = fake_checked_inputs(tmp_path / "study", 30, t1)
    bundle = tmp_path / "brainldm"
    (bundle / "models").mkdir(parents=True)
    for name in ("autoencoder.pt", "model.pt"):
        (bundle / "models" / name).write_bytes(b"")
    local = tmp_path / "local.yaml"  # the two FILL IN paths, and a results folder of its own
    local.write_text(
        yaml.safe_dump(
            {
                "results": str(results),
                "data": {"manifest": str(manifest)},
                "backbone": {"bundle": str(bundle)},
            }
        )
    )
    jobs, _, _ = dry_run_jobs([PRESET, local], "profiles/slurm")
    models = 2 * 2 * 3  # methods x condition sets x training sizes
    assert {rule: jobs.get(rule) for rule in ("register_segment", "conditions")} == dict.fromkeys(
        ("register_segment", "conditions"), 30
    )
    assert jobs["train_vcm"] == models and jobs["evaluate"] == models
    assert jobs["mask_edit"] == models  # both condition sets have an LV mask
    assert jobs["generate_shard"] == 100 and jobs["merge_cohort"] == 1  # 10 000 subjects, 100 a shard
    assert jobs["encode_latents"] == 1 and jobs["eval_tables"] == 1 and jobs["summary"] == 1


@pytest.mark.workflow
def test_two_methods_train_evaluate_and_the_cohort_samples_its_method(tmp_path):
    """The demo config with VCM and ControlNet side by side (the reduced workflow run trains VCM only, to keep
    its time): one model, evaluation and mask edit per method, and the cohort's shards use cohort.method's."""
    import subprocess
    import sys

    from vcm.bench.dag import dry_run_jobs, fake_checked_inputs

    t1 = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(t1))
    demo = load_config(REPO / "config" / "config.yaml")
    size = max(demo["training"]["sizes"])
    manifest, results = fake_checked_inputs(tmp_path / "run", demo["dataset"]["val_size"] + size, t1)
    both = tmp_path / "both.yaml"
    both.write_text(
        yaml.safe_dump(
            {
                "results": str(results),
                "data": {"manifest": str(manifest)},
                "training": {"methods": ["vcm", "controlnet"]},
                "cohort": {"method": "controlnet"},
            }
        )
    )
    jobs, _, _ = dry_run_jobs([both], None)
    assert (jobs["train_vcm"], jobs["evaluate"], jobs["mask_edit"], jobs["eval_tables"]) == (2, 2, 2, 1)
    shard = results / "cohorts" / "lv_brain_skull" / "shards" / "00000" / "shard.h5"
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--configfile", str(both), "--", str(shard)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.count("python -m vcm train-vcm") == 1 and "--method controlnet" in out
    assert f"--model {results}/models/controlnet/lv_brain_skull/n{size}/vcm.pt" in out
