"""Train on synthetic, test on real (TSTR): is the synthetic cohort good enough to train a segmenter?

A small MONAI 3-D :class:`~monai.networks.nets.UNet` is trained three times with the same architecture, seed
and budget (``tstr.steps``, optionally ``tstr.minutes``; the loop of :mod:`vcm.segtrain`):

* ``synthetic``: on the QC-passed subjects of a synthetic cohort (:class:`vcm.data.CohortDataset`; targets
  from the label map that conditioned each sample);
* ``real``: on the real training subset (:class:`vcm.data.RealDataset`, ``/splits/train_<n>``, default the
  largest training size);
* ``real+synthetic``: on both together;
* ``synthetic_all`` (with ``passed_only`` and ``qc_ignored_arm``): on every synthetic subject, QC-passed or
  not: whether the cohort teaches anatomy even where its QC bar is not met (a diagnostic, not a training set
  to use);

and each is scored with MONAI's :class:`~monai.metrics.DiceMetric` against the real validation subjects'
labels (``/splits/val``). With ``tstr.repeats = R`` each arm trains R networks (seeds ``seed`` … ``seed + R −
1``) and a subject's Dice is their mean: one 300-step network's Dice moves by ~0.01–0.03 with its seed, as much
as the differences between arms (docs/benchmarks.md, session 21). Targets (``tstr.labels``): ``lv`` (the
lateral-ventricle mask, the paper's condition) or ``semantics`` (the 8 classes of appendix A.3; Dice is the
mean over the foreground classes).

Outputs (``--out results/eval/tstr/<set>.csv``): one row per training source with the mean, sample sd and a
bootstrap 95 % interval of the validation Dice, and ``<stem>.json`` with per-subject and per-class Dice,
steps, seconds and settings. The networks are not kept (they are a measuring instrument).

Cost on the demo (40×56×40, channels 8-16-32, batch 2, one thread of a busy 2-core machine): ~0.2 s a
step, so the default 300 steps take ~1 min per network and ~2 min for the stage (measured: 55 s and 62 s;
LV Dice 0.75 on the 4 validation subjects when trained on 20 real subjects).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset

from vcm.config import section_values
from vcm.data import CohortDataset, RealDataset, n_classes
from vcm.errors import StageError
from vcm.labels import SEMANTIC_CLASSES
from vcm.segtrain import evaluate_dice, train_network, transforms
from vcm.stage import configure_runtime, stage_parser
from vcm.stats import bootstrap_ci

__all__ = ["ARMS", "TstrSettings", "cli", "run_tstr"]

ARMS = ("synthetic", "real", "real+synthetic", "synthetic_all")

logger = logging.getLogger(__name__)


@dataclass
class TstrSettings:
    """TSTR settings, from the config's ``tstr`` section (the field defaults are the schema's).

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
        qc_ignored_arm: with ``passed_only``, also train on every synthetic subject (``synthetic_all``).
        flip: random left-right flip augmentation, and test-time mirroring.
        spatial: rotation and scaling augmentation, the same for every arm.
        augment: blur, contrast, bias and noise augmentation, the same for every arm.
        ema_decay: every arm's network is the moving average of its weights with this decay (``None``: the last
            step's weights).
        seed: network initialisation and batch order (of the first network of each arm).
        num_workers: DataLoader workers (0: in the main process).
        repeats: networks per arm, seeds ``seed`` … ``seed + repeats - 1``; a subject's Dice is their mean.
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
    qc_ignored_arm: bool = True
    flip: bool = True
    spatial: bool = False
    augment: bool = False
    ema_decay: float | None = None
    seed: int = 0
    num_workers: int = 0
    repeats: int = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> TstrSettings:
        """Read ``cfg["tstr"]``; ``overrides`` that are not ``None`` win."""
        values = section_values(cfg, "tstr", [f.name for f in fields(cls)], overrides)
        if values.get("real_split") is None:
            sizes = cfg["training"]["sizes"]
            values["real_split"] = f"train_{max(sizes)}"
        out = cls(**values)
        if out.labels not in ("lv", "semantics"):
            raise StageError(f"config key 'tstr.labels': expected lv or semantics, got {out.labels!r}")
        if len(out.channels) != len(out.strides) + 1:
            raise StageError(
                "config keys 'tstr.channels' / 'tstr.strides': need one stride fewer than channels"
            )
        return out


