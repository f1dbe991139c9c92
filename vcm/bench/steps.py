"""The ``steps`` benchmark: label fidelity against sampling steps, DDIM and DPM-Solver++ 2M, on a trained model.

For every sampler and step count, the first validation subjects of a finished run are sampled with its
trained control module from the evaluation's noise (seed ``evaluation.seed * 1_000_003 + row``: the same
noise for every sampler and step count), decoded and re-segmented with the run's QC segmenter. Per setting:

* the LV Dice of the re-segmentation against the subject's LV mask (its real label map's LV on the grid,
  as in the evaluation), and the paired difference from the reference (DDIM-200) with its bootstrap interval;
* the SSIM of each image to the reference image from the same noise (MONAI's SSIM, the evaluation's window):
  how far fewer steps move the picture;
* the wall seconds per volume of sampling and decoding (after a warm-up of each sampler; segmentation not
  included). Both samplers evaluate the network once per step, so on a machine shared with other work compare
  them in one quiet moment, not across rows taken minutes apart.

The fewest steps per sampler whose mean LV Dice is within ``--tolerance`` (0.01, either way) of the reference's
is the rule for ``cohort.sampler`` / ``cohort.steps`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vcm.bench.common import add_run_arguments, ints, run_inputs, write_result

__all__ = ["add_parser", "bench_steps", "fewest_steps", "plot_steps", "run"]

REFERENCE = "ddim"
"""The reference sampler (the paper's): every image is compared with its DDIM image from the same noise."""


@dataclass
class _Run:
    """A trained model with what it is sampled and scored with."""

    model: Any
    method: str
    backbone: Any
    data: Any  # vcm.evaluation.run.ValidationSet
    segment: Callable[[np.ndarray], np.ndarray]
    lv_labels: tuple[int, ...]
    seed: int
    batch_size: int
    ssim_kernel: int
    ssim_sigma: float
    device: Any
    control_scale: float = 1.0

    def sample(self, sampler: str, steps: int, limit: int | None = None) -> tuple[np.ndarray, float]:
        """Images of the subjects (the first ``limit``) and the wall seconds that sampling and decoding took."""
        import torch

        from vcm.diffusion import noise_from_seeds, sample_images
        from vcm.models.conditions import condition_tensor

        n = len(self.data.index) if limit is None else limit
        factor = self.backbone.downsample_factor
        latent = (self.backbone.latent_channels, *(s // factor for s in self.data.grid))
        seeds = self.data.seeds(self.seed)
        images, seconds = [], 0.0
        for lo in range(0, n, self.batch_size):
            sl = slice(lo, min(lo + self.batch_size, n))
            noise = noise_from_seeds(seeds[sl], latent, device=self.device)
            cov = self.data.covariates[sl].to(self.device)
            cond = {
                k: condition_tensor(k, x[sl], self.data.n_semantic).to(self.device)
                for k, x in self.data.conditions.items()
            }
            start = time.perf_counter()
            images.append(
                sample_images(
                    self.model,
                    self.method,
                    self.backbone,
                    cond,
                    cov,
                    noise,
                    sampler,
                    steps,
                    control_scale=self.control_scale,
                )
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds += time.perf_counter() - start
        return np.concatenate(images), seconds

    def lv_dice(self, images: np.ndarray) -> list[float]:
        """LV Dice of each image's re-segmentation against its subject's LV mask."""
        from vcm.labels import mask_dice, mask_of

        lvs = self.data.lv[: len(images)]
        return [
            mask_dice(mask_of(self.segment(x), self.lv_labels), lv) for x, lv in zip(images, lvs, strict=True)
        ]

    def ssim(self, images: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """SSIM of each image to the reference image of its subject."""
        from vcm.evaluation.metrics import image_metrics

        return image_metrics(images, reference, self.ssim_kernel, self.ssim_sigma, scales=1)["ssim"]


def _load(
    cfg: dict[str, Any],
    results: Path,
    bundle: Path,
    model_path: Path,
    n_subjects: int,
    device: Any,
) -> _Run:
    """The model, its backbone, the validation subjects and the QC segmenter, as the evaluation loads them."""
    from vcm.evaluation.run import load_controlled, read_validation
    from vcm.evaluation.segmenters import make_image_segmenter
    from vcm.evaluation.settings import EvalSettings

    settings = EvalSettings.from_config(cfg)
    model, meta, backbone = load_controlled(model_path, bundle, device)
    names = [n for g in meta["condition_groups"] for n, _ in g]
    lv_labels = tuple(cfg["conditions"]["lv_labels"])
    data = read_validation(results / "dataset.h5", names, lv_labels, n_subjects, model_path)
    segmenter = results / "models" / "qc_segmenter" / "segmenter.pt"
    segment = make_image_segmenter(cfg, "segmenter", None, data.affine, data.grid, segmenter)
    return _Run(
        model.eval(),
        meta["method"],
        backbone,
        data,
        segment,
        lv_labels,
        settings.seed,
        settings.batch_size,
        settings.ssim_kernel,
        settings.ssim_sigma,
        device,
        settings.control_scale,
    )


def bench_steps(
    cfg: dict[str, Any],
    results: str | Path,
    bundle: str | Path,
    model_path: str | Path,
    samplers: Sequence[str] = ("ddim", "dpmpp_2m"),
    steps: Sequence[int] = (10, 15, 20, 30, 50, 100, 200),
    n_subjects: int = 8,
    reference_steps: int = 200,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Sample every validation subject (the first ``n_subjects``) with each sampler and step count; score them.

    Args:
        cfg: the run's validated config (``evaluation`` seed, batch size and SSIM window; ``conditions``).
        results: a finished run's results folder (``dataset.h5``, ``models/qc_segmenter/segmenter.pt``).
        bundle: the backbone bundle the model was trained on.
        model_path: the trained ``vcm.pt``.
        samplers: names of :data:`vcm.diffusion.SAMPLERS`.
        steps: step counts.
        n_subjects: first validation subjects.
        reference_steps: steps of the reference, DDIM (200: the paper's).
        device: where to sample (default CUDA when available).
        progress: called with a line after every setting.

    Returns:
        one row per subject, sampler and step count: ``lv_dice``, ``ssim_to_reference``, ``s_per_volume``
        (of the whole setting); the reference, ``(ddim, reference_steps)``, is among them even when not asked.
    """
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = _load(cfg, Path(results), Path(bundle), Path(model_path), n_subjects, dev)
    for sampler in dict.fromkeys(
        [REFERENCE, *samplers]
    ):  # one-off costs (imports, oneDNN primitives) untimed
        run.sample(sampler, 2, limit=1)
    settings = [(REFERENCE, int(reference_steps))]
    settings += [(s, int(k)) for s in samplers for k in steps if (s, int(k)) != settings[0]]
    rows, reference = [], None
    for sampler, k in settings:
        images, seconds = run.sample(sampler, k)
        reference = images if reference is None else reference
        n = len(images)
        for i, (dice, ssim) in enumerate(zip(run.lv_dice(images), run.ssim(images, reference), strict=True)):
            rows.append(
                {
                    "subject": run.data.subjects[i],
                    "sampler": sampler,
                    "steps": k,
                    "lv_dice": dice,
                    "ssim_to_reference": float(ssim),
                    "s_per_volume": seconds / n,
                }
            )
        if progress is not None:
            dice = np.mean([r["lv_dice"] for r in rows[-n:]])
            progress(f"{sampler}-{k}: LV Dice {dice:.3f}, {seconds / n:.2f} s/volume")
    return pd.DataFrame(rows)


def summarise(per_subject: pd.DataFrame, reference_steps: int) -> pd.DataFrame:
    """One row per sampler and step count: means and sd over subjects, the paired LV Dice difference from the
    reference with its bootstrap 95 % interval, seconds per volume."""
    from vcm.stats import paired_difference

    ref = per_subject[(per_subject["sampler"] == REFERENCE) & (per_subject["steps"] == reference_steps)]
    ref_dice = ref.set_index("subject")["lv_dice"]
    rows = []
    for (sampler, steps), g in per_subject.groupby(["sampler", "steps"], sort=True):
        diff, low, high = paired_difference(g["lv_dice"].to_numpy(), ref_dice.loc[g["subject"]].to_numpy())
        rows.append(
            {
                "sampler": sampler,
                "steps": int(steps),
                "n": len(g),
                "lv_dice": g["lv_dice"].mean(),
                "lv_dice_sd": g["lv_dice"].std(ddof=1),
                "lv_dice_diff": diff,
                "lv_dice_diff_ci_low": low,
                "lv_dice_diff_ci_high": high,
                "ssim_to_reference": g["ssim_to_reference"].mean(),
                "ssim_sd": g["ssim_to_reference"].std(ddof=1),
                "s_per_volume": g["s_per_volume"].iloc[0],
            }
        )
    return pd.DataFrame(rows)


def fewest_steps(table: pd.DataFrame, tolerance: float = 0.01) -> dict[str, int | None]:
    """Per sampler, the fewest steps whose mean LV Dice is within ``tolerance`` of the reference's (either way:
    fewer steps that score higher have not converged to the reference either)."""
    out: dict[str, int | None] = {}
    for sampler, g in table.groupby("sampler", sort=False):
        ok = g[g["lv_dice_diff"].abs() <= tolerance]
        out[str(sampler)] = int(ok["steps"].min()) if len(ok) else None
    return out


def plot_steps(table: pd.DataFrame, path: str | Path, reference_steps: int, tolerance: float = 0.01) -> None:
    """Mean LV Dice and SSIM to the reference against steps, one line per sampler (log step axis).

    The Dice error bars are the bootstrap 95 % interval of the paired difference from the reference (the same
    subjects and noise in every setting; the spread between subjects is far wider and says nothing about the
    sampler), the grey band the reference's Dice ± ``tolerance``.
    """
    import matplotlib.pyplot as plt

    from vcm.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ref = table[(table["sampler"] == REFERENCE) & (table["steps"] == reference_steps)]
    if len(ref):
        dice = float(ref["lv_dice"].iloc[0])
        axes[0].axhspan(
            dice - tolerance,
            dice + tolerance,
            color="grey",
            alpha=0.2,
            label=f"DDIM-{reference_steps} ± {tolerance:g}",
        )
    for sampler, g in table.groupby("sampler", sort=False):
        g = g.sort_values("steps")
        err = [g["lv_dice_diff"] - g["lv_dice_diff_ci_low"], g["lv_dice_diff_ci_high"] - g["lv_dice_diff"]]
        axes[0].errorbar(g["steps"], g["lv_dice"], yerr=err, marker="o", capsize=2, label=sampler)
        axes[1].plot(g["steps"], g["ssim_to_reference"], marker="o", label=sampler)
    for ax, label in zip(axes, ("LV Dice (QC segmenter)", f"SSIM to DDIM-{reference_steps}"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("steps (network evaluations)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    n = int(table["n"].max())
    fig.suptitle(f"label fidelity vs steps, n = {n} validation subjects, same noise per subject", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``steps`` sub-command and its options."""
    p = sub.add_parser("steps", help="LV Dice and SSIM against sampling steps, DDIM and DPM-Solver++ 2M")
    add_run_arguments(p)
    p.add_argument("--samplers", default="ddim,dpmpp_2m", help="comma-separated")
    p.add_argument("--steps", type=ints, default=[10, 15, 20, 30, 50, 100, 200], help="e.g. 10,20,50")
    p.add_argument("--subjects", type=int, default=8, help="first N validation subjects")
    p.add_argument("--reference-steps", type=int, default=200, help="steps of the DDIM reference")
    p.add_argument("--tolerance", type=float, default=0.01, help="LV Dice from the reference still accepted")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--out", type=Path, default=None, help="CSV (default <results>/benchmarks/bench_steps.csv)"
    )
    return p


def run(args: argparse.Namespace) -> None:
    """Run the benchmark of the parsed ``args``; print the table and the fewest steps; write CSV, PNG, JSON."""
    import torch

    from vcm.evaluation.tables import markdown_table
    from vcm.io import atomic_path

    torch.set_num_threads(args.threads)
    cfg, bundle, model = run_inputs(args)
    samplers = [s for s in args.samplers.split(",") if s]
    per_subject = bench_steps(
        cfg,
        args.results,
        bundle,
        model,
        samplers,
        args.steps,
        args.subjects,
        args.reference_steps,
        args.device,
        progress=print,
    )
    table = summarise(per_subject, args.reference_steps)
    out = args.out or args.results / "benchmarks" / "bench_steps.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, frame in ((out.with_name(f"{out.stem}_subjects.csv"), per_subject), (out, table)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    plot_steps(table, out.with_suffix(".png"), args.reference_steps, args.tolerance)
    print(markdown_table(table.round(4)), end="")
    fewest = fewest_steps(table, args.tolerance)
    for sampler, k in fewest.items():
        within = f"{k} steps" if k is not None else "none of the step counts"
        print(f"{sampler}: {within} within {args.tolerance} LV Dice of DDIM-{args.reference_steps}")
    info = {
        "model": str(model),
        "bundle": str(bundle),
        "subjects": list(dict.fromkeys(per_subject["subject"])),
        "threads": args.threads,
        "tolerance": args.tolerance,
        "fewest_steps": fewest,
    }
    write_result(out.with_suffix(".json"), info)
    print(f"written: {out}, {out.with_suffix('.png')}")
