"""The DeepSeek-VL2 language model against transformers' DeepSeek models, its KV cache, its MoE implementations,
its shardability, and generation."""
from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vl2lab.model.config import get_config  # noqa: E402
from vl2lab.model.attention import KVCache, MHAttention, MLAttention  # noqa: E402
from vl2lab.model.generation import generate, sample_next, top_p_filter  # noqa: E402
from vl2lab.model.language import DeepseekLanguageModel  # noqa: E402
from vl2lab.model.moe import MoE, Experts, Router  # noqa: E402
from vl2lab.perf.peer import build_reference, reference_logits  # noqa: E402
from vl2lab.train.scenes import make_example  # noqa: E402
from vl2lab.weights.pretrained import load_pretrained  # noqa: E402

PRESETS = ["random-tiny", "random-small", "random-base"]
FP32_ATOL = 2e-5      # logits are O(1); observed differences are ~3e-7
FP64_ATOL = 1e-6      # float64 models still run RMSNorm, the router (and transformers its RoPE) in fp32, as the
                      # official code does: the floor is fp32 rounding; observed ~1.2e-7


def lang_config(name, **overrides):
    return dataclasses.replace(get_config(name).language_config, **overrides)


def make_lm(name, dtype=torch.float32, seed=0, **overrides):
    return DeepseekLanguageModel(lang_config(name, **overrides)).init_weights(seed).to(dtype).eval()


def padded_batch(T=12, pad=4, seed=1):
    """Two rows of random ids; row 1 is left-padded by ``pad`` positions (its pad slots hold token 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1024, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------ vs transformers

@pytest.mark.parametrize("name", PRESETS)
def test_matches_transformers_fp32_padded_batch(name):
    """tiny ↔ DeepseekOcr2TextModel (MHA), small ↔ DeepseekV2ForCausalLM, base ↔ DeepseekV3ForCausalLM:
    same weights, same left-padded batch; every real position's logits agree."""
    lm = make_lm(name)
    ref, kind = build_reference(lm)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, _ = lm(input_ids=ids, attention_mask=mask)
    theirs = reference_logits(ref, kind, lm, ids, mask, positions(mask))
    real = mask.bool()
    assert ours.dtype == torch.float32 and ours.shape == (2, 12, 1024)
    torch.testing.assert_close(ours[real], theirs[real], atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("name", PRESETS)
def test_matches_transformers_fp64_each_row_unpadded(name):
    """In float64 (the 'dense' experts path: grouped_mm takes no fp64) our padded batch equals transformers run on
    each row's real tokens alone (transformers' eager fp64 path turns left-padded rows into NaN, so it gets none)."""
    lm = make_lm(name, torch.float64)
    ref, kind = build_reference(lm)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, _ = lm(input_ids=ids, attention_mask=mask)
    for b in range(2):
        row = ids[b, mask[b].bool()][None]
        ones = torch.ones_like(row)
        theirs = reference_logits(ref, kind, lm, row, ones, positions(ones))
        torch.testing.assert_close(ours[b, mask[b].bool()], theirs[0], atol=FP64_ATOL, rtol=0)


def test_yarn_rope_matches_transformers():
    """rope_scaling 'yarn' (not used by VL2, supported like DeepSeek-V2): frequencies, cos/sin mscale and the
    softmax mscale² agree with transformers' DeepseekV3 yarn."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
    lm = make_lm("random-base", rope_scaling=yarn, max_position_embeddings=256)     # 256 = 4 × 64
    hf_yarn = {k: v for k, v in yarn.items() if k != "type"} | {"rope_type": "yarn"}
    ref, kind = build_reference(lm, rope_scaling=hf_yarn)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, _ = lm(input_ids=ids, attention_mask=mask)
    theirs = reference_logits(ref, kind, lm, ids, mask, positions(mask))
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=FP32_ATOL, rtol=0)


def test_noaux_tc_group_rule_matches_transformers_router():
    """With n_group > 1 (not used by VL2) the group-limited choice matches transformers' DeepseekV3TopkRouter."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    cfg = lang_config("random-base", n_routed_experts=16, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    ours = Router(cfg)
    torch.manual_seed(0)
    nn.init.normal_(ours.weight, std=0.3)
    nn.init.normal_(ours.e_score_correction_bias, std=0.1)
    ref = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=cfg.hidden_size, n_routed_experts=16, n_group=4,
                                                topk_group=2, num_experts_per_tok=cfg.num_experts_per_tok,
                                                norm_topk_prob=True, routed_scaling_factor=2.5))
    ref.weight.data.copy_(ours.weight)
    ref.e_score_correction_bias.copy_(ours.e_score_correction_bias)
    x = torch.randn(64, cfg.hidden_size)
    idx, w = ours(x)
    _, w_ref, idx_ref = ref(x)
    o, o_ref = idx.argsort(-1), idx_ref.argsort(-1)
    assert torch.equal(idx.gather(1, o), idx_ref.gather(1, o_ref))
    torch.testing.assert_close(w.gather(1, o), w_ref.gather(1, o_ref))


