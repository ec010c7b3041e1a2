"""Attention of the DeepSeek-VL2 language model: RMSNorm, RoPE, the KV cache, MHA (tiny) and MLA (small, base).

Lesson: notebook 01, sections "1. Load the model" (MHA vs MLA) and "4. Where time and memory go"
(what the KV cache holds).

RoPE rotates pairs of channels by the angle p·θ_i, θ_i = theta^(-2i/d) (i < d/2), p the token's position::

    rope(x)     = x·cos + rotate_half(x)·sin,   rotate_half([a, b]) = [-b, a],   cos = [cos(pθ), cos(pθ)]

so channel i is paired with channel i + d/2 (the "halves" layout of NeoX/Llama). MLA's rope channels are trained
in the *interleaved* layout (channel 2i paired with 2i+1): they are first permuted into halves
(``deinterleave``), then rotated the same way. The permutation is applied to q and k alike, so q·k is that of the
interleaved rotation; the cached k_pe is post-RoPE, in the halves layout.

MHA (tiny):  q, k, v = x W_q, x W_k, x W_v  (n heads × d);  softmax(q kᵀ / √d) v  → o_proj.

MLA (small/base, no q-LoRA)::

    q            = q_proj(x)                        → per head [q_nope (dn) | q_pe (dr)]
    [c | k_pe]   = kv_a_proj_with_mqa(x);  c = RMSNorm(c)      c: the latent (r wide), k_pe: ONE rope key for all heads
    [k_nope | v] = kv_b_proj(c)                     → per head (dn + dv)
    k            = [k_nope | rope(k_pe)],  q = [q_nope | rope(q_pe)],  scale = (dn + dr)^-0.5 (· yarn mscale²)

The cache stores what the layer cannot recompute cheaply and what all heads share: for MLA the latent c and the
post-RoPE k_pe (r + dr numbers per token, replicated across tensor-parallel ranks); for MHA K and V per head.
MLA then attends in one of two forms (:mod:`.mla`, ``MLAttention.impl``): ``"expanded"`` (the default, the official
code's way) expands every cached latent with kv_b_proj at every step, [k_nope | v] = kv_b_proj(c), as above;
``"absorbed"`` folds kv_b_proj into the query and the output (q_lat = W_ukᵀ q_nope, o = W_uv · attended c), so
a decode step attends over the cached c and k_pe themselves. Same scores, same scale, same cache.

Tensor parallelism replaces q/k/v_proj (or q_proj, kv_b_proj) with column-parallel layers holding whole heads
and o_proj with a row-parallel one: the head count is never stored, it is read from the projections' outputs.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vl2lab.model.mla import attend_absorbed, attend_expanded, uses_absorbed

__all__ = ["RMSNorm", "Rotary", "KVCache", "MHAttention", "MLAttention", "rotate_half", "apply_rope",
           "deinterleave", "attention_kernel"]


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ------------------------------------------------------------------------------------------------------- RoPE

def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(head_dim: int, rope_scaling: Optional[dict]) -> float:
    """head_dim^-0.5, times yarn_mscale(factor, mscale_all_dim)² when rope_scaling is yarn (official MLA rule)."""
    scale = head_dim ** -0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim"):
        m = _yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


class Rotary(nn.Module):
    """cos/sin tables for positions [B, T]. Holds no tensors (nothing to cast to bf16 or to move): the dim/2
    inverse frequencies are recomputed in fp32 per forward, which is negligible next to a layer."""

    def __init__(self, dim: int, theta: float = 10000.0, rope_scaling: Optional[dict] = None):
        super().__init__()
        kind = (rope_scaling or {}).get("type", (rope_scaling or {}).get("rope_type"))
        if rope_scaling and kind != "yarn":
            raise ValueError(f"rope_scaling type {kind!r} is not supported (DeepSeek-VL2 uses none; "
                             "DeepSeek-V2 style 'yarn' is): remove rope_scaling from the config")
        self.dim, self.theta, self.scaling = dim, theta, rope_scaling

    def inv_freq(self, device) -> tuple[torch.Tensor, float]:
        """θ_i [dim/2] (fp32) and the factor multiplying cos/sin (1 without yarn)."""
        d, base = self.dim, self.theta
        extra = 1.0 / base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        if not self.scaling:
            return extra, 1.0
        s = self.scaling                                  # yarn: interpolate the slow channels by `factor`
        factor, orig = s["factor"], s.get("original_max_position_embeddings", 4096)
        beta_fast, beta_slow = s.get("beta_fast", 32), s.get("beta_slow", 1)

        def corr_dim(rot):
            return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(corr_dim(beta_fast)), 0), min(math.ceil(corr_dim(beta_slow)), d - 1)
        ramp = ((torch.arange(d // 2, device=device, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        keep = 1.0 - ramp                                 # 1: extrapolate (fast channels), 0: interpolate
        inv = extra / factor * (1 - keep) + extra * keep
        m = _yarn_mscale(factor, s.get("mscale", 1)) / _yarn_mscale(factor, s.get("mscale_all_dim", 0))
        return inv, m

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv, m = self.inv_freq(positions.device)
        freqs = positions.float()[..., None] * inv        # [B, T, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)           # [B, T, dim]
        return (emb.cos() * m).to(dtype), (emb.sin() * m).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, d] with cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] → [x0, x2, ..., x1, x3, ...]: pairs (2i, 2i+1) become (i, i + d/2)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


# --------------------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Static cache: per layer, preallocated buffers of ``max_len`` positions and a write index.

    Each layer's buffers are allocated at its first write, with the batch, head count and dtype of what it writes
    (so a tensor-parallel rank allocates only its own heads). Time is dim -2 of every cached tensor:
    MHA ``k, v`` [B, n_heads_local, max_len, head_dim]; MLA ``latent`` [B, max_len, kv_lora_rank] and
    ``k_pe`` [B, max_len, qk_rope_head_dim]. All rows share the write index; left padding is handled by the
    attention mask, so a padded row simply has masked slots at its start.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.buffers: list[Optional[tuple[torch.Tensor, ...]]] = [None] * num_layers
        self.lengths = [0] * num_layers

    @property
    def seq_len(self) -> int:
        """Positions already written (by layer 0; all layers agree between forwards)."""
        return self.lengths[0]

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write ``new`` (each [..., T, d]) at the write index; return views of everything written so far."""
        start, t = self.lengths[layer], new[0].shape[-2]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {start} + {t} positions exceed max_len={self.max_len}; create the "
                             "cache with a larger max_len (prompt length + max_new_tokens)")
        if self.buffers[layer] is None:
            self.buffers[layer] = tuple(x.new_zeros(*x.shape[:-2], self.max_len, x.shape[-1]) for x in new)
        bufs = self.buffers[layer]
        for buf, x in zip(bufs, new):
            if buf.shape[:-2] != x.shape[:-2]:
                raise ValueError(f"KV cache layer {layer} holds {tuple(buf.shape)} but got {tuple(x.shape)}: "
                                 "one cache serves one batch; create a new cache for another batch size")
            buf[..., start:end, :] = x
        self.lengths[layer] = end
        return tuple(buf[..., :end, :] for buf in bufs)

    def reset(self) -> None:
        """Start over (the buffers are kept)."""
        self.lengths = [0] * len(self.lengths)

    def bytes(self) -> int:
        """Bytes allocated by the buffers (the whole ``max_len``)."""
        return sum(b.numel() * b.element_size() for bufs in self.buffers if bufs for b in bufs)

    def bytes_per_token(self) -> int:
        """Bytes one position costs, all layers together (per sequence: divided by the batch size)."""
        return self.bytes() // self.max_len if self.max_len else 0


