"""The distributed smoke test: every rank reports in, one all-reduce proves they can talk.

``vl2lab.run("vl2lab.lessons.smoke:hello", world_size=N)`` returns, per rank, who it is (rank, local rank, host, device,
backend) and the result of an all-reduce of ``rank + 1`` (it must equal N(N+1)/2 on every rank), plus the versions
the rank imported. ``noop`` measures the launch's own overhead; ``fail_on`` raises on one rank on purpose, to show
what a failure looks like; ``work_in_steps`` reports its progress as it goes.

Lesson: notebook 00, sections "Ranks report in" and "When a rank fails".
"""
from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist

from vl2lab.launch import progress
from vl2lab.parallel.groups import device


def hello() -> dict:
    """Identity of this rank and an all-reduce of rank+1 over the world."""
    dev = device()
    x = torch.tensor([float(dist.get_rank() + 1)], device=dev)
    dist.all_reduce(x)
    info = {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "host": socket.gethostname(),
            "backend": dist.get_backend(), "device": str(dev), "all_reduce_sum": float(x.item()),
            "torch": torch.__version__, "omp_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def work_in_steps(steps: int = 20, step_s: float = 0.1) -> int:
    """Sleep ``steps`` times ``step_s`` seconds (rank r's steps last r+1 times longer), saying how far it is with
    :func:`vl2lab.launch.progress.report`: what a long rank function does so that a learner sees each rank's stage
    and an estimate of the time left. Returns the number of steps done, checked once all ranks are through."""
    progress.report("warming up")
    for n in range(steps):
        time.sleep(step_s * (dist.get_rank() + 1))
        progress.report("working", n + 1, steps)
    done = torch.tensor([float(steps)], device=device())
    dist.all_reduce(done)
    return int(done.item())


def noop() -> None:
    """Nothing at all: what remains of a launch's wall time is torchrun's and the imports' overhead."""
    return None


def fail_on(rank: int = 1, message: str = "a deliberate failure, to show the error report") -> str:
    """Raise ``ValueError(message)`` on ``rank``; the other ranks return "ok"."""
    if dist.get_rank() == rank:
        raise ValueError(message)
    return "ok"
