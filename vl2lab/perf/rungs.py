"""The rungs of the tuning ladder: one change at a time, each a state of the same model, and one rung measured.

Lesson: notebook 05, sections "2. The ladder, run here" and "3. The ladder on one H200".

    rung                                   what changes                                  expected effect
    1 fp32, eager attention, expert loop   the official code's way: a Python loop over   host sync per expert per
                                           experts with index selection, scores          layer per step; fp32 reads
                                           materialised, fp32 weights                    twice the bytes
    2 bf16                                 weights and activations in bf16               half the bytes
    3 grouped experts                      sort the (token, expert) pairs, one grouped   no host syncs, one kernel
                                           matmul per projection                         per projection
    4 SDPA attention                       fused attention kernels (flash / efficient)   prefill of long prompts
    5 static cache + CUDA graph            one decode step captured, replayed per token  no launch gaps at decode
    6 torch.compile                        the captured step and the vision tower        fewer, fused kernels
                                           compiled
    7 MLA weight absorption                decode attends over the cached latent:        no per-step expansion of
                                           kv_b_proj folded into q and o                 the cache (small, base);
                                           (vl2lab.model.mla)                            tiny (MHA): = rung 6
    8 decode-shaped experts                the routed experts of a decode step as two    weight reads near the copy
                                           Triton GEMV kernels over the chosen experts   bandwidth, fewer kernels
                                           only (vl2lab.model.expert_gemv)               (GPU; CPU: = rung 7)
    then batching (batch 32 of the last rung) for images/s.

:func:`apply` puts a model in a rung's state (dtype casts are one-way: rungs go fp32 → bf16); :func:`measure` runs
the fixed workload (:func:`vl2lab.perf.workload.measure_generate`) in that state: prefill (vision, projector,
language-model prefill, up to the first token), the decode steps each timed on their own (``decode_step_s``: median,
p10, p90 over every step of every timed run), end to end, images/s, vision tiles/s.
"""
from __future__ import annotations

from dataclasses import dataclass

from vl2lab.model.attention import attention_kernel
from vl2lab.model.dtypes import as_dtype
from vl2lab.model.graph_decode import compile_regions
from vl2lab.perf.workload import measure_generate, workload_requests

__all__ = ["Rung", "RUNGS", "apply", "measure"]


@dataclass(frozen=True)
class Rung:
    name: str
    dtype: str = "bfloat16"
    experts: str = "grouped"      # Experts.impl: loop | grouped | gemv
    attention: str = "sdpa"       # sdpa | math (SDPA's math kernel: the scores materialised, as eager attention)
    decode: str = "eager"         # eager | graph | compile (see vl2lab.model.graph_decode)
    vision: str = "eager"         # eager | compile
    mla: str = "expanded"         # MLAttention.impl: expanded | absorbed (models without MLA ignore it)


RUNGS = (
    Rung("1 fp32 · eager attention · expert loop", dtype="float32", experts="loop", attention="math"),
    Rung("2 bf16", experts="loop", attention="math"),
    Rung("3 grouped experts (no host sync)", attention="math"),
    Rung("4 SDPA attention"),
    Rung("5 static cache + CUDA graph", decode="graph"),
    Rung("6 torch.compile (decode step, vision tower)", decode="compile", vision="compile"),
    Rung("7 MLA weight absorption", decode="compile", vision="compile", mla="absorbed"),
    Rung("8 decode-shaped experts (Triton GEMV)", decode="compile", vision="compile", mla="absorbed",
         experts="gemv"),
)


def apply(vl2, rung: Rung) -> None:
    """Put the model in the state the rung describes (dtype casts are one-way: rungs go fp32 → bf16)."""
    dt = as_dtype(rung.dtype)
    if next(vl2.parameters()).dtype != dt:
        vl2.to(dt)
    vl2.language.set_experts_impl(rung.experts)
    vl2.language.set_mla_impl(rung.mla)
    if rung.vision == "compile" and not getattr(vl2, "_vision_compiled", False):
        layers = next(m for n, m in vl2.vision.named_modules() if n.endswith("encoder.layers"))
        for i, layer in enumerate(compile_regions(list(layers))):
            layers[i] = layer
        vl2._vision_compiled = True


def measure(vl2, processor, rung: Rung, batch_size: int, repeats: int = 3, warmup: int = 1,
            new_tokens: int = 64, seed: int = 0) -> dict:
    """The workload at ``batch_size`` in the rung's state → times (seconds, median/p10/p90) and throughput."""
    convs = workload_requests(processor, batch_size, seed)
    with attention_kernel(rung.attention):
        m = measure_generate(vl2, processor, convs, rung.decode, repeats, warmup, new_tokens)
    batch, tiles, tokens = m["batch"], m["tiles"], m["tokens"]
    out = {"rung": rung.name, "batch": batch_size, "vision_s": m["vision_s"], "prefill_s": m["prefill_s"],
           "decode_step_s": m.get("decode_step_s"), "e2e_s": m["e2e_s"], "tiles": int(tiles.shape[0]),
           "tiles_per_s": tiles.shape[0] / m["vision_s"]["median"], "images_per_s": batch_size / m["e2e_s"]["median"],
           "prompt_len": int(batch["input_ids"].shape[1]), "new_tokens": int(tokens.shape[1]),
           "tokens": tokens[0, :8].tolist()}
    if "peak_bytes" in m:
        out["peak_bytes"] = m["peak_bytes"]
    return out
