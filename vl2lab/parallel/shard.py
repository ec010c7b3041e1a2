"""Tensor and expert parallelism for the whole DeepSeek-VL2: shard a model in place on every rank.

Lesson: notebook 04 (full 4-GPU deployment), sections 1-3.

Every rank starts from the same model; ``shard_model`` keeps this rank's slice of each split weight and swaps in
the layers of :mod:`vl2lab.parallel.layers`. The maths of one decoder layer on rank r (N ranks)::

    attention:  heads h ∈ H_r.  q,k,v = x W_{q,k,v}[H_r]       (column split, whole heads)
                y = Σ_r o_r W_o[:, H_r]ᵀ                        (row split: ONE all-reduce)
    MLA:        q = x W_q[H_r]; [c | k_pe] = x W_kv_a (replicated, so the latent cache is replicated);
                [k_nope | v] = c W_kv_b[H_r]; then as above
    dense MLP:  y = Σ_r (silu(x W_gate[I_r]ᵀ) ⊙ x W_up[I_r]ᵀ) W_down[:, I_r]ᵀ          (ONE all-reduce)
    MoE:        y = Σ_r ( Σ_{e∈topk} w_e · SwiGLU_e^{(r)}(x) + Shared^{(r)}(x) )        (ONE all-reduce)
                moe="tp": SwiGLU_e^{(r)} uses columns I_r of every expert (fused gate/up [E,I,H] by dim 1,
                          down [E,H,I] by dim 2); moe="ep": rank r holds whole experts [e_r, e_{r+1}) and gives
                          zero for the others. The shared experts are always split by width (Shared^{(r)}), so
                          their partial sum rides in the same all-reduce (``MoE.reduce``, shared_in_reduce=True).
    router, norms, kv_a_proj_with_mqa, kv_a_layernorm, projector, image_newline, view_seperator: replicated.
    embedding:  vocab rows split, one all-reduce (VocabParallelEmbedding); lm_head: vocab split, logits gathered.

KV cache: MHA (tiny) caches K and V of the rank's own heads only (1/N of it, uneven with the heads); the MLA
latent c and k_pe (small, base) are computed by the replicated kv_a_proj_with_mqa, so every rank caches all of it.

Communication per generated token (L layers, batch B, hidden H, vocab V): 2L + 1 all-reduces of B·H values and
one all-gather of the logits (B·V). Vision: ``replicated`` (every rank runs the tower on every tile, no
communication) or ``data_parallel`` (rank r encodes and projects its share of the batch's tiles, then one
all-gather of [N, 196, D]; shares may be uneven, even zero).

Uneven splits are allowed wherever a rank can still hold a whole unit: heads (10 heads on 4 ranks → 3,3,2,2;
vLLM requires heads % N == 0), FFN and expert widths (blocks of 8 channels when every rank gets at least one, so
that bf16 rows stay 16-byte aligned as CUDA's grouped_mm needs; otherwise channel by channel), whole experts
(moe="ep"), vocab rows. A split that would leave a rank with nothing (fewer heads than ranks, …) raises
:class:`ShardingError` before the model is touched. Inference only: the backward all-reduces of the column
inputs are not wired for the experts.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vl2lab.parallel.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                       _rank_world, reduce_from_tp, shard_range, split_sizes)

__all__ = ["ShardingError", "check_plan", "ffn_unit", "shard_model", "set_vision_mode", "PartialRowLinear",
           "CommCounter", "comm_modules", "param_bytes", "MOE_MODES", "VISION_MODES"]

MOE_MODES = ("tp", "ep")
VISION_MODES = ("replicated", "data_parallel")
_VISION_ALIASES = {"dp": "data_parallel", "data-parallel": "data_parallel", "replicate": "replicated"}


class ShardingError(ValueError):
    """The model cannot be split over this many ranks (the message names the dimension and what to do)."""


def _vision_mode(vision: str) -> str:
    mode = _VISION_ALIASES.get(vision, vision)
    if mode not in VISION_MODES:
        raise ValueError(f"vision={vision!r}: choose 'replicated' or 'data_parallel' (alias 'dp')")
    return mode


def ffn_unit(width: int, world_size: int) -> int:
    """Split granularity of an FFN/expert width: 8 channels when every rank still gets a block, else 1."""
    return 8 if width % 8 == 0 and width // 8 >= world_size else 1


def check_plan(config, world_size: int, moe: str = "tp") -> dict:
    """Per-rank split sizes of every split dimension, or one ShardingError listing every dimension that cannot
    give each of ``world_size`` ranks at least one unit. ``config``: VL2Config or its language_config."""
    if moe not in MOE_MODES:
        raise ValueError(f"moe={moe!r}: choose 'tp' (split every expert's width) or 'ep' (whole experts per rank)")
    lc = getattr(config, "language_config", config)
    dims = {"heads": (lc.num_attention_heads, 1, "attention heads (a rank needs a whole head)"),
            "vocab": (lc.vocab_size, 1, "vocabulary rows")}
    if not lc.use_mla and lc.num_key_value_heads != lc.num_attention_heads:
        raise ShardingError(f"{lc.num_key_value_heads} key/value heads for {lc.num_attention_heads} query heads: "
                            "grouped-query attention is not part of this sharding plan (DeepSeek-VL2 has none)")
    if any(not lc.is_moe_layer(i) for i in range(lc.num_hidden_layers)):
        dims["dense_width"] = (lc.intermediate_size, ffn_unit(lc.intermediate_size, world_size), "dense MLP width")
    if lc.is_moe:
        shared = lc.moe_intermediate_size * lc.n_shared_experts
        if shared:
            dims["shared_width"] = (shared, ffn_unit(shared, world_size), "shared-experts width")
        if moe == "ep":
            dims["experts"] = (lc.n_routed_experts, 1, "routed experts with moe='ep' (use moe='tp' to split "
                                                       "every expert's width instead)")
        else:
            I = lc.moe_intermediate_size
            dims["expert_width"] = (I, ffn_unit(I, world_size), "expert width with moe='tp'")
    bad = [f"{n} {what} cannot be split over {world_size} ranks; at most {n // unit} rank(s)"
           for n, unit, what in dims.values() if n // unit < world_size]
    if bad:
        raise ShardingError("cannot shard this model: " + "; ".join(bad) + ". Use a smaller world size"
                            + (" (or moe='tp')" if moe == "ep" else ""))
    return {k: [s // u for s in split_sizes(n, world_size, u)] if k in ("heads", "experts") else
            split_sizes(n, world_size, u) for k, (n, u, _) in dims.items()}


class PartialRowLinear(RowParallelLinear):
    """A row-split Linear that returns this rank's partial product X_r W_rᵀ without reducing it: the MoE layer
    adds it to the routed partial sums and reduces once (``MoE.reduce``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)                          # [..., out]: this rank's term only


