"""How MLA attends over its cached latent: *expanded* (the official code's way) or *absorbed* (DeepSeek-V2, §2.1.2).

Lesson: notebook 01, section "4. Where time and memory go"; notebook 05, section "2. The ladder, run here" (rung 7).

The cache holds, per key j, the latent c_j (r wide) and the post-RoPE rope key k_pe_j (dr wide), both shared by
all heads (:class:`~vl2lab.model.attention.MLAttention` computes them and the queries). Viewed per head,
``kv_b_proj.weight`` [h·(dn + dv), r] is [h, dn + dv, r] = [W_uk | W_uv] (W_uk [dn, r], W_uv [dv, r])::

    expanded   k_nope_j = W_uk c_j,   v_j = W_uv c_j                    every cached key, every head, every step
               s_ij = (q_nope_i · k_nope_j + q_pe_i · k_pe_j) · scale
               o_i  = Σ_j softmax_j(s_ij) v_j                            [dv], then o_proj

    absorbed   q_nope · (W_uk c) = (W_ukᵀ q_nope) · c, and Σ_j p_j W_uv c_j = W_uv Σ_j p_j c_j, so
               q_lat_i = W_ukᵀ q_nope_i                                  [r], once per query
               s_ij = (q_lat_i · c_j + q_pe_i · k_pe_j) · scale          the same scores, the same scale (dn+dr)^-½
               o_i  = W_uv Σ_j softmax_j(s_ij) c_j                       [dv], then o_proj

The absorbed form is multi-query attention: every head attends over ONE key [c_j | k_pe_j] (r + dr wide) and
ONE value c_j (r wide), read from the cache without any per-head work (:func:`attend_absorbed` makes the h
queries of each position rows of one matrix).

Cost per head, T queries over Tk keys (multiply-adds)::

    expanded   Tk·r·(dn+dv)  +  T·Tk·(dn+dr+dv)        the expansion grows with Tk even when T = 1
    absorbed   T·r·(dn+dv)   +  T·Tk·(2r+dr)           absorbing q and projecting o, then wider attention

Per key, absorbing is cheaper while T·(2r+dr) < r·(dn+dv) + T·(dn+dr+dv), i.e. T < r·(dn+dv) / (2r − dn − dv):
T ≤ 170 for deepseek-vl2-small and -base (r = 512, dn = dv = 128), T < 32 for the random presets (r = 32,
dn = dv = 16). A decode step (T = 1) of small over 1,000 cached keys: expanded ≈ 131 M per head, absorbed ≈ 1.2 M;
and it moves the 576 cached numbers per key (read, joined into the key, read) instead of writing and reading
h·(dn+dr+dv) = 5,120 expanded ones.
So ``impl="absorbed"`` (:func:`uses_absorbed`) absorbs a forward of fewer than that many queries (decode, short
prompts) and expands longer ones (image prefills, ~1,000 tokens), where absorbing would cost ~3.4× the
attention work (2r+dr = 1,088 against dn+dr+dv = 320 per query-key pair). Either form gives the same result, to
rounding. The choice reads shapes only (no tensor value), so it is fixed for a compiled or captured decode step.

Tensor parallelism splits ``kv_b_proj`` by whole heads: the local head count is read from its weight's shape.
The absorbed form reads that weight directly, bypassing the column layer's backward all-reduce: it is for
inference (the expanded form stays the default, and the one to train with).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["IMPLS", "check_impl", "uses_absorbed", "attend_expanded", "attend_absorbed", "split_kv_b"]

IMPLS = ("expanded", "absorbed")


def check_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`IMPLS`, else one clear ValueError."""
    if impl not in IMPLS:
        raise ValueError(f"MLA impl must be one of {', '.join(repr(i) for i in IMPLS)}; got {impl!r}")
    return impl


def uses_absorbed(impl: str, T: int, rank: int, nope: int, v_dim: int) -> bool:
    """Whether a forward of ``T`` queries attends absorbed: ``impl == "absorbed"`` and T below the crossover
    r·(dn+dv) / (2r − dn − dv) of the module docstring (always, if the denominator is not positive)."""
    if check_impl(impl) == "expanded":
        return False
    wider = 2 * rank - nope - v_dim
    return wider <= 0 or T * wider < rank * (nope + v_dim)


def split_kv_b(weight: torch.Tensor, nope: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj.weight`` [h·(dn+dv), r] → views W_uk [h, dn, r], W_uv [h, dv, r] (h: the heads it holds)."""
    w = weight.unflatten(0, (-1, nope + v_dim))                           # [h, dn + dv, r]
    return w[:, :nope], w[:, nope:]


def attend_expanded(q_nope, q_pe, latent, k_pe, kv_b_proj: Callable, mask, scale: float) -> torch.Tensor:
    """q_nope [B,h,T,dn], q_pe [B,h,T,dr], latent [B,Tk,r], k_pe [B,Tk,dr], mask [B,1,T|1,Tk] (True = may attend)
    → o [B,h,T,dv]: expand every cached latent into per-head keys and values, then SDPA."""
    B, Tk, _ = latent.shape
    nope = q_nope.shape[-1]
    kv = kv_b_proj(latent).view(B, Tk, q_nope.shape[1], -1).transpose(1, 2)   # [B, h, Tk, dn + dv]
    k_nope, v = kv.split([nope, kv.shape[-1] - nope], dim=-1)                # [B, h, Tk, dn], [B, h, Tk, dv]
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
    return F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], dim=-1), k, v, attn_mask=mask, scale=scale)


def attend_absorbed(q_nope, q_pe, latent, k_pe, kv_b_weight: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """The same inputs (``kv_b_proj.weight`` instead of the layer) → the same o [B,h,T,dv], attending over the
    latent: W_uk folded into the queries, W_uv applied to the attended latent.

    Every head attends over the same key [c | k_pe] and value c (multi-query attention), so the h·T queries of a
    sequence are the rows of ONE matrix against its one cache: two batched matmuls and a softmax, each reading the
    cache once, whatever h is. (SDPA would want the key as h head-stride-0 views: its memory-efficient kernel gives
    each head its own block, 16 blocks for a decode step of small at batch 1 on a 132-SM GPU, each reading the
    whole cache on its own; flash takes no head dim of 576. Measured in notebook 05, rung 7.)
    The scores are rounded to the activations' dtype, as the official eager attention rounds them (matmul in
    bf16, softmax in fp32); masked keys get the most negative fp32 number, so a row with no key (a left-pad query
    of a short prompt) averages its keys instead of giving NaN that the next matmul would spread."""
    B, h, T, nope = q_nope.shape
    w_uk, w_uv = split_kv_b(kv_b_weight, nope, kv_b_weight.shape[0] // h - nope)
    # einsum contracts per head as one bmm over h with B·T rows (matmul would copy W_uk once per batch row)
    q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)                   # [B, h, T, r]
    rows = (B, h * T)                                                      # query rows (head, position) per sequence
    s = torch.baddbmm(q_pe.reshape(*rows, -1) @ k_pe.transpose(1, 2),      # q_pe · k_pe      [B, h·T, Tk]
                      q_lat.reshape(*rows, -1), latent.transpose(1, 2))    # + q_lat · c
    s = s.view(B, h, T, -1).to(torch.promote_types(s.dtype, torch.float32)) * scale   # bf16 → fp32
    if mask is not None:                                                   # [B, 1, T|1, Tk], True = may attend
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1).to(latent.dtype)
    o_lat = (p.view(*rows, -1) @ latent).view(B, h, T, -1)                 # Σ_j p_j c_j   [B, h, T, r]
    return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)                    # [B, h, T, dv]