# --------------------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("name", PRESETS)
def test_cached_decode_equals_full_recompute(name):
    """Greedy decoding of 8 tokens with the cache: at each step the last position's logits equal a no-cache
    forward over the whole sequence so far (left-padded batch)."""
    lm = make_lm(name)
    ids, mask = padded_batch(T=9, pad=3)
    cache = lm.new_cache(9 + 8)
    with torch.no_grad():
        logits, cache = lm(input_ids=ids, attention_mask=mask, cache=cache, num_logits_to_keep=1)
        for _ in range(8):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            logits, cache = lm(input_ids=nxt, attention_mask=mask, cache=cache)
            full, _ = lm(input_ids=ids, attention_mask=mask)
            torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=0)
    assert cache.seq_len == ids.shape[1]


def test_cache_contents_and_bytes():
    """MLA caches the latent + rope key (r + d_rope per token, no heads); MHA caches K and V per head."""
    for name in ("random-small", "random-tiny"):
        cfg = lang_config(name)
        lm = make_lm(name)
        cache = lm.new_cache(20)
        ids, mask = padded_batch(T=6, pad=2)
        with torch.no_grad():
            lm(input_ids=ids, attention_mask=mask, cache=cache)
        L, B = cfg.num_hidden_layers, 2
        if cfg.use_mla:
            per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
            assert [t.shape for t in cache.buffers[0]] == [(B, 20, cfg.kv_lora_rank), (B, 20, cfg.qk_rope_head_dim)]
        else:
            per_token = 2 * cfg.hidden_size
            assert cache.buffers[0][0].shape == (B, cfg.num_attention_heads, 20, cfg.head_dim)
        assert cache.bytes() == L * B * 20 * per_token * 4
        assert cache.bytes_per_token() == L * B * per_token * 4


