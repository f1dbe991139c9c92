"""Which conditions a config makes: the names of the condition files prep writes and ``dataset.h5`` stores.

Light on purpose (no NumPy, HDF5 or NIfTI readers): the Snakefile reads these names while it builds the DAG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SECOND_IMAGE", "condition_names", "uses_second_image"]

SECOND_IMAGE = "t2"  # a second modality of the same subject (paper: translation from another modality)


def uses_second_image(cfg: Mapping[str, Any]) -> bool:
    """Whether a condition set uses the second modality (then prep registers and stores it)."""
    return any(SECOND_IMAGE in group for groups in cfg["condition_sets"].values() for group in groups)


def condition_names(cfg: Mapping[str, Any]) -> list[str]:
    """The conditions every subject gets: the masks, the skull image, one low-resolution image per
    ``conditions.lowres_slice_mm`` and, when a condition set uses it, the second modality."""
    return [
        "lv",
        "brain",
        "semantics",
        "skull",
        *[f"lowres_{mm:g}mm" for mm in cfg["conditions"]["lowres_slice_mm"]],
        *([SECOND_IMAGE] if uses_second_image(cfg) else []),
    ]
