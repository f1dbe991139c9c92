"""The command lines of control-module training: ``train-vcm`` (train, then preview) and ``preview``.

Thin shells over :func:`~vcm.training.loop.train` and :func:`~vcm.training.preview.preview`: parse, call the
engine, print one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import vcm.training
from vcm.errors import StageError
from vcm.latents import bundle_sha256
from vcm.models.build import load_model
from vcm.stage import configure_runtime, stage_parser
from vcm.training.distributed import close_distributed, init_distributed, rank_and_world
from vcm.training.loop import TrainResult, train
from vcm.training.preview import preview, preview_summary, write_disabled_preview
from vcm.training.settings import Settings

__all__ = ["cli", "preview_cli"]


def _parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """The options both stages share: the config, the dataset, the backbone and the previews' Dice."""
    parser = stage_parser(stage, doc, threads=True, device=True)
    parser.add_argument("--dataset", required=True, help="dataset.h5")
    parser.add_argument("--bundle", required=True, help="backbone bundle folder")
    parser.add_argument("--template-dir", default=None, help="template for the previews' LV Dice (atlas)")
    parser.add_argument("--segmenter", default=None, help="QC segmenter.pt for the previews' LV Dice")
    return parser


def _train_parser() -> argparse.ArgumentParser:
    parser = _parser("train-vcm", vcm.training.__doc__)
    parser.add_argument("--latents", required=True, help="latents.h5")
    parser.add_argument("--condition-set", required=True)
    parser.add_argument("--size", type=int, required=True, help="training size: uses /splits/train_<size>")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--steps", type=int, default=None, help="override training.steps")
    parser.add_argument("--batch-size", type=int, default=None, help="override training.batch_size")
    parser.add_argument(
        "--minutes", type=float, default=None, help="override training.minutes (0: no time budget)"
    )
    parser.add_argument(
        "--method",
        choices=("vcm", "controlnet"),
        default=None,
        help="the method to train (default: the first of training.methods)",
    )
    parser.add_argument(
        "--modality-dropout",
        choices=("latent", "input", "none"),
        default=None,
        help="override training.modality_dropout (input: the ablation)",
    )
    parser.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after N steps")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-preview", action="store_true")
    return parser


def cli(argv: list[str]) -> int:
    """``python -m vcm train-vcm``: train one model (``--method``) for a condition set and size."""
    from vcm.config import load_config

    args = _train_parser().parse_args(argv)
    requested = configure_runtime(args)
    cfg = load_config(args.config)
    rank_device = init_distributed()  # joins torchrun's group; the local rank's GPU, else the CPU
    device = requested if args.device else rank_device
    try:
        result = train(
            cfg,
            args.dataset,
            args.latents,
            args.bundle,
            args.condition_set,
            args.size,
            args.out_dir,
            device=device,
            stop_after=args.stop_after,
            fresh=args.fresh,
            steps=args.steps,
            batch_size=args.batch_size,
            minutes=args.minutes,
            method=args.method,
            modality_dropout=args.modality_dropout,
        )
        rank, _ = rank_and_world()
    finally:
        close_distributed()
    if rank != 0:
        return 0
    print(_train_summary(args.out_dir, result))
    if result.model_path is None:  # stopped early on request
        return 0
    folder = Path(args.out_dir) / "preview"
    settings = Settings.from_config(cfg, method=args.method)
    if args.no_preview or settings.preview_subjects <= 0:
        write_disabled_preview(folder)
        return 0
    _preview_trained(cfg, args, result, settings, folder, device)
    return 0


def _train_summary(out_dir: str | Path, result: TrainResult) -> str:
    """The line ``train-vcm`` prints: where the model is, steps, final loss and speed (or where it stopped)."""
    if result.model_path is None:
        return f"{out_dir}: stopped at step {result.step} of {result.total_steps}; rerun to resume"
    rate = (result.step - result.resumed_from) / max(result.seconds, 1e-9)
    final = result.history["loss"][-1] if result.history["loss"] else float("nan")
    return (
        f"{result.model_path}: {result.step} steps ({result.extra.get('stopped')}), "
        f"final loss {final:.4f}, {result.seconds:.0f} s ({rate:.2f} steps/s over the whole run)"
    )


def _preview_trained(
    cfg: Mapping[str, Any],
    args: argparse.Namespace,
    result: TrainResult,
    settings: Settings,
    folder: Path,
    device: torch.device,
) -> None:
    """Preview the model just trained, as ``vcm.pt`` describes it, on the backbone it was trained on."""
    from vcm.models.backbone import load_bundle

    backbone = load_bundle(args.bundle, scale_factor=cfg["backbone"]["scale_factor"], device=device)
    meta = torch.load(result.model_path, map_location="cpu", weights_only=True)
    meta.pop("model")
    metrics = preview(
        result.model,
        meta,
        backbone,
        args.dataset,
        folder,
        n_subjects=settings.preview_subjects,
        steps=settings.preview_steps,
        sampler=settings.preview_sampler,
        seed=settings.preview_seed,
        template_dir=args.template_dir,
        lv_labels=cfg["conditions"]["lv_labels"],
        device=device,
        segmenter_path=args.segmenter,
        control_scale=cfg["cohort"]["control_scale"],
    )
    print(preview_summary(folder, metrics))


def preview_cli(argv: list[str]) -> int:
    """``python -m vcm preview``: controlled vs uncontrolled previews of a trained model."""
    from vcm.config import load_config
    from vcm.diffusion import SAMPLERS
    from vcm.models.backbone import load_bundle

    parser = _parser("preview", preview.__doc__)
    parser.add_argument("--model", required=True, help="vcm.pt")
    parser.add_argument("--out-dir", required=True, help="preview folder")
    parser.add_argument(
        "--subjects", type=int, default=None, help="validation subjects (default training.preview)"
    )
    parser.add_argument(
        "--sampler", choices=SAMPLERS, default=None, help="default training.preview / cohort.sampler"
    )
    parser.add_argument("--steps", type=int, default=None, help="default training.preview / cohort.steps")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    device = configure_runtime(args)
    cfg = load_config(args.config)
    settings = Settings.from_config(cfg)
    model, meta = load_model(args.model, device)
    if meta.get("backbone_sha256") and meta["backbone_sha256"] != bundle_sha256(args.bundle):
        raise StageError(f"{args.model} was trained on another backbone bundle than {args.bundle}")
    backbone = load_bundle(args.bundle, scale_factor=meta.get("scale_factor"), device=device)
    metrics = preview(
        model,
        meta,
        backbone,
        args.dataset,
        args.out_dir,
        n_subjects=args.subjects or settings.preview_subjects or 2,
        steps=args.steps or settings.preview_steps,
        sampler=args.sampler or settings.preview_sampler,
        seed=settings.preview_seed if args.seed is None else args.seed,
        template_dir=args.template_dir,
        lv_labels=cfg["conditions"]["lv_labels"],
        device=device,
        segmenter_path=args.segmenter,
        control_scale=cfg["cohort"]["control_scale"],
    )
    print(preview_summary(Path(args.out_dir), metrics))
    return 0
