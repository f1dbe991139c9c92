"""Benchmarks (not tests): ``python -m vcm.bench <name>`` prints figures measured in one run.

* ``dag``: how long ``snakemake -n`` takes to build the DAG for a large manifest (default 1 000 subjects),
  with the input-check checkpoint already done, so the whole per-subject DAG is listed.
* ``register``: seconds per subject of the register stage on the demo grid and at 1 mm.
"""

from __future__ import annotations

import argparse
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


def bench_dag(n_subjects: int, t1: Path) -> dict:
    """Time a dry run over ``n_subjects`` (all pointing at one real T1 through symlinks)."""
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
        pd.DataFrame(columns=["subject", "t1", "reason"]).to_csv(results / "excluded.csv", index=False)
        cfg = root / "config.yaml"
        cfg.write_text(yaml.safe_dump({"results": str(results), "data": {"manifest": str(manifest)}}))
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--configfile", str(cfg)]
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
            if line.split()[:1] in (["register"], ["segment"], ["conditions"])
        }
        jobs = sum(counts.values())
    return {
        "subjects": n_subjects,
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
            register(t1, template_dir / "t1_head.nii.gz", Grid.from_config(grid), Path(tmp) / grid, "Affine", spacing)
            out[label] = (round(time.perf_counter() - start, 1), round(time.process_time() - cpu, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vcm.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", required=True)
    dag = sub.add_parser("dag", help="dry-run time for a large manifest")
    dag.add_argument("--subjects", type=int, default=1000)
    dag.add_argument("--t1", type=Path, default=REPO / "results" / "demo" / "sub-001" / "t1.nii.gz")
    reg = sub.add_parser("register", help="registration seconds per subject")
    reg.add_argument("--t1", type=Path, default=REPO / "results" / "demo" / "sub-001" / "t1.nii.gz")
    reg.add_argument("--template-dir", type=Path, default=REPO / "results" / "template")
    args = parser.parse_args(argv)
    if args.name == "dag":
        r = bench_dag(args.subjects, args.t1)
        print(
            f"snakemake -n for {r['subjects']} subjects ({r['per_subject_jobs']} per-subject jobs): "
            f"{r['seconds']} s wall, {r['cpu_seconds']} s CPU (wall includes waiting for other processes' cores)"
        )
    else:
        for label, (wall, cpu) in bench_register(args.t1, args.template_dir).items():
            print(f"register ({label}): {wall} s wall, {cpu} s CPU (ANTs runs single-threaded for reproducibility)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
