"""Per-rank loading: each rank reads only its own slices of a snapshot, straight from the safetensors files.

Lesson: notebook 04 (full 4-GPU deployment), sections "1. What each rank holds", "2. Run it on 4 ranks" and
"3. Identical answers to one device".

Every rank does the same four steps, with no communication::

    1. build the model skeleton with its parameters on the meta device (no memory, no reads)
    2. check the snapshot against the whole skeleton (missing, unexpected, wrong shapes: CheckpointError)
    3. shard_model(skeleton): the one sharding plan, as for a loaded model, so only shapes change; it records each
       split parameter's dense shape and slice in model.tp_layout
    4. for every parameter: read its slice (module_tensor_from_official(..., slices=...), which asks safetensors
       for that region only), cast, place on the device

So rank r reads  bytes_r = replicated + Σ_split |slice_r|  ≈ replicated + split / N  and never the whole file:
``model.load_report`` holds bytes_read, the size of the snapshot's weight files, and the two parts.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from vl2lab.model.dtypes import as_dtype
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.groups import rank_world
from vl2lab.parallel.shard import shard_model
from vl2lab.weights.keys import state_tensors
from vl2lab.weights.pretrained import check_snapshot, finish_load, read_config, skeleton
from vl2lab.weights.reader import SnapshotReader, module_tensor_from_official, snapshot_bytes

__all__ = ["load_sharded"]


def load_sharded(path, group=None, moe: str = "tp", vision: str = "replicated",
                 dtype: Union[str, torch.dtype] = torch.float32, device: Optional[Union[str, torch.device]] = None):
    """A snapshot folder → ``(model, processor)`` holding only this rank's shard (see
    :func:`vl2lab.parallel.shard.shard_model` for the plan). ``device`` defaults to this rank's device
    (``cuda:LOCAL_RANK`` under NCCL, else the CPU). Parameters take ``dtype``; buffers keep their own dtype (the
    fp32 router correction bias). ``model.load_report``: bytes_read (this rank), snapshot_bytes (all files),
    split_bytes and replicated_bytes (the parts of bytes_read from split and from replicated tensors) and
    split_dense_bytes (what the split tensors weigh whole), all in the snapshot's dtype."""
    dtype = as_dtype(dtype)
    device = torch.device(device) if device is not None else rank_device()
    cfg = read_config(path)
    rank, world = rank_world(group)
    with SnapshotReader(os.fspath(path)) as reader:
        model = skeleton(cfg)
        check_snapshot(model, reader)                             # CheckpointError before anything is read
        shard_model(model, group=group, moe=moe, vision=vision)   # on meta: only the shapes change
        split = split_dense = 0
        for key, mod, attr, t, is_param in list(state_tensors(model)):
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
    model.load_report = {"rank": rank, "world_size": world, "bytes_read": bytes_read,
                         "snapshot_bytes": snapshot_bytes(path), "split_bytes": split,
                         "split_dense_bytes": split_dense, "replicated_bytes": bytes_read - split}
    return finish_load(model, path, device)
