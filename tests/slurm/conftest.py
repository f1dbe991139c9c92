"""A real single-node SLURM for the tests, started by the repository's own script (root, Debian)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def local_slurm() -> None:
    """Start (idempotently) the local SLURM with accounting and one fake GPU; fail clearly if impossible."""
    if os.environ.get("VCM_TEST_SLURM") == "0":
        pytest.skip("VCM_TEST_SLURM=0: SLURM tests disabled by the caller")
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        pytest.fail(
            "SLURM tests need root (to start a local SLURM) or a running SLURM; set VCM_TEST_SLURM=0 to skip"
        )
    if os.geteuid() == 0:
        # The script is idempotent; a second run finishes a first start that lost a race between the daemons
        # (seen once on a machine whose earlier session had left stale state behind).
        for _ in range(2):
            proc = subprocess.run(
                ["bash", str(REPO / "scripts" / "slurm" / "start-local-slurm.sh")],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode == 0:
                break
            time.sleep(5)
        assert proc.returncode == 0, (
            f"start-local-slurm.sh failed twice:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
