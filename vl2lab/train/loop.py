"""What the two training loops of vl2-micro share: the config they accept, the learning-rate schedule, the DDP
wrapper, and the error a bad request raises.

Lesson: notebook 03, sections "3. DDP training: N ranks × b equals one process with N·b" and
"4. A short training run".

Both :func:`vl2lab.train.ddp.train` (stage 1, the whole VL2) and :func:`vl2lab.train.tower.pretrain_tower`
(stage 0, the vision tower alone) are rank functions built from these pieces::

    lr(step) = lr · (step + 1) / warmup                              step < warmup
             = lr · (r + (1 − r) · ½ (1 + cos π t))                  after; t = (step − warmup) / (steps − warmup)

(r = ``min_lr_ratio``), and a model wrapped in ``DistributedDataParallel`` whenever the world holds more than one rank.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch.nn.parallel import DistributedDataParallel

from vl2lab.model.config import VL2Config, get_config
from vl2lab.parallel import groups as vdist

__all__ = ["TrainingError", "resolve_config", "lr_schedule", "wrap_ddp"]

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
    """DDP on this rank's device; buffers are constants here (positions, RoPE), so they are not re-broadcast."""
    dev = vdist.device()
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   **{_NO_BUFFER_SYNC: False})
