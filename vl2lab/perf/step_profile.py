"""One decode step under ``torch.profiler``, summarised as a table: what runs, how often, for how long.

Lesson: notebook 05, section "Reading a profile".

How to read it: ``self_us`` is the time an op spends in its own kernels (device time on a GPU, CPU time on a CPU),
per step; ``calls`` per step. The categories add up the ops by kind::

    matmul          mm / addmm / bmm / linear / grouped_mm       the weight reads: decode's real work
    attention       SDPA kernels                                  grows with the context
    communication   all-reduce / all-gather (NCCL, gloo)          tensor-parallel cost
    other           norms, RoPE, routing, sort, index, copies     elementwise work and launch-bound small ops

On a GPU the rows are the kernels and copies themselves (what the device ran, also inside a CUDA graph); on a CPU
the operators. In eager decoding at batch 1 the device is idle between kernels: the sum of kernel times
(``device_busy_us``) is far below the wall time of a step (``wall_us``); a CUDA graph closes that gap, torch.compile
shrinks ``kernels``.
"""
from __future__ import annotations

import re
import time

import torch

from vl2lab.model.graph_decode import decoder_for
from vl2lab.perf.workload import workload_batch

__all__ = ["CATEGORIES", "category", "profile_steps", "summarise"]

CATEGORIES = (("communication", r"nccl|all_?reduce|all_?gather|gloo|c10d"),
              ("attention", r"attention|sdpa|flash|fmha|efficient|softmax"),
              ("matmul", r"\bmm\b|addmm|bmm|gemm|gemv|matmul|linear|grouped_mm|cutlass|xmma|nvjet|cublas"))


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def _self_time_us(ev, use_device: bool) -> float:
    if use_device:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(ev, attr):
                return float(getattr(ev, attr))
        return 0.0
    return float(ev.self_cpu_time_total)


def summarise(prof, steps: int, use_device: bool, top: int = 15) -> dict:
    """Profiler → {rows: top ops per step, categories: µs per step by kind, kernels per step, busy µs}."""
    rows = []
    for ev in prof.key_averages():
        if use_device and getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue                                      # on a GPU: the kernels and copies themselves
        t = _self_time_us(ev, use_device)
        if t <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        rows.append({"op": ev.key[:70], "calls": ev.count / steps, "self_us": t / steps,
                     "category": category(ev.key)})
    kernels = 0.0
    if use_device:
        cuda = torch.autograd.DeviceType.CUDA
        kernels = sum(e.count for e in prof.events() if getattr(e, "device_type", None) == cuda) / steps
    rows.sort(key=lambda r: -r["self_us"])
    cats = {c: 0.0 for c, _ in CATEGORIES}
    cats["other"] = 0.0
    for r in rows:
        cats[r["category"]] += r["self_us"]
    busy = sum(r["self_us"] for r in rows) if use_device else None
    return {"rows": rows[:top], "categories": cats, "kernels_per_step": kernels, "device_busy_us": busy}


@torch.no_grad()
def profile_steps(vl2, processor, batch_size: int = 1, steps: int = 8, decode: str = "eager", seed: int = 0) -> dict:
    """Prefill the fixed workload's prompt (:mod:`vl2lab.perf.workload`), then profile ``steps`` decode steps
    (``decode``: eager, graph, compile)."""
    dev = next(vl2.parameters()).device
    dt = next(vl2.parameters()).dtype
    cuda = dev.type == "cuda"
    batch = workload_batch(processor, batch_size, dev, dt, seed)
    lm = vl2.language
    embeds = vl2.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                       batch["images_spatial_crop"])
    mask = batch["attention_mask"].long()
    B, T = mask.shape
    if decode == "eager":
        cache = lm.new_cache(T + 2 * steps + 2)
        _, cache = lm(inputs_embeds=embeds, attention_mask=mask, cache=cache, num_logits_to_keep=1)
        tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        state = {"mask": mask}

        def step():
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(B, 1)], dim=1)
            logits, _ = lm(input_ids=tok, attention_mask=state["mask"], cache=cache, num_logits_to_keep=1)
            tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
    else:
        cfg = vl2.config.language_config
        dec = decoder_for(lm, B, T + 2 * steps + 4, dev, decode, cfg.eos_token_id, 0, ignore_eos=True)
        dec.generate(embeds, mask, 2)                         # prefill, capture, one step
        step = dec.replay
    for _ in range(steps // 2 or 1):                          # warm
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(dev)
    wall = (time.perf_counter() - t0) / steps
    out = summarise(prof, steps, cuda)
    out.update(decode=decode, batch=batch_size, steps=steps, wall_us=wall * 1e6, device=str(dev))
    return out
