"""Shared fixtures: tiny volumes, the template (built once), a config for small grids, one torch thread; and how
the suite runs on two pytest-xdist workers.

The builders of tiny files and models are plain functions in tests/fixtures.py.

Parallel runs (``-n 2 --dist loadfile`` in pyproject.toml): every test module is one work unit, so its module
fixtures run once; the long modules are handed out first (the SLURM tests, mostly waiting on the scheduler, then
run beside the rest), and the local whole-DAG run they share with the workflow tests is made once, under a file
lock (tests/workflow/conftest.py). Each worker keeps to its share of the cores, and idle OpenMP threads sleep
instead of spinning on a busy core.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from vcm.config import load_config

REPO = Path(__file__).resolve().parent.parent

# Before torch is imported anywhere (here and in every workflow job the tests start): idle OpenMP threads sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The modules handed out first, in this order: each worker starts one and queues the next, so the SLURM
# module (long, mostly waiting on the scheduler) gets a short one queued behind it, and the local workflow
# modules go to the other worker; every other module follows in its usual order, to whichever worker is free.
FIRST = (
    "slurm/test_slurm_workflow.py",
    "workflow/test_full_workflow.py",
    "test_stage.py",
    "workflow/test_prep_workflow.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """:data:`FIRST` first (a stable sort: the order within a module and of the others is kept)."""
    rank = {name: i for i, name in enumerate(FIRST)}
    tests = Path(__file__).parent
    items.sort(key=lambda item: rank.get(item.path.relative_to(tests).as_posix(), len(rank)))


def pytest_configure(config: pytest.Config) -> None:
    """A worker of a parallel run uses its share of the cores for torch (one each on a 2-core machine)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory) -> Path:
    """The MNI152-derived template and atlas, written once per test session (~6 s)."""
    from vcm.prep.template import write_template

    out = tmp_path_factory.mktemp("template")
    write_template(out)
    return out


@pytest.fixture
def cfg() -> dict:
    """The project's default config, validated and defaulted."""
    return load_config(REPO / "config" / "config.yaml")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than several and leaves the shared CPUs to others. A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
