"""The training loop of a control module: set up, resume, step, checkpoint, write ``vcm.pt``.

:func:`train` runs the steps the package docstring (:mod:`vcm.training`) describes: set up the run
(:func:`~vcm.training.run.set_up`), resume it from its checkpoint, then per step draw the global batch
(:func:`~vcm.training.batches.draw_batch`), set the learning rate (:mod:`~vcm.training.schedule`), optimise
:func:`~vcm.training.loss.training_loss` and agree with the other ranks on the loss, a stop request and the
clock in one all-reduce; at the end write the final checkpoint, the loss log and ``vcm.pt``. The numerics
and the order of random draws are part of the contract: two runs of the same config give the same weights,
and a resumed run those of an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from vcm.errors import StageError
from vcm.models.build import MODEL_FILE
from vcm.training.batches import Batch, draw_batch
from vcm.training.checkpoints import (
    FORMAT_VERSION,
    Interrupt,
    restore_rng_state,
    rng_state,
    save_atomic,
)
from vcm.training.ema import ema_decay_at, ema_update
from vcm.training.loss import training_loss
from vcm.training.run import Run, set_up
from vcm.training.schedule import lr_factor, lr_factor_time

__all__ = ["TrainResult", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` did."""

    model: nn.Module
    step: int
    total_steps: int
    history: dict[str, list[float]]
    seconds: float
    resumed_from: int
    model_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# a run's per-step history, the columns of ``loss.csv``
_HISTORY_KEYS = ("step", "loss", "lr", "elapsed_s", "grad_norm")


# --- state --------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Where a run is: what a checkpoint keeps, and this call's clocks."""

    total: int | None  # steps of the run; None while a time budget decides
    warmup: int
    step: int = 0
    resumed_from: int = 0
    resumed_at: list[int] = field(default_factory=list)  # the step of every resume of this run, in order
    cpu_threads: list[int] = field(default_factory=list)  # torch's threads in the first call and every resume
    elapsed0: float = 0.0  # seconds trained before this call
    history: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key in _HISTORY_KEYS})
    start: float = 0.0  # perf_counter when this call's loop started
    fraction: float = 0.0  # of the time budget, as rank 0 measured it
    done_here: int = 0
    stopped: str = "completed"

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.start


def _resume(run: Run, fresh: bool) -> _State:
    """A new run's progress, or the progress (and weights, optimizer and random state) of its checkpoint."""
    settings = run.settings
    threads = torch.get_num_threads()
    state = _State(total=settings.steps if settings.minutes is None else None, warmup=settings.warmup)
    state.cpu_threads = [threads]
    ckpt = None if fresh else run.store.resume()
    if ckpt is None:
        return state
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"], run.generator)
    state.step = state.resumed_from = int(ckpt["step"])
    state.resumed_at = [*ckpt.get("resumed_at", []), state.step]
    if ckpt["scheduler"]["total_steps"]:
        state.total = int(ckpt["scheduler"]["total_steps"])
    state.warmup = int(ckpt["scheduler"]["warmup_steps"])
    before = list(ckpt.get("cpu_threads", []))
    state.cpu_threads = [*before, threads]
    unfinished = state.total is None or state.step < state.total
    if run.rank == 0 and run.device.type == "cpu" and unfinished and before and before[-1] != threads:
        logger.warning(
            "resuming at step %d on %d CPU threads a run that trained on %d: another thread count sums in another"
            " order, so the weights will not be an uninterrupted run's bit for bit",
            state.step,
            threads,
            before[-1],
        )
    state.history = {k: list(v) for k, v in ckpt["history"].items()}
    # checkpoints written before the gradient norm was logged
    state.history.setdefault("grad_norm", [float("nan")] * len(state.history["step"]))
    state.elapsed0 = float(ckpt.get("elapsed_s", 0.0))
    if run.rank == 0:
        logger.info(
            "resuming from %s at step %d (resume %d)", run.store.folder, state.step, len(state.resumed_at)
        )
    return state


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _checkpoint(run: Run, state: _State) -> dict[str, Any]:
    """What a resume needs (the store adds the run's signature)."""
    settings = run.settings
    return {
        "format": FORMAT_VERSION,
        "method": settings.method,
        "step": state.step,
        "model": _cpu_state(run.model),
        **({"ema": _cpu_state(run.ema)} if run.ema is not None else {}),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {
            "total_steps": state.total,
            "warmup_steps": state.warmup,
            "minutes": settings.minutes,
            "min_lr_ratio": settings.min_lr_ratio,
            "base_lr": settings.lr,
        },
        "rng": rng_state(run.generator),
        "config": json.loads(json.dumps(dict(run.cfg), default=str)),
        "model_config": getattr(run.model, "config", {}),
        "history": state.history,
        "elapsed_s": state.elapsed(),
        "resumed_at": state.resumed_at,
        "cpu_threads": state.cpu_threads,
    }


