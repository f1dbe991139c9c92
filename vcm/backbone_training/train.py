"""The whole ``train-backbone`` stage: corpus to bundle, with the training record that says how it was made.

:func:`train_backbone` runs the stages in order (autoencoder, latents, latent U-Net, optionally the decoder
refinement), each resumable in its own folder of the work folder, then writes the bundle (float16 weights), its
``samples.png``, the loss plots and ``training_record.json``. :func:`refine_bundle` runs the decoder refinement
alone on a bundle that is already trained.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcm.backbone_training.autoencoder import AEOptions, load_or_encode_latents, train_autoencoder
from vcm.backbone_training.corpus import Corpus
from vcm.backbone_training.decoder import DecoderOptions, refine_decoder
from vcm.backbone_training.diffusion import LDMOptions, train_diffusion
from vcm.backbone_training.loop import StageSummary
from vcm.backbone_training.samples import samples_figure
from vcm.errors import StageError

__all__ = ["RECORD_FILE", "refine_bundle", "train_backbone"]

logger = logging.getLogger(__name__)

RECORD_FILE = "training_record.json"
LOSS_PLOTS = {"ae": "loss_autoencoder.png", "ldm": "loss_diffusion.png", "dec": "loss_decoder.png"}
"""The stages' ``loss.png``, copied into the bundle under these names."""


def train_backbone(
    corpus: Corpus,
    definitions: dict[str, Any],
    work: Path,
    out: Path,
    ae_opts: AEOptions,
    ldm_opts: LDMOptions,
    *,
    dec_opts: DecoderOptions | None = None,
    samples: bool = True,
    command: str = "",
    threads: int | None = None,
    started: float | None = None,
) -> Path:
    """Train the autoencoder, encode the latents, train the latent U-Net and write the bundle ``out``.

    Args:
        corpus: the training images and covariates.
        definitions: the backbone definitions (:func:`vcm.models.backbone.tiny_definitions` with ``grid``);
            ``scale_factor`` is set here from the latents.
        work: the work folder: ``ae/``, ``ldm/`` (checkpoints, loss logs) and the cached latents.
        out: the bundle folder to write.
        ae_opts: how the autoencoder trains.
        ldm_opts: how the latent U-Net trains; ``sample_ddim_steps`` also sets the DDIM steps of
            ``samples.png``.
        dec_opts: how the decoder is refined afterwards (``None`` or no budget: not at all).
        samples: draw the bundle's ``samples.png``.
        command: the command line, for the training record.
        threads: torch's CPU threads, for the training record.
        started: ``time.monotonic()`` when the run began (default: now), for the record's wall time.

    Returns:
        the bundle folder.
    """
    from vcm.io import write_json
    from vcm.models.backbone import Backbone, save_bundle

    started = time.monotonic() if started is None else started
    work, out = Path(work), Path(out)
    logger.info(
        "corpus %s: %d images on %s, %d train, %d held out",
        corpus.path,
        corpus.images.shape[0],
        "×".join(map(str, corpus.grid)),
        len(corpus.train),
        len(corpus.val),
    )
    defs = dict(definitions)
    ae_defs = {k: v for k, v in defs.items() if k not in ("diffusion", "scale_factor")}
    ae, ae_summary = train_autoencoder(corpus, ae_defs, work / "ae", ae_opts)
    ae.requires_grad_(False).eval()

    latents = load_or_encode_latents(ae, corpus, work, ae_defs)
    std = float(latents["train"].std())
    defs["scale_factor"] = 1.0 / std
    logger.info("latent std %.4f -> scale_factor %.4f", std, defs["scale_factor"])

    hook = _sample_hook(ae, defs, corpus, work / "ldm", ldm_opts.sample_ddim_steps)
    dm, dm_summary = train_diffusion(latents, ae, defs, work / "ldm", ldm_opts, hook)
    stages: dict[str, tuple[StageSummary, Any]] = {
        "autoencoder": (ae_summary, ae_opts),
        "diffusion": (dm_summary, ldm_opts),
    }
    if dec_opts is not None and dec_opts.enabled:
        ae, dec_summary = refine_decoder(ae, corpus, ae_defs, work / "dec", dec_opts)
        stages["decoder"] = (dec_summary, dec_opts)
    backbone = Backbone(ae, dm, scale_factor=defs["scale_factor"], definitions=defs)
    save_bundle(out, backbone, dtype=torch.float16)
    if samples:
        samples_figure(out / "samples.png", backbone, corpus, ldm_opts.sample_ddim_steps)
    _copy_loss_plots(work, out)
    record = _training_record(
        corpus,
        backbone,
        out,
        latent_shape=list(latents["train"].shape[1:]),
        latent_std=std,
        stages=stages,
        command=command,
        threads=threads,
        wall_s=time.monotonic() - started,
    )
    write_json(out / RECORD_FILE, record)
    return out


