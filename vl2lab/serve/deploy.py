"""The deployment path: load this rank's shard of a snapshot and answer one request, measured.

Lesson: notebook 04, sections "2. Run it on 4 ranks" and "5. Communication per generated token".

Every rank calls :func:`deploy` (``python -m vl2lab.serve.generate`` under torchrun does): it reads only its slices
(:func:`vl2lab.parallel.load.load_sharded`), builds the same batch, and all ranks generate together; the result has
the answer, this rank's memory, the collectives of one decode step and the timings of each stage.
"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist

from vl2lab.inputs.tiling import open_image
from vl2lab.model.config import PRESETS
from vl2lab.model.dtypes import as_dtype
from vl2lab.parallel.comm import CommCounter, comm_modules, describe_rank, param_bytes
from vl2lab.parallel.groups import barrier, rank_world
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.load import load_sharded
from vl2lab.weights.pretrained import make_random_snapshot, shipped_micro

__all__ = ["deploy", "is_preset", "snapshot_for", "cleanup_snapshot", "forward_intervals", "peak_memory", "sync"]


def is_preset(model: str) -> bool:
    """Whether ``model`` names a preset (random weights) rather than a snapshot folder. ``"vl2-micro"`` is not
    one: it means the trained snapshot shipped with vl2lab, as in :func:`vl2lab.load_pretrained`."""
    return not os.path.isdir(model) and model in PRESETS and model != "vl2-micro"


def snapshot_for(model: str, seed: int = 0, group=None) -> tuple[str, bool]:
    """(snapshot folder, made here): a folder as is; a preset → random weights saved by rank 0 in a temp dir
    (split into several files), the path broadcast to every rank."""
    if model == "vl2-micro" and not os.path.isdir(model):
        return shipped_micro(), False
    if not is_preset(model):
        return model, False
    rank, world = rank_world(group)
    path = [None]
    if rank == 0:
        path[0] = make_random_snapshot(tempfile.mkdtemp(prefix=f"vl2lab-{model}-"), model, seed=seed,
                                       max_shard_bytes=1 << 20)
    if world > 1:
        dist.broadcast_object_list(path, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return path[0], True


def cleanup_snapshot(path: str, made: bool, group=None) -> None:
    """Remove a snapshot :func:`snapshot_for` made (rank 0, once every rank is done with it)."""
    rank, _ = rank_world(group)
    barrier(group)
    if made and rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def peak_memory(device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024        # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None
    return {"peak_rss_bytes": rss, "peak_cuda_bytes": cuda}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def forward_intervals(module, device, store: list):
    """Hooks that append [t_start, t_end] (perf_counter, the device synchronised) of every forward of ``module``
    to ``store``; returns the handles (remove them when done)."""
    def pre(*_):
        sync(device)
        store.append([time.perf_counter(), None])

    def post(*_):
        sync(device)
        store[-1][1] = time.perf_counter()
    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def deploy(snapshot_path: str, prompt: str = "Describe the image.", image_path: Optional[str] = None,
           moe: str = "tp", vision: str = "replicated", max_new_tokens: int = 32, dtype: str = "float32",
           seed: int = 0, device=None, group=None) -> dict:
    """Load this rank's shard of ``snapshot_path`` (or of a preset's random weights), answer ``prompt`` about
    ``image_path`` greedily, and return the answer text and tokens, this rank's memory (parameter bytes, bytes
    read, peak RSS / CUDA) and timings (load, vision + embedding, prefill, decode; seconds)."""
    rank, world = rank_world(group)
    device = torch.device(device) if device is not None else rank_device()
    image = open_image(image_path) if image_path else None          # a bad file fails before loading
    import transformers.models.siglip.modeling_siglip  # noqa: F401  (imported before the load is timed)
    path, made = snapshot_for(snapshot_path, seed, group)
    try:
        t0 = time.perf_counter()
        model, processor = load_sharded(path, group=group, moe=moe, vision=vision, dtype=dtype, device=device)
        sync(device)
        load_s = time.perf_counter() - t0
    finally:
        cleanup_snapshot(path, made, group)
    if processor is None:
        raise FileNotFoundError(f"{path} has no tokenizer.json: the snapshot needs its processor files to answer")
    user = {"role": "<|User|>", "content": prompt}
    if image is not None:
        user["content"] = "<image>\n" + prompt
        user["images"] = [image]
    batch = processor(conversation=[user, {"role": "<|Assistant|>", "content": ""}]).to(device, as_dtype(dtype))
    spans: list = []                                                 # [start, end] of each language forward
    hooks = forward_intervals(model.language, device, spans)
    try:
        with CommCounter(comm_modules(model)) as c:
            t0 = time.perf_counter()
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            sync(device)
            total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    steps = len(spans)
    decode_s = sum(b - a for a, b in spans[1:])
    n_new = int((tokens[0] != model.pad_token_id).sum()) if getattr(model, "pad_token_id", None) is not None \
        else tokens.shape[1]
    return {"rank": rank, "world_size": world, "moe": moe, "vision": model.tp_plan["vision"], "dtype": dtype,
            "device": str(device), "random_weights": made, "prompt_tokens": int(batch["input_ids"].shape[1]),
            "answer": processor.decode(tokens[0]), "tokens": tokens.cpu(),
            "memory": {"param_bytes": param_bytes(model), **peak_memory(device),
                       **{k: v for k, v in model.load_report.items() if k not in ("rank", "world_size")}},
            "holds": describe_rank(model),
            "comm_per_token": c.calls["language"][1] if steps > 1 else None,
            "timings": {"load_s": load_s, "vision_embed_s": spans[0][0] - t0 if spans else None,
                        "prefill_s": spans[0][1] - spans[0][0] if spans else None, "decode_s": decode_s,
                        "decode_steps": steps - 1, "new_tokens": n_new, "generate_s": total,
                        "decode_tokens_per_s": (steps - 1) / decode_s if decode_s > 0 else None}}


