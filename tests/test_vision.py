"""The vision side: space-to-depth channel order, the 2-D token layout, the SigLIP tower, and image features
landing exactly on the image positions of a prompt."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_picture
from vl2lab.model.config import get_config
from vl2lab.model.vision import (Projector, build_vision_tower, encode_tiles, image_token_count,
                                 layout_image_features, space_to_depth)


# ----------------------------------------------------------------------------------------- projector
def test_space_to_depth_is_unfold_channel_major():
    torch.manual_seed(0)
    x = torch.randn(2, 729, 5)                                       # [N, 27·27, C]
    ours = space_to_depth(x, grid=27, ratio=2)                        # [N, 196, 4C]
    grid = F.pad(x.view(2, 27, 27, 5).permute(0, 3, 1, 2), (0, 1, 0, 1))  # [N, C, 28, 28], zeros bottom/right
    ref = F.unfold(grid, kernel_size=2, stride=2).transpose(1, 2)    # [N, 196, 4C]
    assert torch.equal(ours, ref)
    assert torch.equal(ours, F.pixel_unshuffle(grid, 2).flatten(2).transpose(1, 2))


def test_space_to_depth_by_hand():
    c = 3
    x = torch.arange(729 * c, dtype=torch.float32).view(1, 729, c)
    out = space_to_depth(x, grid=27, ratio=2)
    g = x.view(27, 27, c)
    for by, bx in [(0, 0), (0, 13), (5, 7), (13, 0), (13, 13)]:
        for ch in range(c):
            for dy in range(2):
                for dx in range(2):
                    r, col = 2 * by + dy, 2 * bx + dx
                    want = g[r, col, ch] if r < 27 and col < 27 else 0.0   # the padded row/column is zero
                    assert out[0, by * 14 + bx, ch * 4 + 2 * dy + dx] == want
    # not the "concatenate the four neighbours" order
    assert not torch.equal(out[0, 0], torch.cat([g[0, 0], g[0, 1], g[1, 0], g[1, 1]]))


def test_projector_layers_and_gelu():
    cfg = get_config("random-tiny")
    proj = Projector(cfg.projector_config, grid=27)
    w, d = cfg.vision_config.width, cfg.projector_config.n_embed
    assert [type(m).__name__ for m in proj.layers] == ["Linear", "GELU", "Linear"]
    assert proj.layers[1].approximate == "none"                       # exact erf GELU
    assert tuple(proj.layers[0].weight.shape) == (d, 4 * w) and tuple(proj.layers[2].weight.shape) == (d, d)
    x = torch.randn(3, 729, w)
    assert torch.allclose(proj(x), proj.layers(space_to_depth(x, 27, 2)))
    assert proj(x).shape == (3, 196, d)


# ----------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("tw,th,count", [(1, 1, 421), (2, 2, 1023), (3, 2, 1415), (1, 9, 2101), (2, 3, 1429)])
def test_layout_counts_and_positions(tw, th, count):
    from vl2lab.inputs.tiling import image_token_count as processor_count

    n = 1 + tw * th
    tiles = torch.zeros(n, 14, 14, 4)                                 # marker: (tile, row, col, 0)
    tiles[..., 0] = torch.arange(n).view(n, 1, 1).float()
    tiles[..., 1] = torch.arange(14).view(1, 14, 1).float()
    tiles[..., 2] = torch.arange(14).view(1, 1, 14).float()
    newline, sep = torch.full((4,), -1.0), torch.full((4,), -2.0)
    out = layout_image_features(tiles, tw, th, newline, sep)
    assert out.shape == (count, 4) and image_token_count(tw, th) == count == processor_count(tw, th)

    glob = out[:210].view(14, 15, 4)                                  # 14 rows of 14 cells + a newline
    assert (glob[:, 14] == -1).all()
    assert torch.equal(glob[:, :14], tiles[0])
    assert (out[210] == -2).all()
    local = out[211:].view(14 * th, 14 * tw + 1, 4)                   # newline only at the right edge
    assert (local[:, -1] == -1).all()
    assert (local[:, :-1] != -1).all() and (out[:210][(out[:210] == -2).all(-1)]).numel() == 0
    for R in range(14 * th):
        for C in range(14 * tw):
            tile = 1 + (R // 14) * tw + C // 14                       # tiles in row-major order
            assert local[R, C].tolist() == [tile, R % 14, C % 14, 0]


def test_layout_rejects_wrong_tile_count():
    with pytest.raises(ValueError, match="tiles"):
        layout_image_features(torch.zeros(4, 14, 14, 8), 2, 2, torch.zeros(8), torch.zeros(8))


# ----------------------------------------------------------------------------------------- tower
@pytest.mark.parametrize("preset", ["random-tiny", "random-small", "random-base"])
def test_tower_output_shape(preset):
    v = get_config(preset).vision_config
    torch.manual_seed(0)
    tower = build_vision_tower(v)
    out = encode_tiles(tower, torch.randn(3, 3, 384, 384))
    assert out.shape == (3, 729, v.width)
    assert tower.config._attn_implementation == "sdpa" and not tower.config.vision_use_head
    # post-LayerNorm output: at init (weight 1, bias 0) every token is normalised
    assert torch.allclose(out.mean(-1), torch.zeros(3, 729), atol=1e-4)
    # tiles are independent: splitting the batch (as ranks would) gives the same features
    tiles = torch.randn(3, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    split = torch.cat([encode_tiles(tower, tiles[:1]), encode_tiles(tower, tiles[1:])])
    assert torch.allclose(split, encode_tiles(tower, tiles), atol=1e-5)


def test_real_tower_geometry_on_meta():
    with torch.device("meta"):
        tower = build_vision_tower(get_config("deepseek-vl2-tiny").vision_config)
    c = tower.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (1152, 4304, 27, 16)
    assert (c.image_size, c.patch_size, c.hidden_act, c.layer_norm_eps) == (384, 14, "gelu_pytorch_tanh", 1e-6)
    assert sum(p.numel() for p in tower.parameters()) == 412_987_248   # SO400M/14 without the pooling head


# ----------------------------------------------------------------------------------------- whole model
def _prompt(processor, picture, question="What is in the picture?"):
    return processor(conversation=[{"role": "<|User|>", "content": f"<image>\n{question}", "images": [picture]},
                                   {"role": "<|Assistant|>", "content": ""}])


def test_image_features_land_on_image_positions(tiny_model, picture_768):
    model, processor = tiny_model
    batch = _prompt(processor, picture_768)
    mask = batch["images_seq_mask"][0]
    assert int(mask.sum()) == 1023 and batch["images_spatial_crop"].tolist() == [[[2, 2]]]
    with torch.no_grad():
        out = model(**batch)
        assert out.logits.shape == (1, batch["input_ids"].shape[1], model.config.language_config.vocab_size)
        embeds = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                             batch["images_spatial_crop"])
        text = model.language.embed(batch["input_ids"])
        feats = model.image_features(batch["images"][0, :5], [(2, 2)])
    assert torch.equal(embeds[0, ~mask], text[0, ~mask])              # text positions untouched
    assert torch.equal(embeds[0, mask], feats)                        # image positions = the image sequence
    nl = model.image_newline.detach()
    assert torch.equal(embeds[0, mask][14], nl) and torch.equal(embeds[0, mask][210], model.view_seperator.detach())

    other = _prompt(processor, make_picture(768, 768, seed=5))       # another image: other logits
    text_changed = _prompt(processor, picture_768, "How many squares?")
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits[0, -1], out.logits[0, -1])
        e2 = model.prepare_inputs_embeds(text_changed["input_ids"], text_changed["images"],
                                         text_changed["images_seq_mask"], text_changed["images_spatial_crop"])
    assert torch.equal(e2[0, text_changed["images_seq_mask"][0]], feats)  # other text: the same image features


def test_batch_uses_one_vision_call(tiny_model, picture_768):
    model, processor = tiny_model
    small = make_picture(300, 200, seed=1)
    batch = processor(conversations=[
        [{"role": "<|User|>", "content": "<image>\nDescribe.", "images": [picture_768]},
         {"role": "<|Assistant|>", "content": ""}],
        [{"role": "<|User|>", "content": "Compare <image> and <image>.", "images": [small, small]},
         {"role": "<|Assistant|>", "content": ""}]])
    calls = []
    hook = model.vision.register_forward_hook(lambda m, a, k: calls.append(k if k else a))
    try:
        with torch.no_grad():
            embeds = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                                 batch["images_spatial_crop"])
    finally:
        hook.remove()
    assert len(calls) == 1                                             # 5 + 2 + 2 tiles in one call
    one = _prompt(processor, picture_768, "Describe.")
    with torch.no_grad():
        alone = model.prepare_inputs_embeds(one["input_ids"], one["images"], one["images_seq_mask"],
                                            one["images_spatial_crop"])
    T = one["input_ids"].shape[1]
    assert torch.allclose(embeds[0, -T:], alone[0], atol=1e-5)


def test_mismatched_image_positions_raise(tiny_model, picture_768):
    model, processor = tiny_model
    batch = _prompt(processor, picture_768)
    mask = batch["images_seq_mask"].clone()
    mask[0, -1] = True                                                 # one position too many
    with pytest.raises(ValueError, match="1024 image positions.*1023"):
        model.prepare_inputs_embeds(batch["input_ids"], batch["images"], mask, batch["images_spatial_crop"])


def test_generate_is_the_argmax_of_the_models_own_logits(tiny_model, picture_768):
    """Greedy generate on an image prompt: each token is the argmax of the full forward over the prompt plus the
    tokens so far (no cache), so a broken KV cache or a dropped image would change them. (The stronger check on
    the trained vl2-micro, left padding and EOS is tests/test_language.py's argmax-loop test.)"""
    model, processor = tiny_model
    batch = _prompt(processor, picture_768)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, ignore_eos=True)
    assert out.shape == (1, 3) and out.dtype == torch.long
    ids, mask = batch["input_ids"], batch["attention_mask"]
    seq_mask = batch["images_seq_mask"]
    with torch.no_grad():
        for k in range(3):
            logits = model(input_ids=ids, attention_mask=mask, images=batch["images"], images_seq_mask=seq_mask,
                           images_spatial_crop=batch["images_spatial_crop"]).logits
            assert int(logits[0, -1].argmax()) == int(out[0, k]), k
            ids = torch.cat([ids, out[:, k:k + 1]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            seq_mask = torch.cat([seq_mask, torch.zeros_like(seq_mask[:, :1])], dim=1)
