"""Shared fixtures: tiny volumes, the template (built once), a config for small grids, one torch thread; and how
the suite runs on two pytest-xdist workers.

The builders of tiny files and models are plain functions in tests/fixtures.py.

Parallel runs (``-n 2 --dist loadgroup`` in pyproject.toml): every test module is one work unit, so its module
fixtures run once; the modules that share one workflow run name their group (``xdist_group``); the long groups
are handed out first, so that the SLURM tests (mostly waiting on the scheduler) run beside the rest. Each worker
keeps to its share of the cores, and OpenMP threads sleep instead of spinning when a core is busy.
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
# The longest work units, in the order they are handed to the workers; modules without a group follow.
LONG_GROUPS = ("slurm", "full_run", "prep_workflow")


def _group(item: pytest.Item) -> str:
    mark = item.get_closest_marker("xdist_group")
    return str(mark.args[0]) if mark else item.module.__name__


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """One work unit per module unless a group is named; the long groups first (stable order otherwise)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    rank = {name: i for i, name in enumerate(LONG_GROUPS)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))


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
