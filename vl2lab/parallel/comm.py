"""Counting communication: which collectives a forward makes, how many bytes they move, and what a rank holds.

Lesson: notebook 04, section "5. Communication per generated token"; notebook 02, section "3. Column → row: one all-reduce per block".

:class:`CommCounter` wraps ``torch.distributed.all_reduce`` / ``all_gather`` / ``all_gather_into_tensor`` inside a
``with`` block and attributes each call to the watched modules whose forward it happens in; :func:`comm_modules`
names the modules of one DeepSeek-VL2 worth watching (the language model, embedding, head, every layer's attention
and feed-forward). Bytes are the size of each collective's result on one rank (gathered pieces include padding).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch.distributed as dist
from torch import nn

from vl2lab.model.attention import MLAttention
from vl2lab.model.moe import MoE

__all__ = ["CommCounter", "comm_modules", "param_bytes", "describe_rank"]


def param_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def comm_modules(model) -> dict:
    """The modules whose collectives a :class:`CommCounter` attributes: the language model, embedding, head,
    and every layer's attention and feed-forward."""
    lm = model.language
    out = {"language": lm, "embed_tokens": lm.model.embed_tokens, "lm_head": lm.lm_head}
    for i, layer in enumerate(lm.model.layers):
        out[f"layers.{i}.self_attn"], out[f"layers.{i}.mlp"] = layer.self_attn, layer.mlp
    return out


class CommCounter(contextlib.AbstractContextManager):
    """Count the collectives made inside a ``with`` block, and their bytes (the size of each collective's
    result on one rank: the reduced tensor; the gathered tensors, padding included)::

        with CommCounter(comm_modules(model)) as c:
            model.generate(...)
        c.totals                  # {"all_reduce": n, "all_reduce_bytes": b, "all_gather": n, "all_gather_bytes": b}
        c.calls["language"]       # one totals-like dict per forward call: [prefill, decode step 1, ...]
    """

    def __init__(self, watch: Optional[dict] = None):
        self.watch = watch or {}
        self.totals = dict.fromkeys(("all_reduce", "all_reduce_bytes", "all_gather", "all_gather_bytes"), 0)
        self.calls = {name: [] for name in self.watch}
        self._saved, self._hooks, self._stack = {}, [], {}

    def _wrap(self, op, fn):
        def counted(tensor_or_list, *args, **kwargs):
            if op == "all_reduce":
                nbytes = tensor_or_list.numel() * tensor_or_list.element_size()
            elif isinstance(tensor_or_list, (list, tuple)):
                nbytes = sum(t.numel() * t.element_size() for t in tensor_or_list)
            else:                                                # all_gather_into_tensor(output, input)
                nbytes = tensor_or_list.numel() * tensor_or_list.element_size()
            self.totals[op] += 1
            self.totals[op + "_bytes"] += nbytes
            return fn(tensor_or_list, *args, **kwargs)
        return counted

    def __enter__(self):
        for name, op in (("all_reduce", "all_reduce"), ("all_gather", "all_gather"),
                         ("all_gather_into_tensor", "all_gather")):
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(op, self._saved[name]))
        for name, mod in self.watch.items():
            self._hooks.append(mod.register_forward_pre_hook(functools.partial(self._pre, name)))
            self._hooks.append(mod.register_forward_hook(functools.partial(self._post, name)))
        return self

    def _pre(self, name, *_):
        self._stack.setdefault(name, []).append(dict(self.totals))

    def _post(self, name, *_):
        before = self._stack[name].pop()
        self.calls[name].append({k: self.totals[k] - before[k] for k in self.totals})

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return False


def describe_rank(model) -> dict:
    """What this rank holds, read from its modules: heads, KV cache, vocab rows, FFN widths, experts, vision mode,
    parameter bytes (a model that is not sharded reports world size 1)."""
    plan = getattr(model, "tp_plan", None) or {"rank": 0, "world_size": 1, "moe": "-", "vision": "replicated"}
    lm = model.language
    at = lm.model.layers[0].self_attn
    mla = isinstance(at, MLAttention)
    unit = at.q_head_dim if mla else at.head_dim
    emb = lm.model.embed_tokens
    out = {"rank": plan["rank"], "world_size": plan["world_size"], "moe": plan["moe"], "vision": plan["vision"],
           "heads": at.q_proj.weight.shape[0] // unit,
           "kv_cache": "latent c + k_pe (replicated)" if mla else f"K,V of {at.k_proj.weight.shape[0] // unit} heads",
           "vocab_rows": (getattr(emb, "start", 0), getattr(emb, "end", emb.weight.shape[0])),
           "param_bytes": param_bytes(model)}
    for ly in lm.model.layers:
        if not isinstance(ly.mlp, MoE):
            out["dense_width"] = ly.mlp.gate_proj.weight.shape[0]
            continue
        ex = ly.mlp.experts
        out["experts"] = (ex.expert_start, ex.expert_start + ex.n_local_experts)
        out["expert_width"] = ex.gate_proj.shape[1]
        if ly.mlp.shared_experts is not None:
            out["shared_width"] = ly.mlp.shared_experts.gate_proj.weight.shape[0]
    return out
