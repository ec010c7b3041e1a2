"""MLA with weight absorption (vl2lab.model.mla) against the expanded form: the same logits (prefill and cached
decode, left padding included), the same greedy tokens (eager and static decode step), and under tensor
parallelism the sharded absorbed model against the dense expanded one."""
from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))        # the gloo ranks import tp_rank from this module

from vl2lab.model.attention import KVCache, MLAttention  # noqa: E402
from vl2lab.model.config import get_config  # noqa: E402
from vl2lab.model.generation import generate  # noqa: E402
from vl2lab.model.graph_decode import GraphDecoder, decoder_for  # noqa: E402
from vl2lab.model.language import DeepseekLanguageModel, attention_inputs  # noqa: E402
from vl2lab.model.mla import attend_absorbed, attend_expanded, uses_absorbed  # noqa: E402
from vl2lab.parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402

MLA_PRESETS = ["random-small", "random-base"]
FP64_RTOL = 1e-10     # relative to the largest |value|; observed ~1e-16 (attention output), 0 (logits: see below)
FP32_RTOL = 1e-5      # observed ~4e-7 on the logits, ~1e-7 on the attention output
NEW = 6               # decode steps after the prefill


def make_lm(name, dtype=torch.float64, seed=0, **overrides):
    cfg = dataclasses.replace(get_config(name).language_config, **overrides)
    lm = DeepseekLanguageModel(cfg).init_weights(seed).to(dtype).eval()
    if dtype == torch.float64:
        lm.set_experts_impl("dense")                  # grouped_mm takes no fp64
    return lm


def left_padded(T=11, pads=(0, 4), seed=1):
    """Two prompts of T − pad real tokens each, left-padded to T (pad slots hold token 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1024, (len(pads), T), generator=g)
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p], ids[b, :p] = 0, 0
    return ids, mask


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def prefill_and_decode(lm, impl, ids, mask, steps=NEW, attn_out=None):
    """Logits of the prefill [B, T, V] and of ``steps`` cached decode steps (fixed next tokens), in ``impl``; with
    ``attn_out`` (a list), every layer's attention output is appended to it, in call order."""
    lm.set_mla_impl(impl)
    cache = lm.new_cache(ids.shape[1] + steps)
    out = []
    hooks = [] if attn_out is None else [layer.self_attn.register_forward_hook(lambda m, a, o: attn_out.append(o))
                                         for layer in lm.model.layers]
    with torch.no_grad():
        logits, cache = lm(input_ids=ids, attention_mask=mask, cache=cache)
        out.append(logits)
        for t in range(steps):
            nxt = torch.full((ids.shape[0], 1), 7 + 13 * t)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            logits, cache = lm(input_ids=nxt, attention_mask=mask, cache=cache)
            out.append(logits)
    for h in hooks:
        h.remove()
    lm.set_mla_impl("expanded")
    return out


# ------------------------------------------------------------------------------------------------ the rule

def test_absorbed_is_chosen_below_the_crossover_and_impl_is_checked():
    assert uses_absorbed("absorbed", 1, 512, 128, 128) and uses_absorbed("absorbed", 170, 512, 128, 128)
    assert not uses_absorbed("absorbed", 171, 512, 128, 128)              # 512·256 / 768 = 170.7
    assert uses_absorbed("absorbed", 31, 32, 16, 16) and not uses_absorbed("absorbed", 32, 32, 16, 16)
    assert uses_absorbed("absorbed", 10 ** 6, 16, 16, 16)                  # 2r ≤ dn + dv: always cheaper
    assert not uses_absorbed("expanded", 1, 512, 128, 128)
    lm = make_lm("random-small")
    with pytest.raises(ValueError, match="'expanded', 'absorbed'; got 'absorb'"):
        lm.set_mla_impl("absorb")
    assert all(m.impl == "expanded" for m in lm.modules() if isinstance(m, MLAttention))
    lm.set_mla_impl("absorbed")
    assert all(m.impl == "absorbed" for m in lm.modules() if isinstance(m, MLAttention))
    tiny = make_lm("random-tiny", torch.float32)                          # MHA: nothing to set, no error
    before = copy.deepcopy(tiny.state_dict())
    tiny.set_mla_impl("absorbed")
    assert not any(isinstance(m, MLAttention) for m in tiny.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


# ----------------------------------------------------------------------------------- one attention layer

@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_RTOL), (torch.float32, FP32_RTOL)], ids=["fp64", "fp32"])
def test_the_two_forms_agree_on_one_layer(dtype, tol):
    """attend_absorbed = attend_expanded on the same q, latent and k_pe: a padded prefill (T = 9, mask as the model
    builds it) and a decode query over the whole cache (mask [B, 1, 1, Tk])."""
    lm = make_lm("random-small", dtype)
    at = lm.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    B, T, Tk, h = 2, 9, 12, 4
    q_nope, q_pe = (torch.randn(B, h, T, d, generator=g, dtype=dtype) for d in (at.nope, at.rope))
    latent, k_pe = torch.randn(B, Tk, at.rank, generator=g, dtype=dtype), torch.randn(B, Tk, at.rope, generator=g,
                                                                                     dtype=dtype)
    _, mask = attention_inputs(torch.tensor([[1] * Tk, [0] * 5 + [1] * (Tk - 5)]), Tk - T, T, "cpu")
    with torch.no_grad():
        for q_sl, m in ((slice(None), mask), (slice(-1, None), mask[:, :, -1:])):
            a = attend_absorbed(q_nope[:, :, q_sl], q_pe[:, :, q_sl], latent, k_pe, at.kv_b_proj.weight, m, at.scale)
            e = attend_expanded(q_nope[:, :, q_sl], q_pe[:, :, q_sl], latent, k_pe, at.kv_b_proj, m, at.scale)
            assert a.shape == e.shape == (B, h, m.shape[-2], at.v_dim)
            assert rel(a, e) < tol, rel(a, e)


