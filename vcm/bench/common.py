"""What every benchmark shares: default paths, a finished run's inputs, wall/CPU timing, peak memory,
allocation failures, results.

Timing waits for CUDA before and after the timed block (:func:`synchronizer`, :func:`timed`), so that wall time
is the device's work and not the launch; peak memory is CUDA's allocator peak, or on the CPU the process's
resident set size polled every 2 ms (:class:`PeakMemory`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "REPO",
    "PeakMemory",
    "ints",
    "out_of_memory",
    "run_inputs",
    "synchronizer",
    "timed",
    "write_result",
]

REPO = Path(__file__).resolve().parent.parent.parent
"""The repository root: the benchmarks' default inputs and outputs live under it."""

T = TypeVar("T")


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or on CPU the process's resident set size, polled."""

    def __init__(self, device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self.extra_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakMemory:
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


def synchronizer(device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work: CUDA's synchronize, a no-op on the CPU."""
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def timed(fn: Callable[[], T], sync: Callable[[], None]) -> tuple[T, float, float]:
    """``fn()`` with its wall and CPU seconds, ``sync`` before and after: ``(result, wall, cpu)``."""
    sync()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return out, time.perf_counter() - w, time.process_time() - c


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: CUDA's ``OutOfMemoryError`` or the CPU allocator's error."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def ints(text: str) -> list[int]:
    """``"2,16"`` -> ``[2, 16]``: the comma-separated integers of an option."""
    return [int(x) for x in text.split(",") if x.strip()]


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options that name a finished run, read back by :func:`run_inputs`."""
    p.add_argument("--results", type=Path, default=REPO / "results", help="a finished run's results folder")
    p.add_argument("--config", type=Path, default=None, help="default <results>/.vcm/config.yaml")
    p.add_argument("--bundle", type=Path, default=None, help="default the config's backbone.bundle")
    p.add_argument(
        "--model", type=Path, default=None, help="default the one <results>/models/<method>/*/n*/vcm.pt"
    )


def run_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Path]:
    """The config, the backbone bundle and the trained model of a finished run, from the parsed ``args``.

    ``args.config`` defaults to ``<args.results>/.vcm/config.yaml``, ``args.bundle`` to the config's
    ``backbone.bundle`` and ``args.model`` to the one ``<args.results>/models/<method>/*/n*/vcm.pt`` (of
    ``cohort.method`` when several methods were trained).

    Raises:
        StageError: no ``--model`` and not exactly one trained model in the results folder.
    """
    from vcm.config import load_config
    from vcm.errors import StageError

    config = args.config or args.results / ".vcm" / "config.yaml"
    cfg = load_config(config)
    bundle = args.bundle or Path(cfg["backbone"]["bundle"])
    if args.model is not None:
        return cfg, bundle, args.model
    models = sorted((args.results / "models").glob("*/*/n*/vcm.pt"))
    if len(models) > 1:  # methods side by side: the one the cohort samples from
        method = cfg["cohort"]["method"] or cfg["training"]["methods"][0]
        models = [m for m in models if m.parent.parent.parent.name == method]
    if len(models) != 1:
        raise StageError(
            f"{args.results / 'models'}: {len(models)} trained models (<method>/<set>/n<size>/vcm.pt of "
            "cohort.method); name one with --model"
        )
    return cfg, bundle, models[0]


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a benchmark's result as JSON and say where."""
    from vcm.io import write_json

    write_json(path, result)
    print(f"written: {path}")
