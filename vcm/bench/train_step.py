"""The ``train`` benchmark: seconds and peak memory of one VCM training step per batch size.

The step is the one ``train-vcm`` takes, on random-weight networks of either scale (:mod:`vcm.bench.networks`)
and random latents and conditions of the scale's shapes, with or without activation checkpointing of the
full-resolution encoders. A batch size that runs out of memory is reported as such, not as a failure.
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable
from pathlib import Path

from vcm.bench.common import REPO, PeakMemory, ints, out_of_memory, synchronizer, write_result
from vcm.bench.networks import SCALES, VCM_WIDTHS, random_backbone, random_vcm

__all__ = ["add_parser", "bench_train", "run"]


def bench_train(
    scale: str,
    batch_sizes: list[int],
    steps: int,
    condset: str,
    widths: str,
    checkpointing: bool,
    threads: int,
    device: str | None,
    grid: tuple[int, ...] | None = None,
    prior_bank: bool = False,
) -> dict:
    """Seconds and peak memory of one VCM training step per batch size, on random-weight networks.

    The step is the one ``train-vcm`` takes: the frozen backbone's noise prediction (no grad), VCM's
    modulation, eq. 4 (:func:`vcm.train.training_loss`), backward and AdamW, under bf16 autocast on CUDA; the
    latents and conditions are random tensors of the scale's shapes. One warm-up step per batch size, then
    ``steps`` timed. A batch size that runs out of memory is reported as such, not as a failure.
    ``prior_bank``: the backbone's prediction is computed before the clock starts, as a step that draws from
    a :class:`~vcm.training.prior_bank.PriorBank` (``training.prior_reuse`` > 1) takes it.
    """
    import torch

    from vcm.config import load_config
    from vcm.models.conditions import condition_groups
    from vcm.training.loss import training_loss

    torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = synchronizer(dev)
    grid = tuple(grid or SCALES[scale])
    backbone, backbone_desc = random_backbone(scale, dev)
    groups = condition_groups(load_config(REPO / "config" / "config.yaml"), condset)
    vcm = random_vcm(backbone, groups, widths, dev, checkpointing).train()
    optimizer = torch.optim.AdamW(vcm.parameters(), lr=5e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    latent = backbone.latent_shape(grid)
    gen = torch.Generator().manual_seed(0)

    def step(b: int) -> float:
        z_t = torch.randn(b, *latent, generator=gen).to(dev)
        noise = torch.randn(b, *latent, generator=gen).to(dev)
        t = torch.randint(0, 1000, (b,), generator=gen).to(dev)
        cov = torch.rand(b, 1, 4, generator=gen).to(dev)
        conds = {n: torch.rand(b, c, *grid, generator=gen).round().to(dev) for g in groups for n, c in g}
        eps_t = None
        if prior_bank:
            with torch.no_grad(), autocast:
                eps_t = backbone.eps(z_t, t, cov)
        sync()
        start = time.perf_counter()
        with autocast:
            loss = training_loss(vcm, vcm, backbone, z_t, t, noise, cov, conds, eps_t=eps_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    rows = [_time_batch(step, b, steps, dev, optimizer) for b in batch_sizes]
    return {
        "scale": scale,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({threads} threads)",
        "grid": list(grid),
        "latent": list(latent),
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "activation_checkpointing": checkpointing,
        "prior_bank": prior_bank,
        "backbone": backbone_desc,
        "backbone_diffusion_parameters_M": round(
            sum(p.numel() for p in backbone.diffusion.parameters()) / 1e6, 2
        ),
        "vcm": f"random weights, {widths} widths, condition set {condset}",
        "vcm_parameters_M": round(sum(p.numel() for p in vcm.parameters()) / 1e6, 2),
        "timed_steps": steps,
        "notes": ["random weights: timing and memory only"],
        "batches": rows,
    }


def _time_batch(step: Callable[[int], float], b: int, steps: int, dev, optimizer) -> dict:
    """One batch size's row: a warm-up step, then the median of ``steps`` timed ones and the peak memory."""
    import numpy as np
    import torch

    row: dict = {"batch_size": b}
    try:
        with PeakMemory(dev) as mem:
            step(b)  # warm-up: allocator, cuDNN / oneDNN algorithm choice
            times = [step(b) for _ in range(steps)]
        row.update(
            s_per_step=round(float(np.median(times)), 4),
            s_per_sample=round(float(np.median(times)) / b, 4),
            peak_memory_mb=round(mem.peak_mb, 1),
        )
    except RuntimeError as err:  # CUDA's OutOfMemoryError is one; the CPU allocator raises a plain one
        if not out_of_memory(err):
            raise
        row["out_of_memory"] = str(err).splitlines()[0][:200]
    optimizer.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_train(r: dict) -> None:
    """The result of :func:`bench_train` for people."""
    print(
        f"VCM training step on {r['device']}: grid {r['grid']}, latent {r['latent']}, {r['precision']}, "
        f"activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}, "
        f"backbone prediction {'from a bank' if r.get('prior_bank') else 'in the step'} [{', '.join(r['notes'])}]"
    )
    print(f"  backbone: {r['backbone']} ({r['backbone_diffusion_parameters_M']} M diffusion parameters)")
    print(f"  VCM: {r['vcm']} ({r['vcm_parameters_M']} M parameters)")
    for row in r["batches"]:
        if "out_of_memory" in row:
            print(f"  batch {row['batch_size']}: out of memory ({row['out_of_memory']})")
        else:
            print(
                f"  batch {row['batch_size']}: {row['s_per_step']:.3f} s/step ({row['s_per_sample']:.3f} s/sample), "
                f"peak memory {row['peak_memory_mb'] / 1024:.2f} GB (median of {r['timed_steps']} steps)"
            )


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``train`` sub-command and its options."""
    trn = sub.add_parser("train", help="VCM training step: seconds and peak memory per batch size")
    trn.add_argument("--batch-sizes", type=ints, default=[2, 16], help="comma-separated, e.g. 2,16")
    trn.add_argument("--steps", type=int, default=5, help="timed steps per batch size (after one warm-up)")
    trn.add_argument("--condition-set", dest="condset", default="lv_brain_skull")
    widths = [*sorted(VCM_WIDTHS), "config"]
    trn.add_argument("--widths", choices=widths, default="paper", help="config: training.vcm of the config")
    trn.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the encoders")
    trn.add_argument(
        "--prior-bank",
        action="store_true",
        help="the backbone's prediction from a bank (training.prior_reuse)",
    )
    trn.add_argument("--threads", type=int, default=1)
    trn.add_argument("--device", default=None)
    trn.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "bench_train.json")
    trn.add_argument("--scale", choices=sorted(SCALES), default="demo", help="demo grid or BrainLDM's")
    trn.add_argument("--grid", type=ints, default=None, help="override the scale's grid, e.g. 32,48,32")
    return trn


def run(args: argparse.Namespace) -> None:
    """Run the benchmark of the parsed ``args``, print it and write the JSON."""
    r = bench_train(**{k: getattr(args, k) for k in inspect.signature(bench_train).parameters})
    print_train(r)
    write_result(args.out, r)