def run_tstr(
    cfg: Mapping[str, Any],
    dataset: str | Path,
    cohort: str | Path,
    out: str | Path,
    settings: TstrSettings | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Train on the synthetic cohort, the real training subset and both; Dice of each on the real validation set.

    Args:
        cfg: the validated config (``tstr``, ``training.sizes``, ``conditions.lv_labels``).
        dataset: ``dataset.h5`` (real training split and ``/splits/val``).
        cohort: the synthetic ``cohort.h5``.
        out: the table CSV; ``<stem>.json`` goes beside it.
        settings: defaults to :meth:`TstrSettings.from_config`.
        device: where to train.
        progress: tqdm bars.

    Returns:
        the table written to ``out`` (one row per arm of :data:`ARMS`).
    """
    from vcm.io import atomic_path, provenance, write_json

    settings = settings or TstrSettings.from_config(cfg)
    lv_labels = tuple(cfg["conditions"]["lv_labels"])
    kw = {"label_map": settings.labels, "lv_labels": lv_labels}
    augment = transforms(settings, True).set_random_state(settings.seed)  # the same flips for every arm
    val = RealDataset(dataset, "val", transform=transforms(settings, False), **kw)
    if len(val) == 0:
        raise StageError(f"{dataset}: /splits/val is empty: nothing to test on")
    synthetic = CohortDataset(cohort, passed_only=settings.passed_only, transform=augment, **kw)
    real = RealDataset(dataset, settings.real_split, transform=augment, **kw)
    sources = {"synthetic": synthetic, "real": real, "real+synthetic": ConcatDataset([real, synthetic])}
    if settings.passed_only and settings.qc_ignored_arm:
        sources["synthetic_all"] = CohortDataset(cohort, passed_only=False, transform=augment, **kw)
    n_fg = int(n_classes(settings.labels))
    rows, details = [], {}
    for name, ds in sources.items():
        if len(ds) == 0:  # no subject passed QC: say so in the table instead of failing the run
            rows.append(
                {
                    "train_data": name,
                    "source": _source(name, cohort, settings),
                    "n_train": 0,
                    "labels": settings.labels,
                    "n_val": len(val),
                    "dice_mean": float("nan"),
                    "note": "no synthetic subject"
                    if name == "synthetic_all"
                    else "no QC-passed synthetic subject",
                }
            )
            details[name] = {"n_train": 0, "n_total": synthetic.n_total}
            logger.warning("TSTR %s: no training subjects (no synthetic subject passed QC)", name)
            continue
        source = _source(name, cohort, settings)
        row, details[name] = _train_arm(name, source, ds, augment, val, settings, n_fg, device, progress)
        rows.append(row)
        if name.startswith("synthetic"):
            details[name]["n_total"] = synthetic.n_total
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


def _train_arm(
    name: str,
    source: str,
    ds: Any,
    augment: Any,
    val: RealDataset,
    settings: TstrSettings,
    n_fg: int,
    device: torch.device | str,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one arm's ``settings.repeats`` networks on ``ds`` and score them on ``val``: its table row and the
    details for the JSON (training info, per-subject and per-class Dice, averaged over the networks)."""
    runs = []
    for seed in range(settings.seed, settings.seed + settings.repeats):
        augment.set_random_state(seed)  # every arm sees the same flips
        run = replace(settings, seed=seed)
        desc = f"tstr {name}" if settings.repeats == 1 else f"tstr {name} seed {seed}"
        net, info = train_network(ds, run, n_fg, device, desc=desc, progress=progress)
        runs.append({**info, **evaluate_dice(net, val, n_fg, device, mirror=settings.flip)})
    dice = np.mean([r["dice"] for r in runs], axis=0)
    low, high = bootstrap_ci(dice, seed=settings.seed)
    row = {
        "train_data": name,
        "source": source,
        "n_train": len(ds),
        "labels": settings.labels,
        "steps": runs[0]["steps"],
        "seconds": round(sum(r["seconds"] for r in runs), 2),
        "final_loss": float(np.mean([r["final_loss"] for r in runs])),
        "n_val": len(val),
        "dice_mean": float(dice.mean()),
        "dice_sd": float(dice.std(ddof=1)) if len(dice) > 1 else 0.0,
        "dice_ci_low": low,
        "dice_ci_high": high,
    }
    details = {key: row[key] for key in ("steps", "seconds", "final_loss")}
    details.update(
        subjects=runs[0]["subjects"],
        dice=[float(d) for d in dice],
        per_class=np.mean([r["per_class"] for r in runs], axis=0).tolist(),
        n_train=len(ds),
    )
    if settings.repeats > 1:
        means = [float(np.mean(r["dice"])) for r in runs]
        row["repeats"], row["dice_seed_sd"] = settings.repeats, float(np.std(means, ddof=1))
        details["repeats"] = [
            {
                "seed": settings.seed + i,
                "dice_mean": m,
                "final_loss": r["final_loss"],
                "seconds": r["seconds"],
            }
            for i, (m, r) in enumerate(zip(means, runs, strict=True))
        ]
    logger.info(
        "TSTR %s: Dice %.3f [%.3f, %.3f] on %d real validation subjects (%d network%s)",
        name,
        dice.mean(),
        low,
        high,
        len(val),
        settings.repeats,
        "s" if settings.repeats > 1 else "",
    )
    return row, details


def _source(arm: str, cohort: str | Path, settings: TstrSettings) -> str:
    set_name = Path(cohort).parent.name
    return {"synthetic": set_name, "synthetic_all": set_name, "real": settings.real_split}.get(
        arm, f"{settings.real_split}+{set_name}"
    )


def cli(argv: list[str]) -> int:
    """``python -m vcm tstr``: train on synthetic, test on real."""
    from vcm.config import load_config

    parser = stage_parser("tstr", __doc__, threads=True, device=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--cohort", required=True, help="cohort.h5")
    parser.add_argument("--out", required=True, help="results/eval/tstr/<set>.csv")
    parser.add_argument("--steps", type=int, default=None, help="override tstr.steps")
    parser.add_argument("--minutes", type=float, default=None, help="override tstr.minutes")
    parser.add_argument("--labels", choices=("lv", "semantics"), default=None, help="override tstr.labels")
    parser.add_argument("--repeats", type=int, default=None, help="override tstr.repeats (networks per arm)")
    args = parser.parse_args(argv)
    device = configure_runtime(args)
    cfg = load_config(args.config)
    settings = TstrSettings.from_config(
        cfg, steps=args.steps, minutes=args.minutes, labels=args.labels, repeats=args.repeats
    )
    if settings.repeats < 1:
        raise StageError(
            f"--repeats / config key 'tstr.repeats': expected at least 1, got {settings.repeats}"
        )
    table = run_tstr(cfg, args.dataset, args.cohort, args.out, settings, device)
    for r in table.to_dict("records"):
        if not r["n_train"]:
            print(f"TSTR {r['train_data']}: not trained ({r.get('note')})")
            continue
        print(
            f"TSTR {r['train_data']} ({r['source']}, {r['n_train']} subjects, {r['steps']} steps, {r['seconds']:.0f} s):"
            f" {r['labels']} Dice {r['dice_mean']:.3f} [95% CI {r['dice_ci_low']:.3f}, {r['dice_ci_high']:.3f}]"
            f" on {r['n_val']} real validation subjects"
        )
    return 0
