"""Parameter, weight, KV-cache and activation maths for DeepSeek-VL2.

Everything here is a pure function of a :class:`~vl2lab.model.config.VL2Config`: no model is built. Sizes are in
**bytes**; ``GB`` = 1e9 bytes and ``GiB`` = 2**30 bytes (functions :func:`gb` and :func:`gib`).

Notation: H LM hidden, L layers, V vocab, E routed experts, k experts per token, I_m expert width, I_d dense
width, n_h heads, d = 1152 vision width, m = 4304 vision MLP width, D projector output (= H).

Counting convention (the one the published figures use): ``total`` counts every tensor of the checkpoint,
including the SigLIP ``attn_pool`` head that is never called; ``activated`` = total − embedding − (E−k)/E · routed
experts (the published 1.0B / 2.8B / 4.5B are these values truncated to 0.1B). ``total_instantiated`` is what
vl2lab builds: no attn_pool, and the noaux_tc ``e_score_correction_bias`` is a buffer, not a parameter.

Lesson: notebook 01, sections "1. Load the model" (counts), "4. Where time and memory go" (bytes, KV cache) and
"5. Will it fit? The planner". The per-GPU bytes of a parallel layout are in :mod:`vl2lab.planner.layouts`.
"""
from __future__ import annotations

import math

from vl2lab.inputs.tiling import image_token_count
from vl2lab.model.config import ConfigError, VL2Config
from vl2lab.model.dtypes import dtype_bytes

GB, GiB = 10**9, 2**30
CUDA_CONTEXT_BYTES = 500 * 10**6  # CUDA context + cuBLAS/NCCL workspaces per process, a round estimate


def gb(n_bytes: float) -> float:
    return n_bytes / GB


def gib(n_bytes: float) -> float:
    return n_bytes / GiB


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def format_count(n: float, digits: int = 2) -> str:
    """A parameter (or any) count with the unit that fits: 917 → "917", 3_285_696 → "3.29M",
    3_370_501_440 → "3.37B" (K = 10³, M = 10⁶, B = 10⁹, T = 10¹²)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale * (1 - 0.5 * 10 ** -digits):  # 999_999_999 → "1.00B", not "1000.00M"
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:g}"


def check_config(cfg) -> None:
    if not isinstance(cfg, VL2Config):
        raise TypeError(f"expected a VL2Config (vl2lab.model.config.get_config(name)), got {type(cfg).__name__}")
    if cfg.projector_config.projector_type != "downsample_mlp_gelu":
        raise ConfigError(f"projector_type {cfg.projector_config.projector_type!r}: only downsample_mlp_gelu is sized")
    if cfg.language_config.attention_bias:
        raise ConfigError("attention_bias=True is used by no DeepSeek-VL2 variant and is not sized here")


# ------------------------------------------------------------------------------------------ parameter counts

def param_counts(cfg: VL2Config) -> dict:
    """Parameter count of every component (spec §3), as a dict of ints.

    * vision block = 2·LN(2d) + qkv(d·3d + 3d) + proj(d² + d) + fc1(d·m + m) + fc2(m·d + d); patch conv 3·p²·d + d;
      positions g²·d; final LN 2d; attn_pool = latent d + q(d²+d) + kv(2d²+2d) + proj(d²+d) + LN 2d + MLP.
    * projector = (4d·D + D) + (D² + D) (depth 2, ratio 1); special vectors 2·D.
    * MHA attention/layer = H·n_h·hd (q) + 2·H·n_kv·hd (k, v) + n_h·hd·H (o) = 4H² when n_kv = n_h.
    * MLA attention/layer = H·n_h·(nope+rope) + H·(c+rope) + c + c·n_h·(nope+v) + n_h·v·H, c = kv_lora_rank.
    * dense MLP = 3·H·I_d; shared = 3·H·(n_shared·I_m); routed/layer = E·3·H·I_m; gate = E·H (+E bias, noaux_tc).
    * norms = 2H per layer + H; embedding = lm_head = V·H (counted once if tied).
    """
    check_config(cfg)
    v, p, lm = cfg.vision_config, cfg.projector_config, cfg.language_config
    d, m, g = v.width, v.mlp_dim, v.grid
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    vis = 3 * v.patch_size ** 2 * d + d + g * g * d + v.layers * block + 2 * d
    pool = d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    pool = pool if v.global_pool == "map" else 0
    D = p.n_embed
    widths = [p.input_dim * p.downsample_ratio ** 2] + [D * p.mlp_ratio] * (p.depth - 1) + [D]
    projector = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))

    H, L, V = lm.hidden_size, lm.num_hidden_layers, lm.vocab_size
    if lm.use_mla:
        c, r = lm.kv_lora_rank, lm.qk_rope_head_dim
        attn = (H * lm.num_attention_heads * lm.q_head_dim + H * (c + r) + c
                + c * lm.num_attention_heads * (lm.qk_nope_head_dim + lm.v_head_dim)
                + lm.num_attention_heads * lm.v_head_dim * H)
    else:
        hd = lm.head_dim
        attn = H * hd * (2 * lm.num_attention_heads + 2 * lm.num_key_value_heads)
    n_moe = sum(lm.is_moe_layer(i) for i in range(L))
    E, k = (lm.n_routed_experts or 0), (lm.num_experts_per_tok or 0)
    expert = 3 * H * lm.moe_intermediate_size
    c = dict(
        vision=vis + pool, vision_no_pool=vis, vision_attn_pool=pool, vision_mlp_per_layer=d * m + m + m * d + d,
        projector=projector, special_vectors=2 * D,
        embedding=V * H, attention=L * attn, attention_per_layer=attn,
        dense_mlp=(L - n_moe) * 3 * H * lm.intermediate_size, n_dense_layers=L - n_moe, n_moe_layers=n_moe,
        shared_experts=n_moe * 3 * H * (lm.n_shared_experts or 0) * lm.moe_intermediate_size,
        routed_experts=n_moe * E * expert, routed_experts_per_layer=E * expert, routed_expert=expert,
        router=n_moe * E * H, correction_bias=n_moe * E if lm.topk_method == "noaux_tc" else 0,
        norms=2 * H * L + H, lm_head=0 if lm.tie_word_embeddings else V * H,
    )
    parts = ("vision", "projector", "special_vectors", "embedding", "attention", "dense_mlp", "shared_experts",
             "routed_experts", "router", "correction_bias", "norms", "lm_head")
    c["total"] = sum(c[x] for x in parts)
    c["total_instantiated"] = c["total"] - pool - c["correction_bias"]  # parameters() of vl2lab's model
    c["activated"] = c["total"] - c["embedding"] - c["routed_experts"] * (E - k) // max(E, 1)
    c["lm_activated"] = c["activated"] - c["vision"] - c["projector"] - c["special_vectors"]
    return c


def weight_bytes(cfg: VL2Config, dtype="bfloat16", instantiated: bool = False) -> int:
    """Bytes of all weights = params · itemsize (the correction bias stays fp32: 4 B each).
    ``instantiated=False``: the checkpoint (with attn_pool); True: what vl2lab's model holds."""
    c = param_counts(cfg)
    n = (c["total_instantiated"] + c["correction_bias"]) if instantiated else c["total"]
    return (n - c["correction_bias"]) * dtype_bytes(dtype) + 4 * c["correction_bias"]


