"""How many routed experts a decode step of the workload reads, counted from the model's own routers.

Lesson: notebook 05, section "2. The ladder, run here".

A decode step of B sequences sends B tokens through every MoE layer; each token's router picks k of the E routed
experts, and the step must read the weights of every expert that at least one token picked::

    touched(layer, step) = | ∪_b topk(x_b) |                       1 ≤ touched ≤ min(E, B·k)

The floor of :mod:`vl2lab.perf.roofline` assumes independent, uniform routing, E·(1 − (1 − k/E)^B) experts per
layer. Rows whose states are alike pick alike experts and read fewer; rows that crowd onto different experts than
chance would, read more. :func:`experts_read` measures the count on the workload itself: forward hooks on every
:class:`~vl2lab.model.moe.Router` note the ids chosen in each decode step (the calls with exactly B tokens; the
prefill sends B·T) of one eager generation, so the floor can count the bytes the step really must read.
"""
from __future__ import annotations

import statistics

import torch

from vl2lab.model.moe import Router
from vl2lab.perf.roofline import experts_touched
from vl2lab.perf.workload import NEW_TOKENS, answer_tokens, workload_batch

__all__ = ["experts_read"]


def experts_read(vl2, processor, batch_size: int, new_tokens: int = NEW_TOKENS, seed: int = 0) -> dict:
    """Distinct routed experts per MoE layer per decode step, on the workload's batch of ``batch_size`` requests
    (:func:`~vl2lab.perf.workload.workload_requests`), greedy, EOS ignored → ``{"batch", "mean", "min", "max",
    "uniform", "n_experts", "top_k", "samples"}`` (``uniform``: the independent-routing estimate beside it).
    A model without routed experts gives ``None``."""
    routers = [m for m in vl2.modules() if isinstance(m, Router)]
    if not routers:
        return None
    counts = []

    def note(module, args, out):
        idx = out[0]                                      # [N, k] expert ids of N tokens
        if idx.shape[0] == batch_size:                    # a decode step (the prefill sends B·T tokens)
            counts.append(int(torch.unique(idx).numel()))

    dev, dt = next(vl2.parameters()).device, next(vl2.parameters()).dtype
    batch = workload_batch(processor, batch_size, dev, dt, seed)
    hooks = [r.register_forward_hook(note) for r in routers]
    try:
        with torch.inference_mode():
            answer_tokens(vl2, batch, new_tokens, decode="eager")
    finally:
        for h in hooks:
            h.remove()
    E, k = routers[0].weight.shape[0], routers[0].top_k
    return {"batch": batch_size, "mean": statistics.fmean(counts), "min": min(counts), "max": max(counts),
            "uniform": experts_touched(E, k, batch_size), "n_experts": E, "top_k": k, "samples": len(counts)}
