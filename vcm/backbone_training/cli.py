"""The ``train-backbone`` command line: a thin shell over :func:`vcm.backbone_training.train.train_backbone`.

It parses the options (the networks' sizes, each stage's budget and optimiser), builds the network
definitions for the corpus' grid and the two stages' options, calls the engine and prints one line.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import vcm.backbone_training
from vcm.backbone_training.autoencoder import AEOptions
from vcm.backbone_training.corpus import load_corpus
from vcm.backbone_training.decoder import DecoderOptions
from vcm.backbone_training.diffusion import LDMOptions
from vcm.backbone_training.samples import samples_figure
from vcm.backbone_training.train import refine_bundle, train_backbone
from vcm.errors import StageError
from vcm.stage import configure_runtime, stage_parser

__all__ = ["build_parser", "cli", "definitions_from_args"]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _bools(text: str) -> list[bool]:
    return [v.strip().lower() in ("1", "true", "t", "yes", "y") for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m vcm train-backbone``."""
    p = stage_parser("train-backbone", vcm.backbone_training.__doc__, config=False)
    p.add_argument("--data", required=True, help="training HDF5 in the dataset.h5 layout")
    p.add_argument("--work-dir", required=True, help="checkpoints, loss logs, latents (resumable)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    # not stage_parser's --threads/--device: this stage defaults to one thread on the CPU
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoint_latest.pt")
    _add_autoencoder_options(p.add_argument_group("autoencoder"))
    _add_diffusion_options(p.add_argument_group("latent diffusion"))
    _add_decoder_options(p.add_argument_group("decoder refinement (stage 4, off unless given a budget)"))
    p.add_argument("--no-samples", action="store_true", help="skip samples.png (tests)")
    p.add_argument(
        "--samples-only", action="store_true", help="only redraw samples.png of the existing bundle --out"
    )
    return p


def _add_region_options(group: argparse._ArgumentGroup, prefix: str, default_weight: float) -> None:
    """``--<prefix>-region-weight`` and ``--<prefix>-region-margin``: the stage's L1 weighted near the
    ventricles (:mod:`vcm.backbone_training.region`; the corpus' ``/label``)."""
    group.add_argument(
        f"--{prefix}-region-weight",
        type=float,
        default=default_weight,
        help="extra L1 weight near the ventricles: each voxel there counts 1 + this (0: off)",
    )
    group.add_argument(
        f"--{prefix}-region-margin", type=int, default=2, help="ventricles dilated by this many voxels"
    )


def _add_autoencoder_options(a: argparse._ArgumentGroup) -> None:
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
    _add_region_options(a, "ae", default_weight=0.0)
    a.add_argument("--adv-weight", type=float, default=0.0, help="patch-adversarial weight (0: off)")
    a.add_argument("--adv-start", type=int, default=0, help="step at which the adversarial term starts")
    a.add_argument("--ae-val-every", type=int, default=100)


def _add_diffusion_options(d: argparse._ArgumentGroup) -> None:
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


def _add_decoder_options(d: argparse._ArgumentGroup) -> None:
    d.add_argument("--dec-steps", type=int, default=0, help="decoder refinement steps (0: no refinement)")
    d.add_argument("--dec-minutes", type=float, default=None)
    d.add_argument("--dec-batch", type=int, default=2)
    d.add_argument("--dec-lr", type=float, default=5e-4)
    _add_region_options(d, "dec", default_weight=5.0)
    d.add_argument(
        "--dec-latent-noise",
        type=float,
        default=0.0,
        help="extra noise on the decoded latents, as a fraction of their std (0: none)",
    )
    d.add_argument("--dec-val-every", type=int, default=200)
    d.add_argument(
        "--from-bundle",
        default=None,
        help="refine the decoder of this trained bundle instead of training stages 1-3 (needs --dec-steps)",
    )


def definitions_from_args(args: argparse.Namespace, grid: Sequence[int]) -> dict[str, Any]:
    """The backbone definitions the options describe, for images on ``grid``."""
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


def _stage_options(args: argparse.Namespace, device: str) -> tuple[AEOptions, LDMOptions, DecoderOptions]:
    """The stages' training options from the command line (``--ae-*``, ``--dm-*``, ``--dec-*``)."""

    def common(prefix: str) -> dict[str, Any]:
        return {
            "steps": getattr(args, f"{prefix}_steps"),
            "minutes": getattr(args, f"{prefix}_minutes"),
            "batch_size": getattr(args, f"{prefix}_batch"),
            "lr": getattr(args, f"{prefix}_lr"),
            "val_every": getattr(args, f"{prefix}_val_every"),
            "checkpoint_every": args.checkpoint_every,
            "seed": args.seed,
            "device": device,
        }

    ae_opts = AEOptions(
        **common("ae"),
        kl_weight=args.kl_weight,
        init_sigma=args.ae_init_sigma,
        crop=tuple(args.ae_crop) if args.ae_crop else None,
        adv_weight=args.adv_weight,
        adv_start=args.adv_start,
        region_weight=args.ae_region_weight,
        region_margin=args.ae_region_margin,
    )
    ldm_opts = LDMOptions(
        **common("dm"),
        ema_decay=args.ema_decay,
        sample_every=args.sample_every,
        sample_ddim_steps=args.ddim_steps,
    )
    dec_opts = DecoderOptions(
        **common("dec"),
        region_weight=args.dec_region_weight,
        region_margin=args.dec_region_margin,
        latent_noise=args.dec_latent_noise,
    )
    return ae_opts, ldm_opts, dec_opts


def cli(argv: list[str]) -> int:
    """``python -m vcm train-backbone``: train the tiny backbone and write its bundle (or only its samples)."""
    args = build_parser().parse_args(argv)
    device = str(configure_runtime(args))
    with contextlib.suppress(RuntimeError):  # one inter-op thread; fails when already set in this process
        torch.set_num_interop_threads(1)
    started = time.monotonic()
    ae_opts, ldm_opts, dec_opts = _stage_options(args, device)
    corpus = load_corpus(args.data, labels=dec_opts.enabled or ae_opts.uses_region)
    out = Path(args.out)
    command = "python -m vcm train-backbone " + shlex.join(argv)
    if args.samples_only:
        from vcm.models.backbone import load_bundle

        samples_figure(out / "samples.png", load_bundle(out, device=device), corpus, args.ddim_steps)
        print(f"samples: {out / 'samples.png'}")
        return 0
    if args.from_bundle:
        refine_bundle(
            corpus,
            Path(args.from_bundle),
            Path(args.work_dir),
            out,
            dec_opts,
            samples=not args.no_samples,
            ddim_steps=args.ddim_steps,
            command=command,
            threads=args.threads,
            started=started,
        )
        print(f"bundle: {out} (decoder refined from {args.from_bundle})")
        return 0
    train_backbone(
        corpus,
        definitions_from_args(args, corpus.grid),
        Path(args.work_dir),
        out,
        ae_opts,
        ldm_opts,
        dec_opts=dec_opts,
        samples=not args.no_samples,
        command=command,
        threads=args.threads,
        started=started,
    )
    print(f"bundle: {out}")
    return 0
