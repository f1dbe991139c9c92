"""The ``sample`` benchmark: seconds per synthetic volume of the naive, production and backbone-only samplers.

All three run in one process on the same inputs (validation subjects of ``dataset.h5``, or blobs) and the same
noise: the naive loop (batch 1, VCM's condition encoder at every step, fp32), the production sampler of
``generate-shard`` (batched, encoder features once per sample, bf16 on CUDA) and the backbone alone (the floor:
same steps, same batching, no VCM). Timings at a few DDIM steps are extrapolated to a full run from the
measured per-step and one-off costs.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcm.bench.common import REPO, PeakMemory, ints, synchronizer, timed, write_result
from vcm.bench.networks import SCALES, VCM_WIDTHS, random_backbone, random_vcm

__all__ = ["add_parser", "bench_sample", "print_sample", "run"]


def bench_sample(
    dataset: Path | None,
    bundle: Path | None,
    model: Path | None,
    condset: str,
    volumes: int,
    steps: int,
    extrapolate_to: int,
    widths: str,
    threads: int,
    device: str | None,
    chunk: int = 1,
    scale: str = "demo",
    grid: tuple[int, ...] | None = None,
    repeats: int = 1,
    profile: Path | None = None,
) -> dict:
    """Time the naive, production and backbone-only samplers on the same inputs (see the module docstring).

    ``scale="brainldm"`` ignores ``dataset`` and ``bundle`` (random BrainLDM networks, blob conditions);
    ``grid`` overrides the scale's image grid (a smoke run of the BrainLDM networks on a small grid).
    ``repeats`` alternates the production and floor runs that many times and keeps each one's median run
    (the naive loop, ~10x slower, runs once). ``profile`` writes a torch.profiler table of one more
    production run there (:func:`profile_run`).

    Returns:
        per sampler: wall and CPU seconds per volume (measured at ``steps`` and extrapolated to
        ``extrapolate_to`` DDIM steps from the measured per-step and one-off costs), peak memory; the ratios,
        the images' max abs difference naive vs production and its tolerance; what the weights were.
    """
    import torch

    from vcm.cohort.plan import noise_seed
    from vcm.cohort.sampler import CohortSampler

    torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone, backbone_desc, vcm, groups, model_desc, notes = _networks(
        scale, bundle, model, condset, widths, dev
    )
    names = [n for g in groups for n, _ in g]
    grid = tuple(grid or SCALES[scale])
    conds, cov, grid, inputs_desc = _sample_inputs(dataset if scale == "demo" else None, names, volumes, grid)
    seeds = [noise_seed(0, i) for i in range(volumes)]
    n_sem = 8
    production = CohortSampler(vcm, "vcm", backbone, grid, "ddim", steps, volumes, chunk, n_sem, dev)
    floor = CohortSampler(None, "vcm", backbone, grid, "ddim", steps, volumes, chunk, n_sem, dev)
    latent = production.latent_shape
    naive = _NaiveSampler(vcm, backbone, names, conds, cov, seeds, latent, n_sem, dev)

    # warm-up: one-off costs (allocator, oneDNN primitives) are not what is being compared
    naive.decode(naive.latents(0, 1))
    for s in (production, floor):
        s.steps = 1
        s.sample(conds, cov, seeds)
        s.steps = steps

    sync = synchronizer(dev)
    results = {"naive": _time_naive(naive, volumes, steps, dev, sync)}
    results.update(_time_batched(production, floor, conds, cov, seeds, repeats, dev, sync))
    out: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({threads} threads)",
        "scale": scale,
        "grid": list(grid),
        "latent": list(latent),
        "volumes": volumes,
        "steps": steps,
        "extrapolated_to_steps": extrapolate_to,
        "batch_size": volumes,
        "decode_chunk": chunk,
        "repeats": repeats,
        "backbone": backbone_desc,
        "backbone_diffusion_parameters_M": round(
            sum(p.numel() for p in backbone.diffusion.parameters()) / 1e6, 2
        ),
        "vcm": model_desc,
        "vcm_parameters_M": round(sum(p.numel() for p in vcm.parameters()) / 1e6, 2),
        "inputs": inputs_desc,
        "notes": notes,
    }
    out.update(_figures(results, steps, volumes, extrapolate_to, dev))
    if profile is not None:
        out["profile"] = profile_run(production, conds, cov, seeds, dev, Path(profile))
    return out


def profile_run(
    sampler: Any, conds: Any, cov: Any, seeds: list[int], dev: Any, path: Path
) -> dict[str, float]:
    """One run of ``sampler`` under torch.profiler: writes the operators and the step's parts (``backbone``,
    ``vcm``, ``scheduler``, the labels of :func:`vcm.diffusion.sample_latents`) by their own time on the device
    (the CPU's on a CPU) as a text table to ``path``; returns the parts' total milliseconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        sampler.sample(conds, cov, seeds)
        synchronizer(dev)()
    events = prof.key_averages()
    key = "device_time_total" if cuda else "cpu_time_total"
    parts = {
        e.key: round(getattr(e, key) / 1e3, 3) for e in events if e.key in ("backbone", "vcm", "scheduler")
    }
    table = events.table(sort_by=f"self_{key}", row_limit=30)
    head = f"one production run: {len(seeds)} volumes x {sampler.steps} steps on {dev} (torch {torch.__version__})"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}\nparts, ms ({key}): {parts}\n{table}\n")
    print(f"profile: {path} (parts, ms: {parts})")
    return parts


