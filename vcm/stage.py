"""The shared shell of every stage's command line: one parser prologue, one way to pick threads and device.

A stage is an engine function with typed arguments (``train``, ``generate_shard``, ``evaluate`` ...) and a
thin ``cli(argv)`` that parses, calls the engine and prints one line; the prologue every ``cli`` repeated
(prog name, description from the module docstring, ``--config``, ``--threads``, ``--device``) lives here.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["configure_runtime", "resolve_device", "stage_parser"]


def stage_parser(
    stage: str,
    doc: str | None,
    *,
    config: bool = True,
    threads: bool = False,
    device: bool = False,
) -> argparse.ArgumentParser:
    """The parser of ``python -m vcm <stage>`` with the options most stages share.

    Args:
        stage: the stage name, as ``python -m vcm`` lists it.
        doc: the stage module's docstring; its first line becomes the description.
        config: add ``--config`` (required): the workflow's config YAML.
        threads: add ``--threads``: CPU threads for torch (default: torch's own choice).
        device: add ``--device``: ``cuda`` or ``cpu`` (default: cuda when available).
    """
    description = (doc or "").strip().splitlines()[0] if (doc or "").strip() else None
    parser = argparse.ArgumentParser(prog=f"python -m vcm {stage}", description=description)
    if config:
        parser.add_argument("--config", required=True, help="the workflow's config YAML")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    if device:
        parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    return parser


def configure_runtime(args: argparse.Namespace) -> Any:
    """Apply ``--threads`` and resolve ``--device`` (both optional on ``args``).

    Returns:
        the ``torch.device`` to run on when the parser has ``--device``, else ``None``.
    """
    import torch

    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    return resolve_device(args.device) if hasattr(args, "device") else None


def resolve_device(name: str | None = None) -> Any:
    """``torch.device(name)``; ``None`` or ``"auto"`` pick CUDA when available, else the CPU."""
    import torch

    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
