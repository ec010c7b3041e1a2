"""The DeepSeek-VL2 language model (DeepSeekMoE decoder): embeddings, decoder layers, final norm, LM head.

Lesson: notebook 01, section "1. Load the model" (the DeepSeekMoE decoder).

For hidden states x [B, T, H]::

    x ← x + Attn(RMSNorm(x))          MHA (tiny) or MLA (small, base): :mod:`.attention`
    x ← x + FFN(RMSNorm(x))           dense SwiGLU in the first layer(s), MoE after: :mod:`.moe`
    logits = lm_head(RMSNorm(x))      untied head, returned in fp32

Positions come from the 2-D padding mask [B, T_total] (left padding): p = max(cumsum(mask) − 1, 0), so each
row's first real token sits at position 0 whatever its padding. A query at absolute index i may attend key j
when j ≤ i and mask[j] = 1 (plus itself, so that a padding query never has an empty row).

Module names follow the official checkpoint (``model.embed_tokens``, ``model.layers.{i}.self_attn…``,
``model.norm``, ``lm_head``), so a state dict loads as is once the experts are stacked into 3-D tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vl2lab.model.attention import KVCache, MHAttention, MLAttention, RMSNorm, Rotary
from vl2lab.model.mla import check_impl
from vl2lab.model.moe import MLP, Experts, MoE, Router

__all__ = ["DeepseekLanguageModel", "DecoderLayer", "KVCache", "attention_inputs"]


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        attn = MLAttention if config.use_mla else MHAttention
        self.self_attn = attn(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size,
                                                                            config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    """``embed_tokens``, ``layers``, ``norm`` (the official ``language.model``)."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.use_mla:
            rope_dim = config.qk_rope_head_dim
        elif config.rope_scaling:
            raise ValueError("rope_scaling with MHA is not supported (deepseek-vl2-tiny uses none): remove it")
        else:
            rope_dim = config.hidden_size // config.num_attention_heads
        self.rotary = Rotary(rope_dim, config.rope_theta, config.rope_scaling)


def attention_inputs(attention_mask: torch.Tensor, past: int, T: int, device) -> tuple:
    """The positions and mask of ``T`` new positions after ``past`` cached ones, from the whole sequence's
    ``attention_mask`` [B, past + T] (1 = real token, 0 = left padding) → (position_ids [B, T]: each row counts its
    real tokens from 0; mask [B, 1, T, past + T]: causal, padding keys hidden, every query sees itself so a padded
    row never attends to nothing)."""
    key_ok = attention_mask.to(device=device, dtype=torch.bool)                     # [B, Tk]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:].to(device)   # [B, T]
    q_at = torch.arange(past, past + T, device=device)[:, None]                      # [T, 1] absolute index
    k_at = torch.arange(past + T, device=device)[None, :]                            # [1, Tk]
    mask = ((k_at <= q_at) & key_ok[:, None, :]) | (k_at == q_at)                    # [B, T, Tk]
    return positions, mask[:, None]


class DeepseekLanguageModel(nn.Module):
    """The whole language model. ``forward`` returns (fp32 logits, cache)."""

    def __init__(self, config):
        super().__init__()
        if config.use_mla and config.q_lora_rank is not None:
            raise ValueError("MLA with q-LoRA (q_lora_rank set) is not used by DeepSeek-VL2; set q_lora_rank=None")
        if config.use_mla and not (config.kv_lora_rank and config.qk_rope_head_dim):
            raise ValueError("MLA needs kv_lora_rank and qk_rope_head_dim > 0 (or set use_mla=False for MHA)")
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init(torch.nn.init.normal_, None)

    # ------------------------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def _init(self, normal, generator):
        std = self.config.initializer_range
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
            elif isinstance(mod, (nn.Linear, nn.Embedding)):
                normal(mod.weight, 0.0, std, generator=generator)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, Experts):
                for p in (mod.gate_proj, mod.up_proj, mod.down_proj):
                    normal(p, 0.0, std, generator=generator)
            elif isinstance(mod, Router):
                normal(mod.weight, 0.0, std, generator=generator)
                if mod.e_score_correction_bias is not None:     # small, so that it moves some choices
                    normal(mod.e_score_correction_bias, 0.0, std, generator=generator)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "DeepseekLanguageModel":
        """Deterministic random weights: N(0, initializer_range) for every matrix, the router and the correction
        bias; norms 1. Drawn on the CPU from ``seed``, so the values do not depend on the device or dtype."""
        g = torch.Generator().manual_seed(seed)

        def normal(p, mean, std, generator):
            p.copy_(torch.randn(p.shape, generator=generator) * std + mean)
        self._init(normal, g)
        return self

    # ---------------------------------------------------------------------------------------------- forward
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] ids → [B, T, H] embeddings (the VL2 wrapper then writes image features into them)."""
        return self.model.embed_tokens(input_ids)

    def new_cache(self, max_len: int) -> KVCache:
        """An empty static KV cache for up to ``max_len`` positions (prompt + new tokens)."""
        return KVCache(len(self.model.layers), max_len)

    def forward(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, num_logits_to_keep: int = 0):
        """Prefill (T > 1) or decode (T = 1, with ``cache``).

        ``attention_mask`` [B, T_past + T] (1 = real token, 0 = padding; None = all real) covers the cached
        positions too. Returns (logits [B, T or num_logits_to_keep, V] fp32, cache); with ``cache=None`` nothing
        is cached and None is returned."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds      # [B, T, H]
        B, T, _ = x.shape
        past = cache.seq_len if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but {past} cached + {T} new "
                             f"positions need ({B}, {past + T}); pass the mask of the whole sequence so far")
        positions, mask = attention_inputs(attention_mask, past, T, x.device)        # [B, T], [B, 1, T, Tk]
        x = self.layers_forward(x, positions if position_ids is None else position_ids, mask, cache)
        if num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        return self.head(x), cache

    def layers_forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                       cache: Optional[KVCache], layers=None) -> torch.Tensor:
        """[B, T, H] embeddings → [B, T, H] hidden states before the final norm: RoPE at ``position_ids`` [B, T],
        then every decoder layer (or ``layers``: this rank's share, or compiled copies) with ``mask`` [B, 1, T|1,
        Tk] (True = may attend) and ``cache``. The one layer loop that prefill, decode, the CUDA-graph step and the
        layer split all run."""
        cos, sin = self.model.rotary(position_ids.to(x.device), x.dtype)             # [B, T, d_rope]
        for layer in (self.model.layers if layers is None else layers):
            x = layer(x, cos, sin, mask, cache)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """[B, k, H] hidden states → [B, k, V] fp32 logits (final norm, then the LM head)."""
        return self.lm_head(self.model.norm(x)).float()

    def set_experts_impl(self, impl: str) -> None:
        """Pick the routed-experts computation in every MoE layer: 'grouped', 'dense', 'loop' or 'gemv'
        (:class:`~vl2lab.model.moe.Experts`)."""
        for mod in self.modules():
            if isinstance(mod, Experts):
                mod.impl = impl

    def set_mla_impl(self, impl: str) -> None:
        """Pick how every MLA layer attends: 'expanded' (default) or 'absorbed' (decode over the latent, see
        :mod:`vl2lab.model.mla`). A ValueError names the allowed values; a model without MLA (tiny) is unchanged."""
        check_impl(impl)
        for mod in self.modules():
            if isinstance(mod, MLAttention):
                mod.impl = impl