def _networks(scale: str, bundle: Path | None, model: Path | None, condset: str, widths: str, dev) -> tuple:
    """The backbone and VCM to time: the bundle and model when given (demo scale), else random weights.

    Returns:
        ``(backbone, backbone description, vcm, condition groups, vcm description, notes)``.
    """
    from vcm.config import load_config
    from vcm.models.backbone import load_bundle
    from vcm.models.build import load_model
    from vcm.models.conditions import condition_groups

    cfg = load_config(REPO / "config" / "config.yaml")
    notes = []
    if scale == "demo" and bundle is not None and (Path(bundle) / "models" / "model.pt").is_file():
        backbone = load_bundle(bundle, device=dev)
        backbone_desc = str(bundle)
    else:
        backbone, backbone_desc = random_backbone(scale, dev)
        notes.append("random backbone weights")
    if model is not None:
        vcm, meta = load_model(model, dev)
        if meta["method"] != "vcm":
            raise SystemExit(f"{model}: a {meta['method']} model; the sample benchmark times VCM")
        groups = [[(n, int(c)) for n, c in g] for g in meta["condition_groups"]]
        model_desc = str(model)
    else:
        groups = condition_groups(cfg, condset)
        vcm = random_vcm(backbone, groups, widths, dev).eval()
        model_desc = f"random weights, {widths} widths"
        notes.append("random VCM weights")
    return backbone, backbone_desc, vcm, groups, model_desc, notes


@dataclass
class _NaiveSampler:
    """The naive loop: one volume at a time, VCM's condition encoder at every DDIM step, fp32."""

    vcm: Any
    backbone: Any
    names: list[str]
    conds: list[dict[str, Any]]
    cov: Any
    seeds: list[int]
    latent: tuple[int, ...]
    n_sem: int
    device: Any

    def latents(self, i: int, n_steps: int):
        """The final latent of volume ``i`` after ``n_steps`` DDIM steps."""
        import numpy as np
        import torch

        from vcm.diffusion import ddim_scheduler, noise_from_seeds, sample_latents
        from vcm.models.conditions import condition_tensor

        dev = self.device
        c = {
            k: condition_tensor(k, torch.from_numpy(np.asarray(self.conds[i][k])[None, None]), self.n_sem).to(
                dev
            )
            for k in self.names
        }
        cv = torch.from_numpy(self.cov[i : i + 1]).reshape(1, 1, -1).to(dev)
        z = sample_latents(
            lambda z, t: self.backbone.eps(z, t, cv),
            noise_from_seeds(self.seeds[i : i + 1], self.latent, device=dev),
            ddim_scheduler(n_steps),
            self.vcm,
            c,
            cache_features=False,
        )
        return z

    def decode(self, z):
        """The image of a latent, in [0, 1], as a (1, *grid) array."""
        import torch

        with torch.no_grad():
            return self.backbone.decode(z).float().clamp(0, 1)[:, 0].cpu().numpy()


def _time_naive(naive: _NaiveSampler, volumes: int, steps: int, dev, sync) -> dict:
    """Wall and CPU seconds of the naive loop over ``volumes`` volumes (total, one-off, per-step), its peak
    memory and images."""
    import numpy as np

    with PeakMemory(dev) as mem:
        zs, w_lat, c_lat = [], 0.0, 0.0
        for i in range(volumes):
            z, w, c = timed(lambda i=i: naive.latents(i, steps), sync)
            zs.append(z)
            w_lat, c_lat = w_lat + w, c_lat + c
        naive_img, w_dec, c_dec = timed(lambda: np.concatenate([naive.decode(z) for z in zs]), sync)
    return {
        "total": (w_lat + w_dec, c_lat + c_dec),
        "fixed": (w_dec, c_dec),
        "per_step": (w_lat, c_lat),
        "memory": mem,
        "images": naive_img,
    }


