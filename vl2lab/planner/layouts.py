"""The bytes on each GPU of a parallel layout, read from the one sharding plan, and which layouts fit.

Lesson: notebook 04, sections "1. What each rank holds" (legal TP sizes) and "4. Memory per rank against the
planner" (per-rank bytes); notebook 01, section "5. Will it fit? The planner".

What a rank holds is not re-derived here: :func:`rank_weight_params` applies :func:`vl2lab.parallel.plan.plan_slices`
to the model's tensor shapes (built once on the meta device) and sums the slices of the most loaded rank (rank 0:
uneven splits give the first ranks one unit more), part by part. The KV cache and the activations come from the
formulas of :mod:`vl2lab.planner.sizing`.
"""
from __future__ import annotations

import re

from vl2lab.model.config import VL2Config
from vl2lab.parallel.plan import ShardingError, check_plan, model_shapes, plan_slices, vision_mode
from vl2lab.planner.sizing import (CUDA_CONTEXT_BYTES, activation_bytes, cdiv, check_config, dtype_bytes, gb,
                                   kv_cache_bytes)

__all__ = ["TPSizes", "legal_tp_sizes", "legal_ep_sizes", "part_of", "rank_weight_params", "rank_weight_bytes",
           "layout_bytes", "usable_bytes", "fits", "feasible_layouts", "tp_weight_rows", "REPLICATED_PARTS"]

# tensor key → the part of the model it belongs to (the first pattern that matches wins)
PARTS = (
    ("vision", r"vision\."),
    ("projector", r"projector\.|image_newline$|view_seperator$"),
    ("embedding", r"language\.model\.embed_tokens\."),
    ("lm_head", r"language\.lm_head\."),
    ("correction_bias", r".*\.mlp\.gate\.e_score_correction_bias$"),
    ("router", r".*\.mlp\.gate\.weight$"),
    ("kv_a_proj", r".*\.self_attn\.kv_a_proj_with_mqa\."),
    ("norms", r".*layernorm\.weight$|language\.model\.norm\.weight$"),
    ("attention", r".*\.self_attn\."),
    ("shared_experts", r".*\.mlp\.shared_experts\."),
    ("routed_experts", r".*\.mlp\.experts\."),
    ("dense_mlp", r".*\.mlp\.(gate|up|down)_proj\."),
)
_PARTS = tuple((name, re.compile(p)) for name, p in PARTS)
REPLICATED_PARTS = ("vision", "projector", "norms", "router", "correction_bias", "kv_a_proj")


class TPSizes(list):
    """The legal sizes (a list of ints), with ``.rejected`` = {size: reason} for every size refused."""

    def __init__(self, legal, rejected):
        super().__init__(legal)
        self.rejected = rejected


def legal_tp_sizes(cfg: VL2Config, max_tp: int = 16, moe: str = "tp", vision: str = "replicated",
                   rule: str = "vl2lab") -> TPSizes:
    """TP sizes t ≤ max_tp that can split ``cfg``. ``rule="vl2lab"``: the sharding plan's own test
    (:func:`vl2lab.parallel.plan.check_plan`: every rank holds at least one unit of every split quantity, so 10
    heads split 3, 3, 2, 2 over 4 ranks). ``rule="vllm"``: vLLM's stricter one, every split dimension divisible by
    t: heads, key/value heads (MHA), the dense, shared-expert and (moe="tp") expert widths, and the vision MLP
    width with vision="tp". The vocab need not divide in either (its split is uneven)."""
    check_config(cfg)
    if rule not in ("vl2lab", "vllm"):
        raise ValueError(f"rule={rule!r}: choose 'vl2lab' (the sharding plan) or 'vllm' (divisible splits)")
    vision = vision_mode(vision)
    lm = cfg.language_config
    dims = [("attention heads", lm.num_attention_heads)]
    if not lm.use_mla:
        dims.append(("key/value heads", lm.num_key_value_heads))
    dims.append(("intermediate_size (dense MLP)", lm.intermediate_size))
    if lm.is_moe:
        dims.append(("shared-expert width", (lm.n_shared_experts or 0) * lm.moe_intermediate_size))
        if moe == "tp":
            dims.append(("moe_intermediate_size", lm.moe_intermediate_size))
    if vision == "tp":
        dims.append(("vision MLP width", cfg.vision_config.mlp_dim))
    legal, rejected = [], {}
    for t in range(1, max_tp + 1):
        if rule == "vllm":
            why = "; ".join(f"{name} {n} % {t} = {n % t}" for name, n in dims if n % t)
        else:
            try:
                check_plan(cfg, t, moe, vision)
                why = ""
            except ShardingError as e:
                why = str(e)
        if why:
            rejected[t] = why
        else:
            legal.append(t)
    return TPSizes(legal, rejected)


