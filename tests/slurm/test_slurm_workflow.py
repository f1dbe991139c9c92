"""The reduced whole DAG submitted through the SLURM profile on a real (local) SLURM: every job via sbatch, on
the partition the profile gives its rule; the same data, model and cohort as the same config run locally
(``full_run``); and a training job cancelled three times resumes from its checkpoint each time."""

import re
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from ..fixtures import TINY_VCM
from ..workflow.conftest import REPO, full_config, run_snakemake, shared_dir
from .conftest import cancel_leftover_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

# Faster polling than a production profile needs (plugin 2.6.1 waits this long after a job finishes, then 10 s
# longer at each check that finds none finished: a short job costs the wait, not its run); everything else,
# resources included, comes from profiles/slurm and the rules as a user gets them (the test node has the
# machine's 2 CPUs and one fake GPU).
FAST = ["--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5", "--jobs", "4"]
PROFILE = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
GPU_RULES = {rule for rule, res in PROFILE["set-resources"].items() if res.get("gpu")}
# What a file records about where and how it was made, not what it holds: the config text names the results
# folder, SLURM jobs record their ids (a cohort lists its shards' jobs), and the inputs' paths and hashes (a
# model's hash covers its own provenance; a cohort's signature hashes those hashes) name the other run's files.
PROVENANCE = {
    "config_yaml",
    "config_sha256",
    "slurm_job_id",
    "slurm_array_job_id",
    "slurm_array_task_id",
    "shards",
}
PROVENANCE_OF_INPUTS = {"model", "model_sha256", "dataset", "latents", "signature"}


@pytest.fixture(scope="module")
def slurm_run(local_slurm, tmp_path_factory):
    """The config of ``full_run`` (tests/workflow/conftest.py), in its own results folder, through the SLURM
    profile; it runs beside the local run when the tests run on two workers."""
    root = shared_dir(tmp_path_factory) / "full"
    root.mkdir(exist_ok=True)
    configfile, results = full_config(root, "slurm")
    proc = run_snakemake(configfile, "--profile", "profiles/slurm", *FAST, timeout=2400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return {"config": configfile, "results": results, "output": out}


def test_every_job_went_through_sbatch_on_its_partition(slurm_run):
    out, results = slurm_run["output"], slurm_run["results"]
    finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", out)
    assert {
        "register_segment",
        "conditions",
        "dataset",
        "train_vcm",
        "generate_shard",
        "merge_cohort",
    } <= set(finished)
    assert {"evaluate", "tstr", "summary", "train_qc_segmenter", "encode_latents"} <= set(finished)
    # one submission per job; the cohort's two shards go as one array job of two tasks
    submitted = dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", out))
    arrays = re.findall(r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)", out)
    assert len(arrays) == 1 and len(arrays[0][0].split(",")) == 2, arrays
    local = {"all", "models", "cohorts", "subject_gates"}  # the rules with `localrule: True`
    assert len(submitted) + 2 == len([r for r in finished if r not in local]), (submitted, finished)
    acct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State,Partition", "-j", ",".join(submitted)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {r[0]: r[1:] for r in (line.split("|") for line in acct.stdout.split())}
    assert set(rows) == set(submitted)
    for job, rule in submitted.items():
        state, partition = rows[job]
        assert state == "COMPLETED", (job, rule, state)
        assert partition == ("gpu" if rule in GPU_RULES else "cpu"), (job, rule, partition)
    tasks = set()
    for shard in sorted((results / "cohorts" / "lv_brain_skull" / "shards").glob("*/shard.h5")):
        with h5py.File(shard) as h5:
            assert "slurm_job_id" in h5.attrs
            tasks.add(h5.attrs["slurm_array_task_id"])
    assert len(tasks) == 2, tasks  # the two shards ran as two tasks of one array job
    meta = torch.load(results / "models" / "vcm" / "lv_brain_skull" / "n3" / "vcm.pt", weights_only=True)
    assert "slurm_job_id" in meta["provenance"]
    assert (results / "summary.md").is_file() and (results / "eval" / "tstr.csv").is_file()


def _assert_same_h5(a: h5py.Group, b: h5py.Group) -> None:
    """Same groups, datasets (bit for bit) and attributes, provenance aside."""
    assert set(a) == set(b), a.name
    skip = PROVENANCE | PROVENANCE_OF_INPUTS
    assert {k for k in a.attrs if k not in skip} == {k for k in b.attrs if k not in skip}, a.name
    for key in a.attrs:
        if key not in skip:
            np.testing.assert_array_equal(a.attrs[key], b.attrs[key], err_msg=f"{a.name} attrs[{key}]")
    for name in a:
        if isinstance(a[name], h5py.Group):
            _assert_same_h5(a[name], b[name])
        else:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=a[name].name)


