"""DistributedDataParallel plumbing of control-module training: joining torchrun's group, rank and size.

Every rank draws the same global batch and takes its slice (:func:`~vcm.training.batches.draw_batch`), so
the only collectives are DDP's gradient reduction and one small all-reduce per step in the loop.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["close_distributed", "init_distributed", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count (``0, 1`` outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA); pick the device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")


def close_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
