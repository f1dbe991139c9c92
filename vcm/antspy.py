"""antspyx, imported without the subpackages vcm never calls.

``import ants`` (antspyx 0.6) imports every subpackage: plotting (matplotlib), learn and math (statsmodels),
deeplearn (scikit-learn) — about 2.4 CPU-seconds in each process, 1 of them for what vcm uses. The demo starts
two such processes per subject (``register``, ``segment``), so those imports were a sixth of its preparation.
:func:`import_ants` registers the unused subpackages as empty packages before the first import, so
``import ants`` runs only its core (images, transforms, registration, resampling); their modules stay
importable one by one (``from ants.math.image_similarity import image_similarity``).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

# what vcm calls (registration, apply_transforms, read_transform, resample_image, from_nibabel_nifti) lives in
# ants.core, ants.registration, ants.ops and ants.utils, which import none of these
UNUSED_SUBPACKAGES = ("learn", "math", "plotting", "deeplearn", "contrib", "segmentation")


def import_ants() -> types.ModuleType:
    """The ``ants`` module, imported without :data:`UNUSED_SUBPACKAGES` if nothing imported it before.

    Raises:
        ModuleNotFoundError: antspyx is not installed.
    """
    if "ants" in sys.modules:
        return sys.modules["ants"]
    spec = importlib.util.find_spec("ants")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("antspyx is not installed (pip install antspyx)", name="ants")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name in UNUSED_SUBPACKAGES:
        full = f"ants.{name}"
        if full not in sys.modules and (root / name).is_dir():
            stub = types.ModuleType(full, f"antspyx's {name} subpackage, not imported by vcm (vcm.antspy)")
            stub.__path__ = [str(root / name)]  # its modules import on their own
            stub.__package__ = full
            sys.modules[full] = stub
    import ants

    return ants