# --- one step -----------------------------------------------------------------------------------------------


def _draw(run: Run) -> Batch:
    """This rank's share of the next global batch."""
    s, local = run.settings, run.settings.batch_size // run.world
    return draw_batch(
        run.data,
        s.batch_size,
        run.generator,
        run.alphas,
        run.backbone.scale_factor,
        s.flip,
        run.keep_probs,
        len(run.groups),
        slice(run.rank * local, (run.rank + 1) * local),
        run.device,
        run.backbone.posterior_weight,
        s.timesteps,
        s.noise_draws,
        run.bank,
    )


def _set_lr(run: Run, state: _State) -> float:
    """Set the learning rate of this step, by steps or by the elapsed fraction of the time budget."""
    s = run.settings
    if run.budget is None:
        factor = lr_factor(state.step, state.total, state.warmup, s.min_lr_ratio)
    else:
        factor = lr_factor_time(max(state.fraction, state.step / s.steps), 0.05, s.min_lr_ratio)
    lr = s.lr * factor
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def _optimise(run: Run, net: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdamW step on ``batch`` (bf16 autocast on CUDA; the gradient norm clipped at
    ``training.grad_clip_norm`` when set; the moving average of the weights updated when
    ``training.ema_decay`` is set); returns the loss and the gradient norm before clipping."""
    s = run.settings
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
        loss = training_loss(
            net,
            run.model,
            run.backbone,
            batch.z_t,
            batch.t,
            batch.noise,
            batch.cov,
            batch.conditions,
            batch.keep,
            run.drop,
            s.l1_scale,
            batch.draws,
            s.loss_weighting,
            s.lv_weight,
            batch.eps_t,
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # an infinite norm measures without clipping: the gradients are multiplied by exactly 1
    limit = s.grad_clip_norm if s.grad_clip_norm is not None else float("inf")
    norm = nn.utils.clip_grad_norm_(run.model.parameters(), limit)
    run.optimizer.step()
    if run.ema is not None:
        ema_update(run.ema, run.model, ema_decay_at(step, s.ema_decay))
    return loss, norm


def _agree(
    run: Run, loss: torch.Tensor, norm: torch.Tensor, interrupted: bool, elapsed: float
) -> torch.Tensor:
    """One collective per step: the mean loss, the stop request, rank 0's clock (so that every rank uses the
    same learning rate and stops at the same step) and the gradient norm (equal on every rank once DDP has
    averaged the gradients). Returns ``[loss, stop, elapsed, grad norm]`` on the CPU."""
    # NCCL reduces CUDA tensors only; gloo CPU ones
    comm = run.device if run.world > 1 and dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.stack(
        [
            loss.detach().float().reshape(()),
            torch.tensor(float(interrupted), device=loss.device),
            torch.tensor(elapsed if run.rank == 0 else 0.0, device=loss.device),
            norm.detach().float().reshape(()).to(loss.device),
        ]
    ).to(comm)
    if run.world > 1:
        dist.all_reduce(flags)
        flags[[0, 3]] /= run.world  # the loss and the gradient norm: means
    return flags.cpu()


def _record(run: Run, state: _State, flags: torch.Tensor, lr: float, bar: tqdm) -> None:
    """Log the step; under a time budget, make it the final step when the budget is spent."""
    history = state.history
    history["step"].append(state.step)
    history["loss"].append(float(flags[0]))
    history["lr"].append(lr)
    history["elapsed_s"].append(float(flags[2]))
    history["grad_norm"].append(float(flags[3]))
    bar.update(1)
    bar.set_postfix(loss=f"{flags[0]:.4f}", lr=f"{lr:.2e}", refresh=False)
    if run.budget is not None:
        state.fraction = float(flags[2]) / run.budget
        if state.fraction >= 1.0 and state.step < run.settings.steps:
            state.stopped, state.total = "time budget", state.step  # this is the final step


# --- the loop -----------------------------------------------------------------------------------------------


def train(
    cfg: Mapping[str, Any],
    dataset: str | Path,
    latents: str | Path,
    bundle: str | Path,
    condset: str,
    size: int,
    out_dir: str | Path,
    device: torch.device | str | None = None,
    stop_after: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    write_model: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train one control module (``method``, default the first of ``training.methods``) for a condition set on ``/splits/train_<size>``.

    Resumes from ``out_dir/checkpoints`` when a checkpoint of the same run exists (one of other settings is
    set aside, :mod:`~vcm.training.checkpoints`). Call inside an initialised process group to train with DDP
    (every rank calls it; rank 0 writes).

    Args:
        cfg: the validated config.
        dataset: ``dataset.h5``.
        latents: ``latents.h5`` from the same dataset and bundle.
        bundle: the backbone bundle folder.
        condset: a key of ``condition_sets``.
        size: training size (``/splits/train_<size>``).
        out_dir: output folder.
        device: default CUDA when available.
        stop_after: stop after this many steps in this call (checkpointing), as a pre-emption would; rerun
            to resume.
        fresh: ignore existing checkpoints.
        progress: tqdm bar (rank 0).
        write_model: write ``vcm.pt``, ``loss.csv`` and ``loss.png`` at the end.
        overrides: :class:`~vcm.training.settings.Settings` fields that win over the config (e.g. ``steps``,
            ``batch_size``).

    Returns:
        a :class:`TrainResult`; ``model`` is the trained, unwrapped module.
    """
    from vcm.config import dump_config

    run = set_up(cfg, (dataset, latents, bundle), condset, size, out_dir, device, overrides)
    state = _resume(run, fresh)
    net = _wrap_ddp(run)
    config_text = dump_config(dict(cfg))
    state.start = time.perf_counter()
    state.fraction = state.elapsed0 / run.budget if run.budget else 0.0
    bar = tqdm(
        total=state.total or run.settings.steps,
        initial=state.step,
        desc=f"train {run.title}",
        unit="step",
        disable=not (progress and run.rank == 0),
    )
    with Interrupt() as interrupt:
        try:
            stopped_early = _loop(run, state, net, bar, interrupt, stop_after, write_model)
        finally:
            bar.close()
    if stopped_early is not None:
        return stopped_early
    return _finish(run, state, write_model, config_text, dataset, latents)