# ------------------------------------------------------------------------------------------------ KV cache

def _kv_elems_per_head(cfg, mla_cache: str) -> tuple[int, int]:
    """(elements per token per layer that are split by heads, elements that are replicated across TP ranks)."""
    lm = cfg.language_config
    if mla_cache not in ("latent", "expanded", "expanded_padded"):
        raise ValueError(f"mla_cache must be 'latent', 'expanded' or 'expanded_padded', got {mla_cache!r}")
    if not lm.use_mla:
        return 2 * lm.num_key_value_heads * lm.head_dim, 0  # K and V, MHA has one cache form
    if mla_cache == "latent":
        return 0, lm.kv_lora_rank + lm.qk_rope_head_dim
    v = lm.q_head_dim if mla_cache == "expanded_padded" else lm.v_head_dim
    return lm.num_attention_heads * (lm.q_head_dim + v), 0


def kv_cache_bytes_per_token(cfg: VL2Config, dtype="bfloat16", mla_cache: str = "latent") -> int:
    """KV cache bytes per token, all layers (spec §3.1).

    MHA: L · 2 · n_kv · hd · b. MLA "latent": L · (c + rope) · b (512 + 64, what absorbed MLA caches);
    "expanded": L · n_h · (q_hd + v_hd) · b (K and V after kv_b_proj); "expanded_padded": V padded to q_hd."""
    split, repl = _kv_elems_per_head(cfg, mla_cache)
    return cfg.language_config.num_hidden_layers * (split + repl) * dtype_bytes(dtype)


