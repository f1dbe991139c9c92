"""The learning-rate schedule of control-module training: linear warm-up, then cosine annealing.

Two clocks drive it: the step count (``training.steps``) or the elapsed fraction of a wall-clock budget
(``training.minutes``), so that a budgeted run completes its annealing however fast the shared CPUs are.
"""

from __future__ import annotations

import math

__all__ = ["lr_factor", "lr_factor_time"]


def _cosine(progress: float, min_ratio: float) -> float:
    """Cosine from 1 at ``progress`` 0 to ``min_ratio`` at 1 (``progress`` clipped to [0, 1])."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``: linear warm-up over ``warmup`` steps,
    then cosine annealing to ``min_ratio`` at the last step."""
    warmup = max(0, min(warmup, total - 1))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return _cosine((step - warmup) / max(1, total - 1 - warmup), min_ratio)


def lr_factor_time(fraction: float, warmup: float = 0.05, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``fraction`` of a wall-clock budget: linear warm-up over the first
    ``warmup`` of it, then cosine annealing that reaches ``min_ratio`` when the budget is spent, however
    the speed varies on the way (shared CPUs)."""
    if fraction < warmup:
        return max(fraction / warmup, 0.01)
    return _cosine((fraction - warmup) / (1.0 - warmup), min_ratio)
