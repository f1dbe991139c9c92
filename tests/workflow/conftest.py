"""Helpers to run the real Snakefile on a reduced config in a temporary results folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def run_snakemake(
    configfile: Path, *args: str, targets: tuple = (), timeout: int = 1200
) -> subprocess.CompletedProcess:
    """Run snakemake in the repository with an extra config file; the venv's bin comes first on PATH."""
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
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def write_config(tmp_path):
    def write(overrides: dict, name: str = "test_config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(overrides))
        return path

    return write
