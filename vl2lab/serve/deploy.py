"""The deployment path: load this rank's shard of a snapshot and answer one request, measured.

Lesson: notebook 04, sections "2. Run it on 4 ranks" and "5. Communication per generated token".

Every rank calls :func:`deploy` (``python -m vl2lab.serve.generate`` under torchrun does): it reads only its slices
(:func:`vl2lab.parallel.load.load_sharded`), builds the same batch, and all ranks generate together; the result has
the answer, this rank's memory, the collectives of one decode step and the timings of each stage.
"""
from __future__ import annotations

import math
import os
import resource
import shutil
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist

from vl2lab.inputs.tiling import open_image
from vl2lab.model.config import PRESETS, REAL_PRESETS, ConfigError, get_config, preset_name
from vl2lab.launch import progress
from vl2lab.model.dtypes import as_dtype
from vl2lab.model.generation import check_context, check_new_tokens
from vl2lab.parallel.comm import CommCounter, comm_modules, describe_rank, param_bytes
from vl2lab.parallel.groups import barrier, rank_world
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.load import load_sharded
from vl2lab.parallel.plan import check_plan, model_shapes
from vl2lab.weights.pretrained import load_processor, make_random_snapshot, read_config, shipped_micro

__all__ = ["deploy", "DeployError", "resolve_model", "check_request", "random_note", "is_preset", "snapshot_for",
           "cleanup_snapshot", "forward_intervals", "peak_memory", "sync", "MODEL_NAMES"]

# The names a model may be given by, besides a snapshot folder: the shipped snapshot, then the presets.
MODEL_NAMES = ("vl2-micro",) + tuple(p for p in PRESETS if p != "vl2-micro")


class DeployError(ValueError):
    """A deployment request that cannot run (the message says what is wrong and what to do)."""


def _kind(model) -> tuple[str, str]:
    """("folder" | "shipped" | "preset", folder or canonical preset name), without touching the shipped files."""
    if not isinstance(model, (str, os.PathLike)):
        raise DeployError(f"the model must be a snapshot folder or a name, got {type(model).__name__}")
    m = os.fspath(model)
    if os.path.isdir(m):
        return "folder", m
    try:
        name = preset_name(m)
    except ConfigError:
        raise DeployError(f"{m!r} is neither a snapshot folder nor a known model name; the names are "
                          f"{', '.join(MODEL_NAMES)} (vl2-micro: the trained snapshot shipped with vl2lab; the others "
                          "make random weights; aliases tiny, small, base); or give the path of a snapshot folder "
                          "(config.json + *.safetensors)") from None
    return ("shipped", name) if name == "vl2-micro" else ("preset", name)


def resolve_model(model) -> tuple[str, str]:
    """What ``model`` names, the same everywhere in vl2lab (:func:`vl2lab.load_pretrained`, the planner, the
    benchmarks): ``("folder", path)`` for an existing folder, ``("shipped", folder)`` for ``"vl2-micro"`` (the
    trained snapshot in vl2lab/assets), ``("preset", canonical name)`` for a preset, an alias (``tiny``) or a hub id
    (``deepseek-ai/deepseek-vl2-tiny``): random weights of that preset. Anything else: one DeployError."""
    kind, where = _kind(model)
    return (kind, shipped_micro()) if kind == "shipped" else (kind, where)


def is_preset(model) -> bool:
    """Whether ``model`` names a preset (random weights) rather than a snapshot folder. ``"vl2-micro"`` is not
    one: it means the trained snapshot shipped with vl2lab, as in :func:`vl2lab.load_pretrained`."""
    try:
        return _kind(model)[0] == "preset"
    except DeployError:
        return False


def check_request(model, world_size: int = 1, moe: str = "tp", vision: str = "replicated",
                  max_new_tokens: int = 32, image_path: Optional[str] = None) -> dict:
    """Everything about a request that can be checked before any weight is made or read, each failure one clear
    error: ``max_new_tokens`` (TypeError / GenerationError), the model name (DeployError), the picture
    (ProcessorError), the config (CheckpointError), ``max_new_tokens`` against its context (GenerationError) and the
    split over ``world_size`` ranks (ShardingError). → {"kind", "where", "config", "image", "max_new_tokens"}."""
    max_new_tokens = check_new_tokens(max_new_tokens)
    kind, where = resolve_model(model)
    image = open_image(image_path) if image_path else None
    cfg = get_config(where) if kind == "preset" else read_config(where)
    check_context(None, max_new_tokens, cfg.language_config.max_position_embeddings)
    check_plan(cfg, world_size, moe, vision)
    return {"kind": kind, "where": where, "config": cfg, "image": image, "max_new_tokens": max_new_tokens}


