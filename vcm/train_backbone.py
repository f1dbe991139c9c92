"""Train the ``tiny`` backbone: a small AutoencoderKL, then a covariate-conditioned latent diffusion U-Net.

``python -m vcm train-backbone --data corpus.h5 --work-dir WORK --out BUNDLE`` trains, from an HDF5 in the
``dataset.h5`` layout (``/image`` N×1×D×H×W in [0, 1], ``/covariates`` N×4 scaled, ``/splits/train`` and
``/splits/val``), the two networks of a BrainLDM-like backbone at CPU scale (:func:`vcm.models.backbone.
tiny_definitions`) and writes them as a bundle that :func:`vcm.models.backbone.load_bundle` reads:

1. **autoencoder** (stage ``ae``): :class:`~monai.networks.nets.AutoencoderKL`, loss
   ``L1(x, x̂) + w_kl · KL`` (KL summed over the latent, averaged over the batch), left-right flip augmentation,
   optionally a :class:`~monai.networks.nets.PatchDiscriminator` least-squares adversarial term after a
   warm-up (off by default). No perceptual loss: its pretrained weights cannot be downloaded here.
2. **latents**: the posterior mean ``mu`` of every image and of its left-right flip (axis 0 of the LAS grid),
   encoded once; ``scale_factor = 1 / std`` of the training latents.
3. **diffusion** (stage ``ldm``): :class:`~monai.networks.nets.DiffusionModelUNet` on
   ``cat[z_t, covariates broadcast]`` with cross-attention to the covariates (B, 1, 4), exactly as
   :meth:`vcm.models.backbone.Backbone.eps` calls it; DDPM epsilon objective with the project's schedule
   (:func:`vcm.diffusion.ddpm_scheduler`); an exponential moving average (EMA) of the weights is what ships.

Both stages use AdamW with a linear warm-up and a cosine decay over the stage's budget (``--*-steps`` and/or
``--*-minutes``, whichever ends first), log every step to ``<work>/<stage>/losses.csv`` (+ ``loss.png``), and
write ``<work>/<stage>/checkpoint_latest.pt`` every ``--checkpoint-every`` steps; a rerun resumes from it
(step counter, optimiser, EMA, random generators and elapsed time included), and a finished stage
(``checkpoint_final.pt``) is not retrained. The work folder is deliberately not the bundle folder: Snakemake
deletes the outputs of a failed job, and the checkpoints must survive it.

At the end the bundle gets float16 weights (:func:`vcm.models.backbone.save_bundle` with ``dtype``; loading
casts back to float32), ``training_record.json`` and ``samples.png`` (3-plane views of real images, their
reconstructions and DDIM samples at young/old × small/large-ventricle covariates).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vcm.errors import StageError

__all__ = [
    "Corpus",
    "StageSummary",
    "cli",
    "encode_latents",
    "kl_loss",
    "load_corpus",
    "train_autoencoder",
    "train_diffusion",
]

logger = logging.getLogger(__name__)

CHECKPOINT_LATEST = "checkpoint_latest.pt"
CHECKPOINT_FINAL = "checkpoint_final.pt"
LATENTS_FILE = "latents.pt"
FLIP_DIM = 2
"""Left-right axis of a (B, C, x, y, z) batch: axis 0 of the LAS image grid."""


# --- data ----------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Images and covariates of the training HDF5, held in memory (float16 images)."""

    path: Path
    images: torch.Tensor  # (N, 1, *grid) float16
    covariates: torch.Tensor  # (N, 4) float32, scaled to [0, 1]
    train: np.ndarray
    val: np.ndarray

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.images.shape[2:])