def _loop(
    run: Run,
    state: _State,
    net: nn.Module,
    bar: tqdm,
    interrupt: Interrupt,
    stop_after: int | None,
    write_model: bool,
) -> TrainResult | None:
    """Step to the run's last step, checkpointing every ``checkpoint_every`` steps; ``None`` once there.

    On a stop request (a signal on any rank) or after ``stop_after`` steps of this call, checkpoint and stop:
    raise for a signal, return what was done for ``stop_after``.
    """
    s = run.settings
    while state.step < (state.total or s.steps):
        batch = _draw(run)
        lr = _set_lr(run, state)
        loss, norm = _optimise(run, net, batch, state.step)
        state.step += 1
        state.done_here += 1
        flags = _agree(run, loss, norm, interrupt.flag, state.elapsed())
        _record(run, state, flags, lr, bar)
        limit = state.total or s.steps
        if run.rank == 0 and state.step < limit and state.step % s.checkpoint_every == 0:
            run.store.save(_checkpoint(run, state))
            if write_model:
                _write_loss(run.out_dir, state.history, run.title)
        stop_here = stop_after is not None and state.done_here >= stop_after and state.step < limit
        if flags[1] > 0 or stop_here:
            if run.rank == 0:
                run.store.save(_checkpoint(run, state))
            if flags[1] > 0:
                raise StageError(f"interrupted at step {state.step}; checkpoint written, rerun to resume")
            return TrainResult(
                run.model, state.step, limit, state.history, float(flags[2]), state.resumed_from
            )
    return None


