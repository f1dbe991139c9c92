"""Train on synthetic, test on real (TSTR): is the synthetic cohort good enough to train a segmenter?

A small MONAI 3-D :class:`~monai.networks.nets.UNet` is trained twice with the same architecture, seed and
budget (``tstr.steps``, optionally ``tstr.minutes``):

* on the QC-passed subjects of a synthetic cohort (:class:`vcm.data.CohortDataset`; targets from the label
  map that conditioned each sample), and
* on the real training subset (:class:`vcm.data.RealDataset`, ``/splits/train_<n>``, default the largest
  training size);

and both are scored with MONAI's :class:`~monai.metrics.DiceMetric` against the real validation subjects'
labels (``/splits/val``). Targets (``tstr.labels``): ``lv`` (the lateral-ventricle mask, the paper's
condition) or ``semantics`` (the 8 classes of appendix A.3; Dice is the mean over the foreground classes).

Outputs (``--out results/eval/tstr/<set>.csv``): one row per training source (``synthetic``, ``real``)
with the mean and sample sd of the validation Dice, and ``<stem>.json`` with per-subject and per-class Dice,
steps, seconds and settings. The networks are not kept (they are a measuring instrument).

Cost on the demo (40×56×40, channels 8-16-32, batch 2, one thread of a busy 2-core machine): ~0.2 s a
step, so the default 300 steps take ~1 min per network and ~2 min for the stage (measured: 55 s and 62 s;
LV Dice 0.75 on the 4 validation subjects when trained on 20 real subjects).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vcm.config import section_values
from vcm.data import CohortDataset, RealDataset, n_classes
from vcm.errors import StageError
from vcm.labels import SEMANTIC_CLASSES

__all__ = ["TstrSettings", "build_network", "cli", "evaluate_dice", "run_tstr", "train_network"]

logger = logging.getLogger(__name__)


@dataclass
class TstrSettings:
    """TSTR settings, from the config's ``tstr`` section (absent keys take these defaults).

    Args:
        steps: optimisation steps per network (the same for both).
        minutes: optional wall-clock cap per network (both get the same cap; steps stay the upper bound).
        batch_size: training batch.
        lr: Adam learning rate.
        labels: ``lv`` or ``semantics``.
        channels: U-Net channels per level.
        strides: U-Net strides (the input is padded to a multiple of their product).
        num_res_units: residual units per U-Net block.
        real_split: real training split (default ``train_<largest training size>``).
        passed_only: train on QC-passed synthetic subjects only.
        flip: random left-right flip augmentation.
        seed: network initialisation and batch order.
        num_workers: DataLoader workers (0: in the main process).
    """

    steps: int = 300
    minutes: float | None = None
    batch_size: int = 2
    lr: float = 1e-3
    labels: str = "lv"
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    strides: list[int] = field(default_factory=lambda: [2, 2])
    num_res_units: int = 1
    real_split: str | None = None
    passed_only: bool = True
    flip: bool = True
    seed: int = 0
    num_workers: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> TstrSettings:
        """Read ``cfg["tstr"]``; ``overrides`` that are not ``None`` win."""
        values = section_values(cfg, "tstr", set(cls.__dataclass_fields__), overrides)
        if values.get("real_split") is None:
            sizes = cfg.get("training", {}).get("sizes") or [10]
            values["real_split"] = f"train_{max(sizes)}"
        out = cls(**values)
        if out.labels not in ("lv", "semantics"):
            raise StageError(f"config key 'tstr.labels': expected lv or semantics, got {out.labels!r}")
        if len(out.channels) != len(out.strides) + 1:
            raise StageError(
                "config keys 'tstr.channels' / 'tstr.strides': need one stride fewer than channels"
            )
        return out


def build_network(settings: TstrSettings) -> nn.Module:
    """The segmenter: MONAI's 3-D U-Net, background + the foreground classes of ``settings.labels``."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=int(n_classes(settings.labels)) + 1,
        channels=tuple(settings.channels),
        strides=tuple(settings.strides),
        num_res_units=settings.num_res_units,
    )


def _transforms(settings: TstrSettings, train: bool):
    from monai.transforms import Compose, DivisiblePadd, EnsureChannelFirstd, RandFlipd

    k = int(np.prod(settings.strides))
    steps: list[Any] = [
        EnsureChannelFirstd(keys="label", channel_dim="no_channel"),
        DivisiblePadd(keys=["image", "label"], k=k),
    ]
    if train and settings.flip:
        steps.append(RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0))
    return Compose(steps)


