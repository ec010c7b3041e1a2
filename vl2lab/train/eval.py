"""Data-parallel inference: every rank answers its share of the eval split, rank 0 puts them back in order.

Lesson: notebook 03, sections "2. Data-parallel inference" and "6. Bad input".

``DistributedSampler(shuffle=False)`` gives rank r the indices r, r+W, … of the list padded (by repeating its
head) to a multiple of W::

    rank r answers  { i = r + k·W  :  k = 0, 1, …,  i < n }          (padded slots, i ≥ n, are skipped)

so every example is answered exactly once, whatever W; with more ranks than examples the extra ranks get no work.
Each rank loads the whole snapshot (:func:`load_eval_model`) and answers greedily (:func:`vl2lab.train.score.predict`),
one question type at a time (``predict`` batches within a type, so the batches are the ones it would make), and
reports "evaluating n/N" as its progress.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from vl2lab.launch import progress
from vl2lab.parallel import groups as vdist
from vl2lab.train.loop import TrainingError
from vl2lab.train.scenes import dataset
from vl2lab.train.score import predict
from vl2lab.weights.pretrained import check_processor_files, load_pretrained

__all__ = ["shard_eval", "load_eval_model", "answer"]


def load_eval_model(model_path: str, dtype: torch.dtype = torch.float32) -> tuple:
    """(model, processor) of a snapshot folder on this rank's device; one clear error if it has no tokenizer."""
    if model_path != "vl2-micro":
        check_processor_files(model_path, required=True)        # before any weight is read
    return load_pretrained(model_path, dtype=dtype, device=vdist.device())


def answer(model, processor, examples: list, batch_size: int = 8) -> list:
    """:func:`predict`'s answers to ``examples``, in order, one question type at a time, with progress reports."""
    out: list = [None] * len(examples)
    done = 0
    progress.report("evaluating", done, len(examples))
    for q in dict.fromkeys(ex.qtype for ex in examples):
        idx = [i for i, ex in enumerate(examples) if ex.qtype == q]
        for i, a in zip(idx, predict(model, processor, [examples[i] for i in idx], batch_size)):
            out[i] = a
        done += len(idx)
        progress.report("evaluating", done, len(examples))
    return out


def shard_eval(model_path: str, split: str = "eval", n: int = 200, batch_size: int = 8) -> Optional[dict]:
    """Rank function: answer the first ``n`` examples of ``split`` data-parallel; rank 0 returns them in dataset
    order (``answers``), with ``per_rank`` counts and how many sampler padding slots were skipped (a padded slot,
    global position ≥ n, is skipped, not answered: no example is counted twice). Other ranks return None."""
    if n < 1:
        raise TrainingError(f"n={n}: shard_eval needs at least one example")
    world, rank = vdist.world_size(), vdist.rank()
    ds = dataset(split, n)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    mine = [i for k, i in enumerate(sampler) if rank + k * world < n]   # position rank + k·W of the padded list
    progress.report("loading the snapshot")
    model, processor = load_eval_model(model_path)
    t0 = time.time()
    answers = answer(model, processor, [ds[i] for i in mine], batch_size) if mine else []
    local = {"rank": rank, "pairs": list(zip(mine, answers)), "time_s": time.time() - t0}
    gathered = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(local, gathered, dst=0)
    else:
        gathered = [local]
    if rank != 0:
        return None
    out: list = [None] * n
    for part in gathered:
        for i, a in part["pairs"]:
            if out[i] is not None:
                raise RuntimeError(f"example {i} was answered twice: the sharding is wrong")
            out[i] = a
    missing = [i for i, a in enumerate(out) if a is None]
    if missing:
        raise RuntimeError(f"examples {missing[:5]} were answered by no rank: the sharding is wrong")
    return {"answers": out, "per_rank": [len(p["pairs"]) for p in gathered],
            "padded_slots_skipped": len(sampler) * world - n, "time_s": [p["time_s"] for p in gathered]}