def legal_ep_sizes(cfg: VL2Config, max_ep: int = 16) -> TPSizes:
    """EP sizes that spread the routed experts evenly: ep | E (small 64: 1, 2, 4, 8, 16; base 72: 1, 2, 3, 4,
    6, 8, 9, 12)."""
    E = cfg.language_config.n_routed_experts or 0
    legal = [e for e in range(1, max_ep + 1) if E and E % e == 0]
    return TPSizes(legal, {e: f"{E} experts % {e} = {E % e if E else 'no experts'}"
                           for e in range(1, max_ep + 1) if e not in legal})


def part_of(key: str) -> str:
    """The part of the model a tensor key belongs to (vision, projector, attention, routed_experts, ...)."""
    for name, pattern in _PARTS:
        if pattern.match(key):
            return name
    raise KeyError(f"{key}: no part of the model claims this tensor; add a pattern to PARTS")


def rank_weight_params(cfg: VL2Config, tp: int = 1, ep: int = 1, moe: str = "tp",
                       vision: str = "replicated", rank: int = 0) -> dict:
    """Elements held by ``rank`` (default 0, the most loaded) of a ``tp``-way split, per part, plus
    ``replicated`` (the sum of the replicated parts) and ``total`` (every parameter and persistent buffer vl2lab
    builds: no attn_pool). Read from the sharding plan: replicated are the vision tower (its MLP split with
    vision="tp", as vLLM does), projector, special vectors, all norms, the router and its correction bias, MLA's
    kv_a_proj_with_mqa; split are attention (whole heads), dense MLP and shared experts (8-channel blocks),
    embedding and lm_head (vocab rows, uneven: not vLLM's padding to a multiple of 64·tp), and the routed experts
    by width over tp (moe="tp") or as whole experts over ``ep`` ranks (moe="ep")."""
    shapes = model_shapes(cfg)
    slices = plan_slices(shapes, cfg.language_config.num_attention_heads, rank, tp, moe, vision,
                         ep=(rank % ep, ep) if moe == "ep" else None)
    p = dict.fromkeys((name for name, _ in PARTS), 0)
    for key, shape in shapes.items():
        shape = slices[key].shape if key in slices else shape
        n = 1
        for s in shape:
            n *= s
        p[part_of(key)] += n
    p["replicated"] = sum(p[x] for x in REPLICATED_PARTS)
    p["total"] = sum(p.values()) - p["replicated"]
    return p


def rank_weight_bytes(cfg: VL2Config, tp: int = 1, ep: int = 1, moe: str = "tp", vision: str = "replicated",
                      dtype="bfloat16") -> dict:
    """:func:`rank_weight_params` in bytes (elements · itemsize; the correction bias stays fp32), without totals."""
    p, b = rank_weight_params(cfg, tp, ep, moe, vision), dtype_bytes(dtype)
    return {k: n * (4 if k == "correction_bias" else b) for k, n in p.items() if k not in ("replicated", "total")}


def layout_bytes(cfg: VL2Config, tp: int = 1, ep: int = 1, dp: int = 1, dtype="bfloat16",
                 vision: str = "replicated", moe: str = "tp", batch: int = 1, seq_len: int = 4096, tiles: int = 10,
                 mla_cache: str = "latent", attn: str = "sdpa", logits: str = "last", kv_dtype=None) -> dict:
    """Bytes on the most loaded GPU of a layout with world = tp·dp ranks (dp replicas of a tp group).

    weights = Σ rank_weight_params · b (correction bias at 4 B); kv_cache = kv_cache_bytes(ceil(batch/dp) ·
    seq_len tokens), split by heads for MHA / expanded MLA, replicated for the MLA latent; activations =
    activation_bytes(ceil(batch/dp), ...)["peak"]; total = weights + kv_cache + activations. ``batch`` is the
    whole layout's number of concurrent sequences; each replica takes ceil(batch/dp). moe="ep" places
    ceil(E/ep) whole experts per rank (ep must divide tp·dp; vLLM uses ep = tp·dp); vision "replicated" and
    "data_parallel" hold the whole tower (the latter splits the tiles over the tp ranks), "tp" splits its MLP.
    Against the spec's vLLM-style "weights per TP rank" table: vision="tp" is vLLM's split (ViT MLP split,
    the rest of the tower replicated) and lands 30 MB below it per rank, because vl2lab holds no attn_pool
    (15.2M params) and splits the vocab unevenly instead of padding it."""
    if min(tp, ep, dp) < 1:
        raise ValueError(f"tp, ep and dp must be >= 1, got tp={tp}, ep={ep}, dp={dp}")
    if moe == "tp" and ep != 1:
        raise ValueError(f"moe='tp' splits experts by width over tp and needs ep=1 (got ep={ep}); use moe='ep'")
    if moe == "ep" and (tp * dp) % ep:
        raise ValueError(f"ep={ep} must divide the world size tp·dp = {tp * dp}")
    try:
        check_plan(cfg, tp, moe, vision)
    except ShardingError as e:
        raise ValueError(f"tp={tp} cannot split {cfg.name} (moe={moe!r}, vision={vision!r}): {e}; legal sizes: "
                         f"{list(legal_tp_sizes(cfg, max(tp, 16), moe, vision))}") from None
    parts = rank_weight_bytes(cfg, tp, ep, moe, vision, dtype)
    repl = sum(parts[k] for k in REPLICATED_PARTS)
    b_rep = cdiv(batch, dp)
    act = activation_bytes(cfg, b_rep, seq_len, tiles, dtype, tp, vision=vision, attn=attn, logits=logits,
                           moe=moe, ep=ep)
    out = dict(tp=tp, ep=ep, dp=dp, world=tp * dp, moe=moe, vision=vision, batch_per_replica=b_rep,
               weights_replicated=repl, weights_sharded=sum(parts.values()) - repl, weights=sum(parts.values()),
               kv_cache=kv_cache_bytes(cfg, b_rep * seq_len, kv_dtype or dtype, mla_cache, tp),
               activations=act["peak"], weight_parts=parts)
    out["total"] = out["weights"] + out["kv_cache"] + out["activations"]
    return out


