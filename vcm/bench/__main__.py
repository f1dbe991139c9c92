"""``python -m vcm.bench <name> [options]``: parse, dispatch to the benchmark family's ``run``."""

from __future__ import annotations

import argparse

import vcm.bench
from vcm.bench import cohort, dag, labels, layout, registration, sampling, steps, train_step

__all__ = ["FAMILIES", "main"]

FAMILIES = {
    "dag": dag,
    "register": registration,
    "sample": sampling,
    "train": train_step,
    "layout": layout,
    "labels": labels,
    "steps": steps,
    "cohort": cohort,
}
"""Benchmark name -> its module (``add_parser`` and ``run``), in the order ``--help`` lists them."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vcm.bench", description=vcm.bench.__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="name", required=True)
    for family in FAMILIES.values():
        family.add_parser(sub)
    args = parser.parse_args(argv)
    FAMILIES[args.name].run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
