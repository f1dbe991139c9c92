"""The ``dag`` benchmark: how long ``snakemake -n`` takes to build the DAG of a large manifest.

Every subject points at one real T1 through a symlink and the input-check checkpoint's outputs are written
beforehand, so the dry run lists the whole per-subject DAG (register_segment, conditions) and the cohort's
shard jobs.

The SLURM executor plugin asks the controller for its configuration (``scontrol show config``) when it is
imported: with no controller reachable that call waits about 9 s, which the dry run's wall time then
includes. The benchmark times that call on its own and reports it beside the dry run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from vcm.bench.common import REPO

__all__ = ["add_parser", "bench_dag", "dry_run_jobs", "fake_checked_inputs", "run", "slurm_probe_seconds"]


def fake_checked_inputs(root: Path, n_subjects: int, t1: Path) -> tuple[Path, Path]:
    """A manifest of ``n_subjects`` (every T1 a symlink to ``t1``) under ``root`` and the input-check
    checkpoint's outputs already written for it, so that a dry run lists the whole per-subject DAG.

    Returns:
        the manifest and the results folder.
    """
    from vcm.prep.exclusion import EXCLUDED_COLUMNS
    from vcm.prep.inputs import write_subject_meta

    (root / "t1").mkdir(parents=True)
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
    pd.DataFrame(columns=list(EXCLUDED_COLUMNS)).to_csv(results / "inputs" / "excluded.csv", index=False)
    return manifest, results


def dry_run_jobs(
    configfiles: list[Path], profile: str | None = "profiles/slurm"
) -> tuple[dict[str, int], float, float]:
    """``snakemake -n`` of the repository's workflow with ``configfiles`` (merged in order over
    config/config.yaml) and ``profile``.

    Returns:
        the jobs per rule, the wall and the CPU seconds of the dry run.

    Raises:
        SystemExit: the dry run failed (the end of its error output).
    """
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--quiet",
        "rules",
        "--configfile",
        *map(str, configfiles),
    ]
    cmd += ["--profile", profile] if profile else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed:\n{proc.stderr[-2000:]}")
    counts = {}
    for line in proc.stdout.splitlines():  # the job-stats table: "<rule>   <count>"
        words = line.split()
        if len(words) == 2 and words[1].isdigit() and words[0] != "total":
            counts[words[0]] = int(words[1])
    return counts, seconds, cpu


def slurm_probe_seconds() -> float | None:
    """Wall seconds of ``scontrol show config``, the SLURM plugin's probe of the controller (``None``: no
    ``scontrol`` on the PATH)."""
    if shutil.which("scontrol") is None:
        return None
    start = time.perf_counter()
    subprocess.run(["scontrol", "show", "config"], capture_output=True, check=False)
    return round(time.perf_counter() - start, 2)


def bench_dag(
    n_subjects: int, t1: Path, cohort_size: int = 10_000, profile: str | None = "profiles/slurm"
) -> dict:
    """Time a dry run over ``n_subjects`` (all pointing at one real T1 through symlinks) and a cohort of
    ``cohort_size`` volumes (``cohort.shard_size`` 16 per shard), with ``profile`` (None: the local default)."""
    with tempfile.TemporaryDirectory(prefix="vcm_dag_") as tmp:
        root = Path(tmp)
        manifest, results = fake_checked_inputs(root, n_subjects, t1)
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
        counts, seconds, cpu = dry_run_jobs([cfg], profile)
    return {
        "slurm_probe_seconds": slurm_probe_seconds() if profile and "slurm" in profile else None,
        "subjects": n_subjects,
        "cohort_size": cohort_size,
        "shard_jobs": counts.get("generate_shard", 0),
        "profile": profile or "default",
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "per_subject_jobs": sum(counts.get(rule, 0) for rule in ("register_segment", "conditions")),
    }


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``dag`` sub-command and its options."""
    dag = sub.add_parser("dag", help="dry-run time for a large manifest")
    dag.add_argument("--subjects", type=int, default=1000)
    dag.add_argument("--t1", type=Path, default=REPO / "results" / "demo" / "sub-001" / "t1.nii.gz")
    dag.add_argument("--cohort-size", type=int, default=10_000, help="synthetic volumes (16 per shard)")
    dag.add_argument("--profile", default="profiles/slurm", help="profile of the dry run ('' for none)")
    return dag


def run(args: argparse.Namespace) -> None:
    """Run the benchmark of the parsed ``args`` and print its one line."""
    r = bench_dag(args.subjects, args.t1, args.cohort_size, args.profile or None)
    if r["slurm_probe_seconds"] is not None and r["slurm_probe_seconds"] > 1:
        print(
            f"note: 'scontrol show config' took {r['slurm_probe_seconds']} s (no SLURM controller answering?); "
            "the SLURM plugin waits for it once per snakemake start, and the wall time below includes it"
        )
    print(
        f"snakemake -n --profile {r['profile']} for {r['subjects']} subjects ({r['per_subject_jobs']} "
        f"per-subject jobs) and {r['cohort_size']} volumes ({r['shard_jobs']} shard jobs): {r['seconds']} s wall, {r['cpu_seconds']} s CPU (wall includes waiting for other processes' cores)"
    )