def refine_bundle(
    corpus: Corpus,
    bundle: Path,
    work: Path,
    out: Path,
    dec_opts: DecoderOptions,
    *,
    samples: bool = True,
    ddim_steps: int = 50,
    command: str = "",
    threads: int | None = None,
    started: float | None = None,
) -> Path:
    """Refine the decoder of the trained bundle ``bundle`` (stage 4 alone) and write the bundle ``out``.

    Only ``models/autoencoder.pt`` changes: the other files are copied as they are (the latent U-Net stays
    valid because the encoder is frozen); ``training_record.json`` keeps the source's record and gains the
    ``decoder`` stage and a ``decoder_refinement`` entry (data, command, date, software).

    Args:
        corpus: the training images and label maps.
        bundle: the trained bundle folder (written by this stage, with ``configs/network.json``).
        work: the work folder (``dec/``: checkpoints, loss log).
        out: the bundle folder to write (may be ``bundle`` itself).
        dec_opts: how the decoder is refined.
        samples: redraw ``samples.png``.
        ddim_steps: DDIM steps of ``samples.png``.
        command: the command line, for the training record.
        threads: torch's CPU threads, for the training record.
        started: ``time.monotonic()`` when the run began (default: now), for the record's wall time.
    """
    import json

    from vcm.io import provenance, save_torch, sha256_file, write_json
    from vcm.models.backbone import AUTOENCODER_FILE, load_bundle

    started = time.monotonic() if started is None else started
    bundle, out, work = Path(bundle), Path(out), Path(work)
    if not dec_opts.enabled:
        raise StageError("--from-bundle refines the decoder: give it a budget (--dec-steps or --dec-minutes)")
    backbone = load_bundle(bundle, device=dec_opts.device)
    if backbone.definitions is None:
        raise StageError(f"{bundle}: no configs/network.json: only bundles written by train-backbone")
    ae_defs = {k: v for k, v in backbone.definitions.items() if k not in ("diffusion", "scale_factor")}
    source_record = bundle / RECORD_FILE
    record = json.loads(source_record.read_text()) if source_record.is_file() else {}
    ae, summary = refine_decoder(backbone.autoencoder, corpus, ae_defs, work / "dec", dec_opts)
    if out.resolve() != bundle.resolve():
        shutil.copytree(bundle, out, dirs_exist_ok=True)
    state = {k: v.detach().cpu() for k, v in ae.state_dict().items()}
    save_torch(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out / AUTOENCODER_FILE
    )
    if samples:
        samples_figure(out / "samples.png", load_bundle(out, device=dec_opts.device), corpus, ddim_steps)
    _copy_loss_plots(work, out)
    prov = provenance(None)
    record["decoder"] = {**summary.__dict__, "options": dec_opts.__dict__}
    record["decoder_refinement"] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "from_bundle": str(bundle),
        "data": {"file": str(corpus.path), "sha256": sha256_file(corpus.path)},
        "threads": threads,
        "device": str(dec_opts.device),
        "wall_s_this_run": round(time.monotonic() - started, 1),
        "versions": _versions(prov),
    }
    record["bundle_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    write_json(out / RECORD_FILE, record)
    return out


def _sample_hook(
    ae: nn.Module, defs: dict[str, Any], corpus: Corpus, folder: Path, ddim_steps: int
) -> Callable[[nn.Module, int], None]:
    """Intermediate ``samples_stepNNNNNN.png`` of the EMA U-Net while it trains."""
    from vcm.models.backbone import Backbone

    def hook(ema: nn.Module, step: int) -> None:
        samples_figure(
            folder / f"samples_step{step:06d}.png",
            Backbone(ae, ema, scale_factor=defs["scale_factor"], definitions=defs),
            corpus,
            ddim_steps,
            # the bundle's samples.png seeds (the default): one seed's draw can hide what the covariates do
            title=f"step {step}: real, reconstruction, DDIM-{ddim_steps} samples (EMA)",
        )

    return hook


def _copy_loss_plots(work: Path, out: Path) -> None:
    from vcm.io import atomic_path

    for stage, name in LOSS_PLOTS.items():
        if (work / stage / "loss.png").is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(work / stage / "loss.png", tmp)


def _versions(prov: dict[str, Any]) -> dict[str, Any]:
    """The software versions of a training record, from :func:`vcm.io.provenance`."""
    return {k: prov[k] for k in ("vcm_version", "vcm_git_sha", "python", "torch_version", "monai_version")}


def _training_record(
    corpus: Corpus,
    backbone: Any,
    out: Path,
    *,
    latent_shape: list[int],
    latent_std: float,
    stages: dict[str, tuple[StageSummary, Any]],
    command: str,
    threads: int | None,
    wall_s: float,
) -> dict[str, Any]:
    """``training_record.json``: the data, the networks, each stage's figures and options, the software."""
    from vcm.io import provenance, sha256_file
    from vcm.models.backbone import count_parameters

    prov = provenance(None)
    ae_opts = stages["autoencoder"][1]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
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
            "latent_shape": latent_shape,
            "scale_factor": backbone.definitions["scale_factor"],
            "latent_std": latent_std,
            "weights_dtype": "float16 (loaded as float32)",
        },
        **{name: {**summary.__dict__, "options": opts.__dict__} for name, (summary, opts) in stages.items()},
        "threads": threads,
        "device": str(ae_opts.device),
        "seed": ae_opts.seed,
        "wall_s_this_run": round(wall_s, 1),
        "bundle_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "versions": _versions(prov),
        "host": prov["host"],
        "cpu_count": os.cpu_count(),
    }
