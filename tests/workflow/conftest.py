"""Helpers to run the real Snakefile on a reduced config in a temporary results folder, and the reduced
whole-DAG config that the local and the SLURM workflow tests share (one local run serves both)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[2]


def run_snakemake(
    configfile: Path, *args: str, targets: tuple = (), timeout: int = 1200, background: bool = False
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run snakemake in the repository with an extra config file; the venv's bin comes first on PATH.
    ``background``: return the running process at once (stdout and stderr together, as text)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # Targets go first: --configfile and --set-resources take every word that follows them.
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        *map(str, targets),
        "--cores",
        "2",
        "--configfile",
        str(configfile),
        *args,
    ]
    if background:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def write_config(tmp_path):
    def write(overrides: dict, name: str = "test_config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(overrides))
        return path

    return write


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that every pytest-xdist worker of this session sees (the session's base temporary folder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def tiny_bundle(folder: Path) -> Path:
    """A random-weight tiny backbone bundle in ``folder``, written once (seeded: the same bytes every time)."""
    import torch

    from vcm.models.backbone import Backbone, build_networks, save_bundle, tiny_definitions

    with FileLock(f"{folder}.lock"):
        if not (folder / "models" / "model.pt").is_file():
            torch.manual_seed(0)
            defs = tiny_definitions()
            save_bundle(folder, Backbone(*build_networks(defs), definitions=defs))
    return folder


def full_config(root: Path, name: str) -> tuple[Path, Path]:
    """The whole DAG on a tiny demo with a random-weight tiny backbone (in ``root/bundle``): two condition sets
    (one of them the second modality), a sharded cohort with QC, evaluation, TSTR, summary. Returns the config
    file ``root/<name>.yaml`` and its results folder ``root/<name>``."""
    bundle = tiny_bundle(root / "bundle")
    results = root / name
    cfg = {
        "results": str(results),
        "data": {
            "manifest": f"{results}/demo/manifest.csv",
            "demo": {"n_subjects": 5, "seed": 0, "spacing_mm": 2.0},
        },
        "dataset": {"val_size": 1},
        # the second modality end to end: registered with the T1's transform, stored, trained on
        "condition_sets": {"lv_brain_skull": [["lv", "brain"], ["skull"]], "t2": [["t2"]]},
        "backbone": {"kind": "tiny", "bundle": str(bundle)},
        "training": {
            "sizes": [3],
            "steps": 6,
            "minutes": None,
            "batch_size": 2,
            "checkpoint_every": 3,
            "preview": {"subjects": 1, "steps": 3},
        },
        "cohort": {"sets": ["lv_brain_skull"], "size": 4, "shard_size": 2, "steps": 3, "batch_size": 2},
        "qc": {"max_tries": 2, "segmenter": {"steps": 20}},
        "tstr": {"steps": 10, "passed_only": False},  # random weights: no subject passes QC
    }
    configfile = root / f"{name}.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    return configfile, results


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> dict:
    """The reduced whole DAG run locally once per session, whichever worker asks first (the others wait for
    it), with its Snakemake report: the workflow tests check what it writes; the SLURM tests run the same
    config through sbatch and compare."""
    root = shared_dir(tmp_path_factory) / "full"
    root.mkdir(exist_ok=True)
    with FileLock(f"{root}.lock"):
        configfile, results = full_config(root, "local")
        report, done = root / "report.html", root / "done"
        if not done.is_file():
            proc = run_snakemake(configfile, timeout=2400)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            proc = run_snakemake(configfile, "--report", str(report), timeout=600)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            done.touch()
    return {"root": root, "config": configfile, "results": results, "report": report}
