"""Benchmarks (not tests): ``python -m vcm.bench <name>`` prints figures measured in one run.

* ``dag``: how long ``snakemake -n`` takes to build the DAG for a large manifest (default 1 000 subjects),
  with the input-check checkpoint already done, so the whole per-subject DAG is listed.
* ``register``: seconds per subject of the register stage on the demo grid and at 1 mm.
* ``sample``: seconds per synthetic volume of three samplers on the same inputs, in one process: the naive
  loop (batch 1, VCM's condition encoder at every step, fp32), the production sampler of ``generate-shard``
  (batched, encoder features once per sample, bf16 on CUDA) and the backbone alone (the floor: same steps,
  same batching, no VCM); their ratios, peak memory and how far the naive and production images differ.
  ``--scale demo`` (default) uses the shipped tiny backbone on the demo grid; ``--scale brainldm`` builds
  BrainLDM's networks (the model-zoo bundle's definitions) and the paper's VCM with random weights on the
  160×224×160 grid, for a GPU.
* ``train``: seconds and peak memory of one VCM training step (eq. 4, AdamW, bf16 autocast on CUDA) per batch
  size, at either scale, with or without activation checkpointing of the full-resolution encoders.

``bench/gpu.sh`` runs the BrainLDM-scale benchmarks in one go on a GPU machine.
"""

from __future__ import annotations

import argparse
import inspect
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent


def bench_dag(
    n_subjects: int, t1: Path, cohort_size: int = 10_000, profile: str | None = "profiles/slurm"
) -> dict:
    """Time a dry run over ``n_subjects`` (all pointing at one real T1 through symlinks) and a cohort of
    ``cohort_size`` volumes (``cohort.shard_size`` 16 per shard), with ``profile`` (None: the local default)."""
    from vcm.prep.inputs import write_subject_meta

    with tempfile.TemporaryDirectory(prefix="vcm_dag_") as tmp:
        root = Path(tmp)
        (root / "t1").mkdir()
        rows = []
        for i in range(n_subjects):
            link = root / "t1" / f"s{i:05d}.nii.gz"
            link.symlink_to(t1.resolve())
            rows.append({"subject": f"s{i:05d}", "t1": str(link), "age": 60.0, "sex": "F"})
        manifest = root / "manifest.csv"
        pd.DataFrame(rows).to_csv(manifest, index=False)
        results = root / "results"
        (results / "inputs").mkdir(parents=True)
        time.sleep(0.05)  # the checkpoint's outputs must be newer than the manifest
        pd.DataFrame(rows).to_csv(results / "inputs" / "subjects.csv", index=False)
        write_subject_meta(pd.DataFrame(rows), results / "inputs")
        pd.DataFrame(columns=["subject", "t1", "reason"]).to_csv(results / "excluded.csv", index=False)
        cfg = root / "config.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "results": str(results),
                    "data": {"manifest": str(manifest)},
                    "cohort": {"size": cohort_size, "shard_size": 16},
                }
            )
        )
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--configfile", str(cfg)]
        cmd += ["--profile", profile] if profile else []
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"dry run failed:\n{proc.stderr[-2000:]}")
        counts = {
            line.split()[0]: int(line.split()[-1])
            for line in proc.stdout.splitlines()
            if line.split()[:1] in (["register"], ["segment"], ["conditions"], ["generate_shard"])
        }
        shards = counts.pop("generate_shard", 0)
        jobs = sum(counts.values())
    return {
        "subjects": n_subjects,
        "cohort_size": cohort_size,
        "shard_jobs": shards,
        "profile": profile or "default",
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "per_subject_jobs": jobs,
    }


def bench_register(t1: Path, template_dir: Path) -> dict:
    from vcm.grid import Grid
    from vcm.prep.registration import register

    out = {}
    with tempfile.TemporaryDirectory(prefix="vcm_reg_") as tmp:
        for label, grid, spacing in (
            ("demo grid, 2 mm working", "demo", 2.0),
            ("brainldm grid, 1 mm working", "brainldm", 1.0),
        ):
            start, cpu = time.perf_counter(), time.process_time()
            register(
                t1,
                template_dir / "t1_head.nii.gz",
                Grid.from_config(grid),
                Path(tmp) / grid,
                "Affine",
                spacing,
            )
            out[label] = (round(time.perf_counter() - start, 1), round(time.process_time() - cpu, 1))
    return out


