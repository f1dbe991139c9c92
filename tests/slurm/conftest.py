"""A real single-node SLURM for the tests, started by the repository's own script (root, Debian)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ..workflow.conftest import full_run  # noqa: F401  (the local run the SLURM run is compared with)

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


def cancel_leftover_jobs() -> None:
    """Cancel every job still queued or running: a test that failed mid-run must not leave its sbatch jobs
    holding the test node's CPUs and its one GPU for the tests after it (the local SLURM is the tests' own)."""
    subprocess.run(["scancel", "--user", getpass.getuser()], check=False)
    deadline = time.time() + 60
    while time.time() < deadline:
        left = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        if not left:
            return
        time.sleep(1)