def load_corpus(path: str | Path) -> Corpus:
    """Read ``/image``, ``/covariates`` and the splits of a training HDF5.

    ``/splits/train`` is used when present, otherwise every image not in ``/splits/val``; without
    ``/splits/val`` there is no held-out loss.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise StageError(f"training data not found: {path}")
    try:
        with h5py.File(path, "r") as h5:
            for key in ("image", "covariates"):
                if key not in h5:
                    raise StageError(f"{path}: no /{key} dataset (expected the dataset.h5 layout)")
            images = torch.from_numpy(np.asarray(h5["image"][...], dtype=np.float16))
            covariates = torch.from_numpy(np.asarray(h5["covariates"][...], dtype=np.float32))
            splits = h5.get("splits", {})
            val = np.asarray(splits["val"][...], dtype=np.int64) if "val" in splits else np.zeros(0, np.int64)
            if "train" in splits:
                train = np.asarray(splits["train"][...], dtype=np.int64)
            else:
                train = np.setdiff1d(np.arange(images.shape[0]), val)
    except OSError as err:
        raise StageError(f"{path}: not a readable HDF5 file ({err})") from None
    if images.dim() != 5 or images.shape[1] != 1:
        raise StageError(f"{path}: /image must be N×1×D×H×W, got {tuple(images.shape)}")
    if covariates.shape != (images.shape[0], 4):
        raise StageError(f"{path}: /covariates must be {images.shape[0]}×4, got {tuple(covariates.shape)}")
    if len(train) == 0:
        raise StageError(f"{path}: no training images")
    for name, idx in (("train", train), ("val", val)):
        if len(idx) and (idx.min() < 0 or idx.max() >= images.shape[0]):
            raise StageError(f"{path}: /splits/{name} indexes outside /image")
    return Corpus(path, images, covariates, np.sort(train), np.sort(val))


# --- losses --------------------------------------------------------------------------------------------------


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over the latent, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()


# --- training-loop machinery --------------------------------------------------------------------------------


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


def _mean_tail(rows: Sequence[dict[str, str]], key: str, n: int = 50) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return float(np.mean(values[-n:])) if values else float("nan")


def _last(rows: Sequence[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return values[-1] if values else None


def plot_losses(path: Path, rows: Sequence[dict[str, str]], train_key: str, val_key: str, title: str) -> None:
    """Loss curve PNG: the per-step training loss (raw and smoothed) and the held-out loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vcm.io import atomic_path

    if not rows:
        return
    steps = np.array([int(r["step"]) for r in rows])
    train = np.array([float(r[train_key]) for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, train, color="0.75", lw=0.5, label=f"train {train_key}")
    if len(train) >= 20:
        k = max(5, len(train) // 50)
        smooth = np.convolve(train, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="C0", lw=1.2, label=f"train {train_key} (mean of {k})")
    val = [(int(r["step"]), float(r[val_key])) for r in rows if r.get(val_key) not in (None, "")]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="C3", ms=3, lw=1, label=f"held-out {val_key}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    from vcm.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(
    path: Path, definitions: dict[str, Any], stale_ok: bool = False
) -> dict[str, Any] | None:
    """A checkpoint of ``path`` made with ``definitions``; ``None`` when absent (or stale, if ``stale_ok``)."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file
        raise StageError(
            f"{path}: not a readable checkpoint ({type(err).__name__}); delete it to restart"
        ) from None
    saved = json.loads(ckpt.get("definitions", "null"))
    if saved != definitions:
        if stale_ok:
            return None
        raise StageError(
            f"{path}: was trained with other network definitions; delete the work folder's stage to retrain"
        )
    return ckpt


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Stage:
    """Shared loop: budget, learning-rate schedule, CSV, progress bar, checkpoints, resumption."""

    def __init__(
        self,
        name: str,
        work: Path,
        definitions: dict[str, Any],
        modules: dict[str, nn.Module],
        optimisers: dict[str, torch.optim.Optimizer],
        budget: Budget,
        lr_final: float,
        columns: Sequence[str],
        seed: int,
        checkpoint_every: int,
    ) -> None:
        self.name, self.work, self.definitions = name, work, definitions
        self.modules, self.optimisers, self.budget = modules, optimisers, budget
        self.lr_final, self.checkpoint_every = lr_final, checkpoint_every
        self.base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in optimisers.items()}
        self.generator = torch.Generator().manual_seed(seed)
        self.step, self.elapsed = 0, 0.0
        self.extra: dict[str, Any] = {}
        work.mkdir(parents=True, exist_ok=True)
        ckpt = _load_checkpoint(work / CHECKPOINT_LATEST, definitions)
        if ckpt is not None:
            for k, m in modules.items():
                m.load_state_dict(ckpt["modules"][k])
            for k, o in optimisers.items():
                o.load_state_dict(ckpt["optimisers"][k])
                for g, lr in zip(o.param_groups, self.base_lr[k], strict=True):
                    g["lr"] = lr
            self.generator.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["torch_rng"])
            self.step, self.elapsed = int(ckpt["step"]), float(ckpt["elapsed_s"])
            self.extra = dict(ckpt.get("extra", {}))
            logger.info("%s: resuming from %s at step %d", name, work / CHECKPOINT_LATEST, self.step)
        self.log = LossLog(work / "losses.csv", ["step", "elapsed_s", "lr", *columns], self.step)

    def set_lr(self) -> float:
        factor = self.budget.lr_factor(self.step, self.elapsed, self.lr_final)
        for k, o in self.optimisers.items():
            for g, lr in zip(o.param_groups, self.base_lr[k], strict=True):
                g["lr"] = lr * factor
        return self.base_lr[next(iter(self.base_lr))][0] * factor

    def checkpoint(self) -> None:
        _save_checkpoint(
            self.work / CHECKPOINT_LATEST,
            {
                "stage": self.name,
                "step": self.step,
                "elapsed_s": self.elapsed,
                "definitions": json.dumps(self.definitions, sort_keys=True),
                "modules": {k: _state(m) for k, m in self.modules.items()},
                "optimisers": {k: o.state_dict() for k, o in self.optimisers.items()},
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "extra": self.extra,
            },
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
        """Train until the budget is spent; returns the loss rows."""
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
                lr = self.set_lr()
                for m in self.modules.values():
                    m.train()
                losses = step_fn(self.generator)
                self.step += 1
                self.elapsed = time.monotonic() - start
                row: dict[str, Any] = {"step": self.step, "elapsed_s": self.elapsed, "lr": lr, **losses}
                last = self.budget.done(self.step, self.elapsed)
                if val_fn is not None and (last or (val_every and self.step % val_every == 0)):
                    row.update(val_fn())
                self.log.write(row)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items() if k == train_key}, refresh=False)
                if last or (self.checkpoint_every and self.step % self.checkpoint_every == 0):
                    self.elapsed = time.monotonic() - start
                    self.checkpoint()
                    plot_losses(
                        self.work / "loss.png", self.log.read(), train_key, val_key, f"{self.name} losses"
                    )
                if hook is not None and hook_every and self.step % hook_every == 0:
                    hook(self.step)
                self.elapsed = time.monotonic() - start
        finally:
            bar.close()
            self.log.close()
        return self.log.read()


def _batch(images: torch.Tensor, idx: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return images[idx].to(device).float()


def _crops(x: torch.Tensor, size: Sequence[int], multiple: int, generator: torch.Generator) -> torch.Tensor:
    """A random crop of ``size`` from every image of ``x`` (B, C, *grid), starting at multiples of ``multiple``."""
    out = []
    for img in x:
        starts = [
            int(torch.randint((g - s) // multiple + 1, (1,), generator=generator)) * multiple
            for g, s in zip(img.shape[1:], size, strict=True)
        ]
        out.append(img[(slice(None), *(slice(a, a + s) for a, s in zip(starts, size, strict=True)))])
    return torch.stack(out)


# --- stage 1: autoencoder -------------------------------------------------------------------------------------


@dataclass
class AEOptions:
    steps: int | None = 1000
    minutes: float | None = None
    batch_size: int = 4
    lr: float = 5e-4
    lr_final: float = 0.1
    warmup: int = 50
    kl_weight: float = 1e-6
    adv_weight: float = 0.0
    adv_start: int = 0
    disc_channels: int = 16
    init_sigma: float = 0.05
    crop: tuple[int, ...] | None = None
    val_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "cpu"


def _ae_val(ae: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Held-out L1 of the reconstruction from the posterior mean."""
    ae.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(_device(ae)).float()
            mu, _ = ae.encode(x)
            total += F.l1_loss(ae.decode(mu), x, reduction="sum").item()
            n += x.numel()
    return total / max(n, 1)


def train_autoencoder(
    corpus: Corpus, definitions: dict[str, Any], work: Path, opts: AEOptions
) -> tuple[nn.Module, StageSummary]:
    """Stage 1: the AutoencoderKL (L1 + KL [+ patch adversarial]); returns the trained network."""
    from monai.networks.nets import AutoencoderKL, PatchDiscriminator

    work = Path(work)
    final = _load_checkpoint(work / CHECKPOINT_FINAL, definitions)
    torch.manual_seed(opts.seed)
    ae = AutoencoderKL(**definitions["autoencoder"]).to(opts.device)
    if opts.init_sigma > 0:
        # Start with little posterior noise: with the library's init (sigma ~ 1) the decoder first sees
        # mostly noise, and on a CPU budget the autoencoder is still worse than the mean image after
        # hundreds of steps. The KL term moves sigma from here.
        with torch.no_grad():
            ae.quant_conv_log_sigma.conv.bias.fill_(2 * math.log(opts.init_sigma))
    if final is not None:
        ae.load_state_dict(final["modules"]["autoencoder"])
        logger.info("ae: already trained (%s); delete it to retrain", work / CHECKPOINT_FINAL)
        return ae, StageSummary(**final["summary"])
    factor = 2 ** (len(definitions["autoencoder"]["channels"]) - 1)
    if any(s % factor for s in corpus.grid):
        raise StageError(f"image grid {corpus.grid} is not divisible by the autoencoder's factor {factor}")
    crop = tuple(min(c, g) for c, g in zip(opts.crop, corpus.grid, strict=True)) if opts.crop else None
    if crop is not None and any(c % factor for c in crop):
        raise StageError(f"--ae-crop {crop} is not divisible by the autoencoder's factor {factor}")
    modules: dict[str, nn.Module] = {"autoencoder": ae}
    optimisers: dict[str, torch.optim.Optimizer] = {
        "autoencoder": torch.optim.AdamW(ae.parameters(), lr=opts.lr)
    }
    use_adv = opts.adv_weight > 0
    if use_adv:
        from monai.losses import PatchAdversarialLoss

        disc = PatchDiscriminator(
            spatial_dims=len(corpus.grid),
            num_layers_d=3,
            channels=opts.disc_channels,
            in_channels=1,
            out_channels=1,
            norm="INSTANCE",
        ).to(opts.device)
        adv_loss = PatchAdversarialLoss(criterion="least_squares")
        modules["discriminator"] = disc
        optimisers["discriminator"] = torch.optim.AdamW(disc.parameters(), lr=opts.lr)
    stage = _Stage(
        "ae",
        work,
        definitions,
        modules,
        optimisers,
        Budget(opts.steps, opts.minutes, opts.warmup),
        opts.lr_final,
        ["loss", "l1", "kl", "adv", "disc", "val_l1"],
        opts.seed,
        opts.checkpoint_every,
    )
    train_images = corpus.images[torch.from_numpy(corpus.train)]
    val_images = corpus.images[torch.from_numpy(corpus.val)] if len(corpus.val) else None

    def step_fn(g: torch.Generator) -> dict[str, float]:
        idx = torch.randint(train_images.shape[0], (opts.batch_size,), generator=g)
        x = _batch(train_images, idx, opts.device)
        if crop is not None:
            x = _crops(x, crop, factor, g)
        flip = (torch.rand(opts.batch_size, generator=g) < 0.5).to(opts.device)
        x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(FLIP_DIM), x)
        recon, mu, sigma = ae(x)
        l1 = F.l1_loss(recon, x)
        kl = kl_loss(mu, sigma)
        loss = l1 + opts.kl_weight * kl
        out = {"l1": l1.item(), "kl": kl.item()}
        adv_on = use_adv and stage.step >= opts.adv_start
        if adv_on:
            gen_adv = adv_loss(disc(recon)[-1], target_is_real=True, for_discriminator=False)
            loss = loss + opts.adv_weight * gen_adv
            out["adv"] = gen_adv.item()
        optimisers["autoencoder"].zero_grad(set_to_none=True)
        loss.backward()
        optimisers["autoencoder"].step()
        if adv_on:
            d_fake = adv_loss(disc(recon.detach())[-1], target_is_real=False, for_discriminator=True)
            d_real = adv_loss(disc(x)[-1], target_is_real=True, for_discriminator=True)
            d_loss = 0.5 * (d_fake + d_real)
            optimisers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimisers["discriminator"].step()
            out["disc"] = d_loss.item()
        out["loss"] = loss.item()
        return out

    val_fn = None
    if val_images is not None:

        def val_fn() -> dict[str, float]:
            return {"val_l1": _ae_val(ae, val_images, opts.batch_size)}

    rows = stage.run(step_fn, val_fn, opts.val_every, train_key="l1", val_key="val_l1")
    summary = StageSummary(
        steps=stage.step,
        wall_s=round(stage.elapsed, 1),
        train_loss=_mean_tail(rows, "l1"),
        val_loss=_last(rows, "val_l1"),
        extra={
            "train_kl": _mean_tail(rows, "kl"),
            "loss": "L1 + kl_weight * KL" + (" + adv" if use_adv else ""),
        },
    )
    _save_checkpoint(
        work / CHECKPOINT_FINAL,
        {
            "definitions": json.dumps(definitions, sort_keys=True),
            "modules": {"autoencoder": _state(ae)},
            "summary": summary.__dict__,
        },
    )
    ae.eval()
    return ae, summary