def _wrap_ddp(run: Run) -> nn.Module:
    """The module to call: ``run.model``, wrapped in DistributedDataParallel under several processes."""
    if run.world == 1:
        return run.model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
    )


# --- the end ------------------------------------------------------------------------------------------------


def _finish(
    run: Run,
    state: _State,
    write_model: bool,
    config_text: str,
    dataset: str | Path,
    latents: str | Path,
) -> TrainResult:
    """After the last step: the final checkpoint, then (rank 0) ``loss.csv``, ``loss.png`` and ``vcm.pt``."""
    state.total = state.total or state.step
    seconds = state.elapsed()
    if run.world > 1:
        dist.barrier()
    result = TrainResult(
        run.shipped,
        state.step,
        int(state.total),
        state.history,
        seconds,
        state.resumed_from,
        extra={"stopped": state.stopped},
    )
    if run.rank != 0:
        return result
    if state.done_here:
        run.store.save(_checkpoint(run, state), final=True)
    if write_model:
        _write_loss(run.out_dir, state.history, run.title)
        result.model_path = run.out_dir / MODEL_FILE
        save_atomic(_model_file(run, state, config_text, dataset, latents), result.model_path)
    return result


def _model_file(
    run: Run,
    state: _State,
    config_text: str,
    dataset: str | Path,
    latents: str | Path,
) -> dict[str, Any]:
    """The contents of ``vcm.pt``: weights, what :func:`~vcm.models.build.load_model` needs, provenance.
    Nothing measured by a clock: the same config and seed give the same file (timings are in ``loss.csv``)."""
    from vcm.io import provenance

    s, losses = run.settings, state.history["loss"]
    final_loss = float(np.mean(losses[-max(1, len(losses) // 10) :])) if losses else None
    return {
        "format": FORMAT_VERSION,
        "method": s.method,
        "model": _cpu_state(run.shipped),
        "model_config": run.model.config,
        "condition_set": run.condset,
        "condition_groups": [[[n, c] for n, c in g] for g in run.groups],
        "training_size": int(run.size),
        "subjects": run.data.subjects,
        "backbone_sha256": run.bundle_sha,
        "scale_factor": run.backbone.scale_factor,
        "steps": int(state.step),
        "batch_size": s.batch_size,
        "processes": run.world,
        # the counts, not the calls: a rerun that resumes from the final checkpoint writes the same file
        "cpu_threads": sorted(set(state.cpu_threads)),
        "final_loss": final_loss,
        "settings": json.loads(json.dumps(asdict(s))),
        "provenance": provenance(
            config_text,
            bundle_sha256=run.bundle_sha,
            latents=str(latents),
            dataset=str(dataset),
            device=torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        ),
    }


def _write_loss(out_dir: Path, history: Mapping[str, Sequence[float]], title: str) -> None:
    """``loss.csv`` (step, loss, lr, elapsed seconds, gradient norm before clipping) and, once there is a
    step, ``loss.png``."""
    from vcm.io import atomic_path

    with atomic_path(out_dir / "loss.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_HISTORY_KEYS)
        for row in zip(*(history[k] for k in _HISTORY_KEYS), strict=True):
            writer.writerow([int(row[0]), f"{row[1]:.6g}", f"{row[2]:.6g}", f"{row[3]:.2f}", f"{row[4]:.4g}"])
    if history["step"]:
        from vcm.plots import loss_curve

        loss_curve(out_dir / "loss.png", history["step"], history["loss"], title)