# ------------------------------------------------------------------------------------------ the whole model

@pytest.mark.parametrize("name", MLA_PRESETS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_RTOL), (torch.float32, FP32_RTOL)], ids=["fp64", "fp32"])
def test_prefill_and_cached_decode_agree_left_padded(name, dtype, tol):
    """Two prompts of 11 and 7 real tokens, left-padded to 11: the prefill (T = 11 < 32: absorbed) and 6 cached
    decode steps give the expanded form's logits, and every layer's attention output. (In float64 the norms still
    round to fp32, as the official code does, which hides differences of ~1e-16: the logits come out equal; the
    attention outputs, before any norm, show the fp64 agreement.)"""
    lm = make_lm(name, dtype)
    ids, mask = left_padded()
    attn_exp, attn_ab = [], []
    exp = prefill_and_decode(lm, "expanded", ids, mask, attn_out=attn_exp)
    ab = prefill_and_decode(lm, "absorbed", ids, mask, attn_out=attn_ab)
    real = mask.bool()
    assert rel(ab[0][real], exp[0][real]) < tol
    for a, e in zip(ab[1:], exp[1:]):
        assert rel(a, e) < tol
    assert len(attn_ab) == len(attn_exp) == lm.config.num_hidden_layers * (1 + NEW)
    for i, (a, e) in enumerate(zip(attn_ab, attn_exp)):               # padding queries too (they see themselves)
        assert rel(a, e) < tol, (i, rel(a, e))


def test_a_long_prefill_expands_and_its_decode_absorbs():
    """T = 40 ≥ 32 (the random presets' crossover): the prefill runs the expanded form, the decode steps absorbed;
    every step still matches the expanded model."""
    lm = make_lm("random-small", torch.float32)
    ids, mask = left_padded(T=40, pads=(3, 17))
    calls = []
    at = lm.model.layers[0].self_attn
    hook = at.register_forward_pre_hook(lambda m, args: calls.append(
        uses_absorbed(m.impl, args[0].shape[1], m.rank, m.nope, m.v_dim)))
    exp = prefill_and_decode(lm, "expanded", ids, mask, steps=3)
    calls.clear()
    ab = prefill_and_decode(lm, "absorbed", ids, mask, steps=3)
    hook.remove()
    assert calls == [False, True, True, True]
    for a, e in zip(ab, exp):
        assert rel(a, e) < FP32_RTOL


@pytest.mark.parametrize("name", MLA_PRESETS)
def test_greedy_tokens_equal_eager_and_static_step(name):
    """8 greedy tokens of a left-padded batch: generate() absorbed = generate() expanded, and the static decode step
    (graph_decode on CPU: the whole cache buffer, masked by key_ok) absorbed gives them too."""
    lm = make_lm(name, torch.float32)
    ids, mask = left_padded(T=10, pads=(0, 3))
    emb = lm.embed(ids)
    with torch.no_grad():
        ref = generate(lm, emb, mask, 8, ignore_eos=True)
        lm.set_mla_impl("absorbed")
        got = generate(lm, emb, mask, 8, ignore_eos=True)
        static = GraphDecoder(lm, 2, 24, "cpu", ignore_eos=True).generate(emb, mask, 8)
    lm.set_mla_impl("expanded")
    assert torch.equal(got, ref) and torch.equal(static, ref), (got, static, ref)


def test_a_kept_decoder_is_per_mla_impl():
    """decoder_for keeps one decoder (one captured graph) per implementation choice: switching to "absorbed" must
    not replay the graph captured in the expanded form."""
    lm = make_lm("random-small", torch.float32)
    a = decoder_for(lm, 2, 20, "cpu")
    lm.set_mla_impl("absorbed")
    b = decoder_for(lm, 2, 20, "cpu")
    assert b is not a and decoder_for(lm, 2, 30, "cpu") is b
    lm.set_mla_impl("expanded")
    assert decoder_for(lm, 2, 20, "cpu") is a


# --------------------------------------------------------------------------------------- tensor parallelism