def _time_batched(production, floor, conds, cov, seeds, repeats: int, dev, sync) -> dict[str, dict]:
    """The production sampler and the floor, alternated ``repeats`` times, each one's median run kept (with
    the largest peak memory of its runs)."""
    import torch

    # production and floor alternate, `repeats` times each, and each keeps its median run: a shared machine's
    # drift then hits both alike, which one run of each did not ensure (the ratio moved by +-0.04 between runs)
    runs: dict[str, list[dict]] = {"production": [], "floor": []}
    for _ in range(repeats):
        for name, sampler in (("production", production), ("floor", floor)):
            with PeakMemory(dev) as mem:
                z, w_lat, c_lat = timed(lambda sampler=sampler: sampler.latents(conds, cov, seeds), sync)
                img, w_dec, c_dec = timed(lambda sampler=sampler, z=z: sampler.decode(z), sync)
            w_enc = c_enc = 0.0
            # the encoder runs once per sample: a one-off cost, not a per-step one
            if sampler.model is not None:
                cond = sampler.condition_batch(conds)
                with torch.no_grad(), sampler.autocast:
                    _, w_enc, c_enc = timed(lambda cond=cond, sampler=sampler: sampler.features(cond), sync)
            runs[name].append(
                {
                    "total": (w_lat + w_dec, c_lat + c_dec),
                    "fixed": (w_dec + w_enc, c_dec + c_enc),
                    "per_step": (w_lat - w_enc, c_lat - c_enc),
                    "memory": mem,
                    "images": img,
                }
            )
    results = {}
    for name, rs in runs.items():
        median = sorted(rs, key=lambda r: r["total"][0])[len(rs) // 2]
        median["memory"] = max((r["memory"] for r in rs), key=lambda m: m.peak_mb)
        results[name] = median
    return results


def _figures(results: dict[str, dict], steps: int, volumes: int, extrapolate_to: int, dev) -> dict:
    """Per sampler seconds per volume (measured and extrapolated) and memory; the ratios; how far the naive
    and production images differ, and how far VCM moves the production images from the floor's."""
    import numpy as np

    out: dict = {"samplers": {}}
    for name, r in results.items():
        (w_fixed, c_fixed), (w_step, c_step) = r["fixed"], (x / steps for x in r["per_step"])
        out["samplers"][name] = {
            "wall_s_per_volume": round(r["total"][0] / volumes, 4),
            "cpu_s_per_volume": round(r["total"][1] / volumes, 4),
            "wall_s_per_volume_extrapolated": round((w_fixed + w_step * extrapolate_to) / volumes, 3),
            "cpu_s_per_volume_extrapolated": round((c_fixed + c_step * extrapolate_to) / volumes, 3),
            "wall_ms_per_step_per_volume": round(1000 * w_step / volumes, 2),
            "peak_memory_mb": round(r["memory"].peak_mb, 1),
            "peak_memory_extra_mb": round(r["memory"].extra_mb, 1),
        }
    s = out["samplers"]
    for key in (
        "wall_s_per_volume",
        "cpu_s_per_volume",
        "wall_s_per_volume_extrapolated",
        "cpu_s_per_volume_extrapolated",
    ):
        out.setdefault("ratios", {})[key] = {
            "naive/production": round(s["naive"][key] / s["production"][key], 2),
            "production/floor": round(s["production"][key] / s["floor"][key], 2),
        }
    diff = float(np.abs(results["naive"]["images"] - results["production"]["images"]).max())
    tol = 5e-2 if dev.type == "cuda" else 1e-3  # bf16 production vs fp32 naive on CUDA; fp32 both on CPU
    out["max_abs_diff_naive_vs_production"] = diff
    out["tolerance"] = tol
    out["within_tolerance"] = diff <= tol
    out["vcm_effect_max_abs"] = float(
        np.abs(results["production"]["images"] - results["floor"]["images"]).max()
    )
    return out


def _sample_inputs(dataset: Path | None, names: list[str], n: int, grid: tuple[int, ...]):
    """Conditions and covariates of ``n`` volumes: validation subjects of ``dataset`` (cycled), else blobs."""
    import numpy as np

    from vcm.dataset_store import DatasetFile

    if dataset is not None and Path(dataset).is_file():
        with DatasetFile(dataset) as data:
            val = data.split("val")
            rows = [int(val[i % len(val)]) for i in range(n)]
            conds = [{k: data.conditions(k, r)[0] for k in names} for r in rows]
            cov = data.covariates(sorted(set(rows)))
            cov = np.stack([cov[sorted(set(rows)).index(r)] for r in rows])
            return conds, cov, data.grid_shape, f"{dataset} (validation subjects)"
    rng = np.random.default_rng(0)
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in grid], indexing="ij")
    r = np.sqrt(sum(a**2 for a in axes))
    blob = {
        "lv": (r < 0.25).astype(np.uint8),
        "brain": (r < 0.7).astype(np.uint8),
        "semantics": np.clip(r * 9, 0, 8).astype(np.uint8),
    }
    conds = [
        {k: blob.get(k, (rng.random(grid) * (r > 0.75)).astype(np.float16)) for k in names} for _ in range(n)
    ]
    return conds, rng.random((n, 4)).astype(np.float32), grid, f"synthetic blobs on {grid}"


