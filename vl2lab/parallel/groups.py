"""Ranks and groups: helpers for code that runs inside a rank (started by ``vl2lab.run`` or ``%%torchrun``).

They read the initialised ``torch.distributed`` process group, and fall back to torchrun's
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or to a single process, so the
same task code also runs unlaunched in a plain Python session.

Lesson: notebook 00, section 2 ("Ranks report in").
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: imported later (transformers' model code does), it captures
# the live default group in its functions' default arguments, so destroy_process_group cannot free it and gloo's
# threads die at interpreter exit ("terminate called without an active exception", SIGABRT at teardown).
import torch.distributed.nn  # noqa: F401

__all__ = ["rank", "world_size", "local_rank", "is_main", "rank_print", "device", "barrier", "rank_world"]


def _ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 when not launched)."""
    return dist.get_rank() if _ready() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of ranks in the default process group (1 when not launched)."""
    return dist.get_world_size() if _ready() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """Rank within this node; it picks the GPU under NCCL."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on global rank 0, the rank that prints and saves."""
    return rank() == 0


def rank_print(*args, **kwargs) -> None:
    """print() with a "[rank r]" prefix, flushed at once so rank logs stay in order."""
    kwargs.setdefault("flush", True)
    print(f"[rank {rank()}]", *args, **kwargs)


def device() -> torch.device:
    """This rank's device: cuda:local_rank under NCCL, otherwise the CPU."""
    if _ready() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (the default group when None); (0, 1) when torch.distributed is not
    initialised, so the same code runs in a plain Python session."""
    if not _ready():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def barrier(group=None) -> None:
    """Wait until every rank of ``group`` gets here (nothing to wait for when not launched or alone)."""
    if _ready() and dist.get_world_size(group) > 1:
        if dist.get_backend(group) == "nccl":
            dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=group)