@pytest.mark.parametrize("world,splits", [(2, (2, 2)), (3, (2, 1, 1)), (4, (1, 1, 1, 1))])
def test_head_shards_absorbed_sum_to_dense_expanded(world, splits):
    """Each 'rank' holds the parallel layers of its heads (q_proj, kv_b_proj column-split, o_proj row-split, built
    with rank=/world_size=, no process group): its absorbed partial outputs add up to the dense expanded layer's
    output, prefill and cached decode. The local head count comes from kv_b_proj's weight alone."""
    lm = make_lm("random-small")
    attn = lm.model.layers[0].self_attn
    unit_q, unit_kv = attn.q_head_dim, attn.nope + attn.v_dim
    shards = []
    for r in range(world):
        part = copy.deepcopy(attn)
        part.impl = "absorbed"
        place = {"rank": r, "world_size": world}
        part.q_proj = ColumnParallelLinear.from_dense(attn.q_proj, unit=unit_q, **place)
        part.kv_b_proj = ColumnParallelLinear.from_dense(attn.kv_b_proj, unit=unit_kv, **place)
        part.o_proj = RowParallelLinear.from_dense(attn.o_proj, unit=attn.v_dim, **place)
        assert part.kv_b_proj.weight.shape[0] // unit_kv == part.q_proj.weight.shape[0] // unit_q
        shards.append(part)
    assert tuple(s.kv_b_proj.weight.shape[0] // unit_kv for s in shards) == splits       # uneven on 3 ranks
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, lm.config.hidden_size, generator=g, dtype=torch.float64)
    full_mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    pos, mask = attention_inputs(full_mask[:, :7], 0, 7, "cpu")
    cos, sin = lm.model.rotary(pos, x.dtype)
    pos1, mask1 = attention_inputs(full_mask, 7, 1, "cpu")
    cos1, sin1 = lm.model.rotary(pos1, x.dtype)
    with torch.no_grad():
        dense_cache, caches = KVCache(1, 8), [KVCache(1, 8) for _ in shards]
        full = attn(x[:, :7], cos, sin, mask, dense_cache)
        parts = sum(s(x[:, :7], cos, sin, mask, c) for s, c in zip(shards, caches))
        assert rel(parts, full) < FP64_RTOL
        full1 = attn(x[:, 7:], cos1, sin1, mask1, dense_cache)
        parts1 = sum(s(x[:, 7:], cos1, sin1, mask1, c) for s, c in zip(shards, caches))
        assert rel(parts1, full1) < FP64_RTOL
    for c in caches:                                  # every shard caches the whole latent, as the dense layer
        assert all(torch.equal(a, b) for a, b in zip(c.buffers[0], dense_cache.buffers[0]))


def tp_rank(name: str = "random-small", max_new_tokens: int = 8) -> dict:
    """Rank function: the dense model in the expanded form (every rank builds the same one), then this rank's shard
    (shard_model, heads split) in the absorbed form; prefill + decode logits (fp64) and greedy tokens (fp32)."""
    from vl2lab.model.vl2 import build_model
    from vl2lab.parallel.shard import shard_model

    torch.set_num_threads(1)
    ids, mask = left_padded()
    out = {}
    for dtype in (torch.float64, torch.float32):
        model = build_model(name, dtype=dtype, seed=0)
        lm = model.language
        lm.set_experts_impl("dense")
        ref = prefill_and_decode(lm, "expanded", ids, mask)
        with torch.no_grad():
            ref_tokens = generate(lm, lm.embed(ids), mask, max_new_tokens, ignore_eos=True)
        shard_model(model, moe="tp")
        got = prefill_and_decode(lm, "absorbed", ids, mask)
        lm.set_mla_impl("absorbed")
        with torch.no_grad():
            tokens = generate(lm, lm.embed(ids), mask, max_new_tokens, ignore_eos=True)
        at = lm.model.layers[0].self_attn
        real = mask.bool()
        out[str(dtype).split(".")[1]] = {
            "heads": at.kv_b_proj.weight.shape[0] // (at.nope + at.v_dim),
            "prefill_rel": rel(got[0][real], ref[0][real]), "decode_rel": max(rel(a, e) for a, e in
                                                                             zip(got[1:], ref[1:])),
            "max_abs": max((a - e).abs().max().item() for a, e in zip(got[1:] + [got[0][real]],
                                                                      ref[1:] + [ref[0][real]])),
            "tokens": tokens.tolist(), "ref_tokens": ref_tokens.tolist()}
    return out


def test_sharded_absorbed_equals_dense_expanded_on_2_gloo_ranks():
    from vl2lab.launch.launcher import run

    res = run("test_mla_absorbed:tp_rank", world_size=2, backend="gloo", timeout=300.0)
    for r in range(2):
        for dtype, tol in (("float64", FP64_RTOL), ("float32", FP32_RTOL)):
            d = res[r][dtype]
            assert d["heads"] == 2, d
            assert d["prefill_rel"] < tol and d["decode_rel"] < tol, (r, dtype, d)
            assert d["tokens"] == d["ref_tokens"], (r, dtype, d)
