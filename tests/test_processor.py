"""The DeepSeek-VL2 processor and the project tokenizer: tiling table, chat template, batching, bad input."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vl2lab.inputs.processor import ProcessorError, VL2Batch, VL2Processor, parse_grounding
from vl2lab.inputs.tiling import image_layout, image_token_count, pad_resize, select_canvas, to_rgb
from vl2lab.inputs.tokenizer import (ASSISTANT, BOS, EOS, IMAGE, PAD, SPECIAL_TOKENS, USER, TokenizerError,
                              build_tokenizer, load_tokenizer)

GREY = (127 / 255 - 0.5) / 0.5  # the padding colour after normalisation
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path=str(path))
    return str(path)


@pytest.fixture(scope="module")
def proc(tok_dir):
    return VL2Processor.from_pretrained(tok_dir)


def one_image(img, question=QUESTION):
    return [{"role": "<|User|>", "content": f"<image>\n{question}", "images": [img]},
            {"role": "<|Assistant|>", "content": ""}]


def solid(w, h, colour=(200, 30, 30)):
    return Image.new("RGB", (w, h), colour)


# -- tiling --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, canvas, tiles, tokens", [
    ((384, 384), (384, 384), (1, 1), 421), ((224, 224), (384, 384), (1, 1), 421),
    ((768, 768), (768, 768), (2, 2), 1023), ((640, 480), (768, 768), (2, 2), 1023),
    ((1024, 512), (1152, 768), (3, 2), 1415), ((512, 1024), (768, 1152), (2, 3), 1429),
    ((1920, 1080), (1536, 768), (4, 2), 1807), ((1000, 1000), (1152, 1152), (3, 3), 2017),
    ((4000, 3000), (1152, 1152), (3, 3), 2017), ((200, 5000), (384, 3456), (1, 9), 2101),
    ((1, 1), (384, 384), (1, 1), 421),
])
def test_canvas_table(size, canvas, tiles, tokens):
    assert select_canvas(*size) == canvas
    lay = image_layout(*size)
    assert lay["canvas"] == canvas and lay["tiles"] == tiles and lay["tokens"] == tokens
    assert lay["vit_passes"] == 1 + tiles[0] * tiles[1]
    assert image_token_count(*tiles) == tokens
    assert image_layout(*size, n_images=3)["tokens"] == 421


@pytest.mark.parametrize("size", [(1024, 512), (512, 1024), (384, 384)])
def test_batch_fields_follow_the_formula(proc, size):
    b = proc(conversation=one_image(solid(*size)))
    lay = image_layout(*size)
    assert b.images.shape == (1, lay["vit_passes"], 3, 384, 384)
    assert b.images_spatial_crop.tolist() == [[list(lay["tiles"])]]
    assert int(b.images_seq_mask.sum()) == lay["tokens"]
    assert (b.input_ids[b.images_seq_mask] == proc.image_token_id).all()
    assert (b.input_ids[~b.images_seq_mask] != proc.image_token_id).all()


def test_three_images_are_not_tiled_two_are(proc):
    big = solid(768, 768)
    conv = [{"role": "<|User|>", "content": "<image><image><image> Compare.", "images": [big, big, big]},
            {"role": "<|Assistant|>", "content": ""}]
    b = proc(conversation=conv)
    assert b.images_spatial_crop.tolist() == [[[1, 1]] * 3] and b.num_image_tokens == [[421] * 3]
    assert b.images.shape[1] == 6 and int(b.images_seq_mask.sum()) == 3 * 421
    assert torch.equal(b.images[0, 0], b.images[0, 1])  # 384 canvas: local tile == global view
    conv[0]["content"], conv[0]["images"] = "<image><image> Compare.", [big, big]
    assert proc(conversation=conv).num_image_tokens == [[1023, 1023]]


def test_tiles_order_and_grey_padding(proc):
    a = np.zeros((768, 768, 3), np.uint8)
    quads = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # TL, TR, BL, BR
    for k, c in enumerate(quads):
        a[(k // 2) * 384:(k // 2 + 1) * 384, (k % 2) * 384:(k % 2 + 1) * 384] = c
    b = proc(conversation=one_image(Image.fromarray(a)))
    assert b.images_spatial_crop.tolist() == [[[2, 2]]]
    for k, c in enumerate(quads):  # tiles 1..4 are row-major: TL, TR, BL, BR
        expect = torch.tensor(c, dtype=torch.float32) / 255 * 2 - 1
        assert torch.allclose(b.images[0, 1 + k].mean(dim=(1, 2)), expect, atol=1e-6)
    # 1024×512 → canvas 1152×768: resized to 1152×576 with 96 grey rows above and below
    b = proc(conversation=one_image(solid(1024, 512, (255, 255, 255))))
    tiles = b.images[0]
    grey, white = torch.tensor(GREY), torch.tensor(1.0)
    assert torch.allclose(tiles[1, :, :96], grey) and torch.allclose(tiles[1, :, 96:], white)    # top-left tile
    assert torch.allclose(tiles[4, :, -96:], grey) and torch.allclose(tiles[4, :, :-96], white)  # bottom-left tile
    assert torch.allclose(tiles[0, :, :96], grey) and torch.allclose(tiles[0, :, 96:288], white)  # global: 384×192


def test_pad_resize_matches_pil_pad():
    rng = np.random.default_rng(0)
    for w, h in [(1024, 512), (333, 777), (385, 383), (7, 900)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for size in [(384, 384), (1152, 768)]:
            assert np.array_equal(np.asarray(pad_resize(im, size)),
                                  np.asarray(ImageOps.pad(im, size, color=(127, 127, 127))))


def test_normalisation_range(proc):
    a = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    a[0, 0], a[0, 1] = 0, 255
    b = proc(conversation=one_image(Image.fromarray(a)))
    assert b.images.dtype == torch.float32
    assert b.images.min() == -1.0 and b.images.max() == 1.0


# -- chat template -------------------------------------------------------------------------------------------
def test_one_image_chat_string_and_ids(proc):
    conv = one_image(solid(384, 384))
    assert proc.format_prompt(conv) == f"{USER}: <image>\n{QUESTION}\n\n{ASSISTANT}:"
    b = proc(conversation=conv)
    ids = b.input_ids[0].tolist()
    enc = lambda s: proc.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert ids == [proc.bos_id] + enc(f"{USER}: ") + [proc.image_token_id] * 421 + enc(f"\n{QUESTION}\n\n{ASSISTANT}:")
    assert ids[0] == proc.tokenizer.convert_tokens_to_ids(BOS) and ids.count(proc.bos_id) == 1
    assert b.attention_mask.tolist() == [[1] * len(ids)]


def test_multi_turn_and_system(proc):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "<|User|>", "content": "Hi"},
            {"role": "<|Assistant|>", "content": "Hello."}, {"role": "<|User|>", "content": "Colour?"},
            {"role": "<|Assistant|>", "content": ""}]
    assert proc.format_prompt(conv) == (f"Be brief.\n\n{USER}: Hi\n\n{ASSISTANT}: Hello.{EOS}"
                                        f"{USER}: Colour?\n\n{ASSISTANT}:")
    ids = proc(conversation=conv).input_ids[0].tolist()
    enc = lambda s: proc.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    # the answer is encoded without its leading space, then EOS; the final empty answer adds nothing
    assert ids == ([proc.bos_id] + enc(f"Be brief.\n\n{USER}: Hi\n\n{ASSISTANT}:") + enc("Hello.") + [proc.eos_id]
                   + enc(f"{USER}: Colour?\n\n{ASSISTANT}:"))
    full = proc(conversation=conv[:3], inference_mode=False, return_labels=True)
    assert full.input_ids[0, -1] == proc.eos_id and torch.equal(full.labels, full.input_ids)
    assert proc(conversation=conv[:3]).input_ids[0, -1] != proc.eos_id  # inference mode drops the final EOS


def test_left_padding_batch(proc):
    c1, c2 = one_image(solid(1024, 512)), [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": ""}]
    b = proc(conversations=[c1, c2])
    s1, s2 = proc(conversation=c1), proc(conversation=c2)
    T, n2 = s1.input_ids.shape[1], s2.input_ids.shape[1]
    assert b.input_ids.shape == (2, T) and b.images.shape == (2, 7, 3, 384, 384)
    assert torch.equal(b.input_ids[0], s1.input_ids[0]) and torch.equal(b.images[0], s1.images[0])
    assert torch.equal(b.input_ids[1, T - n2:], s2.input_ids[0])
    assert (b.input_ids[1, :T - n2] == proc.tokenizer.pad_token_id).all()
    assert proc.tokenizer.pad_token_id == proc.tokenizer.convert_tokens_to_ids(PAD)
    assert b.attention_mask[1].tolist() == [0] * (T - n2) + [1] * n2
    assert not b.images_seq_mask[1].any() and (b.images[1] == 0).all()
    assert b.images_spatial_crop.tolist() == [[[3, 2]], [[0, 0]]]
    assert b.input_ids.dtype == b.attention_mask.dtype == b.images_spatial_crop.dtype == torch.long
    assert b.images_seq_mask.dtype == torch.bool


def test_no_images_and_batch_object(proc):
    b = proc(conversation=[{"role": "user", "content": "Hi"}])  # ends with a user turn: generation prompt
    assert b.images.shape == (1, 0, 3, 384, 384) and b.images_spatial_crop.shape == (1, 0, 2)
    assert proc.decode(b.input_ids[0], skip_special_tokens=False) == f"{BOS}{USER}: Hi\n\n{ASSISTANT}:"
    assert isinstance(b, VL2Batch) and b.input_ids is b["input_ids"]
    assert set(b) == {"input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop"}
    b2 = proc(conversation=one_image(solid(64, 64))).to("cpu", torch.bfloat16)
    assert b2.images.dtype == torch.bfloat16 and b2.input_ids.dtype == torch.long


def test_save_and_load_roundtrip(proc, tok_dir, tmp_path):
    proc.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["processor_class"] == "DeepseekVLV2Processor" and cfg["pad_token"] == PAD
    assert cfg["candidate_resolutions"][0] == [384, 384] and len(cfg["candidate_resolutions"]) == 23
    assert cfg["mask_prompt"] is False and cfg["add_special_token"] is False and cfg["ignore_id"] == -100
    again = VL2Processor.from_pretrained(str(tmp_path))
    conv = one_image(solid(100, 50))
    assert torch.equal(again(conversation=conv).input_ids, proc(conversation=conv).input_ids)
    assert (tmp_path / "tokenizer.json").read_bytes() == open(os.path.join(tok_dir, "tokenizer.json"), "rb").read()
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "LlamaTokenizerFast" and tc["add_bos_token"] is True


# -- tokenizer -----------------------------------------------------------------------------------------------
def test_tokenizer_determinism_and_special_ids(tok_dir, tmp_path):
    build_tokenizer(path=str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(tok_dir, name), "rb").read()
    tok = load_tokenizer(tok_dir)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(11))
    assert "｜" in BOS and "▁" in BOS and (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    text = "a red circle 123"
    assert len(tok) <= 1024 and tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("<|ref|>x<|/ref|>", add_special_tokens=False)[0] == 4
    more = build_tokenizer(texts=["the glimmering octagon sits beside a turquoise hexagon"] * 5)
    assert more.get_vocab_size() <= 1024 and more.token_to_id("Ġoctagon") is not None
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv, match", [
    ([{"role": "user", "content": "<image><image> hi", "images": [Image.new("RGB", (8, 8))]}], "2 <image> tag"),
    ([{"role": "user", "content": "hi", "images": [Image.new("RGB", (8, 8))]}], "0 <image> tag"),
    ([{"role": "user", "content": "<image>", "images": [Image.new("RGB", (0, 8))]}], "empty"),
    ([{"role": "user", "content": "<image>", "images": [np.zeros((8, 8, 3), np.uint8)]}], "PIL"),
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}], "assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], "system"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], "alternate"),
    ([], "non-empty"),
])
def test_bad_input(proc, conv, match):
    with pytest.raises(ProcessorError, match=match):
        proc(conversation=conv)


def test_context_overflow(proc):
    tall = solid(200, 5000)
    conv = [{"role": "user", "content": "<image><image>", "images": [tall, tall]}]
    with pytest.raises(ProcessorError, match=r"needs 42\d\d tokens .*fewer or smaller images"):
        proc(conversation=conv)
    with pytest.raises(ProcessorError, match="holds 100"):
        proc(conversation=one_image(solid(8, 8)), max_length=100)
    assert issubclass(ProcessorError, ValueError)


def test_image_modes(proc):
    tiny = proc(conversation=one_image(solid(1, 1)))  # 1×1 is valid
    assert int(tiny.images_seq_mask.sum()) == 421
    sixteen = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert sixteen.mode.startswith("I;16") and np.asarray(to_rgb(sixteen))[0, 0].tolist() == [128] * 3
    assert np.asarray(to_rgb(Image.fromarray(np.full((8, 8), 0.5, np.float32))))[0, 0].tolist() == [128] * 3
    assert np.asarray(to_rgb(Image.fromarray(np.full((8, 8), 40000, np.int32))))[0, 0].tolist() == [156] * 3
    for mode in ("RGBA", "LA", "P", "CMYK", "L", "1"):
        im = Image.new(mode, (16, 16))
        assert to_rgb(im).mode == "RGB"
        assert proc(conversation=one_image(im)).images.shape == (1, 2, 3, 384, 384)


# -- grounding -----------------------------------------------------------------------------------------------
def test_parse_grounding(proc):
    text = ("<|ref|>red circle<|/ref|><|det|>[[0,0,999,999]]<|/det|> and "
            "<|ref|>star<|/ref|><|det|>[[100,200,300,400],[1,2,3]],[[999,0,999,999]]<|/det|>")
    got = parse_grounding(text, (1998, 999))
    assert got[0] == ("red circle", [0.0, 0.0, 1998.0, 999.0])
    assert [g[0] for g in got] == ["red circle", "star", "star"]
    assert got[1][1] == pytest.approx([200.0, 200.0, 600.0, 400.0])
    assert proc.parse_grounding(text, Image.new("RGB", (999, 999)))[2][1] == pytest.approx([999, 0, 999, 999])
    ids = proc.tokenizer.encode(text, add_special_tokens=False)
    assert parse_grounding(proc.decode(ids, skip_special_tokens=False), (1998, 999)) == got
