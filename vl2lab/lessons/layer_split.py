"""The layer split (after the official recipe) against one device, on N ranks: the same tokens, bit-identical logits.

Lesson: notebook 04, sections "6. Three ways to use 4 devices" and "8. Beyond one machine".
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vl2lab.lessons.sharded_vs_dense import greedy_with_logits, test_batches
from vl2lab.model.dtypes import as_dtype
from vl2lab.parallel.comm import param_bytes
from vl2lab.parallel.pipeline import PipelineLM, describe, generate, load_layer_split
from vl2lab.serve.deploy import cleanup_snapshot, snapshot_for
from vl2lab.weights.pretrained import load_pretrained

__all__ = ["check_layer_split"]


def check_layer_split(model: str = "random-tiny", sizes: Optional[Sequence[int]] = None, max_new_tokens: int = 8,
                      seed: int = 0, dtype: str = "float32", group=None) -> dict:
    """Rank function: the layer split of ``model`` (a snapshot folder, or a preset: random weights written by rank
    0 to a temp folder) against the whole model on one device, on the processor batches of
    :func:`vl2lab.lessons.sharded_vs_dense.compare_all` ('single': one image + prompt; 'pair': two left-padded prompts).
    Returns this rank's holding (``holds``), both token sets, ``tokens_equal``, ``logits_exact`` (the prefill
    logits, computed by the last rank and broadcast, bit-identical to one device's), and the 'single' request's
    compute intervals and bytes sent."""
    dt = as_dtype(dtype)
    path, made = snapshot_for(model, seed, group)
    try:
        split, processor = load_layer_split(path, group=group, sizes=sizes, dtype=dt)
        device = next(split.parameters()).device
        dense, _ = load_pretrained(path, dtype=dt, device=device)
    finally:
        cleanup_snapshot(path, made, group)
    out = {"holds": describe(split), "dense_param_bytes": param_bytes(dense), "tokens": {}, "dense_tokens": {},
           "tokens_equal": True, "logits_exact": True}
    for name, batch in test_batches(processor, True, device).items():
        stage = PipelineLM(split, group, keep_first_logits=True)
        tokens = generate(split, batch, max_new_tokens, group=group, stage=stage).cpu()
        ref_tokens, ref_logits, _ = greedy_with_logits(dense, batch, max_new_tokens)
        out["tokens"][name], out["dense_tokens"][name] = tokens, ref_tokens
        out["tokens_equal"] &= bool(torch.equal(tokens, ref_tokens))
        out["logits_exact"] &= bool(torch.equal(stage.first_logits, ref_logits))
        if name == "single":
            out.update(intervals=list(stage.intervals), sent_bytes=stage.sent_bytes,
                       broadcast_bytes=stage.broadcast_bytes)
    return out
