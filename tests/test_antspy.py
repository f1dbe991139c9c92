"""vcm.antspy: antspyx's core without its plotting, statistics and deep-learning imports."""

import subprocess
import sys

import pytest

PROBE = """
import sys
from vcm.antspy import import_ants
ants = import_ants()
from ants.math.image_similarity import image_similarity
heavy = sorted(m for m in ("matplotlib", "statsmodels", "sklearn") if m in sys.modules)
print(heavy, callable(ants.registration), callable(ants.apply_transforms), callable(image_similarity))
"""


def test_import_ants_skips_the_heavy_subpackages():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True", "True", "True"]


def test_import_ants_returns_an_already_imported_ants(monkeypatch):
    fake = type(sys)("ants")
    monkeypatch.setitem(sys.modules, "ants", fake)
    from vcm.antspy import import_ants

    assert import_ants() is fake


def test_import_ants_without_antspyx_names_the_package(monkeypatch):
    import importlib.util

    from vcm.antspy import import_ants

    monkeypatch.delitem(sys.modules, "ants", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="antspyx"):
        import_ants()