def random_note(model, name: str, config, seed: int = 0) -> str:
    """The line that says a preset's weights are random (and, for a real variant, where the real ones come from)."""
    n = sum(math.prod(s) for s in model_shapes(config).values())
    what = f"{model!r} is a preset" if os.fspath(model) == name else f"{model!r} names the preset {name!r}"
    size = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    out = f"note: {what}: the weights are random (seed {seed}, {size} parameters), so the answer is meaningless text"
    if name in REAL_PRESETS:
        out += f"; for the published weights, download deepseek-ai/{name} and pass its folder"
    return out


def snapshot_for(model: str, seed: int = 0, group=None) -> tuple[str, bool]:
    """(snapshot folder, made here): a folder as is, ``"vl2-micro"`` the shipped one; a preset → random weights
    saved by rank 0 in a temp dir (split into several files), the path broadcast to every rank."""
    kind, where = resolve_model(model)
    if kind != "preset":
        return where, False
    rank, world = rank_world(group)
    path = [None]
    if rank == 0:
        path[0] = make_random_snapshot(tempfile.mkdtemp(prefix=f"vl2lab-{where}-"), where, seed=seed,
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


def forward_intervals(module, device, store: list, total_steps: int | None = None):
    """Hooks that append [t_start, t_end] (perf_counter, the device synchronised) of every forward of ``module``
    to ``store``, and report the decode steps done of ``total_steps`` as the rank's progress; returns the handles
    (remove them when done)."""
    def pre(*_):
        sync(device)
        store.append([time.perf_counter(), None])

    def post(*_):
        sync(device)
        store[-1][1] = time.perf_counter()
        progress.report("prefill done" if len(store) == 1 else "decoding", len(store) - 1, total_steps)
    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def deploy(snapshot_path: str, prompt: str = "Describe the image.", image_path: Optional[str] = None,
           moe: str = "tp", vision: str = "replicated", max_new_tokens: int = 32, dtype: str = "float32",
           seed: int = 0, device=None, group=None) -> dict:
    """Load this rank's shard of ``snapshot_path`` (a folder, ``"vl2-micro"``, or a preset's random weights), answer
    ``prompt`` about ``image_path`` greedily, and return the answer text and tokens, this rank's memory (parameter
    bytes, bytes read, peak RSS / CUDA) and timings (load, vision + embedding, prefill, decode; seconds).

    Bad input fails before any weight is made or read (:func:`check_request`), and a prompt too long for the
    context before the load (the processor is read first)."""
    rank, world = rank_world(group)
    device = torch.device(device) if device is not None else rank_device()
    req = check_request(snapshot_path, world, moe, vision, max_new_tokens, image_path)
    max_new_tokens, image = req["max_new_tokens"], req["image"]
    import transformers.models.siglip.modeling_siglip  # noqa: F401  (imported before the load is timed)
    path, made = snapshot_for(snapshot_path, seed, group)
    try:
        processor = load_processor(path, required=True)      # the snapshot needs its processor files to answer
        user = {"role": "<|User|>", "content": prompt}
        if image is not None:
            user["content"] = "<image>\n" + prompt
            user["images"] = [image]
        batch = processor(conversation=[user, {"role": "<|Assistant|>", "content": ""}])
        check_context(int(batch["input_ids"].shape[1]), max_new_tokens,
                      req["config"].language_config.max_position_embeddings)
        t0 = time.perf_counter()
        progress.report("loading its shard of the weights")
        model, _ = load_sharded(path, group=group, moe=moe, vision=vision, dtype=dtype, device=device)
        sync(device)
        load_s = time.perf_counter() - t0
    finally:
        cleanup_snapshot(path, made, group)
    batch = batch.to(device, as_dtype(dtype))
    spans: list = []                                                 # [start, end] of each language forward
    hooks = forward_intervals(model.language, device, spans, max_new_tokens - 1)
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


