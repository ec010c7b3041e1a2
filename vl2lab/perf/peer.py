"""transformers' own DeepSeek models holding vl2lab's language-model weights, as numerical references.

* MLA + softmax greedy router (small)       → ``DeepseekV2ForCausalLM``
* MLA + sigmoid noaux_tc router (base)      → ``DeepseekV3ForCausalLM`` (V2's router has no bias/renormalisation)
* MHA + softmax greedy router (tiny)        → ``DeepseekOcr2TextModel`` (Llama-style MHA with the DeepSeekMoE FFN;
  it has no LM head, so the logits are its hidden states times vl2lab's ``lm_head``)

They serve as the numerical reference of the tests (same weights, same logits) and as the speed peer of the tuning
notebook (:func:`peer_timings`: what a user gets composing transformers' parts as they are).

Lesson: notebook 05, section "The ladder" (the transformers peer).

Every key the VL2 config leaves to defaults is written out, since transformers' defaults differ from the
official ones. Weights are converted from vl2lab's layout: ``gate_up_proj`` [E, 2I, H] = cat(gate, up) along
dim 1; ``down_proj`` [E, H, I] as is; everything else keeps its name.
"""
from __future__ import annotations

import os

import torch

from vl2lab.model.build import constructed_on
from vl2lab.model.config import get_config
from vl2lab.perf.workload import time_steps

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["reference_kind", "hf_state_dict", "build_reference", "reference_logits", "peer_timings"]


def _common(cfg) -> dict:
    if cfg.moe_layer_freq != 1:
        raise ValueError("transformers' DeepSeek models make every layer >= first_k_dense_replace MoE; "
                         "moe_layer_freq must be 1")
    n_layers = cfg.num_hidden_layers
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=n_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=cfg.first_k_dense_replace,
        mlp_layer_types=["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(n_layers)],
        n_group=cfg.n_group or 1, topk_group=cfg.topk_group or 1,
        routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
        hidden_act=cfg.hidden_act, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=cfg.attention_bias, tie_word_embeddings=False, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=None, initializer_range=cfg.initializer_range,
        attn_implementation="eager", experts_implementation="eager",
    )


def _mla(cfg) -> dict:
    return dict(q_lora_rank=None, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim)


def reference_kind(cfg) -> str:
    """Which transformers model matches this language config: 'deepseek_v2', 'deepseek_v3' or 'deepseek_ocr2'."""
    if not cfg.use_mla:
        return "deepseek_ocr2"
    return "deepseek_v3" if cfg.topk_method == "noaux_tc" else "deepseek_v2"


def hf_state_dict(lm, prefix: str = "model.", with_head: bool = True) -> dict:
    """vl2lab's state dict in transformers' layout (fused ``gate_up_proj``)."""
    out = {}
    for name, t in lm.state_dict().items():
        if name == "lm_head.weight":
            if with_head:
                out[name] = t
            continue
        key = prefix + name[len("model."):]
        if key.endswith("experts.gate_proj"):
            up = lm.state_dict()[name.replace("gate_proj", "up_proj")]
            out[key.replace("gate_proj", "gate_up_proj")] = torch.cat([t, up], dim=1)   # [E, 2I, H]
        elif key.endswith("experts.up_proj"):
            continue
        else:
            out[key] = t
    return out


def build_reference(lm, rope_scaling: dict | None = None):
    """A transformers model with ``lm``'s weights (same dtype), in eval mode. Returns (model, kind)."""
    cfg = lm.config
    kind = reference_kind(cfg)
    kw = _common(cfg)
    if rope_scaling:
        kw["rope_parameters"] = {**rope_scaling, "rope_theta": float(cfg.rope_theta)}
    if kind == "deepseek_v2":
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**kw, **_mla(cfg), topk_method="greedy"))
        sd = hf_state_dict(lm)
    elif kind == "deepseek_v3":
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw, **_mla(cfg), rope_interleave=True, num_mtp_layers=0))
        sd = hf_state_dict(lm)
    else:
        from transformers.models.deepseek_ocr2 import DeepseekOcr2TextConfig, DeepseekOcr2TextModel
        model = DeepseekOcr2TextModel(DeepseekOcr2TextConfig(**kw, topk_method="greedy"))
        sd = hf_state_dict(lm, prefix="", with_head=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("inv_freq",))]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch for {kind}: missing {missing}, unexpected {unexpected}")
    return model.to(next(lm.parameters()).dtype).eval(), kind


@torch.no_grad()
def reference_logits(model, kind: str, lm, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """fp32 logits [B, T, V] of the transformers model (the MHA reference borrows ``lm.lm_head``)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if kind == "deepseek_ocr2":
        return lm.lm_head(out.last_hidden_state).float()
    return out.logits.float()


def _hf_config(cfg):
    """The transformers config of ``cfg`` with transformers' own kernel choices (its defaults)."""
    kind = reference_kind(cfg)
    kw = _common(cfg)
    del kw["attn_implementation"], kw["experts_implementation"]
    if kind == "deepseek_v2":
        from transformers import DeepseekV2Config
        return kind, DeepseekV2Config(**kw, **_mla(cfg), topk_method="greedy")
    if kind == "deepseek_v3":
        from transformers import DeepseekV3Config
        return kind, DeepseekV3Config(**kw, **_mla(cfg), rope_interleave=True, num_mtp_layers=0)
    raise ValueError("the speed peer needs a causal-LM class: MLA presets only (small, base)")


class _Marks:
    """A transformers streamer that marks each step for :func:`vl2lab.perf.workload.time_steps`: ``generate`` hands
    it the prompt first (skipped), then the tokens of every step, already copied to the CPU."""

    def __init__(self, mark):
        self.mark, self.prompt_seen = mark, False

    def put(self, tokens):
        if self.prompt_seen:
            self.mark(tokens)
        self.prompt_seen = True

    def end(self):
        pass


@torch.no_grad()
def peer_timings(preset: str = "deepseek-vl2-small", batch_sizes=(1, 32), prompt_len: int = 1065,
                 new_tokens: int = 64, device="cuda", repeats: int = 3, warmup: int = 1) -> list:
    """transformers' DeepSeek causal LM at the preset's real size (random bf16 weights, built on ``device``),
    ``generate`` with its defaults (SDPA attention, its default experts kernel, dynamic cache): prefill time and
    the decode steps, each timed on its own as vl2lab's (:func:`~vl2lab.perf.workload.time_steps`, marked by a
    streamer), for random prompt embeddings of ``prompt_len`` positions."""
    from transformers import AutoModelForCausalLM

    cfg = get_config(preset).language_config
    kind, hf_cfg = _hf_config(cfg)
    with constructed_on(device, "bfloat16"):
        model = AutoModelForCausalLM.from_config(hf_cfg).eval()
    dev = torch.device(device)
    rows = []
    for b in batch_sizes:
        embeds = torch.randn(b, prompt_len, cfg.hidden_size, dtype=torch.bfloat16, device=dev) * 0.02
        mask = torch.ones(b, prompt_len, dtype=torch.long, device=dev)

        def gen(mark):
            return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=_Marks(mark))
        t, _ = time_steps(gen, dev, repeats, warmup)
        rows.append({"peer": f"transformers {type(model).__name__}", "kind": kind, "batch": b,
                     "prefill_s": t["prefill_s"]["median"], "decode_step_s": t.get("decode_step_s"),
                     "e2e_s": t["e2e_s"]})
    del model
    return rows