def kv_cache_bytes(cfg: VL2Config, tokens: int, dtype="bfloat16", mla_cache: str = "latent", tp: int = 1) -> int:
    """KV bytes for ``tokens`` cached tokens (e.g. batch · seq_len) on the most loaded of ``tp`` ranks:
    head-split caches (MHA, expanded MLA) hold ceil(n_heads/tp)/n_heads of it; the MLA latent is replicated."""
    lm = cfg.language_config
    split, repl = _kv_elems_per_head(cfg, mla_cache)
    heads = lm.num_key_value_heads if not lm.use_mla else lm.num_attention_heads
    split = split * cdiv(heads, tp) // heads
    return tokens * lm.num_hidden_layers * (split + repl) * dtype_bytes(dtype)


# --------------------------------------------------------------------------------------------- token counts

def image_tokens(width_tiles: int, height_tiles: int) -> int:
    """LM positions one image takes (global view + separator + local grid); the processor owns the formula."""
    return image_token_count(width_tiles, height_tiles)


def vision_tokens(cfg: VL2Config, tiles: int) -> int:
    """Tokens the vision tower runs on: tiles · grid² (27² = 729 per 384-px tile)."""
    return tiles * cfg.vision_config.grid ** 2


# ------------------------------------------------------------------------------------------------ activations

def activation_bytes(cfg: VL2Config, batch: int = 1, seq_len: int = 4096, tiles: int = 10, dtype="bfloat16",
                     tp: int = 1, *, vision: str = "replicated", attn: str = "sdpa", logits: str = "last",
                     moe: str = "tp", ep: int = 1) -> dict:
    """Upper-bound estimate of the transient bytes of one prefill forward on one rank (inference, no autograd).

    ``batch`` sequences of ``seq_len`` tokens, each with ``tiles`` ViT tiles (global + local; 5 for 768×768).
    b = itemsize, T = batch·seq_len, n_t = tiles this rank encodes (all batch·tiles when the tower is
    replicated or TP-split; ceil(batch·tiles/tp) for vision="data_parallel"), N = n_t·g² vision tokens, h = heads
    on this rank (ceil(n_h/tp)), I/tp = per-rank FFN width. Each term is the sum of the tensors alive at once in
    that stage (including the contiguous copies of transposes); the allocator's fragmentation is not modelled.

    * vision_pixels = n_t·3·384²·b; vision_residual = 2·N·d·b (hidden + residual);
      vision_attention = 7·N·d·b (LN out, q, k, v, attention out, its contiguous copy, out-proj);
      vision_scores = n_t·heads_v·g⁴·(2b+4) for attn="eager" (scores, fp32 softmax, cast), 0 for "sdpa"
      (flash / memory-efficient kernels never materialise them; SDPA's math fallback behaves like eager);
      vision_mlp = N·(2·m_r + 2d)·b (LN out, fc1, GELU, fc2); projector = n_t·(g/2)²·(4d + 2D)·b;
      text_embeds = T·H·b (alive while the tower runs).
    * lm_residual = 3·T·H·b (inputs_embeds, hidden, residual);
      lm_attention: MHA T·b·(3H + 7·h·hd); MLA T·b·(3H + 2c + rope + h·(3·q_hd + nope + 4·v_hd));
      lm_scores = batch·h·seq_len²·(2b+4) for eager, else 0;
      lm_mlp = max(dense: T·b·(2H + 4·I_d/tp),
                   MoE: T·b·(3H + 4·S/tp) + T·E·8 + T·k·12 (router fp32 logits/scores, top-k) +
                        A·b·(2H + 4·I_r) + A·H·4 + T·H·4 (gathered inputs, gate/up/act/product, outputs,
                        fp32 weighting and sum) [+ 2·T·k·H·b all-to-all buffers for moe="ep"]),
      A = T·k routed assignments with I_r = I_m/tp (moe="tp"), or the worst case T·min(k, E/ep) with the full
      I_m (moe="ep": every token could pick only this rank's experts);
      logits = Lg·(ceil(V/tp)·b + V·b + V·4), Lg = batch ("last") or T ("all"): local shard, gathered, fp32.
    * vision_peak = pixels + residual + text_embeds + max(attention + scores, mlp, projector);
      lm_peak = lm_residual + max(lm_attention + lm_scores, lm_mlp, logits); peak = max of the two.
    """
    check_config(cfg)
    if vision not in ("replicated", "tp", "data_parallel") or attn not in ("sdpa", "eager") \
            or logits not in ("last", "all") or moe not in ("tp", "ep"):
        raise ValueError(f"bad option: vision={vision!r} (replicated|tp|data_parallel), attn={attn!r} "
                         f"(sdpa|eager), logits={logits!r} (last|all), moe={moe!r} (tp|ep)")
    if min(batch, seq_len, tp, ep) < 1 or tiles < 0:
        raise ValueError(f"batch, seq_len, tp, ep must be >= 1 and tiles >= 0; got {batch}, {seq_len}, {tp}, "
                         f"{ep}, {tiles}")
    b = dtype_bytes(dtype)
    v, lm = cfg.vision_config, cfg.language_config
    d, g, H, V = v.width, v.grid, lm.hidden_size, lm.vocab_size
    n_t = cdiv(batch * tiles, tp) if vision == "data_parallel" else batch * tiles
    N = n_t * g * g
    m_r = cdiv(v.mlp_dim, tp) if vision == "tp" else v.mlp_dim
    a = dict(vision_pixels=n_t * 3 * v.image_size ** 2 * b, vision_residual=2 * N * d * b,
             vision_attention=7 * N * d * b,
             vision_scores=n_t * v.heads * g ** 4 * (2 * b + 4) if attn == "eager" else 0,
             vision_mlp=N * (2 * m_r + 2 * d) * b,
             projector=n_t * cdiv(g, 2) ** 2 * (4 * d + 2 * H) * b)
    T = batch * seq_len
    a["text_embeds"] = T * H * b
    a["lm_residual"] = 3 * T * H * b
    h = cdiv(lm.num_attention_heads, tp)
    if lm.use_mla:
        c, r = lm.kv_lora_rank, lm.qk_rope_head_dim
        a["lm_attention"] = T * b * (3 * H + 2 * c + r + h * (3 * lm.q_head_dim + lm.qk_nope_head_dim
                                                             + 4 * lm.v_head_dim))
    else:
        a["lm_attention"] = T * b * (3 * H + 7 * h * lm.head_dim)
    a["lm_scores"] = batch * h * seq_len ** 2 * (2 * b + 4) if attn == "eager" else 0
    has_dense = any(not lm.is_moe_layer(i) for i in range(lm.num_hidden_layers))
    mlp = T * b * (2 * H + 4 * cdiv(lm.intermediate_size, tp)) if has_dense else 0
    if lm.is_moe:
        E, k = lm.n_routed_experts, lm.num_experts_per_tok
        shared = cdiv((lm.n_shared_experts or 0) * lm.moe_intermediate_size, tp)
        if moe == "tp":
            A, I_r, dispatch = T * k, cdiv(lm.moe_intermediate_size, tp), 0
        else:
            A, I_r, dispatch = T * min(k, cdiv(E, ep)), lm.moe_intermediate_size, 2 * T * k * H * b
        moe_b = (T * b * (3 * H + 4 * shared) + T * E * 8 + T * k * 12 + A * b * (2 * H + 4 * I_r)
                 + A * H * 4 + T * H * 4 + dispatch)
        mlp = max(mlp, moe_b)
    a["lm_mlp"] = mlp
    Lg = batch if logits == "last" else T
    a["logits"] = Lg * (cdiv(V, tp) * b + V * b + V * 4)
    a["vision_peak"] = (a["vision_pixels"] + a["vision_residual"] + a["text_embeds"]
                        + max(a["vision_attention"] + a["vision_scores"], a["vision_mlp"], a["projector"])
                        if tiles else 0)
    a["lm_peak"] = a["lm_residual"] + max(a["lm_attention"] + a["lm_scores"], a["lm_mlp"], a["logits"])
    a["peak"] = max(a["vision_peak"], a["lm_peak"])
    return a