def test_bad_inputs_raise_clear_errors():
    lm = make_lm("random-small")
    ids, mask = padded_batch(T=6)
    cache = lm.new_cache(6)
    with torch.no_grad():
        with pytest.raises(ValueError, match="attention_mask has shape"):
            lm(input_ids=ids, attention_mask=mask[:, :5])
        lm(input_ids=ids, attention_mask=mask, cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            lm(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache)
        with pytest.raises(ValueError, match="exactly one"):
            lm()


def test_left_padding_does_not_change_a_row():
    """The padded row's logits equal those of the same tokens without padding (positions restart at 0)."""
    lm = make_lm("random-tiny")
    ids, mask = padded_batch(T=10, pad=4)
    with torch.no_grad():
        batch, _ = lm(input_ids=ids, attention_mask=mask)
        alone, _ = lm(input_ids=ids[1:, 4:])
    torch.testing.assert_close(batch[1, 4:], alone[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------- MoE

def _expert_inputs(E=12, k=4, N=40, H=64, I=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = Experts(E, H, I)
    for p in ex.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(N, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    w = torch.rand(N, k, generator=g)
    return ex, x, idx, w


def _run(ex, impl, *args):
    ex.impl = impl
    return ex(*args)


def test_expert_implementations_agree():
    ex, x, idx, w = _expert_inputs()
    ref = _run(ex, "loop", x, idx, w)
    for impl in ("grouped", "dense"):
        torch.testing.assert_close(_run(ex, impl, x, idx, w), ref, atol=1e-6, rtol=1e-5)
    lm = make_lm("random-base")
    ids, mask = padded_batch()
    with torch.no_grad():
        outs = {}
        for impl in ("grouped", "dense", "loop"):
            lm.set_experts_impl(impl)
            outs[impl] = lm(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(outs["grouped"], outs["loop"], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs["dense"], outs["loop"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["grouped", "dense", "loop"])
def test_expert_shards_sum_to_full(impl):
    """Expert parallel (contiguous expert ranges, zero for others) and tensor parallel (slices of I): the partial
    outputs of the shards add up to the full output, which is what the all-reduce in ``MoE.reduce`` relies on."""
    ex, x, idx, w = _expert_inputs()
    full = _run(ex, "loop", x, idx, w)
    ep = []
    for start, stop in ((0, 5), (5, 9), (9, 12)):                # uneven expert ranges
        part = Experts(12, 64, 32)
        part.gate_proj = nn.Parameter(ex.gate_proj[start:stop].clone())
        part.up_proj = nn.Parameter(ex.up_proj[start:stop].clone())
        part.down_proj = nn.Parameter(ex.down_proj[start:stop].clone())
        part.expert_start = start
        assert part.n_local_experts == stop - start
        ep.append(_run(part, impl, x, idx, w))
    torch.testing.assert_close(sum(ep), full, atol=1e-5, rtol=1e-5)
    tp = []
    for sl in (slice(0, 16), slice(16, 32)):
        part = copy.deepcopy(ex)
        part.gate_proj = nn.Parameter(ex.gate_proj[:, sl].clone())
        part.up_proj = nn.Parameter(ex.up_proj[:, sl].clone())
        part.down_proj = nn.Parameter(ex.down_proj[:, :, sl].clone())
        tp.append(_run(part, impl, x, idx, w))
    torch.testing.assert_close(sum(tp), full, atol=1e-5, rtol=1e-5)


def test_moe_reduce_hook():
    """``reduce`` is applied once to routed (+ shared, when ``shared_in_reduce``) output."""
    moe = make_lm("random-small").model.layers[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        base = moe(x)
        shared = moe.shared_experts(x)
        moe.reduce = lambda y: 2 * y
        torch.testing.assert_close(moe(x), 2 * base)
        moe.shared_in_reduce = False
        torch.testing.assert_close(moe(x), 2 * (base - shared) + shared)


class NoHostSync(TorchDispatchMode):
    """Fails on every aten op that makes the host wait for the device: reading a value (``.item()`` →
    ``_local_scalar_dense``, ``is_nonzero``, ``equal``), or producing a data-dependent shape (``nonzero``,
    ``masked_select``, boolean-mask indexing, ``unique``, ``bincount``, ``repeat_interleave`` with tensor repeats).
    It sees the ops exactly as the device would run them, so it checks on the CPU what
    ``torch.cuda.set_sync_debug_mode("error")`` would check on a GPU."""

    aten = torch.ops.aten
    SYNCING = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select,
               aten.bincount, aten._unique2, aten.unique_dim, aten.unique_consecutive}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        bool_index = packet in (self.aten.index, self.aten.index_put, self.aten.index_put_) and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or []) if t is not None)
        tensor_repeats = packet is self.aten.repeat_interleave and isinstance(args[0], torch.Tensor) \
            and func is not self.aten.repeat_interleave.self_int
        if packet in self.SYNCING or bool_index or tensor_repeats:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **kwargs)


def test_grouped_forward_has_no_host_sync():
    """The grouped MoE, and the whole model's prefill and cached decode, run without any syncing op
    (see :class:`NoHostSync`); the loop implementation is caught by the same check."""
    lm = make_lm("random-base")
    ids, mask = padded_batch()
    cache = lm.new_cache(13)
    with torch.no_grad(), NoHostSync():
        lm(input_ids=ids, attention_mask=mask, cache=cache)
        lm(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache)
    ex, x, idx, w = _expert_inputs()
    with NoHostSync():
        _run(ex, "grouped", x, idx, w)
        _run(ex, "dense", x, idx, w)
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        _run(ex, "loop", x, idx, w)


def test_bf16_keeps_correction_bias_fp32():
    lm = make_lm("random-base")
    router = lm.model.layers[1].mlp.gate
    before = router.e_score_correction_bias.clone()
    lm.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, before)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.isfinite(lm(input_ids=ids, attention_mask=mask)[0][mask.bool()]).all()


# ------------------------------------------------------------------------------------------ head sharding

@pytest.mark.parametrize("name,splits", [("random-tiny", (2, 2, 1, 1)), ("random-small", (3, 1))])
def test_attention_head_shards_sum_to_full(name, splits):
    """Replacing the projections with per-rank slices of whole heads (q/k/v or q/kv_b by rows, o by columns)
    just works: heads are read from the weight shapes, each shard caches its own heads (MHA) or the whole latent
    (MLA), and the o_proj partial outputs add up to the full output, prefill and decode alike."""
    cfg = lang_config(name)
    lm = make_lm(name)
    attn = lm.model.layers[0].self_attn
    per_head_q = attn.q_head_dim if cfg.use_mla else attn.head_dim
    per_head_kv = attn.nope + attn.v_dim if cfg.use_mla else attn.head_dim
    per_head_o = attn.v_dim if cfg.use_mla else attn.head_dim
    col = ("q_proj", "kv_b_proj") if cfg.use_mla else ("q_proj", "k_proj", "v_proj")
    shards, h0 = [], 0
    for n in splits:
        part = copy.deepcopy(attn)
        for proj in col:
            unit = per_head_q if proj == "q_proj" else per_head_kv
            w = getattr(attn, proj).weight[h0 * unit:(h0 + n) * unit]
            setattr(part, proj, nn.Linear(w.shape[1], w.shape[0], bias=False))
            getattr(part, proj).weight.data.copy_(w)
        w = attn.o_proj.weight[:, h0 * per_head_o:(h0 + n) * per_head_o]
        part.o_proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
        part.o_proj.weight.data.copy_(w)
        shards.append(part)
        h0 += n
    x = torch.randn(2, 7, cfg.hidden_size)
    pos = torch.arange(7).expand(2, 7)
    cos, sin = lm.model.rotary(pos, x.dtype)
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    with torch.no_grad():
        full = attn(x, cos, sin, mask)
        caches = [KVCache(1, 8) for _ in shards]
        parts = sum(s(x, cos, sin, mask, c) for s, c in zip(shards, caches))
        torch.testing.assert_close(parts, full, atol=1e-6, rtol=1e-5)
        x1, pos1 = torch.randn(2, 1, cfg.hidden_size), torch.full((2, 1), 7)
        cos1, sin1 = lm.model.rotary(pos1, x.dtype)
        mask1 = torch.ones(2, 1, 1, 8, dtype=torch.bool)
        full1 = attn(torch.cat([x, x1], 1), *lm.model.rotary(torch.arange(8).expand(2, 8), x.dtype),
                     torch.ones(2, 1, 8, 8, dtype=torch.bool).tril())[:, -1:]
        parts1 = sum(s(x1, cos1, sin1, mask1, c) for s, c in zip(shards, caches))
        torch.testing.assert_close(parts1, full1, atol=1e-6, rtol=1e-5)
    if not cfg.use_mla:
        assert [c.buffers[0][0].shape[1] for c in caches] == list(splits)
    assert isinstance(attn, MLAttention if cfg.use_mla else MHAttention)


# ------------------------------------------------------------------------------------------------ generation

@pytest.mark.parametrize("name", PRESETS)
def test_batched_generation_equals_each_row_alone(name):
    lm = make_lm(name)
    ids, mask = padded_batch(T=9, pad=4)
    with torch.no_grad():
        batch = generate(lm, lm.embed(ids), mask, 6)
        for b in range(2):
            row = ids[b, mask[b].bool()][None]
            alone = generate(lm, lm.embed(row), None, 6)
            assert torch.equal(batch[b], alone[0]), (b, batch[b], alone[0])


class ScriptedLM:
    """Stands in for a model: row b emits script[b][step] (a one-hot logit), whatever its input."""

    def __init__(self, script, vocab=16):
        self.script, self.vocab, self.calls = script, vocab, 0

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, num_logits_to_keep=0):
        step, self.calls = self.calls, self.calls + 1
        assert attention_mask.shape[1] == 3 + step             # the mask grows by one column per step
        logits = torch.zeros(len(self.script), 1, self.vocab)
        for b, seq in enumerate(self.script):
            logits[b, 0, seq[min(step, len(seq) - 1)]] = 1.0
        return logits, cache


def test_generate_pads_after_eos_and_stops_early():
    lm = ScriptedLM([[5, 1, 7, 7, 7], [3, 4, 1, 9, 9]])
    out = generate(lm, torch.zeros(2, 3, 4), torch.ones(2, 3), 5, eos_token_id=1, pad_token_id=0)
    assert out.tolist() == [[5, 1, 0, 0, 0], [3, 4, 1, 0, 0]]
    assert lm.calls == 3                                        # prefill + 2 decode steps, then all done
    lm = ScriptedLM([[5, 1, 7, 7, 7], [3, 4, 1, 9, 9]])
    out = generate(lm, torch.zeros(2, 3, 4), torch.ones(2, 3), 5, eos_token_id=[1], ignore_eos=True)
    assert out.tolist() == [[5, 1, 7, 7, 7], [3, 4, 1, 9, 9]]


def test_sampling_is_seeded_and_top_p_tiny_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    a = sample_next(logits, 0.7, 0.9, torch.Generator().manual_seed(3))
    b = sample_next(logits, 0.7, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for t in (0.3, 1.0, 5.0):
        assert torch.equal(sample_next(logits, t, 1e-6, torch.Generator().manual_seed(1)), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0, 1.0), logits.argmax(-1))
    kept = top_p_filter(torch.tensor([[0.2, 0.5, 0.3]]), 0.6)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.625, 0.375]]))
    lm = make_lm("random-small")
    ids, mask = padded_batch(T=6, pad=2)
    runs = [generate(lm, lm.embed(ids), mask, 5, do_sample=True, temperature=0.7, top_p=0.9,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_vl2_greedy_generate_equals_an_argmax_loop():
    """VL2 ``generate`` (images spliced in, a left-padded batch of two prompts, KV cache) gives the tokens of an
    explicit loop: argmax of the last position of a fresh forward over the whole sequence so far, no cache. With
    EOS honoured: the same tokens up to each row's first EOS, pad after it. The shipped vl2-micro (trained, so its
    tokens follow the picture and the prompt: a random model repeats one token whatever it is shown)."""
    model, processor = load_pretrained("vl2-micro")
    batch = processor(conversations=[make_example(7, "count").conversation(),
                                     make_example(3, "ground").conversation()])
    assert batch["attention_mask"][1].eq(0).sum() > 50                 # the shorter prompt is left-padded
    n, eos, pad = 8, model.config.language_config.eos_token_id, processor.pad_id
    got = model.generate(**batch, max_new_tokens=n, do_sample=False, ignore_eos=True)
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                             batch["images_spatial_crop"])
        mask, want = batch["attention_mask"].long(), []
        for _ in range(n):
            logits, _ = model.language(inputs_embeds=embeds, attention_mask=mask)
            nxt = logits[:, -1].argmax(-1)
            want.append(nxt)
            embeds = torch.cat([embeds, model.language.embed(nxt[:, None])], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    want = torch.stack(want, 1)
    assert got.shape == (2, n) and got.dtype == torch.long and torch.equal(got, want), (got, want)
    assert len(set(want[1].tolist())) > 4                               # an answer, not one token repeated
    stopped = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    assert eos in want[0].tolist()                                     # "3", EOS: the pad path is exercised
    for row, ref in zip(stopped.tolist(), want.tolist()):
        cut = ref.index(eos) + 1 if eos in ref else n
        assert row == ref[:cut] + [pad] * (n - cut), (row, ref)