def _assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "model":
            assert a[key].keys() == b[key].keys()
            for name, tensor in a[key].items():
                assert torch.equal(tensor, b[key][name]), name
        elif key == "provenance":
            skip = PROVENANCE | PROVENANCE_OF_INPUTS
            assert {k: v for k, v in a[key].items() if k not in skip} == {
                k: v for k, v in b[key].items() if k not in skip
            }
        else:
            assert a[key] == b[key], key


def test_slurm_run_makes_the_same_data_model_and_cohort_as_a_local_run(slurm_run, full_run):
    """Same config and seed, another executor and folder: dataset.h5, vcm.pt and cohort.h5 hold the same bits."""
    local, remote = full_run["results"], slurm_run["results"]
    for rel in ("dataset.h5", "cohorts/lv_brain_skull/cohort.h5"):
        with h5py.File(local / rel) as a, h5py.File(remote / rel) as b:
            _assert_same_h5(a, b)
    for condset in ("lv_brain_skull", "t2"):
        rel = f"models/vcm/{condset}/n3/vcm.pt"
        _assert_same_model(
            torch.load(local / rel, weights_only=True), torch.load(remote / rel, weights_only=True)
        )


def _running_job() -> str | None:
    jobs = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True)
    ids = jobs.stdout.split()
    assert len(ids) <= 1, ids  # only the training job runs
    return ids[0] if ids else None


def _resumes_saved(path: Path) -> int:
    """How many resumes the latest checkpoint has seen (-1: none written yet, or replaced while reading)."""
    try:
        return len(torch.load(path, weights_only=True)["resumed_at"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


def test_training_job_survives_three_preemptions(slurm_run):
    """scancel the GPU training job three times mid-run: each time the profile's retry resubmits it and it
    resumes from its latest checkpoint; it ends at the step budget with the final checkpoint."""
    results, pre_emptions, steps = slurm_run["results"], 3, 120
    cfg = yaml.safe_load(slurm_run["config"].read_text())
    cfg["training"].update(steps=steps, checkpoint_every=5, vcm=TINY_VCM, preview={"subjects": 0, "steps": 3})
    configfile = slurm_run["config"].with_name("slurm_preempted.yaml")
    configfile.write_text(yaml.safe_dump(cfg))
    model_dir = results / "models" / "vcm" / "t2" / "n3"
    shutil.rmtree(model_dir)  # trained by slurm_run with 6 steps: train it again, with checkpoints to resume
    target, latest = model_dir / "vcm.pt", model_dir / "checkpoints" / "checkpoint_latest.pt"
    proc = run_snakemake(configfile, "--profile", "profiles/slurm", *FAST, targets=(target,), background=True)
    cancelled: list[str] = []
    try:
        deadline = time.time() + 900
        while len(cancelled) < pre_emptions:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, f"{len(cancelled)} pre-emptions, no checkpoint of the next attempt"
            # pre-empt each attempt once it has saved a checkpoint of its own (after k pre-emptions, the
            # latest checkpoint lists k resumes), long before the step budget
            job = _running_job()
            if job is not None and job not in cancelled and _resumes_saved(latest) == len(cancelled):
                subprocess.run(["scancel", job], check=True)
                cancelled.append(job)
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:  # a failure above: leave the node and the folder to the next test
            proc.kill()
            cancel_leftover_jobs()
            run_snakemake(configfile, "--unlock", targets=(target,), timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("Trying to restart job") == pre_emptions, out[-4000:]
    log = (results / "logs" / "train_vcm" / "vcm" / "t2_n3.log").read_text()  # the last attempt's
    assert re.search(rf"resuming from .* at step \d+ \(resume {pre_emptions}\)", log), log[-3000:]
    final = torch.load(model_dir / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert int(final["step"]) == steps
    # every attempt resumed where the one before had last saved: later and later, never from the start
    resumed = final["resumed_at"]
    assert len(resumed) == pre_emptions and all(0 < s < steps for s in resumed), resumed
    assert resumed == sorted(set(resumed)), resumed
    states = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", ",".join(cancelled)], capture_output=True, text=True
    ).stdout.splitlines()  # "CANCELLED by 0"
    assert len(states) == pre_emptions and all(s.startswith("CANCELLED") for s in states), states
