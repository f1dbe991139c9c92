"""The training loop the backbone stages share: budget, learning-rate schedule, loss log, checkpoints.

A stage (the autoencoder, then the latent U-Net) hands :class:`StageLoop` its networks, optimisers and a
``step_fn``; the loop runs it until the :class:`Budget` is spent, logs every step to ``losses.csv``
(:class:`LossLog`, drawn as ``loss.png``), checkpoints every few steps and resumes from the latest checkpoint.
Checkpoints live in the stage's work folder under the project's one policy (:func:`stage_store`,
:mod:`vcm.training.checkpoints`): a checkpoint of other network definitions is set aside, never resumed.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vcm.errors import StageError
from vcm.training.checkpoints import (
    FINAL,
    FORMAT_VERSION,
    CheckpointStore,
    restore_rng_state,
    rng_state,
    signature,
)

__all__ = [
    "Budget",
    "LossLog",
    "StageLoop",
    "StageOptions",
    "StageSummary",
    "finished_stage",
    "last_value",
    "module_device",
    "module_state",
    "save_final",
    "stage_store",
    "tail_mean",
]

logger = logging.getLogger(__name__)


@dataclass
class Budget:
    """When a stage ends: after ``steps`` steps or ``minutes`` of wall time, whichever comes first."""

    steps: int | None
    minutes: float | None
    warmup: int

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise StageError("give each stage a budget: --*-steps and/or --*-minutes")

    def progress(self, step: int, elapsed_s: float) -> float:
        """The spent fraction of the budget, in [0, 1]."""
        parts = []
        if self.steps:
            parts.append(step / self.steps)
        if self.minutes:
            parts.append(elapsed_s / (60 * self.minutes))
        return min(1.0, max(parts))

    def done(self, step: int, elapsed_s: float) -> bool:
        return self.progress(step, elapsed_s) >= 1.0

    def lr_factor(self, step: int, elapsed_s: float, final: float) -> float:
        """Linear warm-up over ``warmup`` steps (at most a fifth of ``steps``), then a cosine decay to
        ``final`` times the base rate over the budget."""
        warmup = min(self.warmup, self.steps // 5) if self.steps else self.warmup
        warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        p = self.progress(step, elapsed_s)
        return warm * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class StageOptions:
    """What every stage's options have besides its budget, batch and learning rate."""

    minutes: float | None = None
    lr_final: float = 0.1
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "cpu"


@dataclass
class StageSummary:
    """Figures of a finished stage, for the training record."""

    steps: int
    wall_s: float
    train_loss: float
    val_loss: float | None
    extra: dict[str, Any] = field(default_factory=dict)


class LossLog:
    """A per-step loss CSV that survives resumption (rows after the resumed step are dropped)."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: int) -> None:
        self.path, self.columns = path, list(columns)
        rows: list[dict[str, str]] = []
        if resume_step > 0 and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("w", newline="")
        self._w = csv.DictWriter(self._f, self.columns, extrasaction="ignore")
        self._w.writeheader()
        self._w.writerows(rows)
        self._f.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def read(self) -> list[dict[str, str]]:
        with self.path.open() as f:
            return list(csv.DictReader(f))

    def plot(self, path: Path, train_key: str, val_key: str, title: str) -> None:
        """``loss.png``: the per-step training loss ``train_key`` and the held-out loss ``val_key``."""
        from vcm.plots import loss_curve

        rows = self.read()
        if not rows:
            return
        held_out = [(int(r["step"]), float(r[val_key])) for r in rows if r.get(val_key) not in (None, "")]
        loss_curve(
            path,
            [int(r["step"]) for r in rows],
            [float(r[train_key]) for r in rows],
            title,
            label=f"train {train_key}",
            held_out=tuple(zip(*held_out, strict=True)) if held_out else None,  # type: ignore[arg-type]
            held_out_label=f"held-out {val_key}",
        )


def tail_mean(rows: Sequence[dict[str, str]], key: str, n: int = 50) -> float:
    """Mean of the last ``n`` logged values of ``key`` (NaN when none)."""
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return float(np.mean(values[-n:])) if values else float("nan")


def last_value(rows: Sequence[dict[str, str]], key: str) -> float | None:
    """The last logged value of ``key``, or ``None``."""
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return values[-1] if values else None


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state dict, for a checkpoint."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def finished_stage(
    store: CheckpointStore, name: str, modules: Mapping[str, nn.Module]
) -> StageSummary | None:
    """The summary of a finished stage (its ``checkpoint_final.pt``), its weights loaded into ``modules``;
    ``None`` when the stage has not finished."""
    final = store.final()
    if final is None:
        return None
    for k, m in modules.items():
        m.load_state_dict(final["modules"][k])
    logger.info("%s: already trained (%s); delete it to retrain", name, store.path(FINAL))
    return StageSummary(**final["summary"])


def save_final(store: CheckpointStore, modules: Mapping[str, nn.Module], summary: StageSummary) -> None:
    """Write a finished stage's ``checkpoint_final.pt``: the weights of ``modules`` and the summary."""
    store.save(
        {"modules": {k: module_state(m) for k, m in modules.items()}, "summary": summary.__dict__}, final=True
    )


def stage_store(work: Path, definitions: Mapping[str, Any]) -> CheckpointStore:
    """The checkpoints of a stage in its work folder, signed by the network definitions alone: the budget,
    batch size and learning rates are not part of the signature, so a rerun with another budget resumes."""
    return CheckpointStore(Path(work), signature({"definitions": definitions}))


