"""Fused input projections (vl2lab.model.fused_inputs): a language model whose attention layers run q/k/v (MHA) or
q_proj + kv_a_proj_with_mqa (MLA) as one matmul gives the logits and greedy tokens of the unfused one, keeps its
state dict, writes a later load through to the stacked weight, and leaves tensor-parallel layers alone."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vl2lab.model.attention import MHAttention, MLAttention
from vl2lab.model.config import get_config
from vl2lab.model.generation import generate
from vl2lab.model.language import DeepseekLanguageModel
from vl2lab.parallel.layers import ColumnParallelLinear

FP64_RTOL = 1e-12     # one matmul in place of several reorders nothing within a row; observed 0 or ~1e-16


def make_lm(name, seed=0):
    cfg = get_config(name).language_config
    lm = DeepseekLanguageModel(cfg).init_weights(seed).to(torch.float64).eval()
    lm.set_experts_impl("dense")                      # grouped_mm takes no fp64
    return lm


def logits(lm, ids):
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=torch.ones_like(ids))[0]


@pytest.mark.parametrize("name", ["random-tiny", "random-small"])
def test_fused_model_gives_the_same_logits_tokens_and_state(name):
    lm = make_lm(name)
    kind = MLAttention if get_config(name).language_config.use_mla else MHAttention
    ids = torch.randint(2, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    ref, state = logits(lm, ids), {k: v.clone() for k, v in lm.state_dict().items()}
    ref_tokens = generate(lm, lm.embed(ids), None, 4, ignore_eos=True)
    layers = sum(isinstance(m, kind) for m in lm.modules())
    assert lm.set_fused_inputs(True) == layers > 0
    got = logits(lm, ids)
    assert (got - ref).abs().max() <= FP64_RTOL * ref.abs().max()
    assert torch.equal(generate(lm, lm.embed(ids), None, 4, ignore_eos=True), ref_tokens)
    after = lm.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    attn = next(m for m in lm.modules() if isinstance(m, kind))
    first = getattr(attn, kind.INPUTS[0]).weight
    assert first.untyped_storage().data_ptr() == attn.fused_weight.untyped_storage().data_ptr()   # a view
    lm.set_fused_inputs(False)
    assert attn.fused_weight is None and (logits(lm, ids) - ref).abs().max() <= FP64_RTOL * ref.abs().max()


def test_a_load_after_fusing_writes_through_to_the_stacked_weight():
    lm, other = make_lm("random-small", seed=0), make_lm("random-small", seed=5)
    ids = torch.randint(2, 1000, (1, 7), generator=torch.Generator().manual_seed(2))
    want = logits(other, ids)
    lm.set_fused_inputs(True)
    lm.load_state_dict(other.state_dict())
    assert (logits(lm, ids) - want).abs().max() <= FP64_RTOL * want.abs().max()


def test_tensor_parallel_projections_are_not_stacked():
    lm = make_lm("random-tiny")
    attn = next(m for m in lm.modules() if isinstance(m, MHAttention))
    q = attn.q_proj
    attn.q_proj = ColumnParallelLinear(q.in_features, q.out_features, bias=q.bias is not None)
    assert attn.fuse_inputs(True) is False and attn.fused_weight is None
    assert lm.set_fused_inputs(True) == sum(isinstance(m, MHAttention) for m in lm.modules()) - 1