def usable_bytes(gpu_bytes: float, margin: float = 0.10, context_bytes: int = CUDA_CONTEXT_BYTES) -> float:
    """What a layout may use: gpu_bytes · (1 − margin) − context_bytes (10% for the allocator's fragmentation
    and workspaces, 0.5 GB for the CUDA context)."""
    return gpu_bytes * (1 - margin) - context_bytes


def fits(cfg: VL2Config, gpu_bytes: float, margin: float = 0.10, context_bytes: int = CUDA_CONTEXT_BYTES,
         **layout) -> bool:
    """layout_bytes(cfg, **layout)["total"] ≤ usable_bytes(gpu_bytes, margin, context_bytes)."""
    return layout_bytes(cfg, **layout)["total"] <= usable_bytes(gpu_bytes, margin, context_bytes)


def feasible_layouts(cfg: VL2Config, n_gpus: int, gpu_bytes: float, margin: float = 0.10,
                     context_bytes: int = CUDA_CONTEXT_BYTES, moe_modes=("tp", "ep"),
                     rule: str = "vl2lab", vision: str = "replicated", **workload) -> list[dict]:
    """Every layout using all ``n_gpus`` (tp·dp = n_gpus; tp legal under ``rule``, see :func:`legal_tp_sizes`; moe="ep" with ep ∈ {tp, n_gpus}, ep > 1,
    ep | E) whose per-rank total fits ``usable_bytes``. Each entry is a :func:`layout_bytes` dict plus ``usable``
    and ``headroom``. Order: fewest TP ranks first (DP replicas buy throughput, TP only latency), TP-split
    experts before EP, then the smaller per-rank total. ``workload``: batch, seq_len, tiles, dtype, ..."""
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    usable = usable_bytes(gpu_bytes, margin, context_bytes)
    eps = legal_ep_sizes(cfg, max_ep=n_gpus)
    out = []
    tp_ok = legal_tp_sizes(cfg, n_gpus, "tp", vision, rule)
    for tp in legal_tp_sizes(cfg, n_gpus, "ep", vision, rule):
        if n_gpus % tp:
            continue
        cands = [("tp", 1)] if "tp" in moe_modes and tp in tp_ok else []
        if "ep" in moe_modes and cfg.language_config.is_moe:
            cands += [("ep", e) for e in sorted({tp, n_gpus}) if e > 1 and e in eps]
        for moe, ep in cands:
            lay = layout_bytes(cfg, tp=tp, ep=ep, dp=n_gpus // tp, moe=moe, vision=vision, **workload)
            if lay["total"] <= usable:
                out.append({**lay, "usable": usable, "headroom": usable - lay["total"]})
    return sorted(out, key=lambda x: (x["tp"], x["moe"] != "tp", x["total"]))




def tp_weight_rows(cfg: VL2Config, tps=None, dtype="bfloat16", vision: str = "replicated",
                   rule: str = "vllm") -> list[dict]:
    """Per-rank weight GB for each legal TP size (MoE split by width)."""
    tps = tps or legal_tp_sizes(cfg, 16, "tp", vision, rule)
    return [{"variant": cfg.name, "tp": t,
             "weights_GB": gb(sum(rank_weight_bytes(cfg, t, vision=vision, dtype=dtype).values()))} for t in tps]
