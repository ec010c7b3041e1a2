"""What the two training loops of vl2-micro share: the config they accept, the learning-rate schedule, the DDP
wrapper and the hook that logs what it all-reduces, and the error a bad request raises.

Lesson: notebook 03, sections "3. DDP training: N ranks × b equals one process with N·b" and
"4. A short training run".

Both :func:`vl2lab.train.ddp.train` (stage 1, the whole VL2) and :func:`vl2lab.train.tower.pretrain_tower`
(stage 0, the vision tower alone) are rank functions built from these pieces::

    lr(step) = lr · (step + 1) / warmup                              step < warmup
             = lr · (r + (1 − r) · ½ (1 + cos π t))                  after; t = (step − warmup) / (steps − warmup)

(r = ``min_lr_ratio``), and a model wrapped in ``DistributedDataParallel`` whenever the world holds more than one rank.

**What DDP sends** is read from DDP itself: :func:`log_buckets` registers a communication hook, which the reducer
calls with each gradient bucket (a flat buffer of the gradients of some parameters) when the bucket is ready; the
hook notes the bucket and hands it to DDP's default all-reduce (sum, then ÷ W)::

    bytes handed to the all-reduce per step = Σ_buckets numel(buffer) · element size      (on each rank)

(what the all-reduce algorithm then moves is its own matter: a ring sends ≈ 2(W−1)/W × that from each rank).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from vl2lab.model.config import VL2Config, get_config
from vl2lab.parallel import groups as vdist

__all__ = ["TrainingError", "resolve_config", "lr_schedule", "wrap_ddp", "log_buckets", "bucket_logging_hook"]

# the keyword that turns off DDP's re-broadcast of buffers before each forward (renamed in torch 2.13)
_DDP_ARGS = inspect.signature(DistributedDataParallel).parameters
_NO_BUFFER_SYNC = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"


class TrainingError(ValueError):
    """A training or evaluation request that cannot run as asked (the message says what to change)."""


def resolve_config(config) -> VL2Config:
    """A :class:`VL2Config`, a config dict (``config.json`` layout) or a preset name → a :class:`VL2Config`."""
    if isinstance(config, VL2Config):
        return config
    if isinstance(config, dict):
        return VL2Config.from_dict(config)
    return get_config(config)


def lr_schedule(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """The learning-rate factor of ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine from 1
    down to ``min_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def wrap_ddp(model: torch.nn.Module) -> DistributedDataParallel:
    """DDP on this rank's device, without re-broadcasting the buffers before every forward (DDP's default): the
    model's one buffer, the tower's position ids, is a constant that the construction already made equal."""
    dev = vdist.device()
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   **{_NO_BUFFER_SYNC: False})


def bucket_logging_hook(state: dict, bucket):
    """The communication hook of :func:`log_buckets`: note the bucket, then all-reduce it as DDP does by default.
    (``bucket`` stays unannotated: DDP compares that annotation with ``dist.GradBucket``, and this module's
    annotations are strings.)"""
    buf = bucket.buffer()
    names = state["names"]
    state["open"].append({"index": bucket.index(), "numel": buf.numel(), "bytes": buf.numel() * buf.element_size(),
                          "dtype": str(buf.dtype).removeprefix("torch."),
                          "params": [names.get(id(p), "?") for p in bucket.parameters()]})
    if bucket.is_last():                          # the last bucket of this backward: one step's traffic is complete
        state["steps"].append(state["open"])
        state["open"] = []
    return default_hooks.allreduce_hook(None, bucket)


def log_buckets(ddp_model: DistributedDataParallel) -> list:
    """Log every gradient bucket ``ddp_model`` all-reduces, from now on. Returns the log, a list that grows by one
    entry per synchronised backward: the buckets in the order DDP launched them, each ``{"index", "numel",
    "bytes", "dtype", "params"}`` (the names of the parameters whose gradients it holds). A backward under
    ``no_sync`` launches no bucket and adds nothing."""
    state = {"steps": [], "open": [], "names": {id(p): n for n, p in ddp_model.module.named_parameters()}}
    ddp_model.register_comm_hook(state, bucket_logging_hook)
    return state["steps"]
