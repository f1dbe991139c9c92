"""Training checkpoints: where they live, how they are written, and what happens to one from other settings.

This is the project's one checkpoint policy, for every trainer that resumes:

* a run keeps its checkpoints in one folder (:class:`CheckpointStore`): ``checkpoint_latest.pt``, written
  every few steps and when a stop is requested, and ``checkpoint_final.pt``, written when training completed
  (a rerun then trains nothing);
* every checkpoint carries the run's *signature* (:func:`signature`), a hash of everything that decides the
  trained weights; a checkpoint with another signature (other settings, data or backbone) is never resumed:
  a warning names the file and both signatures, the file is renamed to ``<name>.stale`` (nothing is lost;
  an older ``.stale`` of the same name is replaced) and the run starts over;
* an unreadable file (not a checkpoint, or truncated by a copy) is ignored with a warning and overwritten
  by the next save;
* writes are atomic (a temporary file in the same folder, then a rename), so a job killed mid-write leaves
  the previous checkpoint intact;
* checkpoints hold only tensors and plain Python types and load with ``torch.load(weights_only=True)``.

Resuming bit-for-bit also needs the random state (:func:`rng_state`, :func:`restore_rng_state`) and a clean
stop on a scheduler's signal (:class:`Interrupt`): both live here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_DIR",
    "FINAL",
    "FORMAT_VERSION",
    "LATEST",
    "STALE_SUFFIX",
    "CheckpointStore",
    "Interrupt",
    "restore_rng_state",
    "rng_state",
    "save_atomic",
    "signature",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "checkpoint_latest.pt"
FINAL = "checkpoint_final.pt"
STALE_SUFFIX = ".stale"
FORMAT_VERSION = 1


def signature(parts: Mapping[str, Any]) -> str:
    """SHA-256 of ``parts`` as sorted JSON (non-JSON values by ``str``): what decides a run's weights."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file renamed on success: never half a file, and the
    same bytes for the same contents (:func:`vcm.io.save_torch`)."""
    from vcm.io import save_torch

    save_torch(obj, path)


class CheckpointStore:
    """The checkpoints of one run in one folder, with the signature they must carry.

    Args:
        folder: the checkpoint folder (created on the first save).
        signature: the run's :func:`signature`; :meth:`save` stamps it, :meth:`load` requires it.
        owner: the process that writes (rank 0 under DDP). Other processes only read: they neither warn
            nor rename a stale file.

    Example::

        store = CheckpointStore(out_dir / CHECKPOINT_DIR, signature({"settings": ..., "data": ...}))
        state = store.resume()  # the final checkpoint, else the latest, else None
        ...
        store.save(state)  # checkpoint_latest.pt
        store.save(state, final=True)  # checkpoint_final.pt
    """

    def __init__(self, folder: str | os.PathLike, signature: str, *, owner: bool = True) -> None:
        self.folder = Path(folder)
        self.signature = signature
        self.owner = owner

    def path(self, name: str) -> Path:
        """The file ``name`` of the folder."""
        return self.folder / name

    def load(self, name: str) -> dict[str, Any] | None:
        """The checkpoint ``name`` when it exists, is readable and carries this run's signature, else ``None``
        (a stale one renamed to ``<name>.stale`` by the owner, see the module's policy)."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (
            Exception
        ) as err:  # a foreign or truncated file (or renamed meanwhile): start over, do not fail
            if self.owner:
                logger.warning("ignoring unreadable checkpoint %s (%s)", path, type(err).__name__)
            return None
        found = ckpt.get("signature") if isinstance(ckpt, Mapping) else None
        if found != self.signature:
            self._set_aside(path, found)
            return None
        return ckpt

    def latest(self) -> dict[str, Any] | None:
        """``checkpoint_latest.pt`` of this run, or ``None``."""
        return self.load(LATEST)

    def final(self) -> dict[str, Any] | None:
        """``checkpoint_final.pt`` of this run, or ``None``."""
        return self.load(FINAL)

    def resume(self) -> dict[str, Any] | None:
        """Where a rerun continues: the final checkpoint (training done), else the latest, else ``None``."""
        return self.final() or self.latest()

    def save(self, state: Mapping[str, Any], final: bool = False, *, name: str | None = None) -> Path:
        """Write ``state`` with this run's signature, atomically.

        Args:
            state: tensors and plain Python types.
            final: write ``checkpoint_final.pt`` instead of ``checkpoint_latest.pt``.
            name: another file of the folder (e.g. a cache that follows the same policy).

        Returns:
            the file written.
        """
        path = self.path(name or (FINAL if final else LATEST))
        save_atomic({**state, "signature": self.signature}, path)
        return path

    def _set_aside(self, path: Path, found: Any) -> None:
        if not self.owner:
            return
        stale = path.with_name(path.name + STALE_SUFFIX)
        logger.warning(
            "%s belongs to other settings (signature %s, this run %s): moved to %s, training from scratch",
            path,
            str(found)[:12],
            self.signature[:12],
            stale.name,
        )
        with contextlib.suppress(FileNotFoundError):  # another process set it aside first
            os.replace(path, stale)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The random state a bit-for-bit resume needs: torch's global CPU (and CUDA) state, ``generator``'s."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    """Undo :func:`rng_state`: set torch's global state and ``generator``'s back."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Interrupt:
    """SIGTERM / SIGUSR1 (SLURM's pre-emption and time-limit signals) ask the loop to checkpoint and stop.

    A context manager: inside it, the signals set :attr:`flag` instead of killing the process; the previous
    handlers come back on exit. Outside the main thread it installs nothing.
    """

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
