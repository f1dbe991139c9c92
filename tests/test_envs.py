"""The conda environments for `--software-deployment-method conda` agree with pyproject.toml."""

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
CONDA_TO_PYPI = {"matplotlib-base": "matplotlib", "pytorch": "torch"}


def _pins(env_file: Path) -> dict[str, str]:
    pins = {}
    for dep in yaml.safe_load(env_file.read_text())["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-") or item in ("pip",) or item.startswith("python="):
                continue
            name, _, version = item.replace("==", "=").partition("=")
            pins[CONDA_TO_PYPI.get(name, name).lower()] = version
    return pins


def _project_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}


@pytest.mark.parametrize("env", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pin_satisfies_the_project_range(env):
    reqs = _project_requirements()
    pins = _pins(env)
    assert pins, env
    for name, version in pins.items():
        assert "*" not in version and version, f"{env.name}: {name} is not pinned"
        if name in reqs:
            assert reqs[name].specifier.contains(version), (
                f"{env.name}: {name}={version} outside {reqs[name]}"
            )


def test_torch_env_covers_every_dependency():
    missing = set(_project_requirements()) - set(_pins(REPO / "envs" / "torch.yaml"))
    assert not missing, f"envs/torch.yaml lacks {sorted(missing)}"


def test_prep_env_covers_what_the_prep_stages_import():
    needed = {
        "numpy",
        "scipy",
        "nibabel",
        "nilearn",
        "antspyx",
        "h5py",
        "pandas",
        "pyyaml",
        "jsonschema",
        "tqdm",
        "matplotlib",
        "scikit-image",
    }
    assert needed <= set(_pins(REPO / "envs" / "prep.yaml"))
