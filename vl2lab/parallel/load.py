"""Per-rank loading: each rank reads only its own slices of a snapshot, straight from the safetensors files.

Lesson: notebook 04 (full 4-GPU deployment), sections "1. What each rank holds", "2. Run it on 4 ranks" and
"3. Identical answers to one device".

Every rank does the same four steps, with no communication::

    1. build the model skeleton with its parameters on the meta device (no memory, no reads)
    2. check the snapshot against the whole skeleton (missing, unexpected, wrong shapes: CheckpointError)
    3. shard_model(skeleton): the same plan as for a loaded model, so only shapes change; it records each split
       parameter's dense shape and slice in model.tp_layout
    4. for every parameter: read its slice (module_tensor_from_official(..., slices=...), which asks safetensors
       for that region only), cast, place on the device

So rank r reads  bytes_r = replicated + Σ_split |slice_r|  ≈ replicated + split / N  and never the whole file:
``model.load_report`` holds bytes_read, the size of the snapshot's weight files, and the two parts.
"""
from __future__ import annotations

import glob
import os
from typing import Optional, Union

import torch
from torch import nn

from vl2lab.weights.checkpoint import (SnapshotReader, _load_processor, _parameters_on_meta, _plan, _read_config, _state_tensors,
                         module_tensor_from_official)
from vl2lab.parallel.layers import _rank_world
from vl2lab.parallel.shard import shard_model

__all__ = ["load_sharded", "snapshot_bytes", "as_dtype"]


def as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """'float32' / 'bfloat16' / torch.float32 … → torch.dtype (one clear error otherwise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype; use float32, bfloat16 or float16")
    return dt


def snapshot_bytes(path: str) -> int:
    """Total size of a snapshot's ``*.safetensors`` files."""
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(os.fspath(path), "*.safetensors")))


def load_sharded(path, group=None, moe: str = "tp", vision: str = "replicated",
                 dtype: Union[str, torch.dtype] = torch.float32, device: Optional[Union[str, torch.device]] = None):
    """A snapshot folder → ``(model, processor)`` holding only this rank's shard (see :func:`vl2lab.parallel.shard.shard_model`
    for the plan). ``device`` defaults to this rank's device (``cuda:LOCAL_RANK`` under NCCL, else the CPU).
    Parameters take ``dtype``; buffers keep their own dtype (the fp32 router correction bias).
    ``model.load_report``: bytes_read (this rank), snapshot_bytes (all files), split_bytes and replicated_bytes
    (the parts of bytes_read from split and from replicated tensors) and split_dense_bytes (what the split
    tensors weigh whole), all in the snapshot's dtype."""
    from vl2lab.parallel.groups import device as rank_device
    from vl2lab.model.vl2 import DeepseekVL2ForCausalLM

    dtype = as_dtype(dtype)
    device = torch.device(device) if device is not None else rank_device()
    cfg = _read_config(path)
    rank, world = _rank_world(group)
    with SnapshotReader(os.fspath(path)) as reader:
        with _parameters_on_meta(), torch.random.fork_rng(devices=[]):
            model = DeepseekVL2ForCausalLM(cfg)
        _plan(model, reader)                                      # CheckpointError before anything is read
        shard_model(model, group=group, moe=moe, vision=vision)   # on meta: only the shapes change
        split = split_dense = 0
        for key, mod, attr, t, is_param in list(_state_tensors(model)):
            full, slices = model.tp_layout.get(key, (tuple(t.shape), None))
            before = reader.bytes_read
            val = module_tensor_from_official(reader, key, full, dtype=dtype if is_param else t.dtype,
                                              slices=slices, device=device)
            if tuple(val.shape) != tuple(t.shape):
                raise RuntimeError(f"{key}: read {tuple(val.shape)} for a shard of shape {tuple(t.shape)}")
            if slices is not None and val.numel():
                delta = reader.bytes_read - before
                split += delta
                split_dense += delta // val.numel() * torch.Size(full).numel()
            if is_param:
                mod._parameters[attr] = nn.Parameter(val, requires_grad=t.requires_grad)
            else:
                mod._buffers[attr] = val
        bytes_read = reader.bytes_read
    for mod in model.modules():                                   # non-persistent buffers (e.g. position ids)
        for n in mod._non_persistent_buffers_set:
            if mod._buffers.get(n) is not None:
                mod._buffers[n] = mod._buffers[n].to(device)
    model.eval()
    model.load_report = {"rank": rank, "world_size": world, "bytes_read": bytes_read,
                         "snapshot_bytes": snapshot_bytes(path), "split_bytes": split,
                         "split_dense_bytes": split_dense, "replicated_bytes": bytes_read - split}
    processor = _load_processor(os.fspath(path))
    pad = getattr(processor, "pad_id", None)
    if pad is not None:
        model.pad_token_id = int(pad)
    return model, processor