def _record(layout: dict, prefix: str, dims: dict) -> None:
    """Note each split parameter's dense shape and slice (what a per-rank loader reads):
    {name: (dense shape, dim, start, end)} → layout[prefix.name] = (dense shape, leading-dim slices)."""
    for name, (full, dim, start, end) in dims.items():
        layout[f"{prefix}.{name}"] = (tuple(full), tuple([slice(None)] * dim + [slice(start, end)]))


def _column(layout, parent, name, prefix, group, unit=1, cls=ColumnParallelLinear):
    dense = getattr(parent, name)
    new = cls.from_dense(dense, group=group) if cls is ParallelLMHead else cls.from_dense(dense, group=group,
                                                                                         unit=unit)
    setattr(parent, name, new)
    dims = {"weight": (dense.weight.shape, 0, new.start, new.end)}
    if dense.bias is not None:
        dims["bias"] = (dense.bias.shape, 0, new.start, new.end)
    _record(layout, f"{prefix}.{name}", dims)


def _row(layout, parent, name, prefix, group, unit=1, cls=RowParallelLinear):
    dense = getattr(parent, name)
    if cls is PartialRowLinear and dense.bias is not None:
        raise ShardingError(f"{prefix}.{name} has a bias; a partial row split needs a bias-free Linear")
    new = cls.from_dense(dense, group=group, unit=unit)
    setattr(parent, name, new)
    _record(layout, f"{prefix}.{name}", {"weight": (dense.weight.shape, 1, new.start, new.end)})


def _narrow(layout, module, prefix, name, dim, start, end):
    p = getattr(module, name)
    module._parameters[name] = nn.Parameter(p.detach().narrow(dim, start, end - start).clone(),
                                            requires_grad=p.requires_grad)
    _record(layout, prefix, {name: (p.shape, dim, start, end)})


def _shard_mlp(layout, mlp, prefix, group, world, partial=False):
    unit = ffn_unit(mlp.gate_proj.out_features, world)
    _column(layout, mlp, "gate_proj", prefix, group, unit)
    _column(layout, mlp, "up_proj", prefix, group, unit)
    _row(layout, mlp, "down_proj", prefix, group, unit, PartialRowLinear if partial else RowParallelLinear)


