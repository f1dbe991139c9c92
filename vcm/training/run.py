"""What one training run trains, on what and how: inputs checked, model built (seeded), run signed.

:func:`set_up` is the first step of :func:`~vcm.training.loop.train`: it reads the settings, checks that the
dataset, the latents and the backbone bundle belong together, builds the control module under the run's seed
with its optimizer and the batch generator, and signs the run for its
:class:`~vcm.training.checkpoints.CheckpointStore`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcm.dataset_store import DatasetFile
from vcm.diffusion import ddpm_scheduler
from vcm.errors import StageError
from vcm.latents import bundle_sha256
from vcm.models.build import build_model
from vcm.models.conditions import condition_groups
from vcm.models.layout import place
from vcm.models.vcm import subset_probabilities
from vcm.training.batches import TrainData
from vcm.training.checkpoints import CHECKPOINT_DIR, CheckpointStore, signature
from vcm.training.distributed import rank_and_world
from vcm.training.prior_bank import PriorBank, bank_entries
from vcm.training.settings import Settings

__all__ = ["Run", "set_up"]


@dataclass
class Run:
    """What one training run trains, on what and how: built once by :func:`set_up`."""

    cfg: Mapping[str, Any]
    settings: Settings
    condset: str
    size: int
    out_dir: Path
    device: torch.device
    rank: int
    world: int
    groups: list[list[tuple[str, int]]]
    data: TrainData
    backbone: nn.Module
    bundle_sha: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every random draw of the batches
    alphas: torch.Tensor  # the DDPM schedule's cumulative alphas, on the device
    keep_probs: dict[tuple[int, ...], float] | None  # modality dropout; None: keep every group
    drop: str
    store: CheckpointStore
    bank: PriorBank | None = None  # the backbone's predictions, computed once (training.prior_reuse > 1)
    ema: nn.Module | None = None  # the moving average of the weights (training.ema_decay), what vcm.pt holds

    @property
    def shipped(self) -> nn.Module:
        """The weights ``vcm.pt`` holds and the previews sample with: the moving average, else the model."""
        return self.model if self.ema is None else self.ema

    @property
    def title(self) -> str:
        """``<method> <condition set> n<size>``: the run's name in the progress bar and the loss plot."""
        return f"{self.settings.method} {self.condset} n{self.size}"

    @property
    def budget(self) -> float | None:
        """The wall-clock budget of the training loop in seconds (``training.minutes``), or ``None``."""
        return 60.0 * self.settings.minutes if self.settings.minutes else None


def _load_inputs(
    cfg: Mapping[str, Any],
    dataset: str | Path,
    latents: str | Path,
    bundle: str | Path,
    condset: str,
    size: int,
    device: torch.device,
) -> tuple[list[list[tuple[str, int]]], TrainData, nn.Module, str]:
    """The condition groups, the training split, the frozen backbone and its bundle's hash, checked to fit."""
    from vcm.models.backbone import load_bundle

    with DatasetFile(dataset) as data:
        groups = condition_groups(cfg, condset, data.n_semantic)
    names = [n for g in groups for n, _ in g]
    data = TrainData(dataset, latents, f"train_{size}", names)
    bundle_sha = bundle_sha256(bundle)
    if data.bundle_sha256 and data.bundle_sha256 != bundle_sha:
        raise StageError(
            f"{latents} was encoded with another backbone bundle than {bundle}; rerun encode-latents"
        )
    backbone = load_bundle(bundle, scale_factor=cfg["backbone"]["scale_factor"], device=device)
    if data.latent_shape[0] != backbone.latent_channels:
        raise StageError(
            f"{latents}: {data.latent_shape[0]} latent channels, the backbone has {backbone.latent_channels}"
        )
    return groups, data, backbone, bundle_sha


