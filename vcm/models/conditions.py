"""Conditions as network inputs: the condition set's groups and the stored condition maps as float tensors.

Shared by training, generation, evaluation and the mask-edit check, so that a condition means the same
channels wherever a control module reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from vcm.errors import StageError

__all__ = ["condition_groups", "condition_tensor"]


def condition_groups(
    cfg: Mapping[str, Any], condset: str, n_semantic: int = 8
) -> list[list[tuple[str, int]]]:
    """The condition set's groups as ``[(name, channels), ...]`` (semantics: one channel per class)."""
    sets = cfg.get("condition_sets", {})
    if condset not in sets:
        raise StageError(f"unknown condition set '{condset}' (config 'condition_sets': {', '.join(sets)})")
    return [[(name, n_semantic if name == "semantics" else 1) for name in group] for group in sets[condset]]


def condition_tensor(name: str, x: torch.Tensor, n_semantic: int) -> torch.Tensor:
    """A stored condition batch (B, 1, *grid; uint8 or float16) as the float network input."""
    if name == "semantics":  # class map 0..K -> one-hot without background
        onehot = F.one_hot(x[:, 0].long(), n_semantic + 1)[..., 1:]
        return onehot.movedim(-1, 1).float()
    return x.float()