def print_sample(r: dict) -> None:
    """The result of :func:`bench_sample` for people."""
    weights = f" [{', '.join(r['notes'])}]" if r["notes"] else ""
    print(
        f"sampling on {r['device']}: grid {r['grid']}, latent {r['latent']}, {r['volumes']} volumes, DDIM-{r['steps']} "
        f"timed (extrapolated to DDIM-{r['extrapolated_to_steps']}){weights}"
    )
    print(f"  backbone: {r['backbone']} ({r['backbone_diffusion_parameters_M']} M diffusion parameters)")
    print(f"  VCM: {r['vcm']} ({r['vcm_parameters_M']} M parameters); inputs: {r['inputs']}")
    median = f", median of {r['repeats']} alternated runs" if r["repeats"] > 1 else ""
    for name, label in (
        ("naive", "naive (batch 1, encoder every step, fp32)"),
        (
            "production",
            f"production (batch {r['batch_size']}, features once, chunk {r['decode_chunk']}{median})",
        ),
        ("floor", f"floor (backbone alone, same batching{median})"),
    ):
        s = r["samplers"][name]
        print(
            f"  {label}: {s['wall_s_per_volume']:.2f} s/volume wall, {s['cpu_s_per_volume']:.2f} s CPU; "
            f"DDIM-{r['extrapolated_to_steps']}: {s['wall_s_per_volume_extrapolated']:.1f} s wall, "
            f"{s['cpu_s_per_volume_extrapolated']:.1f} s CPU; {s['wall_ms_per_step_per_volume']:.1f} ms/step/volume; "
            f"peak memory {s['peak_memory_mb']:.0f} MB (+{s['peak_memory_extra_mb']:.0f})"
        )
    for key, label in (
        ("wall_s_per_volume", f"DDIM-{r['steps']} wall"),
        ("cpu_s_per_volume", f"DDIM-{r['steps']} CPU"),
        ("wall_s_per_volume_extrapolated", f"DDIM-{r['extrapolated_to_steps']} wall"),
        ("cpu_s_per_volume_extrapolated", f"DDIM-{r['extrapolated_to_steps']} CPU"),
    ):
        q = r["ratios"][key]
        print(
            f"  {label}: naive/production {q['naive/production']:.2f}x (goal >= 2), "
            f"production/floor {q['production/floor']:.2f}x (goal <= 1.25)"
        )
    ok = "within" if r["within_tolerance"] else "OUTSIDE"
    print(
        f"  max |naive - production| = {r['max_abs_diff_naive_vs_production']:.2e} on images in [0, 1], {ok} the "
        f"tolerance {r['tolerance']:g}; VCM's effect |production - floor| = {r['vcm_effect_max_abs']:.2e}"
    )


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``sample`` sub-command and its options."""
    smp = sub.add_parser("sample", help="naive vs production vs backbone-only sampling, seconds per volume")
    smp.add_argument("--dataset", type=Path, default=REPO / "results" / "dataset.h5", help="conditions (val)")
    smp.add_argument("--bundle", type=Path, default=REPO / "resources" / "backbone" / "demo")
    smp.add_argument("--model", type=Path, default=None, help="a trained vcm.pt (default: random weights)")
    smp.add_argument("--condition-set", dest="condset", default="lv_brain_skull", help="for a random VCM")
    widths = [*sorted(VCM_WIDTHS), "config"]
    smp.add_argument("--widths", choices=widths, default="paper", help="for a random VCM")
    smp.add_argument("--volumes", type=int, default=4, help="volumes = the production batch")
    smp.add_argument("--steps", type=int, default=20, help="DDIM steps timed")
    smp.add_argument("--extrapolate-to", type=int, default=200, help="DDIM steps to extrapolate to")
    smp.add_argument("--chunk", type=int, default=1, help="samples per decoder / encoder pass")
    smp.add_argument("--repeats", type=int, default=1, help="production/floor runs, alternated; medians kept")
    smp.add_argument("--threads", type=int, default=1)
    smp.add_argument("--device", default=None)
    smp.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "bench_sample.json")
    smp.add_argument("--scale", choices=sorted(SCALES), default="demo", help="demo grid or BrainLDM's")
    smp.add_argument("--grid", type=ints, default=None, help="override the scale's grid, e.g. 32,48,32")
    smp.add_argument(
        "--profile", type=Path, default=None, help="a torch.profiler table of one production run"
    )
    return smp


def run(args: argparse.Namespace) -> None:
    """Run the benchmark of the parsed ``args``, print it and write the JSON."""
    r = bench_sample(**{k: getattr(args, k) for k in inspect.signature(bench_sample).parameters})
    print_sample(r)
    write_result(args.out, r)