# the shipped demo backbone's recipe (workflow/rules/backbone.smk), for a random stand-in when no bundle exists
DEMO_BACKBONE = {
    "channels": (8, 16, 32),
    "diffusion_channels": (32, 64, 64),
    "diffusion_num_res_blocks": (1, 1, 2),
    "diffusion_attention_levels": (False, False, True),
    "diffusion_num_head_channels": (0, 0, 32),
}
# VCM widths: the paper's (the model's defaults) and smaller ones for the demo's 4.3 M-parameter backbone
VCM_WIDTHS = {
    "paper": {},
    "small": {
        "encoder_channels": [8, 16],
        "encoder_norm_num_groups": 8,
        "unet_channels": [32, 64, 128],
        "unet_out_channels": 32,
        "head_channels": 32,
        "unet_num_res_blocks": 1,
    },
    "tiny": {
        "encoder_channels": [8, 16],
        "encoder_norm_num_groups": 8,
        "unet_channels": [8, 16, 32],
        "unet_num_head_channels": 8,
        "unet_norm_num_groups": 8,
        "unet_out_channels": 8,
        "head_channels": 16,
        "unet_num_res_blocks": 1,
    },
}


class _PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or on CPU the process's resident set size, polled."""

    def __init__(self, device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self.extra_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> _PeakMemory:
        import threading

        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self._base = self._peak = self._rss_mb()
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.wait(0.002):
                self._peak = max(self._peak, self._rss_mb())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._rss_mb())
        self.extra_mb = self.peak_mb - self._base


def _sample_inputs(dataset: Path | None, names: list[str], n: int, grid: tuple[int, ...]):
    """Conditions and covariates of ``n`` volumes: validation subjects of ``dataset`` (cycled), else blobs."""
    import h5py
    import numpy as np

    if dataset is not None and Path(dataset).is_file():
        with h5py.File(dataset, "r") as h5:
            val = np.sort(np.asarray(h5["splits/val"][:], dtype=np.int64))
            rows = [int(val[i % len(val)]) for i in range(n)]
            conds = [{k: np.asarray(h5[f"cond/{k}"][r, 0]) for k in names} for r in rows]
            cov = np.asarray(h5["covariates"][sorted(set(rows))], np.float32)
            cov = np.stack([cov[sorted(set(rows)).index(r)] for r in rows])
            return (
                conds,
                cov,
                tuple(int(s) for s in h5["image"].shape[2:]),
                f"{dataset} (validation subjects)",
            )
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


SCALES = {"demo": (40, 56, 40), "brainldm": (160, 224, 160)}
"""Image grid of each benchmark scale."""


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: CUDA's ``OutOfMemoryError`` or the CPU allocator's error."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def _random_backbone(scale: str, device):
    """A random-weight backbone of ``scale``'s architecture: the demo recipe or BrainLDM's definitions."""
    import torch

    from vcm.models.backbone import Backbone, brainldm_definitions, build_networks, tiny_definitions

    defs = brainldm_definitions() if scale == "brainldm" else tiny_definitions(**DEMO_BACKBONE)
    torch.manual_seed(0)
    ae, dm = build_networks(defs)
    what = "BrainLDM's networks" if scale == "brainldm" else "the demo backbone's architecture"
    return Backbone(ae, dm, definitions=defs).to(device), f"random weights ({what})"


def vcm_widths(name: str) -> dict:
    """VCM constructor widths: ``paper``, ``small``, ``tiny`` or ``config`` (``training.vcm`` of the config)."""
    if name == "config":
        from vcm.config import load_config

        return dict(load_config(REPO / "config" / "config.yaml")["training"].get("vcm") or {})
    return dict(VCM_WIDTHS[name])