# ---------------------------------------------------------------------------------------- parallel layouts

# ------------------------------------------------------------------------------------------------- tables

def format_table(rows: list[dict], columns=None, floatfmt: str = "{:.3f}") -> str:
    """Plain-text table of ``rows`` (dicts) with aligned columns; floats use ``floatfmt``. Deterministic."""
    if not rows:
        return ""
    columns = list(columns or rows[0])
    cells = [[floatfmt.format(r.get(c)) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
             for r in rows]
    w = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda xs: "  ".join(x.rjust(n) for x, n in zip(xs, w)).rstrip()
    return "\n".join([line(columns), line(["-" * n for n in w])] + [line(r) for r in cells])


def summary_rows(cfgs, dtype="bfloat16") -> list[dict]:
    """One row per config: total / activated params (B = 1e9), weight GB, KV bytes per token."""
    rows = []
    for cfg in cfgs:
        c = param_counts(cfg)
        rows.append({"variant": cfg.name, "total_B": c["total"] / 1e9, "activated_B": c["activated"] / 1e9,
                     "lm_activated_B": c["lm_activated"] / 1e9, "weights_GB": gb(weight_bytes(cfg, dtype)),
                     "kv_B_per_token": kv_cache_bytes_per_token(cfg, dtype),
                     "kv_expanded_B_per_token": kv_cache_bytes_per_token(cfg, dtype, "expanded")})
    return rows
