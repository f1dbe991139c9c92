"""Train the QC segmenter (:mod:`vcm.models.segmenter`) on the real training subjects of ``dataset.h5``.

Training data: the real training split (``/splits/train_<max(training.sizes)>``: images and label maps),
never synthetic images and never the validation subjects, which it is scored on afterwards. The score (Dice
per class, LV Dice with its bootstrap 95 % interval) and the time per volume on one CPU thread go to
``segmenter.json`` beside ``segmenter.pt``, so every QC table can say what measured it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vcm.config import section_values
from vcm.data import RealDataset
from vcm.dataset_store import DatasetFile
from vcm.errors import StageError
from vcm.io import provenance, write_json
from vcm.models.segmenter import SegmenterSpec, label_mapping, load_segmenter, qc_classes, save_segmenter
from vcm.segtrain import evaluate_dice, train_network, transforms
from vcm.stage import configure_runtime, stage_parser
from vcm.stats import bootstrap_ci

__all__ = ["SegmenterSettings", "cli", "train_segmenter"]


@dataclass
class SegmenterSettings:
    """``qc.segmenter`` of the config (the field defaults are the schema's).

    Args:
        steps: optimisation steps.
        minutes: optional wall-clock cap (clusters); the demo trains a fixed number of steps.
        batch_size, lr: Adam's batch and learning rate.
        channels, strides, num_res_units: the U-Net.
        flip: left-right flip augmentation, and test-time mirroring (:func:`vcm.models.segmenter.predict`).
        spatial: rotation and scaling augmentation (:func:`vcm.segtrain.spatial_augmentation`).
        augment: blur, contrast, bias and noise augmentation (:func:`vcm.segtrain.appearance_augmentation`).
        ema_decay: ship the exponential moving average of the weights with this decay (``None``: the last step's).
        seed: initialisation and batch order.
        num_workers: DataLoader workers.
    """

    steps: int = 600
    minutes: float | None = None
    batch_size: int = 2
    lr: float = 2e-3
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    flip: bool = True
    spatial: bool = False
    augment: bool = False
    ema_decay: float | None = None
    seed: int = 0
    num_workers: int = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> SegmenterSettings:
        """Read ``cfg["qc"]["segmenter"]`` of a validated config; ``overrides`` that are not ``None`` win."""
        return cls(**section_values(cfg, "qc.segmenter", [f.name for f in fields(cls)], overrides))


def seconds_per_volume(path: Path, affine: np.ndarray, image: np.ndarray, repeats: int = 5) -> float:
    """Median wall time of one segmentation (load excluded) on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seg = load_segmenter(path, affine)
        seg(image)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            seg(image)
            times.append(time.perf_counter() - start)
        return float(np.median(times))
    finally:
        torch.set_num_threads(threads)


def train_segmenter(
    cfg: dict[str, Any],
    dataset: str | Path,
    out: str | Path,
    settings: SegmenterSettings | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train, score on the validation subjects, write ``segmenter.pt`` and ``segmenter.json``; return the report."""
    settings = settings or SegmenterSettings.from_config(cfg)
    lv_labels = tuple(cfg["conditions"]["lv_labels"])
    spec = SegmenterSpec(
        settings.channels,
        settings.strides,
        settings.num_res_units,
        qc_classes(lv_labels),
        mirror=settings.flip,
    )
    split = f"train_{max(cfg['training']['sizes'])}"
    kw = {"label_map": label_mapping(spec.classes)}
    train = RealDataset(
        dataset, split, transform=transforms(settings, True).set_random_state(settings.seed), **kw
    )
    val = RealDataset(dataset, "val", transform=transforms(settings, False), **kw)
    if len(val) == 0:
        raise StageError(f"{dataset}: /splits/val is empty: nothing to score the QC segmenter on")
    n_fg = len(spec.classes)
    net, info = train_network(train, settings, n_fg, device, desc="qc segmenter", progress=progress)
    net = net.cpu()
    out = Path(out)
    with DatasetFile(dataset) as data:
        affine = data.affine
        image = np.asarray(data.images(int(val.rows[0]))[0], dtype=np.float32)
    # the training time goes to segmenter.json only: the same config and seed give the same segmenter.pt
    untimed = {k: v for k, v in info.items() if k != "seconds"}
    save_segmenter(out, net, spec, {**untimed, "split": split, "n_train": len(train)})
    scores = evaluate_dice(net, val, n_fg, mirror=spec.mirror)
    per_class = np.asarray(scores["per_class"])
    lv = per_class[:, 0]
    low, high = bootstrap_ci(lv, seed=settings.seed)
    report = {
        "segmenter": "qc_segmenter (MONAI UNet)",
        "train_split": split,
        "n_train": len(train),
        "n_val": len(val),
        "lv_dice": {
            "mean": float(lv.mean()),
            "sd": float(lv.std(ddof=1)) if len(lv) > 1 else 0.0,
            "ci95": [low, high],
        },
        "class_dice": {name: float(np.nanmean(per_class[:, k])) for k, name in enumerate(spec.classes)},
        "seconds_per_volume_1_thread": seconds_per_volume(out, affine, image),
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "training": info,
        "settings": asdict(settings),
        "per_subject": {"subjects": scores["subjects"], "lv_dice": [float(x) for x in lv]},
        "provenance": provenance(None),
    }
    write_json(out.with_suffix(".json"), report)
    return report


def cli(argv: list[str]) -> int:
    """``python -m vcm train-segmenter``: the QC segmenter from the real training subjects."""
    from vcm.config import load_config

    parser = stage_parser("train-segmenter", __doc__, threads=True, device=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--out", required=True, help="segmenter.pt (segmenter.json goes beside it)")
    parser.add_argument("--steps", type=int, default=None, help="override qc.segmenter.steps")
    args = parser.parse_args(argv)
    device = configure_runtime(args)
    cfg = load_config(args.config)
    report = train_segmenter(
        cfg, args.dataset, args.out, SegmenterSettings.from_config(cfg, steps=args.steps), device
    )
    lv = report["lv_dice"]
    print(
        f"QC segmenter: {report['training']['steps']} steps on {report['n_train']} real training subjects;"
        f" LV Dice {lv['mean']:.3f} [95% CI {lv['ci95'][0]:.3f}, {lv['ci95'][1]:.3f}] on {report['n_val']}"
        f" real validation subjects; {report['seconds_per_volume_1_thread'] * 1000:.0f} ms per volume (1 thread)"
    )
    return 0