def _random_vcm(backbone, groups, widths: str, device, checkpointing: bool = False):
    """A random VCM for ``backbone`` with non-zero heads (zero heads would make it the identity)."""
    import math

    import torch

    from vcm.models.vcm import VCM

    torch.manual_seed(1)
    vcm = VCM(
        latent_channels=backbone.latent_channels,
        condition_groups=groups,
        levels=int(round(math.log2(backbone.downsample_factor))),
        use_checkpointing=checkpointing,
        **vcm_widths(widths),
    )
    with torch.no_grad():
        for head in (vcm.head_gamma, vcm.head_beta):
            head.conv.weight.normal_(std=0.02)
    return vcm.to(device)


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
) -> dict:
    """Time the naive, production and backbone-only samplers on the same inputs (see the module docstring).

    ``scale="brainldm"`` ignores ``dataset`` and ``bundle`` (random BrainLDM networks, blob conditions);
    ``grid`` overrides the scale's image grid (a smoke run of the BrainLDM networks on a small grid).
    ``repeats`` alternates the production and floor runs that many times and keeps each one's median run
    (the naive loop, ~10x slower, runs once).

    Returns:
        per sampler: wall and CPU seconds per volume (measured at ``steps`` and extrapolated to
        ``extrapolate_to`` DDIM steps from the measured per-step and one-off costs), peak memory; the ratios,
        the images' max abs difference naive vs production and its tolerance; what the weights were.
    """
    import numpy as np
    import torch

    from vcm.cohort.plan import noise_seed
    from vcm.cohort.sampler import CohortSampler
    from vcm.config import load_config
    from vcm.diffusion import ddim_sample, ddim_scheduler, noise_from_seeds
    from vcm.models.backbone import load_bundle
    from vcm.models.build import load_model
    from vcm.models.conditions import condition_groups, condition_tensor

    torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(REPO / "config" / "config.yaml")
    notes = []
    if scale == "demo" and bundle is not None and (Path(bundle) / "models" / "model.pt").is_file():
        backbone = load_bundle(bundle, device=dev)
        backbone_desc = str(bundle)
    else:
        backbone, backbone_desc = _random_backbone(scale, dev)
        notes.append("random backbone weights")
    if model is not None:
        vcm, meta = load_model(model, dev)
        if meta["method"] != "vcm":
            raise SystemExit(f"{model}: a {meta['method']} model; the sample benchmark times VCM")
        groups = [[(n, int(c)) for n, c in g] for g in meta["condition_groups"]]
        model_desc = str(model)
    else:
        groups = condition_groups(cfg, condset)
        vcm = _random_vcm(backbone, groups, widths, dev).eval()
        model_desc = f"random weights, {widths} widths"
        notes.append("random VCM weights")
    names = [n for g in groups for n, _ in g]
    grid = tuple(grid or SCALES[scale])
    conds, cov, grid, inputs_desc = _sample_inputs(dataset if scale == "demo" else None, names, volumes, grid)
    seeds = [noise_seed(0, i) for i in range(volumes)]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    n_sem = 8

    def clock(fn):
        sync()
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        return out, time.perf_counter() - w, time.process_time() - c

    production = CohortSampler(vcm, "vcm", backbone, grid, steps, volumes, chunk, n_sem, dev)
    floor = CohortSampler(None, "vcm", backbone, grid, steps, volumes, chunk, n_sem, dev)
    latent = production.latent_shape

    def naive_one(i: int, n_steps: int):
        c = {
            k: condition_tensor(k, torch.from_numpy(np.asarray(conds[i][k])[None, None]), n_sem).to(dev)
            for k in names
        }
        cv = torch.from_numpy(cov[i : i + 1]).reshape(1, 1, -1).to(dev)
        z = ddim_sample(
            lambda z, t: backbone.eps(z, t, cv),
            noise_from_seeds(seeds[i : i + 1], latent, device=dev),
            ddim_scheduler(n_steps),
            vcm,
            c,
            cache_features=False,
        )
        return z

    def naive_decode(z):
        with torch.no_grad():
            return backbone.decode(z).float().clamp(0, 1)[:, 0].cpu().numpy()

    # warm-up: one-off costs (allocator, oneDNN primitives) are not what is being compared
    naive_decode(naive_one(0, 1))
    for s in (production, floor):
        s.ddim_steps = 1
        s.sample(conds, cov, seeds)
        s.ddim_steps = steps

    results = {}
    with _PeakMemory(dev) as mem:
        zs, w_lat, c_lat = [], 0.0, 0.0
        for i in range(volumes):
            z, w, c = clock(lambda i=i: naive_one(i, steps))
            zs.append(z)
            w_lat, c_lat = w_lat + w, c_lat + c
        naive_img, w_dec, c_dec = clock(lambda: np.concatenate([naive_decode(z) for z in zs]))
    results["naive"] = {
        "total": (w_lat + w_dec, c_lat + c_dec),
        "fixed": (w_dec, c_dec),
        "per_step": (w_lat, c_lat),
        "memory": mem,
        "images": naive_img,
    }
    # production and floor alternate, `repeats` times each, and each keeps its median run: a shared machine's
    # drift then hits both alike, which one run of each did not ensure (the ratio moved by +-0.04 between runs)
    runs: dict[str, list[dict]] = {"production": [], "floor": []}
    for _ in range(repeats):
        for name, sampler in (("production", production), ("floor", floor)):
            with _PeakMemory(dev) as mem:
                z, w_lat, c_lat = clock(lambda sampler=sampler: sampler.latents(conds, cov, seeds))
                img, w_dec, c_dec = clock(lambda sampler=sampler, z=z: sampler.decode(z))
            w_enc = c_enc = 0.0
            # the encoder runs once per sample: a one-off cost, not a per-step one
            if sampler.model is not None:
                cond = sampler.condition_batch(conds)
                with torch.no_grad(), sampler.autocast:
                    _, w_enc, c_enc = clock(lambda cond=cond, sampler=sampler: sampler.features(cond))
            runs[name].append(
                {
                    "total": (w_lat + w_dec, c_lat + c_dec),
                    "fixed": (w_dec + w_enc, c_dec + c_enc),
                    "per_step": (w_lat - w_enc, c_lat - c_enc),
                    "memory": mem,
                    "images": img,
                }
            )
    for name, rs in runs.items():
        median = sorted(rs, key=lambda r: r["total"][0])[len(rs) // 2]
        median["memory"] = max((r["memory"] for r in rs), key=lambda m: m.peak_mb)
        results[name] = median

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
        "samplers": {},
    }
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
) -> dict:
    """Seconds and peak memory of one VCM training step per batch size, on random-weight networks.

    The step is the one ``train-vcm`` takes: the frozen backbone's noise prediction (no grad), VCM's
    modulation, eq. 4 (:func:`vcm.training.loss.training_loss`), backward and AdamW, under bf16 autocast on
    CUDA; the latents and conditions are random tensors of the scale's shapes. One warm-up step per batch
    size, then ``steps`` timed. A batch size that runs out of memory is reported as such, not as a failure.
    """
    import numpy as np
    import torch

    from vcm.config import load_config
    from vcm.models.conditions import condition_groups
    from vcm.training.loss import training_loss

    torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    grid = tuple(grid or SCALES[scale])
    backbone, backbone_desc = _random_backbone(scale, dev)
    groups = condition_groups(load_config(REPO / "config" / "config.yaml"), condset)
    vcm = _random_vcm(backbone, groups, widths, dev, checkpointing).train()
    optimizer = torch.optim.AdamW(vcm.parameters(), lr=5e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    latent = (backbone.latent_channels, *(s // backbone.downsample_factor for s in grid))
    gen = torch.Generator().manual_seed(0)

    def step(b: int) -> float:
        z_t = torch.randn(b, *latent, generator=gen).to(dev)
        noise = torch.randn(b, *latent, generator=gen).to(dev)
        t = torch.randint(0, 1000, (b,), generator=gen).to(dev)
        cov = torch.rand(b, 1, 4, generator=gen).to(dev)
        conds = {n: torch.rand(b, c, *grid, generator=gen).round().to(dev) for g in groups for n, c in g}
        sync()
        start = time.perf_counter()
        with autocast:
            loss = training_loss(vcm, vcm, backbone, z_t, t, noise, cov, conds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    rows = []
    for b in batch_sizes:
        row: dict = {"batch_size": b}
        try:
            with _PeakMemory(dev) as mem:
                step(b)  # warm-up: allocator, cuDNN / oneDNN algorithm choice
                times = [step(b) for _ in range(steps)]
            row.update(
                s_per_step=round(float(np.median(times)), 4),
                s_per_sample=round(float(np.median(times)) / b, 4),
                peak_memory_mb=round(mem.peak_mb, 1),
            )
        except RuntimeError as err:  # CUDA's OutOfMemoryError is one; the CPU allocator raises a plain one
            if not _out_of_memory(err):
                raise
            row["out_of_memory"] = str(err).splitlines()[0][:200]
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return {
        "scale": scale,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({threads} threads)",
        "grid": list(grid),
        "latent": list(latent),
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "activation_checkpointing": checkpointing,
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


def _print_train(r: dict) -> None:
    print(
        f"VCM training step on {r['device']}: grid {r['grid']}, latent {r['latent']}, {r['precision']}, "
        f"activation checkpointing {'on' if r['activation_checkpointing'] else 'off'} [{', '.join(r['notes'])}]"
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


def _print_sample(r: dict) -> None:
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


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _write(path: Path, result: dict) -> None:
    from vcm.io import write_json

    write_json(path, result)
    print(f"written: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vcm.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", required=True)
    dag = sub.add_parser("dag", help="dry-run time for a large manifest")
    dag.add_argument("--subjects", type=int, default=1000)
    dag.add_argument("--t1", type=Path, default=REPO / "results" / "demo" / "sub-001" / "t1.nii.gz")
    dag.add_argument("--cohort-size", type=int, default=10_000, help="synthetic volumes (16 per shard)")
    dag.add_argument("--profile", default="profiles/slurm", help="profile of the dry run ('' for none)")
    reg = sub.add_parser("register", help="registration seconds per subject")
    reg.add_argument("--t1", type=Path, default=REPO / "results" / "demo" / "sub-001" / "t1.nii.gz")
    reg.add_argument("--template-dir", type=Path, default=REPO / "results" / "template")
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
    trn = sub.add_parser("train", help="VCM training step: seconds and peak memory per batch size")
    trn.add_argument("--batch-sizes", type=_ints, default=[2, 16], help="comma-separated, e.g. 2,16")
    trn.add_argument("--steps", type=int, default=5, help="timed steps per batch size (after one warm-up)")
    trn.add_argument("--condition-set", dest="condset", default="lv_brain_skull")
    trn.add_argument("--widths", choices=widths, default="paper", help="config: training.vcm of the config")
    trn.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the encoders")
    trn.add_argument("--threads", type=int, default=1)
    trn.add_argument("--device", default=None)
    trn.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "bench_train.json")
    lab = sub.add_parser(
        "labels", help="LV Dice ceilings: QC segmenter on real and autoencoder images; atlas"
    )
    lab.add_argument("--dataset", type=Path, default=REPO / "results" / "dataset.h5")
    lab.add_argument("--bundle", type=Path, default=REPO / "resources" / "backbone" / "demo")
    lab.add_argument(
        "--segmenter", type=Path, default=REPO / "results" / "models" / "qc_segmenter" / "segmenter.pt"
    )
    lab.add_argument("--prep-dir", type=Path, default=REPO / "results" / "prep")
    lab.add_argument("--template-dir", type=Path, default=REPO / "results" / "template")
    lab.add_argument(
        "--atlas-subjects", type=int, default=8, help="validation subjects for the atlas (0: skip)"
    )
    lab.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "bench_labels.json")
    for p in (smp, trn):
        p.add_argument("--scale", choices=sorted(SCALES), default="demo", help="demo grid or BrainLDM's")
        p.add_argument("--grid", type=_ints, default=None, help="override the scale's grid, e.g. 32,48,32")
    args = parser.parse_args(argv)
    if args.name == "dag":
        r = bench_dag(args.subjects, args.t1, args.cohort_size, args.profile or None)
        print(
            f"snakemake -n --profile {r['profile']} for {r['subjects']} subjects ({r['per_subject_jobs']} "
            f"per-subject jobs) and {r['cohort_size']} volumes ({r['shard_jobs']} shard jobs): {r['seconds']} s wall, {r['cpu_seconds']} s CPU (wall includes waiting for other processes' cores)"
        )
    elif args.name == "labels":
        from vcm.label_fidelity import atlas_dice, autoencoder_ceiling

        r = autoencoder_ceiling(args.dataset, args.bundle, args.segmenter)
        if args.atlas_subjects:
            r.update(atlas_dice(args.dataset, args.prep_dir, args.template_dir, args.atlas_subjects))
        for key, name in (
            ("real", "QC segmenter on the real images"),
            ("reconstruction", "QC segmenter on the autoencoder's reconstructions (the control ceiling)"),
            ("atlas_lv_dice", "atlas backend on the real images"),
        ):
            if key in r:
                v = r[key]
                print(
                    f"LV Dice, {name}: {v['mean']:.3f} [95% CI {v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}], n = {v['n']}"
                )
        _write(args.out, r)
    elif args.name in ("sample", "train"):
        run, show = {"sample": (bench_sample, _print_sample), "train": (bench_train, _print_train)}[args.name]
        r = run(**{k: getattr(args, k) for k in inspect.signature(run).parameters})
        show(r)
        _write(args.out, r)
    else:
        for label, (wall, cpu) in bench_register(args.t1, args.template_dir).items():
            print(
                f"register ({label}): {wall} s wall, {cpu} s CPU (ANTs runs single-threaded for reproducibility)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