class StageLoop:
    """The loop of one stage: budget, learning-rate schedule, CSV, progress bar, checkpoints, resumption.

    Args:
        name: the stage (``ae``, ``ldm``): the progress bar's and the checkpoint's label.
        store: the stage's checkpoints (:func:`stage_store`); its folder also gets ``losses.csv`` and
            ``loss.png``. A latest checkpoint with this store's signature is resumed.
        modules: the networks to checkpoint (trained ones and companions such as an EMA copy).
        optimisers: their optimisers; the schedule scales every group's base learning rate.
        budget: when the stage ends.
        lr_final: the learning rate at the end of the cosine decay, as a fraction of the base rate.
        columns: the loss columns of ``losses.csv`` (after step, elapsed_s and lr).
        seed: seed of the generator handed to ``step_fn``.
        checkpoint_every: steps between checkpoints (the last step is always checkpointed).
    """

    def __init__(
        self,
        name: str,
        store: CheckpointStore,
        modules: dict[str, nn.Module],
        optimisers: dict[str, torch.optim.Optimizer],
        budget: Budget,
        lr_final: float,
        columns: Sequence[str],
        seed: int,
        checkpoint_every: int,
    ) -> None:
        self.name, self.store, self.work = name, store, store.folder
        self.modules, self.optimisers, self.budget = modules, optimisers, budget
        self.lr_final, self.checkpoint_every = lr_final, checkpoint_every
        self.base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in optimisers.items()}
        self.generator = torch.Generator().manual_seed(seed)
        self.step, self.elapsed = 0, 0.0
        self.extra: dict[str, Any] = {}
        self.work.mkdir(parents=True, exist_ok=True)
        ckpt = store.latest()
        if ckpt is not None:
            self._restore(ckpt)
        self.log = LossLog(self.work / "losses.csv", ["step", "elapsed_s", "lr", *columns], self.step)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(ckpt["modules"][k])
        for k, o in self.optimisers.items():
            o.load_state_dict(ckpt["optimisers"][k])
            for g, lr in zip(o.param_groups, self.base_lr[k], strict=True):
                g["lr"] = lr
        restore_rng_state(ckpt["rng"], self.generator)
        self.step, self.elapsed = int(ckpt["step"]), float(ckpt["elapsed_s"])
        self.extra = dict(ckpt.get("extra", {}))
        logger.info("%s: resuming from %s at step %d", self.name, self.store.folder, self.step)

    def set_lr(self) -> float:
        factor = self.budget.lr_factor(self.step, self.elapsed, self.lr_final)
        for k, o in self.optimisers.items():
            for g, lr in zip(o.param_groups, self.base_lr[k], strict=True):
                g["lr"] = lr * factor
        return self.base_lr[next(iter(self.base_lr))][0] * factor

    def checkpoint(self) -> None:
        """Write ``checkpoint_latest.pt``: everything a bit-for-bit resume needs."""
        self.store.save(
            {
                "format": FORMAT_VERSION,
                "stage": self.name,
                "step": self.step,
                "elapsed_s": self.elapsed,
                "modules": {k: module_state(m) for k, m in self.modules.items()},
                "optimisers": {k: o.state_dict() for k, o in self.optimisers.items()},
                "rng": rng_state(self.generator),
                "extra": self.extra,
            }
        )

    def run(
        self,
        step_fn: Callable[[torch.Generator], dict[str, float]],
        val_fn: Callable[[], dict[str, float]] | None,
        val_every: int,
        hook: Callable[[int], None] | None = None,
        hook_every: int = 0,
        train_key: str = "loss",
        val_key: str = "val_loss",
    ) -> list[dict[str, str]]:
        """Train until the budget is spent; returns the loss rows.

        Args:
            step_fn: one optimisation step, drawing its randomness from the generator; returns its losses.
            val_fn: the held-out losses, every ``val_every`` steps and at the last step (``None``: none).
            val_every: steps between held-out evaluations (0: only at the last step).
            hook: called with the step every ``hook_every`` steps (intermediate samples).
            hook_every: steps between hook calls (0: never).
            train_key: the loss shown on the progress bar and drawn in ``loss.png``.
            val_key: the held-out loss drawn in ``loss.png``.
        """
        from tqdm import tqdm

        bar = tqdm(
            total=self.budget.steps,
            initial=self.step,
            desc=self.name,
            unit="step",
            mininterval=5.0,
            file=sys.stderr,
        )
        start = time.monotonic() - self.elapsed
        try:
            while not self.budget.done(self.step, self.elapsed):
                lr, losses = self._train_step(step_fn, start)
                last = self.budget.done(self.step, self.elapsed)
                row: dict[str, Any] = {"step": self.step, "elapsed_s": self.elapsed, "lr": lr, **losses}
                if val_fn is not None and (last or (val_every and self.step % val_every == 0)):
                    row.update(val_fn())
                self.log.write(row)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items() if k == train_key}, refresh=False)
                if last or (self.checkpoint_every and self.step % self.checkpoint_every == 0):
                    self.elapsed = time.monotonic() - start
                    self.checkpoint()
                    self.log.plot(self.work / "loss.png", train_key, val_key, f"{self.name} losses")
                if hook is not None and hook_every and self.step % hook_every == 0:
                    hook(self.step)
                self.elapsed = time.monotonic() - start
        finally:
            bar.close()
            self.log.close()
        return self.log.read()

    def _train_step(
        self, step_fn: Callable[[torch.Generator], dict[str, float]], start: float
    ) -> tuple[float, dict[str, float]]:
        """One step at the scheduled learning rate; returns the rate and the step's losses."""
        lr = self.set_lr()
        for m in self.modules.values():
            m.train()
        losses = step_fn(self.generator)
        self.step += 1
        self.elapsed = time.monotonic() - start
        return lr, losses
