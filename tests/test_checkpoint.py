"""Snapshot folders in the official layout: round trips, official key names and shapes, lazy reading, and one
clear error per kind of bad input."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vl2lab.model import build_model
from vl2lab.model.config import ConfigError, get_config
from vl2lab.weights.keys import official_shapes, official_sources, official_to_module
from vl2lab.weights.pretrained import (CheckpointError, SnapshotWarning, load_pretrained, make_random_snapshot,
                                      save_pretrained)
from vl2lab.weights.reader import SnapshotReader, module_tensor_from_official

# Weights-only folders (no tokenizer.json) load with a SnapshotWarning; these tests mean them (test_bad_snapshots.py
# checks the warning itself).
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json:vl2lab.weights.keys.SnapshotWarning")


def _all_tensors(path):
    out = {}
    for fn in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, fn), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _copy(src, tmp_path):
    dst = str(tmp_path / "snap")
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("preset", ["random-tiny", "random-small", "random-base"])
@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip(preset, sharded, tmp_path):
    model = build_model(preset, seed=3)
    save_pretrained(model, str(tmp_path), max_shard_bytes=300_000 if sharded else None)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    if sharded:
        assert len(files) >= 3 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in files)
        with open(tmp_path / "model.safetensors.index.json") as f:
            assert set(json.load(f)["weight_map"].values()) == set(files)
    else:
        assert files == ["model.safetensors"]
    loaded, processor = load_pretrained(str(tmp_path))
    assert processor is None                                          # a weights-only folder
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_full_snapshot_with_processor(tiny_snapshot, tiny_model):
    from vl2lab.inputs.processor import VL2Processor

    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(
        os.listdir(tiny_snapshot))
    model, processor = tiny_model
    assert isinstance(processor, VL2Processor) and model.pad_token_id == processor.pad_id
    again = build_model("random-tiny", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), model.state_dict().values()))


def test_bf16_load_keeps_fp32_router_bias(tmp_path):
    save_pretrained(build_model("random-base", seed=0), str(tmp_path))
    model, _ = load_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    bias = model.language.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0


# ----------------------------------------------------------------------------------------- official names
def test_saved_keys_are_official(tmp_path):
    cfg = get_config("random-small")
    model = build_model(cfg, seed=0)
    save_pretrained(model, str(tmp_path))
    t = {k: list(v.shape) for k, v in _all_tensors(str(tmp_path)).items()}
    assert t == official_shapes(model)
    v, lm = cfg.vision_config, cfg.language_config
    W, D, H, I, E = v.width, cfg.projector_config.n_embed, lm.hidden_size, lm.moe_intermediate_size, lm.n_routed_experts
    expect = {  # spec section 6, scaled
        "vision.patch_embed.proj.weight": [W, 3, 14, 14], "vision.pos_embed": [1, 729, W],
        "vision.blocks.1.norm1.weight": [W], "vision.blocks.1.attn.qkv.weight": [3 * W, W],
        "vision.blocks.1.attn.qkv.bias": [3 * W], "vision.blocks.1.attn.proj.weight": [W, W],
        "vision.blocks.1.mlp.fc1.weight": [v.mlp_dim, W], "vision.blocks.1.mlp.fc2.weight": [W, v.mlp_dim],
        "vision.norm.bias": [W], "projector.layers.0.weight": [D, 4 * W], "projector.layers.2.weight": [D, D],
        "image_newline": [D], "view_seperator": [D], "language.model.embed_tokens.weight": [lm.vocab_size, H],
        "language.model.layers.0.mlp.gate_proj.weight": [lm.intermediate_size, H],
        "language.model.layers.1.mlp.gate.weight": [E, H],
        f"language.model.layers.1.mlp.experts.{E - 1}.gate_proj.weight": [I, H],
        "language.model.layers.2.mlp.experts.0.down_proj.weight": [H, I],
        "language.model.layers.1.mlp.shared_experts.up_proj.weight": [2 * I, H],
        "language.model.layers.1.self_attn.kv_a_proj_with_mqa.weight": [lm.kv_lora_rank + lm.qk_rope_head_dim, H],
        "language.model.layers.1.self_attn.kv_b_proj.weight":
            [lm.num_attention_heads * (lm.qk_nope_head_dim + lm.v_head_dim), lm.kv_lora_rank],
        "language.model.norm.weight": [H], "language.lm_head.weight": [lm.vocab_size, H],
    }
    assert {k: t.get(k) for k in expect} == expect
    assert not [k for k in t if "encoder.layers" in k or "embeddings." in k or re.search(r"\.experts\.[a-z]", k)]


@pytest.mark.parametrize("preset,count,shapes", [
    ("deepseek-vl2-tiny", 2582, {"language.model.layers.1.mlp.experts.0.gate_proj.weight": [896, 1280],
                                 "language.model.layers.11.mlp.experts.63.down_proj.weight": [1280, 896],
                                 "language.model.layers.0.mlp.gate_proj.weight": [6848, 1280],
                                 "language.model.layers.1.mlp.shared_experts.gate_proj.weight": [1792, 1280],
                                 "language.model.layers.3.self_attn.q_proj.weight": [1280, 1280],
                                 "vision.blocks.26.attn.qkv.weight": [3456, 1152], "vision.pos_embed": [1, 729, 1152],
                                 "vision.blocks.0.mlp.fc1.weight": [4304, 1152],
                                 "projector.layers.0.weight": [1280, 4608], "image_newline": [1280],
                                 "language.lm_head.weight": [129280, 1280]}),
    ("deepseek-vl2-small", 5639, {"language.model.layers.1.self_attn.q_proj.weight": [3072, 2048],
                                  "language.model.layers.1.self_attn.kv_a_proj_with_mqa.weight": [576, 2048],
                                  "language.model.layers.1.self_attn.kv_a_layernorm.weight": [512],
                                  "language.model.layers.1.self_attn.kv_b_proj.weight": [4096, 512],
                                  "language.model.embed_tokens.weight": [102400, 2048]}),
    ("deepseek-vl2", 6973, {"language.model.layers.1.self_attn.q_proj.weight": [6144, 2560],
                            "language.model.layers.29.self_attn.kv_b_proj.weight": [8192, 512],
                            "language.model.layers.1.self_attn.o_proj.weight": [2560, 4096],
                            "language.model.layers.1.mlp.gate.e_score_correction_bias": [72],
                            "language.model.layers.1.mlp.experts.71.up_proj.weight": [1536, 2560]}),
])
def test_real_presets_on_meta(preset, count, shapes):
    shp = official_shapes(build_model(preset, device="meta"))
    assert len(shp) + 13 == count                                     # + the 13 unused vision.attn_pool tensors
    assert {k: shp.get(k) for k in shapes} == shapes


def test_key_mapping_both_ways():
    src = official_sources("vision.encoder.layers.4.self_attn.k_proj.weight")
    assert (src.keys, src.kind, src.part) == (("vision.blocks.4.attn.qkv.weight",), "qkv", 1)
    assert official_sources("vision.embeddings.position_embedding.weight").keys == ("vision.pos_embed",)
    src = official_sources("language.model.layers.2.mlp.experts.down_proj", n_experts=3)
    assert src.kind == "stack" and src.keys[2] == "language.model.layers.2.mlp.experts.2.down_proj.weight"
    assert official_to_module("vision.blocks.4.attn.qkv.bias") == [
        f"vision.encoder.layers.4.self_attn.{x}_proj.bias" for x in "qkv"]
    assert official_to_module("language.model.layers.2.mlp.experts.7.up_proj.weight") == [
        "language.model.layers.2.mlp.experts.up_proj"]
    assert official_to_module("vision.attn_pool.latent") == []
    assert official_to_module("language.lm_head.weight") == ["language.lm_head.weight"]


# ----------------------------------------------------------------------------------------- lazy reading
def test_lazy_reading_and_slices(tiny_snapshot, monkeypatch):
    import safetensors.torch

    def forbidden(*a, **k):
        raise AssertionError("a whole file was loaded")
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(safetensors.torch, "load", forbidden)
    model, _ = load_pretrained(tiny_snapshot)
    sd = model.state_dict()
    with SnapshotReader(tiny_snapshot) as r:
        full = r.get("vision.blocks.0.attn.qkv.weight")
        before = r.bytes_read
        part = r.get("vision.blocks.0.attn.qkv.weight", slices=(slice(8, 24),))
        assert torch.equal(part, full[8:24]) and r.bytes_read - before == part.numel() * 4
        for key, sl in [("vision.encoder.layers.1.self_attn.v_proj.weight", (slice(16, 48), slice(0, 8))),
                        ("vision.embeddings.position_embedding.weight", (slice(100, 200),)),
                        ("language.model.layers.1.mlp.experts.down_proj", (slice(3, 7), slice(10, 20))),
                        ("language.model.layers.1.self_attn.q_proj.weight", (slice(48, 96),))]:
            t = module_tensor_from_official(r, key, sd[key].shape, slices=sl)
            assert torch.equal(t, sd[key][sl]), key


def test_attn_pool_keys_are_ignored(tmp_path):
    model = build_model("random-tiny", seed=0)
    save_pretrained(model, str(tmp_path))
    fn = str(tmp_path / "model.safetensors")
    tensors = _all_tensors(str(tmp_path))
    W = model.config.vision_config.width
    tensors.update({"vision.attn_pool.latent": torch.randn(1, 1, W),
                    "vision.attn_pool.kv.weight": torch.randn(2 * W, W),
                    "vision.attn_pool.mlp.fc1.weight": torch.randn(4 * W, W)})
    save_file(tensors, fn, metadata={"format": "pt"})
    loaded, _ = load_pretrained(str(tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_official_single_shard_naming(tiny_snapshot, tmp_path):
    """The published tiny repo has one shard named ``model-00001-of-000001.safetensors`` plus an index."""
    path = _copy(tiny_snapshot, tmp_path)
    name = "model-00001-of-000001.safetensors"
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: name for k in _all_tensors(path)}}, f)
    model, _ = load_pretrained(path)
    assert torch.equal(model.image_newline, build_model("random-tiny", seed=0).image_newline)


# ----------------------------------------------------------------------------------------- bad input
def _rewrite(path, change):
    fn = os.path.join(path, "model.safetensors")
    tensors = _all_tensors(path)
    change(tensors)
    save_file(tensors, fn, metadata={"format": "pt"})


def test_not_a_snapshot(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not a DeepSeek-VL2 snapshot.*llama"):
        load_pretrained(str(tmp_path))


def test_variant_name_instead_of_path():
    with pytest.raises(CheckpointError, match="not a known variant.*known presets"):
        load_pretrained("deepseek-vl2-huge")
    with pytest.raises(CheckpointError, match="preset 'deepseek-vl2-tiny' but is not a folder.*make_random_snapshot"):
        load_pretrained("deepseek-ai/deepseek-vl2-tiny")
    with pytest.raises(ConfigError, match="unknown DeepSeek-VL2 variant"):
        build_model("deepseek-vl2-huge", device="meta")


def test_missing_shard(tmp_path):
    save_pretrained(build_model("random-tiny", seed=0), str(tmp_path), max_shard_bytes=300_000)
    os.remove(tmp_path / "model-00002-of-{:05d}.safetensors".format(
        len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")])))
    with pytest.raises(CheckpointError, match=r"shard\(s\) \['model-00002-of-\d+\.safetensors'\].*missing"):
        load_pretrained(str(tmp_path))


def test_truncated_file(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    fn = os.path.join(path, "model.safetensors")
    with open(fn, "rb") as f:
        data = f.read()
    with open(fn, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(path)


def test_wrong_shape(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    key = "language.model.layers.1.mlp.experts.2.up_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(key, torch.zeros(5, 7)))
    with pytest.raises(CheckpointError, match=re.escape(key) + r": expected shape \[32, 96\], found \[5, 7\]"):
        load_pretrained(path)


def test_missing_and_unexpected_keys(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    _rewrite(path, lambda t: [t.pop(k) for k in ("image_newline", "vision.blocks.1.attn.qkv.bias")])
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) missing.*image_newline"):
        load_pretrained(path)
    path2 = _copy(tiny_snapshot, tmp_path / "b")
    _rewrite(path2, lambda t: t.update({"language.model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"no place for.*mlp\.extra\.weight"):
        load_pretrained(path2)


def test_save_meta_model_refused(tmp_path):
    with pytest.raises(CheckpointError, match="meta device"):
        save_pretrained(build_model("random-tiny", device="meta"), str(tmp_path))


def test_make_random_snapshot_sharded(tmp_path):
    path = make_random_snapshot(str(tmp_path), "random-base", seed=1, max_shard_bytes=250_000)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model, processor = load_pretrained(path)
    assert processor is not None and model.config.language_config.topk_method == "noaux_tc"


# ----------------------------------------------------------------------------------------- official layout, by hand
def _official_value(key, shape):
    """Values that encode the official key: a hash of the name (< 2^23) plus arange, exact in float32."""
    base = int(hashlib.sha256(key.encode()).hexdigest(), 16) % (1 << 23)
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float64) % (1 << 20) + base).reshape(shape).to(torch.float32)


def test_hand_written_official_checkpoint_lands_in_the_right_modules(tmp_path):
    """A file written with the official names (not through save_pretrained, so not through vl2lab's own mapping):
    each module tensor must hold exactly the official tensor written out here by hand. Round trips cannot catch a
    mapping that is wrong both ways (e.g. the experts' gate_proj and up_proj swapped); this test does."""
    cfg = get_config("random-tiny")
    shapes = official_shapes(build_model(cfg, device="meta"))         # only the list of official keys and shapes
    official = {k: _official_value(k, s) for k, s in shapes.items()}
    official["vision.attn_pool.latent"] = torch.ones(1, 1, cfg.vision_config.width)   # in the real files, unused
    save_file(official, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.warns(SnapshotWarning, match="no tokenizer.json"):
        model, _ = load_pretrained(str(tmp_path))
    W = cfg.vision_config.width
    vis, lm = model.vision, model.language.model
    qkv_w, qkv_b = official["vision.blocks.1.attn.qkv.weight"], official["vision.blocks.1.attn.qkv.bias"]
    expect = [  # (module tensor, the official tensor it must be), written out by hand
        (lm.layers[1].mlp.experts.gate_proj[3], official["language.model.layers.1.mlp.experts.3.gate_proj.weight"]),
        (lm.layers[1].mlp.experts.up_proj[3], official["language.model.layers.1.mlp.experts.3.up_proj.weight"]),
        (lm.layers[2].mlp.experts.down_proj[15], official["language.model.layers.2.mlp.experts.15.down_proj.weight"]),
        (lm.layers[2].mlp.experts.gate_proj[0], official["language.model.layers.2.mlp.experts.0.gate_proj.weight"]),
        (lm.layers[1].mlp.gate.weight, official["language.model.layers.1.mlp.gate.weight"]),
        (lm.layers[1].mlp.shared_experts.up_proj.weight,
         official["language.model.layers.1.mlp.shared_experts.up_proj.weight"]),
        (lm.layers[0].mlp.gate_proj.weight, official["language.model.layers.0.mlp.gate_proj.weight"]),
        (lm.layers[0].mlp.up_proj.weight, official["language.model.layers.0.mlp.up_proj.weight"]),
        (lm.layers[2].self_attn.k_proj.weight, official["language.model.layers.2.self_attn.k_proj.weight"]),
        (lm.layers[2].self_attn.o_proj.weight, official["language.model.layers.2.self_attn.o_proj.weight"]),
        (lm.layers[1].input_layernorm.weight, official["language.model.layers.1.input_layernorm.weight"]),
        (lm.embed_tokens.weight, official["language.model.embed_tokens.weight"]),
        (lm.norm.weight, official["language.model.norm.weight"]),
        (model.language.lm_head.weight, official["language.lm_head.weight"]),
        (vis.encoder.layers[1].self_attn.q_proj.weight, qkv_w[:W]),
        (vis.encoder.layers[1].self_attn.k_proj.weight, qkv_w[W:2 * W]),
        (vis.encoder.layers[1].self_attn.v_proj.weight, qkv_w[2 * W:]),
        (vis.encoder.layers[1].self_attn.q_proj.bias, qkv_b[:W]),
        (vis.encoder.layers[1].self_attn.v_proj.bias, qkv_b[2 * W:]),
        (vis.encoder.layers[0].self_attn.out_proj.weight, official["vision.blocks.0.attn.proj.weight"]),
        (vis.encoder.layers[0].layer_norm1.weight, official["vision.blocks.0.norm1.weight"]),
        (vis.encoder.layers[0].layer_norm2.bias, official["vision.blocks.0.norm2.bias"]),
        (vis.encoder.layers[1].mlp.fc1.weight, official["vision.blocks.1.mlp.fc1.weight"]),
        (vis.encoder.layers[1].mlp.fc2.bias, official["vision.blocks.1.mlp.fc2.bias"]),
        (vis.embeddings.position_embedding.weight, official["vision.pos_embed"][0]),
        (vis.embeddings.patch_embedding.weight, official["vision.patch_embed.proj.weight"]),
        (vis.embeddings.patch_embedding.bias, official["vision.patch_embed.proj.bias"]),
        (vis.post_layernorm.weight, official["vision.norm.weight"]),
        (vis.post_layernorm.bias, official["vision.norm.bias"]),
        (model.projector.layers[0].weight, official["projector.layers.0.weight"]),
        (model.projector.layers[2].bias, official["projector.layers.2.bias"]),
        (model.image_newline, official["image_newline"]),
        (model.view_seperator, official["view_seperator"]),
    ]
    wrong = [i for i, (got, want) in enumerate(expect) if got.shape != want.shape or not torch.equal(got, want)]
    assert not wrong, f"module tensors #{wrong} do not hold their official tensor"