def _prior_bank(
    settings: Settings,
    data: TrainData,
    backbone: nn.Module,
    alphas: torch.Tensor,
    device: torch.device,
    rank: int,
) -> PriorBank | None:
    """The run's bank of backbone predictions when ``training.prior_reuse`` > 1, else ``None``.

    VCM only: ControlNet's backbone pass carries its control, so there is nothing to reuse.
    """
    if settings.method != "vcm" or settings.prior_reuse <= 1:
        return None
    flips = 2 if settings.flip else 1
    entries = bank_entries(
        settings.steps, settings.batch_size, settings.noise_draws, settings.prior_reuse, len(data), flips
    )
    return PriorBank.build(
        data,
        backbone,
        alphas,
        entries,
        settings.flip,
        settings.seed,
        settings.timesteps,
        device=device,
        progress=rank == 0,
    )


def _augment_anatomy(
    cfg: Mapping[str, Any],
    settings: Settings,
    dataset: str | Path,
    data: TrainData,
    backbone: nn.Module,
    device: torch.device,
    rank: int,
) -> None:
    """Add ``training.anatomy_augmentation``'s ventricle-pushed copies of the split to ``data``, encoded by the
    frozen autoencoder (:mod:`~vcm.training.anatomy_augmentation`); nothing when ``copies`` is 0."""
    from vcm.latents import encode_dataset
    from vcm.training.anatomy_augmentation import AnatomyAugmentation, augment_subjects

    augmentation = AnatomyAugmentation.from_config(settings.anatomy_augmentation)
    if augmentation.copies == 0:
        return
    extra = augment_subjects(
        dataset, data.index, list(data.cond), cfg, augmentation, settings.seed, progress=rank == 0
    )
    mu, sigma = encode_dataset(backbone, extra.images, device=device, progress=False)
    data.extend(extra.subjects, extra.conditions, extra.covariates, mu, sigma)


def set_up(
    cfg: Mapping[str, Any],
    inputs: tuple[str | Path, str | Path, str | Path],
    condset: str,
    size: int,
    out_dir: str | Path,
    device: torch.device | str | None,
    overrides: Mapping[str, Any],
) -> Run:
    """Check the inputs, build the model (seeded), the optimizer and the generator, sign the run."""
    settings = Settings.from_config(cfg, **overrides)
    rank, world = rank_and_world()
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if settings.batch_size % world:
        raise StageError(
            f"training.batch_size {settings.batch_size} is not divisible by the {world} processes"
        )
    groups, data, backbone, bundle_sha = _load_inputs(cfg, *inputs, condset, size, device)
    _augment_anatomy(cfg, settings, inputs[0], data, backbone, device, rank)
    torch.manual_seed(settings.seed)
    overrides_model = settings.vcm if settings.method == "vcm" else settings.controlnet
    model = place(build_model(settings.method, groups, backbone, overrides_model), device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    keep_probs = subset_probabilities(len(groups), settings.p_all)
    drop = settings.modality_dropout if len(groups) > 1 else "none"
    run_signature = signature(
        {
            "settings": {
                k: v
                for k, v in asdict(settings).items()
                if not k.startswith("preview") and k not in ("minutes", "checkpoint_every")
            },
            "groups": groups,
            "bundle": bundle_sha,
            "scale_factor": backbone.scale_factor,
            "latent_sampling": backbone.latent_sampling,
            "split": data.index.tolist(),
            "model": getattr(model, "config", None),
        }  # not the process count: every rank draws the global batch, so a run may resume on more or fewer
    )
    alphas = ddpm_scheduler().alphas_cumprod.to(device)
    bank = _prior_bank(settings, data, backbone, alphas, device, rank)
    return Run(
        cfg=cfg,
        settings=settings,
        condset=condset,
        size=size,
        out_dir=Path(out_dir),
        device=device,
        rank=rank,
        world=world,
        groups=groups,
        data=data,
        backbone=backbone,
        bundle_sha=bundle_sha,
        model=model,
        optimizer=optimizer,
        generator=generator,
        alphas=alphas,
        keep_probs=keep_probs if drop != "none" else None,
        drop=drop,
        store=CheckpointStore(Path(out_dir) / CHECKPOINT_DIR, run_signature, owner=rank == 0),
        bank=bank,
        ema=copy.deepcopy(model).requires_grad_(False) if settings.ema_decay is not None else None,
    )
