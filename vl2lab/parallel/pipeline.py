"""Layer split: consecutive decoder layers on consecutive ranks, after the official multi-GPU recipe.

Lesson: notebook 04, section "6. Three ways to use 4 devices".

The official DeepSeek-VL2 code has no tensor parallelism, and its own inference code loads the model on one GPU.
The answer its maintainers point to for "the model does not fit one GPU" is the ``split_model`` recipe posted in
the repository's issue #8, which builds a ``device_map`` for ``from_pretrained``: runs of whole decoder layers per
GPU (small: [13, 14], base: [10, 10, 10]), then **the vision tower, projector, image_newline, view_seperator,
embed_tokens, the final norm, lm_head and the last decoder layer on GPU 0**. A token's hidden states therefore leave
GPU 0 after its first layers, cross every other GPU and come back to GPU 0 for the last layer, the norm and the
head (accelerate moves them between devices); small's GPU 0 holds layers 0-12 and 26, GPU 1 layers 13-25.

vl2lab keeps the recipe's runs of consecutive layers and its rank 0 (vision side and embedding), but ends the
chain on the last rank instead of returning to rank 0. For N ranks and L layers split as [a_0 = 0, a_1, …, a_N = L)::

    rank 0       vision tower, projector, image_newline, view_seperator, embed_tokens,  layers [a_0, a_1)
    rank r       layers [a_r, a_{r+1})
    rank N−1     layers [a_{N−1}, L),  norm, lm_head

so a token makes N−1 hops instead of the recipe's N; the schedule is the same (one rank at a time). By default the
layers are spread as evenly as possible with the extra ones on the *last* ranks (rank 0 also holds the vision
tower): 27 layers on 2 ranks → [13, 14], 30 on 3 → [10, 10, 10], 3 on 4 → [0, 1, 1, 1] (rank 0 then holds the
vision side and the embedding only). ``sizes`` takes an explicit list.

One forward (the prefill, or one decode step) of B sequences × T new positions, hidden H, vocabulary V::

    rank 0:    x = embeddings (image features written in) [B, T, H];  x = its layers(x);  send x → rank 1
    rank r:    recv x ← rank r−1;  x = its layers(x);  send x → rank r+1
    rank N−1:  recv;  its layers;  logits = lm_head(norm(x[:, −k:]))  [B, k, V] fp32;  broadcast → every rank
    every rank then picks the same next tokens (``vl2lab.model.generation.generate`` runs unchanged on each).

Each rank computes only while it holds the request's hidden states: for one request **one rank works at a time**,
and a token costs Σ_r t_r + (N−1) sends + 1 broadcast — no faster than one device holding everything. The layer
split buys room (each rank holds ~1/N of the layers), not speed; only several requests in flight at once
(micro-batches, as a pipeline-parallel server schedules them) would keep more than one rank busy. No arithmetic
is split or reordered, so on the same hardware the logits are bit-identical to one device's.

Communication per forward: N−1 point-to-point sends of B·T·H values (send/recv: gloo and NCCL both have them)
and one broadcast of B·k·V fp32 logits. Each rank's KV cache holds its own layers only.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from vl2lab.model.attention import KVCache
from vl2lab.model.dtypes import as_dtype
from vl2lab.model.generation import generate as generate_tokens
from vl2lab.model.language import attention_inputs
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.comm import param_bytes
from vl2lab.parallel.groups import rank_world
from vl2lab.weights.keys import state_tensors
from vl2lab.weights.pretrained import check_snapshot, finish_load, materialise, read_config, skeleton
from vl2lab.weights.reader import SnapshotReader, snapshot_bytes

__all__ = ["LayerSplitError", "layer_ranges", "load_layer_split", "PipelineLM", "generate", "describe"]


class LayerSplitError(ValueError):
    """A layer placement that cannot run (the message says what to change)."""


def layer_ranges(num_layers: int, world_size: int, sizes: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """[(start, end)] of decoder layers per rank. ``sizes``: layers per rank (the recipe's lists, e.g. [13, 14],
    which the recipe then changes by moving the last layer to GPU 0); default: as even as possible, the extra
    layers on the last ranks. Rank 0 (vision, embedding) and the last rank (norm, lm_head) may hold no layer; a
    rank in between must hold at least one."""
    if world_size < 1:
        raise LayerSplitError(f"world_size must be >= 1, got {world_size}")
    if sizes is None:
        base, extra = divmod(num_layers, world_size)
        sizes = [base + (r >= world_size - extra) for r in range(world_size)]
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size or sum(sizes) != num_layers or min(sizes) < 0:
        raise LayerSplitError(f"layer sizes {sizes} must be {world_size} non-negative counts summing to the "
                              f"{num_layers} decoder layers (e.g. small [13, 14] on 2 ranks, base [10, 10, 10] on 3)")
    idle = [r for r in range(1, world_size - 1) if sizes[r] == 0]
    if idle:
        raise LayerSplitError(f"rank(s) {idle} would hold no decoder layer and only pass the hidden states on: "
                              f"{num_layers} layers give work to at most {num_layers + 2} ranks; use fewer ranks")
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _prune(model, rank: int, world: int, start: int, end: int) -> None:
    """Drop every module this rank does not hold (the layers are kept under their global names)."""
    lm = model.language
    lm.model.layers = nn.ModuleDict({str(i): lm.model.layers[i] for i in range(start, end)})
    if rank != 0:
        model.vision = model.projector = None
        model.image_newline = model.view_seperator = None
        lm.model.embed_tokens = None
    if rank != world - 1:
        lm.model.norm = lm.lm_head = None


def load_layer_split(path, group=None, sizes: Optional[Sequence[int]] = None,
                     dtype: Union[str, torch.dtype] = torch.float32, device=None):
    """A snapshot folder → ``(model, processor)`` holding only this rank's part of the layer split (the whole
    snapshot is checked first; then only this rank's tensors are read). ``model.layer_split``: rank, world_size,
    layers (start, end), all ranges; ``model.load_report``: bytes_read, snapshot_bytes."""
    dtype = as_dtype(dtype)
    device = torch.device(device) if device is not None else rank_device()
    cfg = read_config(path)
    rank, world = rank_world(group)
    ranges = layer_ranges(cfg.language_config.num_hidden_layers, world, sizes)
    start, end = ranges[rank]
    with SnapshotReader(os.fspath(path)) as reader:
        model = skeleton(cfg)
        check_snapshot(model, reader)                               # CheckpointError before anything is read
        _prune(model, rank, world, start, end)
        materialise(reader, list(state_tensors(model)), dtype, device)
        bytes_read = reader.bytes_read
    model.layer_split = {"rank": rank, "world_size": world, "layers": (start, end), "ranges": ranges}
    model.load_report = {"bytes_read": bytes_read, "snapshot_bytes": snapshot_bytes(path)}
    return finish_load(model, path, device)


class PipelineLM:
    """This rank's stage of the language model, called the way :func:`vl2lab.model.generation.generate` calls a
    language model: ``(input_ids | inputs_embeds, attention_mask, cache, num_logits_to_keep) → (logits, cache)``.

    Records ``intervals`` [(t_start, t_end)] of this rank's own compute per forward (after the receive, before
    the send; CUDA is synchronised at both ends, so an interval is real work) and the bytes it sent."""

    def __init__(self, model, group=None, keep_first_logits: bool = False):
        self.model, self.group, self._cache_cls = model, group, KVCache
        self.lm = model.language
        self.config = self.lm.config
        self.rank, self.world = rank_world(group)
        self.last = self.world - 1
        p = next(model.parameters())                                # every rank holds something
        self.dtype, self.device = p.dtype, p.device
        self.intervals: list[tuple[float, float]] = []
        self.sent_bytes = self.broadcast_bytes = 0
        self.keep_first_logits, self.first_logits = keep_first_logits, None

    def _peer(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def new_cache(self, max_len: int):
        """A KV cache indexed by the global layer number; only this rank's layers ever write to it."""
        return self._cache_cls(self.config.num_hidden_layers, max_len)

    @torch.no_grad()
    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None,
                 num_logits_to_keep: int = 0, **ignored):
        lm = self.lm
        ref = inputs_embeds if input_ids is None else input_ids
        B, T = ref.shape[:2]                                        # [B, T] new positions
        past = attention_mask.shape[1] - T                          # cached positions before this forward
        if self.rank == 0:
            x = inputs_embeds if input_ids is None else lm.embed(input_ids)          # [B, T, H]
        else:
            x = torch.empty(B, T, self.config.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self._peer(self.rank - 1), group=self.group)
        self._sync()
        t0 = time.perf_counter()
        positions, mask = attention_inputs(attention_mask, past, T, x.device)       # [B, T], [B, 1, T, Tk]
        x = lm.layers_forward(x, positions, mask, cache, layers=lm.model.layers.values())
        k = num_logits_to_keep or T
        if self.rank == self.last:
            logits = lm.head(x[:, -k:])                                             # [B, k, V] fp32
        else:
            logits = torch.empty(B, k, self.config.vocab_size, dtype=torch.float32, device=self.device)
        self._sync()
        self.intervals.append((t0, time.perf_counter()))
        if self.rank != self.last:
            dist.send(x.contiguous(), dst=self._peer(self.rank + 1), group=self.group)
            self.sent_bytes += x.numel() * x.element_size()
        if self.world > 1:
            dist.broadcast(logits, src=self._peer(self.last), group=self.group)
            self.broadcast_bytes += logits.numel() * logits.element_size()
        if self.keep_first_logits and self.first_logits is None:
            self.first_logits = logits.cpu()
        return logits, cache


