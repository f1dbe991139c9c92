"""The ``register`` benchmark: seconds per subject of the register stage on the demo grid and at 1 mm."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vcm.bench.common import REPO

__all__ = ["add_parser", "bench_register", "run"]


def bench_register(t1: Path, template_dir: Path) -> dict:
    """Wall and CPU seconds of one affine registration of ``t1`` to the template, per grid."""
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


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``register`` sub-command and its options."""
    reg = sub.add_parser("register", help="registration seconds per subject")
    reg.add_argument("--t1", type=Path, default=REPO / "results" / "demo" / "sub-001" / "t1.nii.gz")
    reg.add_argument("--template-dir", type=Path, default=REPO / "results" / "template")
    return reg


def run(args: argparse.Namespace) -> None:
    """Run the benchmark of the parsed ``args`` and print one line per grid."""
    for label, (wall, cpu) in bench_register(args.t1, args.template_dir).items():
        print(
            f"register ({label}): {wall} s wall, {cpu} s CPU (ANTs runs single-threaded for reproducibility)"
        )