@torch.no_grad()
def shard_model(model, group=None, moe: str = "tp", vision: str = "replicated"):
    """Shard a DeepseekVL2ForCausalLM in place for this rank of ``group`` (every rank must call it on the same
    model). Works on real weights (slices are copied, the dense tensors freed) and on the meta device (only
    shapes change; :func:`vl2lab.parallel.load.load_sharded` then reads the slices). Records
    ``model.tp_layout`` {parameter key: (dense shape, slices)} and ``model.tp_plan``. Returns the model."""
    from vl2lab.model.attention import MHAttention, MLAttention
    from vl2lab.model.moe import MoE

    if getattr(model, "tp_plan", None):
        raise ShardingError("this model is already sharded; shard a fresh copy (or load_sharded again)")
    rank, world = _rank_world(group)
    splits = check_plan(model.config, world, moe)
    vision = _vision_mode(vision)
    layout: dict = {}
    lm = model.language
    dense_emb = lm.model.embed_tokens
    lm.model.embed_tokens = emb = VocabParallelEmbedding.from_dense(dense_emb, group=group)
    _record(layout, "language.model.embed_tokens", {"weight": (dense_emb.weight.shape, 0, emb.start, emb.end)})
    for i, layer in enumerate(lm.model.layers):
        pre = f"language.model.layers.{i}"
        at, ap = layer.self_attn, pre + ".self_attn"
        if isinstance(at, MHAttention):
            for n in ("q_proj", "k_proj", "v_proj"):
                _column(layout, at, n, ap, group, at.head_dim)
            _row(layout, at, "o_proj", ap, group, at.head_dim)
        elif isinstance(at, MLAttention):                        # kv_a_proj_with_mqa, kv_a_layernorm: replicated
            _column(layout, at, "q_proj", ap, group, at.q_head_dim)
            _column(layout, at, "kv_b_proj", ap, group, at.nope + at.v_dim)
            _row(layout, at, "o_proj", ap, group, at.v_dim)
        else:
            raise ShardingError(f"{ap} is a {type(at).__name__}; the plan knows MHAttention and MLAttention")
        mp = pre + ".mlp"
        if not isinstance(layer.mlp, MoE):
            _shard_mlp(layout, layer.mlp, mp, group, world)
            continue
        ex, xp = layer.mlp.experts, mp + ".experts"
        if moe == "ep":
            start, end = shard_range(ex.num_experts, rank, world)
            for n in ("gate_proj", "up_proj", "down_proj"):
                _narrow(layout, ex, xp, n, 0, start, end)
            ex.expert_start = start
        else:
            I = ex.gate_proj.shape[1]
            start, end = shard_range(I, rank, world, ffn_unit(I, world))
            _narrow(layout, ex, xp, "gate_proj", 1, start, end)
            _narrow(layout, ex, xp, "up_proj", 1, start, end)
            _narrow(layout, ex, xp, "down_proj", 2, start, end)
        if layer.mlp.shared_experts is not None:
            _shard_mlp(layout, layer.mlp.shared_experts, mp + ".shared_experts", group, world, partial=True)
        layer.mlp.shared_in_reduce = True                        # routed + shared partial sums, then ONE reduce
        layer.mlp.reduce = functools.partial(reduce_from_tp, group=group)
    _column(layout, lm, "lm_head", "language", group, cls=ParallelLMHead)   # logits gathered
    model.tp_layout = layout
    model.tp_plan = {"rank": rank, "world_size": world, "moe": moe, "vision": vision, "splits": splits}
    set_vision_mode(model, vision, group)
    return model


class _DataParallelImageFeatures:
    """``model.image_features`` with the tiles split over the ranks: rank r runs the tower and the projector on
    tiles [a_r, a_{r+1}) (shares differ by at most one, possibly zero), then one all-gather of the projected
    [n_r, 196, D] (3.7× fewer bytes than gathering the tower's [n_r, 729, 1152]) and the usual layout."""

    def __init__(self, model, group):
        self.model, self.group = model, group

    def __call__(self, pixel_tiles: torch.Tensor, crops) -> torch.Tensor:
        from vl2lab.model.vision import layout_images

        m = self.model
        rank, world = _rank_world(self.group)
        n = pixel_tiles.shape[0]
        sizes = [n // world + (r < n % world) for r in range(world)]
        start = sum(sizes[:rank])
        h, d = m.projector.out_grid, m.projector.layers[-1].out_features
        w = m.projector.layers[0].weight
        if sizes[rank]:
            mine = m.projector(m.encode_tiles(pixel_tiles[start:start + sizes[rank]]))   # [n_r, h·h, D]
        else:
            mine = torch.zeros(0, h * h, d, dtype=w.dtype, device=w.device)
        feats = _all_gather_rows(mine, sizes, self.group).view(n, h, h, d)            # [N, h, h, D]
        return layout_images(feats, crops, m.image_newline, m.view_seperator)


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0, ``sizes`` rows each): pad to the largest share, gather, trim."""
    if len(sizes) == 1:
        return x
    pad = max(sizes) - x.shape[0]
    x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x.contiguous()
    pieces = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(pieces, x, group=group)
    return torch.cat([p[:s] for p, s in zip(pieces, sizes)])


def set_vision_mode(model, vision: str, group=None) -> None:
    """Switch the vision side between ``replicated`` and ``data_parallel`` (tiles split over the ranks)."""
    vision = _vision_mode(vision)
    model.__dict__.pop("image_features", None)                   # back to the class's own image_features
    if vision == "data_parallel":
        model.__dict__["image_features"] = _DataParallelImageFeatures(model, group)
    if getattr(model, "tp_plan", None):
        model.tp_plan["vision"] = vision


# ------------------------------------------------------------------------------------------ measuring
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
