"""The demo DAG submitted through the SLURM profile on a real (local) SLURM: every job via sbatch, the same
outputs as a local run, and a training job that is cancelled mid-run resumes from its checkpoint."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from ..fixtures import TINY_VCM
from ..workflow.conftest import REPO, run_snakemake
from .conftest import cancel_leftover_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

# Faster polling than a production profile needs; everything else, resources included, comes from
# profiles/slurm and the rules as a user gets them (the test node has the machine's 2 CPUs and one fake GPU).
FAST = ["--slurm-init-seconds-before-status-checks", "5", "--latency-wait", "5", "--jobs", "4"]


def _config(root: Path, name: str, **extra) -> tuple[Path, Path]:
    results = root / name
    cfg = {
        "results": str(results),
        "data": {
            "manifest": f"{results}/demo/manifest.csv",
            "demo": {"n_subjects": 3, "seed": 0, "spacing_mm": 2.0},
        },
        "dataset": {"val_size": 1},
        "training": {"sizes": [2]},
        **extra,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, results


@pytest.fixture(scope="module")
def runs(local_slurm, tmp_path_factory):
    """The reduced demo to dataset.h5, once locally and once through SLURM."""
    root = tmp_path_factory.mktemp("slurm")
    local_cfg, local = _config(root, "local")
    proc = run_snakemake(local_cfg, targets=(local / "dataset.h5",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    slurm_cfg, remote = _config(root, "slurm")
    proc = run_snakemake(
        slurm_cfg, "--profile", "profiles/slurm", *FAST, targets=(remote / "dataset.h5",), timeout=1500
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return {"root": root, "local": local, "remote": remote, "output": out}


def test_every_job_went_through_sbatch(runs):
    out = runs["output"]
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", out)
    assert len(finished) >= 3 * 3 + 4  # register/segment/conditions x 3, demo, template, checks, dataset
    assert len(submitted) == len([r for r in finished if r != "all"])
    acct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State,Partition", "-j", ",".join(submitted)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("|") for line in acct.stdout.split()]
    assert {r[0] for r in rows} == set(submitted)
    assert {r[1] for r in rows} == {"COMPLETED"} and {r[2] for r in rows} == {"cpu"}


def test_slurm_outputs_equal_a_local_run(runs):
    with h5py.File(runs["local"] / "dataset.h5") as a, h5py.File(runs["remote"] / "dataset.h5") as b:
        assert list(a["subjects"][:]) == list(b["subjects"][:])
        np.testing.assert_array_equal(a["label"][:], b["label"][:])
        np.testing.assert_array_equal(a["image"][:], b["image"][:])
        np.testing.assert_array_equal(a["covariates"][:], b["covariates"][:])
        for name in a["splits"]:
            np.testing.assert_array_equal(a["splits"][name][:], b["splits"][name][:])


def _random_tiny_bundle(folder: Path) -> Path:
    from vcm.models.backbone import Backbone, build_networks, save_bundle, tiny_definitions

    if (folder / "models" / "model.pt").is_file():
        return folder
    torch.manual_seed(0)
    defs = tiny_definitions()
    save_bundle(folder, Backbone(*build_networks(defs), definitions=defs))
    return folder


def test_cancelled_training_job_resumes_from_its_checkpoint(runs):
    """scancel the GPU training job mid-run: the profile's retry resubmits it and it resumes (step > 0)."""
    root = runs["root"]
    bundle = _random_tiny_bundle(root / "bundle")
    steps = 400
    training = {
        "sizes": [2],
        "steps": steps,
        "minutes": None,
        "batch_size": 2,
        "checkpoint_every": 5,
        "vcm": TINY_VCM,
        "preview": {"subjects": 0},
    }
    cfg, results = _config(
        root,
        "slurm",
        backbone={"kind": "tiny", "bundle": str(bundle)},
        condition_sets={"lv": [["lv"]]},
        training=training,
        # the QC segmenter is an input of training (previews); a few steps keep this test about resuming
        qc={"segmenter": {"steps": 20}},
    )
    target = results / "models" / "lv" / "n2" / "vcm.pt"
    latest = target.parent / "checkpoints" / "checkpoint_latest.pt"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        str(target),  # first: --configfile and --set-resources take every word that follows them
        "--cores",
        "2",
        "--configfile",
        str(cfg),
        "--profile",
        "profiles/slurm",
        *FAST,
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 900
        while not latest.exists():
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(1)
        jobs = subprocess.run(
            ["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True
        ).stdout.split()
        assert len(jobs) == 1, jobs  # the training job
        subprocess.run(["scancel", jobs[0]], check=True)
        out, _ = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:  # a failure above: leave the node and the folder to the next test
            proc.kill()
            cancel_leftover_jobs()
            run_snakemake(cfg, "--unlock", targets=(target,), timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert "Trying to restart job" in out
    log = (results / "logs" / "train_vcm" / "lv_n2.log").read_text()
    resumed = re.search(r"resuming from .* at step (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < steps, log[-3000:]
    final = torch.load(target.parent / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert int(final["step"]) == steps
    state = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", jobs[0]], capture_output=True, text=True
    ).stdout
    assert "CANCELLED" in state


def test_whole_demo_dag_to_the_cohort_through_slurm(runs):
    """Models, the sharded cohort (an array job), evaluation, TSTR and the summary, all via sbatch."""
    root = runs["root"]
    bundle = _random_tiny_bundle(root / "bundle")
    cfg, results = _config(
        root,
        "slurm",
        backbone={"kind": "tiny", "bundle": str(bundle)},
        training={
            "sizes": [2],
            "steps": 4,
            "minutes": None,
            "batch_size": 2,
            "checkpoint_every": 2,
            "vcm": TINY_VCM,
            "preview": {"subjects": 1, "steps": 2},
        },
        cohort={"sets": ["lv_brain_skull"], "size": 4, "shard_size": 2, "steps": 2, "batch_size": 2},
        qc={"max_tries": 1, "segmenter": {"steps": 10}},
        evaluation={"steps": 2},
        tstr={"steps": 4, "passed_only": False},  # random weights: no subject passes QC
    )
    proc = run_snakemake(cfg, "--profile", "profiles/slurm", *FAST, timeout=2400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", out)
    assert {"train_vcm", "generate_shard", "merge_cohort", "evaluate", "tstr", "summary"} <= set(finished)
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    arrays = re.findall(r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)", out)
    assert len(arrays) == 1 and len(arrays[0][0].split(",")) == 2, arrays  # both shards in one array job
    local = {"all", "models", "cohorts"}
    assert len(submitted) + 2 == len([r for r in finished if r not in local]), (submitted, finished)
    shards = sorted((results / "cohorts" / "lv_brain_skull" / "shards").glob("*/shard.h5"))
    assert len(shards) == 2
    tasks = set()
    for shard in shards:
        with h5py.File(shard) as h5:
            assert "slurm_job_id" in h5.attrs
            tasks.add(h5.attrs["slurm_array_task_id"])
    assert len(tasks) == 2, tasks  # the two shards ran as two tasks of one array job
    with h5py.File(results / "cohorts" / "lv_brain_skull" / "cohort.h5") as h5:
        assert h5["image"].shape[0] == 4
    meta = torch.load(results / "models" / "lv_brain_skull" / "n2" / "vcm.pt", weights_only=True)
    assert "slurm_job_id" in meta["provenance"]
    assert (results / "summary.md").is_file() and (results / "eval" / "tstr.csv").is_file()
