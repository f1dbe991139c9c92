"""The ``layout`` benchmark: seconds of the demo's CPU steps with the networks' weights in PyTorch's default
layout (NCDHW) and channels-last (NDHWC, :func:`vcm.models.layout.place`), and their ratio, in one run.

Each case is built twice from the same seed, one copy per layout, on random weights of the demo's shapes; the
two are timed alternately (one warm-up step each, then ``repeats`` rounds), so that a machine's drift in load
falls on both. The ratio is default / channels-last: above 1, channels-last is faster.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from vcm.bench.common import REPO, write_result

__all__ = ["CASES", "add_parser", "bench_layout", "run"]

GRID = (40, 56, 40)
"""The demo grid."""


def _layout(module, channels_last: bool):
    import torch

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return module.to(memory_format=fmt)


def _vcm_step(channels_last: bool, train: bool) -> Callable[[], None]:
    """VCM's training step (batch 4, the config's noise draws) or one sampling evaluation (backbone + VCM)."""
    import torch

    from vcm.bench.networks import random_backbone, random_vcm
    from vcm.config import load_config
    from vcm.models.conditions import condition_groups
    from vcm.training.loss import training_loss

    cfg = load_config(REPO / "config" / "config.yaml")
    draws = int(cfg["training"].get("noise_draws", 1)) if train else 1
    groups = condition_groups(cfg, "lv_brain_skull")
    backbone = _layout(random_backbone("demo", "cpu")[0], channels_last)
    vcm = _layout(random_vcm(backbone, groups, "config", "cpu"), channels_last).train(train)
    opt = torch.optim.AdamW(vcm.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    b = 4
    rows = b * draws
    latent = backbone.latent_shape(GRID)
    z_t, noise = torch.randn(rows, *latent, generator=gen), torch.randn(rows, *latent, generator=gen)
    t, cov = torch.randint(0, 1000, (rows,), generator=gen), torch.rand(rows, 1, 4, generator=gen)
    conds = {n: torch.rand(b, c, *GRID, generator=gen).round() for g in groups for n, c in g}

    def step() -> None:
        if not train:
            with torch.no_grad():
                vcm(z_t, backbone.eps(z_t, t, cov), t, conds)
            return
        loss = training_loss(
            vcm, vcm, backbone, z_t, t, noise, cov, conds, draws=draws, l1_scale=0.0, weighting="backbone"
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _decoder_step(channels_last: bool) -> Callable[[], None]:
    """The decoder refinement's step: decode a batch of 2 latents, L1, backward, AdamW on the decoder."""
    import torch

    from vcm.bench.networks import random_backbone

    backbone = random_backbone("demo", "cpu")[0]
    ae = _layout(backbone.autoencoder, channels_last).requires_grad_(True)
    params = [*ae.decoder.parameters(), *ae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    latent = backbone.latent_shape(GRID)
    z = torch.randn(2, *latent, generator=gen)
    target = torch.rand(2, 1, *GRID, generator=gen)

    def step() -> None:
        loss = (ae.decode(z) - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _segmenter_step(channels_last: bool) -> Callable[[], None]:
    """The QC segmenter's training step: MONAI's U-Net of the default spec, batch 4, Dice + CE, Adam."""
    import torch
    from monai.losses import DiceCELoss

    from vcm.models.segmenter import SegmenterSpec, build_unet

    spec = SegmenterSpec()
    torch.manual_seed(0)
    net = _layout(build_unet(spec.channels, spec.strides, spec.num_res_units, 3), channels_last)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(4, 1, *GRID, generator=gen)
    label = torch.randint(0, 4, (4, 1, *GRID), generator=gen)

    def step() -> None:
        loss = loss_fn(net(image), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


CASES: dict[str, Callable[[bool], Callable[[], None]]] = {
    "vcm_train": lambda cl: _vcm_step(cl, train=True),
    "vcm_sample": lambda cl: _vcm_step(cl, train=False),
    "decoder_train": _decoder_step,
    "segmenter_train": _segmenter_step,
}
"""Case name -> builder of its step in one layout (``True``: channels-last)."""


def bench_layout(cases: list[str], repeats: int, threads: int) -> dict:
    """Median seconds per step of each case in both layouts, timed alternately, and their ratio."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    rows = []
    for name in cases:
        steps = {cl: CASES[name](cl) for cl in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for cl in (False, True):
            steps[cl]()  # warm-up: allocator, oneDNN's kernel choice
        for _ in range(repeats):
            for cl in (False, True):
                start = time.perf_counter()
                steps[cl]()
                times[cl].append(time.perf_counter() - start)
        default, last = (float(np.median(times[cl])) for cl in (False, True))
        rows.append(
            {
                "case": name,
                "s_default": round(default, 4),
                "s_channels_last": round(last, 4),
                "ratio": round(default / last, 3),
            }
        )
    return {"device": f"cpu ({threads} threads)", "grid": list(GRID), "repeats": repeats, "cases": rows}


def print_layout(r: dict) -> None:
    """The result of :func:`bench_layout` for people."""
    print(f"3-D convolution layout on {r['device']}, demo grid {r['grid']}, median of {r['repeats']} steps:")
    for row in r["cases"]:
        print(
            f"  {row['case']:16s} default {row['s_default']:.3f} s, channels-last {row['s_channels_last']:.3f} s:"
            f" {row['ratio']:.2f}x"
        )


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``layout`` sub-command and its options."""
    p = sub.add_parser("layout", help="CPU steps in the default vs the channels-last layout")
    p.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES), help="comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per case (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "bench_layout.json")
    return p


def run(args: argparse.Namespace) -> None:
    """Run the benchmark of the parsed ``args``, print it and write the JSON."""
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)} (known: {', '.join(CASES)})")
    r = bench_layout(args.cases, args.repeats, args.threads)
    print_layout(r)
    write_result(args.out, r)
