"""Shared fixtures: tiny volumes, the template (built once), a config for small grids, one torch thread.

The builders of tiny files and models are plain functions in tests/fixtures.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vcm.config import load_config

REPO = Path(__file__).resolve().parent.parent


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