def _attend(q, k, v, mask, scale):
    """q [B,h,T,dq], k [B,hk,Tk,dq], v [B,hk,Tk,dv], mask [B,1,T,Tk] bool (True = may attend)."""
    if k.shape[1] != q.shape[1]:                          # grouped-query heads (not used by VL2, kept general)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention_kernel(attn: str):
    """A context for the attention kernel: SDPA as it chooses (``"sdpa"``: flash / memory-efficient where they
    apply), or SDPA's math kernel, which materialises the [B, h, T, Tk] scores like eager attention (``"eager"``
    or ``"math"``)."""
    if attn == "sdpa":
        return contextlib.nullcontext()
    if attn not in ("eager", "math"):
        raise ValueError(f"attention must be 'sdpa', 'eager' or 'math', got {attn!r}")
    return sdpa_kernel([SDPBackend.MATH])


class MHAttention(nn.Module):
    """Multi-head attention with RoPE over the whole head (deepseek-vl2-tiny)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, n = config.hidden_size, config.num_attention_heads
        self.layer_idx, self.head_dim = layer_idx, h // n
        self.scale = self.head_dim ** -0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, n * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n * self.head_dim, h, bias=bias)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None):
        B, T, _ = x.shape                                                   # x [B, T, H]
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)    # [B, h, T, d] (h = local heads)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                       # [B, h, Tk, d]
        o = _attend(q, k, v, mask, self.scale)                              # [B, h, T, d]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention without q-LoRA (deepseek-vl2-small and deepseek-vl2). ``impl``: ``"expanded"``
    (default) or ``"absorbed"`` (forwards of few queries, decode above all, attend over the latent: :mod:`.mla`)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, n = config.hidden_size, config.num_attention_heads
        self.layer_idx, self.impl = layer_idx, "expanded"
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        self.q_head_dim = self.nope + self.rope
        self.scale = softmax_scale(self.q_head_dim, config.rope_scaling)
        self.q_proj = nn.Linear(h, n * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, n * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n * self.v_dim, h, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None):
        B, T, _ = x.shape                                                   # x [B, T, H]
        q = self.q_proj(x).view(B, T, -1, self.q_head_dim).transpose(1, 2)  # [B, h, T, dn+dr]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)                                # [B, T, r]
        q_pe = apply_rope(deinterleave(q_pe), cos[:, None], sin[:, None])   # [B, h, T, dr]
        k_pe = apply_rope(deinterleave(k_pe), cos, sin)                     # [B, T, dr], shared by all heads
        if cache is not None:
            latent, k_pe = cache.update(self.layer_idx, latent, k_pe)       # [B, Tk, r], [B, Tk, dr]
        if uses_absorbed(self.impl, T, self.rank, self.nope, self.v_dim):   # shapes only: fixed per compiled step
            o = attend_absorbed(q_nope, q_pe, latent, k_pe, self.kv_b_proj.weight, mask, self.scale)
        else:
            o = attend_expanded(q_nope, q_pe, latent, k_pe, self.kv_b_proj, mask, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))             # o [B, h, T, dv]
