"""Training and scoring of the project's small segmentation U-Nets (the QC segmenter and the TSTR arms).

One loop for both, so that "the same network and budget" means the same code: MONAI's 3-D U-Net
(:func:`vcm.models.segmenter.build_unet`), Dice + cross-entropy, Adam, left-right flips (optionally small rotations
and scalings), a fixed number of steps (an optional wall-clock cap for clusters), seeded initialisation and batch
order.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vcm.errors import StageError
from vcm.models.layout import place
from vcm.models.segmenter import build_unet, predict
from vcm.training.ema import ema_decay_at, ema_update

__all__ = ["LoopSettings", "evaluate_dice", "spatial_augmentation", "train_network", "transforms"]


class LoopSettings(Protocol):
    """The fields the loop reads (``TstrSettings`` and ``SegmenterSettings`` have them)."""

    steps: int
    minutes: float | None
    batch_size: int
    lr: float
    channels: list[int]
    strides: list[int]
    num_res_units: int
    flip: bool
    augment: bool
    spatial: bool
    ema_decay: float | None
    seed: int
    num_workers: int


def transforms(settings: LoopSettings, train: bool):
    """Channel-first label, padding to the U-Net's stride product, and (training) left-right flips, with
    ``spatial`` the small rotations and scalings of :func:`spatial_augmentation` and with ``augment`` the
    appearance changes of :func:`appearance_augmentation`."""
    from monai.transforms import Compose, DivisiblePadd, EnsureChannelFirstd, RandFlipd

    k = int(np.prod(settings.strides))
    steps: list[Any] = [
        EnsureChannelFirstd(keys="label", channel_dim="no_channel"),
        DivisiblePadd(keys=["image", "label"], k=k),
    ]
    if train and settings.flip:
        steps.append(RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0))
    if train and settings.spatial:
        steps.append(spatial_augmentation())
    if train and settings.augment:
        steps.extend(appearance_augmentation())
    return Compose(steps)


def spatial_augmentation(prob: float = 0.5, rotate: float = 0.15, scale: float = 0.1) -> Any:
    """Image and label rotated (up to ``rotate`` radians about each axis) and scaled (up to ``scale``) together.

    48 training heads are few for a network that must read ventricles of every size and shape: seeing each one
    at other poses and sizes (nnU-Net's default augmentation for small data sets) is worth +0.016 LV Dice on
    the demo's real validation subjects at 2 400 steps (three seeds); at 1 200 nothing (docs/benchmarks.md,
    session 33): it needs the longer training to pay.
    The label is resampled nearest-neighbour, so it stays a label map.
    """
    from monai.transforms import RandAffined

    return RandAffined(
        keys=["image", "label"],
        prob=prob,
        rotate_range=[rotate] * 3,
        scale_range=[scale] * 3,
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
    )


def appearance_augmentation() -> list[Any]:
    """Image-only changes of blur, contrast, bias and noise (labels untouched), in the spirit of SynthSeg.

    A segmenter that has seen only sharp scans loses LV Dice on the smoother images an autoencoder decodes
    (``python -m vcm.bench labels``: real vs reconstruction); blurring a training image by up to about one
    latent voxel's worth is meant to teach it the anatomy rather than the sharpness of the edges. Off by
    default: on the demo it did not raise the LV Dice of real or reconstructed images (docs/benchmarks.md).
    """
    from monai.transforms import (
        RandAdjustContrastd,
        RandBiasFieldd,
        RandGaussianNoised,
        RandGaussianSmoothd,
    )

    blur = (0.5, 2.0)  # voxels (sigma); the demo autoencoder downsamples by 4
    return [
        RandGaussianSmoothd(keys="image", sigma_x=blur, sigma_y=blur, sigma_z=blur, prob=0.6),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.4), prob=0.3),
        RandBiasFieldd(keys="image", coeff_range=(0.0, 0.1), prob=0.3),
        RandGaussianNoised(keys="image", std=0.02, prob=0.3),
    ]


def _loader(ds: Dataset, settings: LoopSettings, generator: torch.Generator) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=len(ds) >= settings.batch_size,
        num_workers=settings.num_workers,
        generator=generator,
        collate_fn=_collate,
    )


def _collate(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    # only the tensors the network needs: strings and MONAI's metadata do not need collating
    def plain(x: Any) -> torch.Tensor:
        return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)

    return {k: torch.stack([plain(it[k]) for it in items]) for k in ("image", "label")}


def train_network(
    ds: Dataset,
    settings: LoopSettings,
    n_foreground: int,
    device: torch.device | str = "cpu",
    desc: str = "segmenter",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh U-Net on ``ds`` (items with ``image`` and channel-first ``label``).

    With ``settings.ema_decay`` the network returned is the exponential moving average of the trained weights
    (:mod:`vcm.training.ema`): the last step's weights carry the noise of the last mini-batches.

    Returns:
        the network (eval mode) and ``{"steps", "seconds", "final_loss"}``.
    """
    from monai.losses import DiceCELoss

    if len(ds) == 0:
        raise StageError(f"{desc}: no training subjects")
    torch.manual_seed(settings.seed)
    net = place(build_unet(settings.channels, settings.strides, settings.num_res_units, n_foreground), device)
    ema = copy.deepcopy(net).requires_grad_(False) if settings.ema_decay is not None else None
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    start, step, losses = time.perf_counter(), 0, []
    budget = None if settings.minutes is None else 60.0 * settings.minutes

    def over_budget() -> bool:  # checked after a step: a cap never leaves the network untrained
        return budget is not None and step > 0 and time.perf_counter() - start > budget

    bar = tqdm(total=settings.steps, desc=desc, unit="step", disable=not progress)
    net.train()
    while step < settings.steps and not over_budget():
        for batch in _loader(ds, settings, generator):
            image, label = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(image), label)
            loss.backward()
            opt.step()
            if ema is not None:
                ema_update(ema, net, ema_decay_at(step, settings.ema_decay))
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            if step >= settings.steps or over_budget():
                break
    bar.close()
    tail = losses[-max(1, len(losses) // 10) :]
    return (net if ema is None else ema).eval(), {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": float(np.mean(tail)) if tail else math.nan,
    }


@torch.no_grad()
def evaluate_dice(
    net: nn.Module,
    ds: Dataset,
    n_foreground: int,
    device: torch.device | str = "cpu",
    mirror: bool = False,
) -> dict[str, Any]:
    """Dice (MONAI :class:`~monai.metrics.DiceMetric`, foreground classes) of ``net`` on every item of ``ds``,
    predicting as :func:`vcm.models.segmenter.predict` does (``mirror``: with test-time mirroring).

    Returns:
        ``subjects``, ``dice`` (per subject, the mean over classes) and ``per_class`` (per subject and class).
    """
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    subjects, dice, per_class = [], [], []
    net.eval()
    for i in range(len(ds)):
        item = ds[i]
        image = torch.as_tensor(item["image"])[None].to(device)
        label = torch.as_tensor(item["label"])[None].long().to(device)  # (1, 1, *grid)
        pred = predict(net, image, mirror).argmax(1, keepdim=True)
        onehot = lambda x: nn.functional.one_hot(x[:, 0], n_foreground + 1).movedim(-1, 1).float()  # noqa: E731
        values = metric(onehot(pred), onehot(label))[0].cpu().numpy()
        subjects.append(str(item["subject"]))
        per_class.append([float(v) for v in values])
        dice.append(float(np.nanmean(values)))
    return {"subjects": subjects, "dice": dice, "per_class": per_class}