@torch.no_grad()
def generate(model, batch, max_new_tokens: int = 32, group=None, stage: Optional[PipelineLM] = None,
             **kwargs) -> torch.Tensor:
    """Greedy (or sampled, ``kwargs`` as in :func:`vl2lab.model.generation.generate`) tokens [B, N] on every rank
    of the layer split. ``batch``: the processor's output (every rank builds it; only rank 0 reads the images).
    ``stage``: a :class:`PipelineLM` to reuse (its ``intervals`` then accumulate)."""
    stage = stage or PipelineLM(model, group)
    ids = batch["input_ids"].to(stage.device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(stage.device)
    if stage.rank == 0:
        embeds = model.prepare_inputs_embeds(ids, batch.get("images"), batch.get("images_seq_mask"),
                                             batch.get("images_spatial_crop"))
    else:
        embeds = torch.empty(*ids.shape, 0, device=stage.device)     # only its shape [B, T] is read
    cfg = stage.config
    pad = kwargs.pop("pad_token_id", None)
    pad = pad if pad is not None else getattr(model, "pad_token_id", None)
    if pad is None:
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    kwargs.setdefault("eos_token_id", cfg.eos_token_id)
    return generate_tokens(stage, embeds, mask, max_new_tokens, pad_token_id=pad, **kwargs)


def describe(model) -> dict:
    """What this rank holds: its layers, whether it has the vision side / embedding / head, parameter bytes."""
    s = model.layer_split
    return {"rank": s["rank"], "world_size": s["world_size"], "layers": s["layers"],
            "vision": model.vision is not None, "embedding": model.language.model.embed_tokens is not None,
            "head": model.language.lm_head is not None, "param_bytes": param_bytes(model)}