# --- stage 2: latents ------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(ae: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Posterior means of ``images`` followed by those of their left-right flips: (2N, C, *latent grid)."""
    ae.eval()
    out = []
    for flip in (False, True):
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(_device(ae)).float()
            mu, _ = ae.encode(x.flip(FLIP_DIM) if flip else x)
            out.append(mu.cpu())
    return torch.cat(out)


def _fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _latents(
    ae: nn.Module, corpus: Corpus, work: Path, definitions: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Pre-encoded latents (cached in the work folder for these autoencoder weights and this corpus)."""
    path = work / LATENTS_FILE
    key = {**definitions, "autoencoder_sha256": _fingerprint(ae), "corpus": str(corpus.path.resolve())}
    cached = _load_checkpoint(path, key, stale_ok=True)
    if cached is not None:
        return cached["latents"]
    logger.info("encoding %d images and their flips", corpus.images.shape[0])
    out: dict[str, torch.Tensor] = {}
    for name, idx in (("train", corpus.train), ("val", corpus.val)):
        if len(idx) == 0:
            continue
        sel = torch.from_numpy(idx)
        out[name] = encode_latents(ae, corpus.images[sel])
        out[f"{name}_cov"] = corpus.covariates[sel].repeat(2, 1)
    _save_checkpoint(path, {"definitions": json.dumps(key, sort_keys=True), "latents": out})
    return out


# --- stage 3: latent diffusion ---------------------------------------------------------------------------------


@dataclass
class LDMOptions:
    steps: int | None = 2000
    minutes: float | None = None
    batch_size: int = 16
    lr: float = 2e-4
    lr_final: float = 0.1
    warmup: int = 100
    ema_decay: float = 0.998
    val_every: int = 200
    val_timesteps: int = 8
    checkpoint_every: int = 100
    sample_every: int = 0
    sample_ddim_steps: int = 50
    seed: int = 0
    device: str = "cpu"


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def train_diffusion(
    latents: dict[str, torch.Tensor],
    ae: nn.Module,
    definitions: dict[str, Any],
    work: Path,
    opts: LDMOptions,
    sample_hook: Callable[[nn.Module, int], None] | None = None,
) -> tuple[nn.Module, StageSummary]:
    """Stage 3: the covariate-conditioned diffusion U-Net on scaled latents; returns its EMA copy."""
    from monai.networks.nets import DiffusionModelUNet

    from vcm.diffusion import NUM_TRAIN_TIMESTEPS, ddpm_scheduler
    from vcm.models.backbone import Backbone

    work = Path(work)
    scale = float(definitions["scale_factor"])
    final = _load_checkpoint(work / CHECKPOINT_FINAL, definitions)
    torch.manual_seed(opts.seed + 1)
    model = DiffusionModelUNet(**definitions["diffusion"]).to(opts.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if final is not None:
        ema.load_state_dict(final["modules"]["ema"])
        logger.info("ldm: already trained (%s); delete it to retrain", work / CHECKPOINT_FINAL)
        return ema, StageSummary(**final["summary"])
    net = Backbone(ae, model, scale_factor=scale, freeze=False)
    ema_net = Backbone(ae, ema, scale_factor=scale, freeze=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    stage = _Stage(
        "ldm",
        work,
        definitions,
        {"diffusion": model, "ema": ema},
        {"diffusion": optimiser},
        Budget(opts.steps, opts.minutes, opts.warmup),
        opts.lr_final,
        ["loss", "val_loss"],
        opts.seed,
        opts.checkpoint_every,
    )
    scheduler = ddpm_scheduler()
    dev = opts.device
    z_train, c_train = (latents["train"] * scale).to(dev), latents["train_cov"].to(dev)

    def step_fn(g: torch.Generator) -> dict[str, float]:
        ae.eval()
        ema.eval()
        idx = torch.randint(z_train.shape[0], (opts.batch_size,), generator=g).to(dev)
        z0, cov = z_train[idx], c_train[idx].unsqueeze(1)
        noise = torch.randn(z0.shape, generator=g).to(dev)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (opts.batch_size,), generator=g).to(dev)
        pred = net.eps(scheduler.add_noise(z0, noise, t), t, cov)
        loss = F.mse_loss(pred, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        _ema_update(ema, model, min(opts.ema_decay, (1 + stage.step) / (10 + stage.step)))
        return {"loss": loss.item()}

    val_fn = None
    if "val" in latents:
        # fixed noise and evenly spread time steps: comparable from one evaluation to the next
        z_val = (latents["val"] * scale).to(dev)
        c_val = latents["val_cov"].unsqueeze(1).to(dev)
        g_val = torch.Generator().manual_seed(12345)
        k = opts.val_timesteps
        t_val = ((torch.arange(k) + 0.5) * NUM_TRAIN_TIMESTEPS / k).long().to(dev)
        val_noise = torch.randn((k, *z_val.shape), generator=g_val).to(dev)

        def val_fn() -> dict[str, float]:
            total = 0.0
            with torch.no_grad():
                for j in range(k):
                    for i in range(0, z_val.shape[0], opts.batch_size):
                        z0, n = z_val[i : i + opts.batch_size], val_noise[j, i : i + opts.batch_size]
                        t = t_val[j].expand(z0.shape[0])
                        pred = ema_net.eps(scheduler.add_noise(z0, n, t), t, c_val[i : i + opts.batch_size])
                        total += F.mse_loss(pred, n, reduction="sum").item()
            return {"val_loss": total / (k * z_val.numel())}

    hook = (lambda step: sample_hook(ema, step)) if sample_hook is not None else None
    rows = stage.run(step_fn, val_fn, opts.val_every, hook=hook, hook_every=opts.sample_every)
    summary = StageSummary(
        steps=stage.step,
        wall_s=round(stage.elapsed, 1),
        train_loss=_mean_tail(rows, "loss", 200),
        val_loss=_last(rows, "val_loss"),
        extra={
            "loss": "MSE(eps, eps_hat), t ~ U{0..999}",
            "val_loss_of": "EMA weights",
            "ema_decay": opts.ema_decay,
        },
    )
    _save_checkpoint(
        work / CHECKPOINT_FINAL,
        {
            "definitions": json.dumps(definitions, sort_keys=True),
            "modules": {"ema": _state(ema), "diffusion": _state(model)},
            "summary": summary.__dict__,
        },
    )
    return ema, summary


# --- pictures -------------------------------------------------------------------------------------------------


def covariate_settings(covariates: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Young/old × small/large ventricles at the corpus' 10th/90th percentiles; sex 0, median brain volume."""
    q = torch.quantile(covariates.float(), torch.tensor([0.1, 0.5, 0.9]), dim=0)
    out = []
    for age_name, age in (("young", q[0, 1]), ("old", q[2, 1])):
        for lv_name, lv in (("small LV", q[0, 2]), ("large LV", q[2, 2])):
            out.append((f"{age_name}, {lv_name}", torch.stack([torch.tensor(0.0), age, lv, q[1, 3]])))
    return out


@torch.no_grad()
def sample_images(
    backbone: Any, covariates: torch.Tensor, seeds: Sequence[int], ddim_steps: int
) -> torch.Tensor:
    """DDIM samples decoded to images (B, 1, *grid), one per seed, all at ``covariates`` (4,) or (B, 4)."""
    from vcm.diffusion import ddim_sample, ddim_scheduler, noise_from_seeds

    factor = backbone.downsample_factor
    grid = backbone.definitions.get("grid") if backbone.definitions else None
    if grid is None:
        raise ValueError("the backbone definitions carry no image grid")
    shape = (backbone.latent_channels, *(s // factor for s in grid))
    device = _device(backbone)
    cov = covariates.reshape(-1, 1, 4).expand(len(seeds), 1, 4).to(device)
    noise = noise_from_seeds(seeds, shape, device=device)
    z = ddim_sample(lambda z, t: backbone.eps(z, t, cov), noise, ddim_scheduler(ddim_steps))
    return backbone.decode(z).clamp(0, 1).cpu()


def _planes(vol: np.ndarray) -> list[np.ndarray]:
    # as vcm.plots.three_plane: axial, coronal, sagittal through the centre, displayed with origin="lower"
    i, j, k = (s // 2 for s in vol.shape)
    return [vol[:, :, k].T, vol[:, j, :].T, vol[i, :, :].T]


def montage(path: Path, panels: Sequence[tuple[str, np.ndarray]], title: str, per_row: int = 2) -> None:
    """PNG of 3-plane views (axial, coronal, sagittal) of several volumes, ``per_row`` volumes per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vcm.io import atomic_path

    rows = math.ceil(len(panels) / per_row)
    vol0 = panels[0][1]
    widths = [vol0.shape[0], vol0.shape[0], vol0.shape[1]] * per_row
    fig, axes = plt.subplots(
        rows,
        3 * per_row,
        figsize=(2.1 * per_row * 3 * 0.9, 2.3 * rows),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for n, (label, vol) in enumerate(panels):
        r, c = divmod(n, per_row)
        for p, plane in enumerate(_planes(vol)):
            ax = axes[r, 3 * c + p]
            ax.imshow(plane, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[r, 3 * c].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def samples_figure(
    path: Path,
    backbone: Any,
    corpus: Corpus,
    ddim_steps: int,
    seeds: Sequence[int] = (0, 1),
    title: str = "",
) -> None:
    """Real held-out images, their reconstructions, and DDIM samples at four covariate settings."""
    pool = corpus.val if len(corpus.val) else corpus.train
    real_idx = torch.from_numpy(pool[:2])
    real = corpus.images[real_idx].float()
    with torch.no_grad():
        mu, _ = backbone.encode(real.to(_device(backbone)))
        recon = backbone.autoencoder.decode(mu).clamp(0, 1).cpu()
    panels: list[tuple[str, np.ndarray]] = []
    for i in range(real.shape[0]):
        panels.append((f"real #{int(real_idx[i])}", real[i, 0].numpy()))
        panels.append((f"AE reconstruction #{int(real_idx[i])}", recon[i, 0].numpy()))
    for name, cov in covariate_settings(corpus.covariates[torch.from_numpy(corpus.train)]):
        images = sample_images(backbone, cov, seeds, ddim_steps)
        for s, img in zip(seeds, images, strict=True):
            panels.append((f"sample: {name} (seed {s})", img[0].numpy()))
    montage(path, panels, title or f"tiny backbone: real, reconstruction, DDIM-{ddim_steps} samples")


# --- command line ---------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _bools(text: str) -> list[bool]:
    return [v.strip().lower() in ("1", "true", "t", "yes", "y") for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vcm train-backbone",
        description="Train the tiny backbone (AutoencoderKL + covariate-conditioned latent diffusion U-Net) "
        "and write it as a bundle (models/autoencoder.pt, models/model.pt, configs/network.json).",
    )
    p.add_argument("--data", required=True, help="training HDF5 in the dataset.h5 layout")
    p.add_argument("--work-dir", required=True, help="checkpoints, loss logs, latents (resumable)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoint_latest.pt")
    a = p.add_argument_group("autoencoder")
    a.add_argument("--ae-channels", type=_ints, default=[8, 16, 32], help="e.g. 8,16,32 (factor 4)")
    a.add_argument("--latent-channels", type=int, default=3)
    a.add_argument("--ae-res-blocks", type=int, default=1)
    a.add_argument("--ae-norm-groups", type=int, default=8)
    a.add_argument("--ae-steps", type=int, default=None)
    a.add_argument("--ae-minutes", type=float, default=None)
    a.add_argument("--ae-batch", type=int, default=4)
    a.add_argument(
        "--ae-crop",
        type=_ints,
        default=None,
        help="train on random crops of this size, e.g. 32,32,32 (default: whole images)",
    )
    a.add_argument("--ae-lr", type=float, default=5e-4)
    a.add_argument("--kl-weight", type=float, default=1e-6)
    a.add_argument(
        "--ae-init-sigma",
        type=float,
        default=0.05,
        help="initial posterior sigma (0: library initialisation)",
    )
    a.add_argument("--adv-weight", type=float, default=0.0, help="patch-adversarial weight (0: off)")
    a.add_argument("--adv-start", type=int, default=0, help="step at which the adversarial term starts")
    a.add_argument("--ae-val-every", type=int, default=100)
    d = p.add_argument_group("latent diffusion")
    d.add_argument("--dm-channels", type=_ints, default=[32, 64, 64])
    d.add_argument("--dm-attention", type=_bools, default=[False, False, True])
    d.add_argument("--dm-head-channels", type=_ints, default=[0, 0, 32])
    d.add_argument("--dm-res-blocks", type=_ints, default=[1, 1, 2], help="one value or one per level")
    d.add_argument("--dm-norm-groups", type=int, default=16)
    d.add_argument("--dm-steps", type=int, default=None)
    d.add_argument("--dm-minutes", type=float, default=None)
    d.add_argument("--dm-batch", type=int, default=16)
    d.add_argument("--dm-lr", type=float, default=2e-4)
    d.add_argument("--ema-decay", type=float, default=0.998)
    d.add_argument("--dm-val-every", type=int, default=200)
    d.add_argument("--sample-every", type=int, default=0, help="intermediate samples PNG every N steps")
    d.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the sample pictures")
    p.add_argument("--no-samples", action="store_true", help="skip samples.png (tests)")
    p.add_argument(
        "--samples-only", action="store_true", help="only redraw samples.png of the existing bundle --out"
    )
    return p


def definitions_from_args(args: argparse.Namespace, grid: Sequence[int]) -> dict[str, Any]:
    from vcm.models.backbone import tiny_definitions

    n = len(args.dm_channels)
    res = args.dm_res_blocks if len(args.dm_res_blocks) > 1 else args.dm_res_blocks * n
    if not (len(args.dm_attention) == len(args.dm_head_channels) == len(res) == n):
        raise StageError(
            "--dm-channels, --dm-attention, --dm-head-channels, --dm-res-blocks need one value per level"
        )
    defs = tiny_definitions(
        channels=args.ae_channels,
        latent_channels=args.latent_channels,
        num_res_blocks=args.ae_res_blocks,
        norm_num_groups=args.ae_norm_groups,
        diffusion_channels=args.dm_channels,
        diffusion_attention_levels=args.dm_attention,
        diffusion_num_head_channels=args.dm_head_channels,
        diffusion_num_res_blocks=res,
        diffusion_norm_num_groups=args.dm_norm_groups,
        spatial_dims=len(grid),
    )
    defs["grid"] = [int(s) for s in grid]
    return defs


def _set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def cli(argv: list[str]) -> int:
    from vcm.io import atomic_path, provenance, sha256_file, write_json
    from vcm.models.backbone import Backbone, count_parameters, save_bundle

    args = build_parser().parse_args(argv)
    _set_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    wall0 = time.monotonic()
    corpus = load_corpus(args.data)
    work, out = Path(args.work_dir), Path(args.out)
    if args.samples_only:
        from vcm.models.backbone import load_bundle

        samples_figure(out / "samples.png", load_bundle(out, device=device), corpus, args.ddim_steps)
        print(f"samples: {out / 'samples.png'}")
        return 0
    logger.info(
        "corpus %s: %d images on %s, %d train, %d held out",
        corpus.path,
        corpus.images.shape[0],
        "×".join(map(str, corpus.grid)),
        len(corpus.train),
        len(corpus.val),
    )
    defs = definitions_from_args(args, corpus.grid)
    ae_opts = AEOptions(
        steps=args.ae_steps,
        minutes=args.ae_minutes,
        batch_size=args.ae_batch,
        lr=args.ae_lr,
        kl_weight=args.kl_weight,
        init_sigma=args.ae_init_sigma,
        crop=tuple(args.ae_crop) if args.ae_crop else None,
        adv_weight=args.adv_weight,
        adv_start=args.adv_start,
        val_every=args.ae_val_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=device,
    )
    ae_defs = {k: v for k, v in defs.items() if k != "diffusion"}
    ae_defs.pop("scale_factor")
    ae, ae_summary = train_autoencoder(corpus, ae_defs, work / "ae", ae_opts)
    ae.requires_grad_(False).eval()

    latents = _latents(ae, corpus, work, ae_defs)
    std = float(latents["train"].std())
    defs["scale_factor"] = 1.0 / std
    logger.info("latent std %.4f -> scale_factor %.4f", std, defs["scale_factor"])

    ldm_opts = LDMOptions(
        steps=args.dm_steps,
        minutes=args.dm_minutes,
        batch_size=args.dm_batch,
        lr=args.dm_lr,
        ema_decay=args.ema_decay,
        val_every=args.dm_val_every,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        sample_ddim_steps=args.ddim_steps,
        seed=args.seed,
        device=device,
    )

    def sample_hook(ema: nn.Module, step: int) -> None:
        bb = Backbone(ae, ema, scale_factor=defs["scale_factor"], definitions=defs)
        samples_figure(
            work / "ldm" / f"samples_step{step:06d}.png",
            bb,
            corpus,
            args.ddim_steps,
            seeds=(0,),
            title=f"step {step}: real, reconstruction, DDIM-{args.ddim_steps} samples (EMA)",
        )

    dm, dm_summary = train_diffusion(latents, ae, defs, work / "ldm", ldm_opts, sample_hook)
    backbone = Backbone(ae, dm, scale_factor=defs["scale_factor"], definitions=defs)
    save_bundle(out, backbone, dtype=torch.float16)
    if not args.no_samples:
        samples_figure(out / "samples.png", backbone, corpus, args.ddim_steps)
    for stage, name in (("ae", "loss_autoencoder.png"), ("ldm", "loss_diffusion.png")):
        if (work / stage / "loss.png").is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(work / stage / "loss.png", tmp)

    prov = provenance(None)
    record = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m vcm train-backbone " + shlex.join(argv),
        "data": {
            "file": str(corpus.path),
            "sha256": sha256_file(corpus.path),
            "n_images": int(corpus.images.shape[0]),
            "n_train": int(len(corpus.train)),
            "n_val": int(len(corpus.val)),
            "grid": list(corpus.grid),
            "latents": "posterior mean of every training image and of its left-right flip",
        },
        "networks": {
            "autoencoder_parameters": count_parameters(backbone.autoencoder),
            "diffusion_parameters": count_parameters(backbone.diffusion),
            "latent_shape": list(latents["train"].shape[1:]),
            "scale_factor": defs["scale_factor"],
            "latent_std": std,
            "weights_dtype": "float16 (loaded as float32)",
        },
        "autoencoder": {**ae_summary.__dict__, "options": ae_opts.__dict__},
        "diffusion": {**dm_summary.__dict__, "options": ldm_opts.__dict__},
        "threads": args.threads,
        "device": str(device),
        "seed": args.seed,
        "wall_s_this_run": round(time.monotonic() - wall0, 1),
        "bundle_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "versions": {
            k: prov[k] for k in ("vcm_version", "vcm_git_sha", "python", "torch_version", "monai_version")
        },
        "host": prov["host"],
        "cpu_count": os.cpu_count(),
    }
    write_json(out / "training_record.json", record)
    print(f"bundle: {out}")
    return 0
