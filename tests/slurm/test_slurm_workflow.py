"""The demo DAG submitted through the SLURM profile on a real (local) SLURM: every job via sbatch, same outputs."""

import re
import subprocess

import h5py
import numpy as np
import pytest
import yaml

from ..workflow.conftest import run_snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

# Faster polling than a production profile needs; everything else comes from profiles/slurm.
FAST = ["--slurm-init-seconds-before-status-checks", "5", "--latency-wait", "5", "--jobs", "4"]


def _config(root, name):
    results = root / name
    cfg = {
        "results": str(results),
        "data": {"manifest": f"{results}/demo/manifest.csv", "demo": {"n_subjects": 3, "seed": 0, "spacing_mm": 2.0}},
        "dataset": {"val_size": 1},
        "training": {"sizes": [2]},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, results


def test_demo_dag_runs_through_sbatch_and_matches_a_local_run(local_slurm, tmp_path):
    local_cfg, local = _config(tmp_path, "local")
    proc = run_snakemake(local_cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]

    slurm_cfg, remote = _config(tmp_path, "slurm")
    proc = run_snakemake(slurm_cfg, "--profile", "profiles/slurm", *FAST, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    # Every executed job was submitted with sbatch and completed in SLURM's accounting.
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", out)
    assert len(finished) >= 3 * 3 + 4  # register/segment/conditions x 3, demo, template, checks, dataset
    assert len(submitted) == len([r for r in finished if r != "all"])
    acct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(submitted)], capture_output=True, text=True, check=True
    )
    states = dict(line.split("|") for line in acct.stdout.split())
    assert set(states) == set(submitted) and set(states.values()) == {"COMPLETED"}

    with h5py.File(local / "dataset.h5") as a, h5py.File(remote / "dataset.h5") as b:
        assert list(a["subjects"][:]) == list(b["subjects"][:])
        np.testing.assert_array_equal(a["label"][:], b["label"][:])
        np.testing.assert_allclose(a["image"][:].astype(np.float32), b["image"][:].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(a["covariates"][:], b["covariates"][:], atol=1e-6)
        for name in a["splits"]:
            np.testing.assert_array_equal(a["splits"][name][:], b["splits"][name][:])