def _loader(ds: Dataset, settings: TstrSettings, generator: torch.Generator) -> DataLoader:
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
    settings: TstrSettings,
    device: torch.device | str = "cpu",
    desc: str = "tstr",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh :func:`build_network` on ``ds`` (items with ``image`` and channel-first ``label``).

    Returns:
        the network (eval mode) and ``{"steps", "seconds", "final_loss"}``.
    """
    from monai.losses import DiceCELoss

    if len(ds) == 0:
        hint = (
            " (no cohort subject passed QC: see qc.csv, or set tstr.passed_only: false)"
            if "synthetic" in desc
            else ""
        )
        raise StageError(f"{desc}: no training subjects{hint}")
    torch.manual_seed(settings.seed)
    net = build_network(settings).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    start, step, losses = time.perf_counter(), 0, []
    budget = None if settings.minutes is None else 60.0 * settings.minutes
    bar = tqdm(total=settings.steps, desc=desc, unit="step", disable=not progress)
    net.train()
    while step < settings.steps:
        for batch in _loader(ds, settings, generator):
            image, label = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(image), label)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            if step >= settings.steps or (budget is not None and time.perf_counter() - start > budget):
                break
        if budget is not None and time.perf_counter() - start > budget:
            break
    bar.close()
    tail = losses[-max(1, len(losses) // 10) :]
    return net.eval(), {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": float(np.mean(tail)) if tail else math.nan,
    }


@torch.no_grad()
def evaluate_dice(
    net: nn.Module, ds: Dataset, n_fg: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Dice (MONAI :class:`~monai.metrics.DiceMetric`, foreground classes) of ``net`` on every item of ``ds``.

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
        pred = net(image).argmax(1, keepdim=True)
        onehot = lambda x: nn.functional.one_hot(x[:, 0], n_fg + 1).movedim(-1, 1).float()  # noqa: E731
        values = metric(onehot(pred), onehot(label))[0].cpu().numpy()
        subjects.append(str(item["subject"]))
        per_class.append([float(v) for v in values])
        dice.append(float(np.nanmean(values)))
    return {"subjects": subjects, "dice": dice, "per_class": per_class}


def run_tstr(
    cfg: Mapping[str, Any],
    dataset: str | Path,
    cohort: str | Path,
    out: str | Path,
    settings: TstrSettings | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Train on the synthetic cohort and on the real training subset; Dice of both on the real validation set.

    Args:
        cfg: the validated config (``tstr``, ``training.sizes``, ``conditions.lv_labels``).
        dataset: ``dataset.h5`` (real training split and ``/splits/val``).
        cohort: the synthetic ``cohort.h5``.
        out: the table CSV; ``<stem>.json`` goes beside it.
        settings: defaults to :meth:`TstrSettings.from_config`.
        device: where to train.
        progress: tqdm bars.

    Returns:
        the table written to ``out`` (rows ``synthetic`` and ``real``).
    """
    from vcm.io import atomic_path, provenance, write_json

    settings = settings or TstrSettings.from_config(cfg)
    lv_labels = tuple(cfg.get("conditions", {}).get("lv_labels", (4, 43)))
    kw = {"label_map": settings.labels, "lv_labels": lv_labels}
    augment = _transforms(settings, True).set_random_state(settings.seed)  # the same flips for both sources
    val = RealDataset(dataset, "val", transform=_transforms(settings, False), **kw)
    if len(val) == 0:
        raise StageError(f"{dataset}: /splits/val is empty: nothing to test on")
    sources = {
        "synthetic": CohortDataset(cohort, passed_only=settings.passed_only, transform=augment, **kw),
        "real": RealDataset(dataset, settings.real_split, transform=augment, **kw),
    }
    n_fg = int(n_classes(settings.labels))
    rows, details = [], {}
    for name, ds in sources.items():
        augment.set_random_state(settings.seed)
        net, info = train_network(ds, settings, device, desc=f"tstr {name}", progress=progress)
        scores = evaluate_dice(net, val, n_fg, device)
        mean = float(np.mean(scores["dice"]))
        sd = float(np.std(scores["dice"], ddof=1)) if len(scores["dice"]) > 1 else 0.0
        rows.append(
            {
                "train_data": name,
                "source": Path(cohort).parent.name if name == "synthetic" else settings.real_split,
                "n_train": len(ds),
                "labels": settings.labels,
                "steps": info["steps"],
                "seconds": info["seconds"],
                "final_loss": info["final_loss"],
                "n_val": len(val),
                "dice_mean": mean,
                "dice_sd": sd,
            }
        )
        details[name] = {**info, **scores, "n_train": len(ds)}
        if name == "synthetic":
            details[name]["n_total"] = ds.n_total
        logger.info("TSTR %s: Dice %.3f ± %.3f on %d real validation subjects", name, mean, sd, len(val))
    table = pd.DataFrame(rows)
    out = Path(out)
    write_json(
        out.with_name(out.name.removesuffix(".csv") + ".json"),
        {
            "cohort": str(cohort),
            "dataset": str(dataset),
            "settings": asdict(settings),
            "classes": ["lv"] if settings.labels == "lv" else list(SEMANTIC_CLASSES),
            "results": details,
            "provenance": provenance(None, device=str(device)),
        },
    )
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return table


def cli(argv: list[str]) -> int:
    """``python -m vcm tstr``: train on synthetic, test on real."""
    from vcm.config import load_config

    parser = argparse.ArgumentParser(prog="python -m vcm tstr", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--cohort", required=True, help="cohort.h5")
    parser.add_argument("--out", required=True, help="results/eval/tstr/<set>.csv")
    parser.add_argument("--steps", type=int, default=None, help="override tstr.steps")
    parser.add_argument("--minutes", type=float, default=None, help="override tstr.minutes")
    parser.add_argument("--labels", choices=("lv", "semantics"), default=None, help="override tstr.labels")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    settings = TstrSettings.from_config(cfg, steps=args.steps, minutes=args.minutes, labels=args.labels)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    table = run_tstr(cfg, args.dataset, args.cohort, args.out, settings, device)
    for r in table.itertuples():
        print(
            f"TSTR {r.train_data} ({r.source}, {r.n_train} subjects, {r.steps} steps, {r.seconds:.0f} s): "
            f"{r.labels} Dice {r.dice_mean:.3f} ± {r.dice_sd:.3f} on {r.n_val} real validation subjects"
        )
    return 0
