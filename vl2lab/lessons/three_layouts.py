"""Three ways to use N ranks for the same requests, measured side by side: one tensor-parallel model, N
data-parallel replicas (in DistributedDataParallel, as the source article wraps them), and a layer split after
the official recipe (consecutive decoder layers per rank: :mod:`vl2lab.parallel.pipeline` says where it differs).

Lesson: notebook 04, section "6. Three ways to use 4 devices", and notebook 05, section "7. Tensor parallelism or
data-parallel replicas, for throughput".
"""
from __future__ import annotations

import gc
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from vl2lab.model.dtypes import as_dtype
from vl2lab.parallel.comm import CommCounter, describe_rank, param_bytes
from vl2lab.parallel.groups import barrier, rank_world
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.load import load_sharded
from vl2lab.parallel.pipeline import PipelineLM, describe, load_layer_split
from vl2lab.parallel.pipeline import generate as ls_generate
from vl2lab.serve.deploy import forward_intervals, sync
from vl2lab.train.scenes import dataset
from vl2lab.train.score import answer_text
from vl2lab.weights.pretrained import load_pretrained

__all__ = ["three_layouts"]


def _timed_batch(fn, device, group) -> tuple:
    """(result, seconds): every rank starts together (barrier) and the time runs until the last rank is done."""
    barrier(group)
    t0 = time.perf_counter()
    res = fn()
    sync(device)
    barrier(group)
    return res, time.perf_counter() - t0


def _free(device) -> None:
    """Return the memory of the models just deleted (the caller drops its references first)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def three_layouts(snapshot_path: str, n_requests: int = 8, max_new_tokens: int = 16, dtype: str = "float32",
                  moe: str = "tp", vision: str = "replicated", layer_sizes: Optional[Sequence[int]] = None,
                  group=None) -> dict:
    """Rank function: the same requests (the first ``n_requests`` questions of the shapes task's eval split) in
    three layouts of the ranks, each timed for one request alone (latency) and for all of them (throughput),
    every answer ``max_new_tokens`` long (EOS ignored, so every layout does the same work):

    * ``tp``: one model sharded over every rank (:func:`vl2lab.parallel.load.load_sharded`); all requests as one
      batch.
    * ``dp``: every rank loads the whole model and wraps it in DistributedDataParallel, as the source article
      does; a ``DistributedSampler(shuffle=False)`` gives rank r the requests r, r+N, …, answered as one batch.
      The lone request runs on rank 0 while the others wait. ``ddp_forward_collectives``: the all-reduces and
      all-gathers one DDP forward makes (none: DDP only all-reduces gradients, in a backward pass).
    * ``layer_split``: :mod:`vl2lab.parallel.pipeline` (consecutive layers per rank, the norm and lm_head on the
      last one); all requests as one batch.

    Per layout: this rank's parameter bytes, latency_s, batch_s (barrier to barrier: until the slowest rank is
    done), the lone request's tokens and the compute intervals of its forwards on this rank (perf_counter: one
    clock for every process of a host), the batch tokens of this rank's requests (``batch_index``). Each layout
    answers the lone request once untimed first: the first run in a process pays one-time costs (on a GPU, loading
    kernels and growing the allocator: 3.5 s against 0.6 s for 32 tokens of tiny on one H200) that would
    otherwise be charged to whichever layout runs first."""
    rank, world = rank_world(group)
    device = rank_device()
    examples = list(dataset("eval", n_requests))
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, ignore_eos=True)
    out = {"rank": rank, "world_size": world, "n_requests": n_requests, "max_new_tokens": max_new_tokens,
           "questions": [ex.question.split("\n", 1)[-1] for ex in examples], "truth": [ex.answer for ex in examples]}

    def batch_of(processor, idx):
        return processor(conversations=[examples[i].conversation() for i in idx]).to(device, as_dtype(dtype))

    # --- tensor (+ expert) parallel: one model over every rank
    model, proc = load_sharded(snapshot_path, group=group, moe=moe, vision=vision, dtype=dtype, device=device)
    one, every = batch_of(proc, [0]), batch_of(proc, range(n_requests))
    model.generate(**one, **gen)                         # warm-up: the timed call once (first-use kernel loads)
    spans: list = []
    hooks = forward_intervals(model.language, device, spans)
    lone, lat = _timed_batch(lambda: model.generate(**one, **gen), device, group)
    for h in hooks:
        h.remove()
    toks, bs = _timed_batch(lambda: model.generate(**every, **gen), device, group)
    out["tp"] = {"param_bytes": param_bytes(model), "latency_s": lat, "batch_s": bs, "lone_tokens": lone.cpu(),
                 "intervals": [tuple(s) for s in spans], "batch_index": list(range(n_requests)),
                 "batch_tokens": toks.cpu(), "holds": describe_rank(model)}
    del model, lone, toks
    _free(device)

    # --- data parallel: the whole model on every rank (DDP, as the article), a share of the requests each
    model, proc = load_pretrained(snapshot_path, dtype=as_dtype(dtype), device=device)
    ddp = model
    if world > 1:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      process_group=group)
    sampler = DistributedSampler(range(n_requests), num_replicas=world, rank=rank, shuffle=False)
    mine = [i for k, i in enumerate(sampler) if rank + k * world < n_requests]   # padded slots skipped
    with CommCounter() as c, torch.no_grad():
        ddp(**one)                                                                # one forward, as the article
    model.generate(**one, **gen)                                                 # warm-up, as above
    spans = []
    hooks = forward_intervals(model.language, device, spans)
    lone, lat = _timed_batch(lambda: model.generate(**one, **gen) if rank == 0 else None, device, group)
    for h in hooks:
        h.remove()
    share = batch_of(proc, mine) if mine else None
    toks, bs = _timed_batch(lambda: model.generate(**share, **gen) if mine else None, device, group)
    out["dp"] = {"param_bytes": param_bytes(model), "latency_s": lat, "batch_s": bs,
                 "lone_tokens": lone.cpu() if lone is not None else None, "intervals": [tuple(s) for s in spans],
                 "batch_index": mine, "batch_tokens": toks.cpu() if toks is not None else None,
                 "ddp_forward_collectives": dict(c.totals), "wrapped_in_ddp": world > 1}
    del ddp, model, lone, toks
    _free(device)

    # --- layer split: consecutive layers per rank, hidden states passed on with send/recv
    model, proc = load_layer_split(snapshot_path, group=group, sizes=layer_sizes, dtype=dtype, device=device)
    ls_generate(model, one, group=group, **gen)                                  # warm-up, as above
    stage = PipelineLM(model, group)
    lone, lat = _timed_batch(lambda: ls_generate(model, one, group=group, stage=stage, **gen), device, group)
    toks, bs = _timed_batch(lambda: ls_generate(model, every, group=group, **gen), device, group)
    out["layer_split"] = {"param_bytes": param_bytes(model), "latency_s": lat, "batch_s": bs,
                          "lone_tokens": lone.cpu(), "intervals": list(stage.intervals),
                          "batch_index": list(range(n_requests)), "batch_tokens": toks.cpu(),
                          "holds": describe(model), "sent_bytes_per_forward": stage.sent_bytes / max(1, len(
                              stage.intervals)), "broadcast_bytes_per_forward": stage.broadcast_bytes / max(
                              1, len(stage.intervals))}
    out["answers"] = [answer_text(proc, t) for t in toks] if rank == 0 else None
    del model
    _free(device)
    return out
