"""Notebook 01's package side: model resolution, parameter accounting, token layout (vl2lab.lessons.baseline), the model
built on its device (vl2lab.model.build), memory measurement, chunked prefill (equal to one shot), the profile and
prefill-memory rank functions run in-process (vl2lab.perf.memory), and their plots."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from vl2lab.lessons import baseline
from vl2lab.model import build_model
from vl2lab.model.attention import attention_kernel
from vl2lab.model.build import build_on_device
from vl2lab.model.config import get_config
from vl2lab.model.generation import chunked_prefill, generate
from vl2lab.perf import memory
from vl2lab.planner import sizing
from vl2lab.weights import pretrained


# ------------------------------------------------------------------------------------------ chunked prefill

def _prompt(lm, seed=0, B=2, T=37):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, T, lm.config.hidden_size, generator=g) * 0.5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0                                                   # a left-padded row
    return embeds, mask


@pytest.mark.parametrize("preset", ["random-tiny", "random-small", "random-base"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
def test_chunked_prefill_equals_one_shot(preset, chunk):
    lm = build_model(preset, seed=1).language
    embeds, mask = _prompt(lm)
    T = embeds.shape[1]
    with torch.no_grad():
        ref, ref_cache = lm(inputs_embeds=embeds, attention_mask=mask, cache=lm.new_cache(T), num_logits_to_keep=1)
    logits, cache = chunked_prefill(lm, embeds, mask, chunk)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert cache.seq_len == T and cache.max_len == T
    for a, b in zip(cache.buffers, ref_cache.buffers):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["random-tiny", "random-small"])
def test_chunked_prefill_then_generate_equals_generate(preset):
    model = build_model(preset, seed=2)
    embeds, mask = _prompt(model.language, seed=3)
    want = generate(model.language, embeds, mask, 6)
    for chunk in (7, 512):
        got = chunked_prefill(model, embeds, mask, chunk, max_new_tokens=6)   # the whole VL2 model works too
        assert torch.equal(got, want)


def test_chunked_prefill_all_logits_and_errors():
    lm = build_model("random-tiny").language
    embeds, mask = _prompt(lm, T=20)
    with torch.no_grad():
        ref, _ = lm(inputs_embeds=embeds, attention_mask=mask, cache=lm.new_cache(20))
    logits, _ = chunked_prefill(lm, embeds, mask, 8, num_logits_to_keep=0)
    assert logits.shape == (2, 4, lm.config.vocab_size)                # the last chunk holds positions 16..19
    torch.testing.assert_close(logits, ref[:, 16:], atol=1e-5, rtol=1e-5)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            chunked_prefill(lm, embeds, mask, bad)
    with pytest.raises(ValueError, match="attention_mask"):
        chunked_prefill(lm, embeds, mask[:, 1:], 4)


def test_chunked_prefill_with_images(tiny_model):
    model, processor = tiny_model
    from vl2lab.train.scenes import make_example
    b = processor(conversation=make_example(5, "colour").conversation())
    embeds = model.prepare_inputs_embeds(b["input_ids"], b["images"], b["images_seq_mask"], b["images_spatial_crop"])
    want = model.generate(**b, max_new_tokens=4, do_sample=False)
    assert torch.equal(chunked_prefill(model, embeds, b["attention_mask"], 64, max_new_tokens=4), want)


# ------------------------------------------------------------------------------------------ model resolution

def test_resolve_model(tmp_path, tiny_snapshot, monkeypatch):
    r = baseline.resolve_model(tiny_snapshot)
    assert r["source"] == "folder" and r["path"] == os.path.abspath(tiny_snapshot)
    monkeypatch.setattr(pretrained, "MICRO_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(baseline.BaselineError, match="vl2-micro.*python -m vl2lab.train.micro.*random-tiny"):
        baseline.resolve_model("vl2-micro")
    with pytest.raises(baseline.BaselineError, match="neither"):
        baseline.resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(baseline.BaselineError, match="config.json"):
        baseline.resolve_model(str(tmp_path / "empty"))
    r = baseline.resolve_model("random-tiny", cache_dir=str(tmp_path))
    assert r["source"] == "random" and os.path.isfile(os.path.join(r["path"], "config.json"))
    assert baseline.resolve_model("random-tiny", cache_dir=str(tmp_path))["path"] == r["path"]   # reused


@pytest.mark.parametrize("preset", ["random-tiny", "random-small", "random-base", "vl2-micro"])
def test_param_rows_match_sizing(preset):
    rows = baseline.param_rows(build_model(preset))
    assert all(r["sizing"] == r["counted"] for r in rows)
    assert sum(r["counted"] for r in rows[:-1]) == rows[-1]["counted"]   # the parts cover every parameter once


def test_build_on_device_makes_the_dtype_directly():
    m = build_on_device("random-base", "bfloat16", "cpu")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in m.parameters()) == sizing.param_counts(m.config)["total_instantiated"]
    assert m.language.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(m.vision.embeddings.position_ids[0], torch.arange(m.config.vision_config.grid ** 2))
    assert torch.get_default_dtype() == torch.float32 and not m.training          # the default dtype is restored
    assert build_on_device("random-tiny", torch.float16).language.lm_head.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="not a torch dtype"):
        build_on_device("random-tiny", "bf16")


def test_attention_kernel():
    q = torch.randn(1, 2, 5, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    for attn in ("sdpa", "eager", "math"):
        with attention_kernel(attn):
            torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q), want)
    with pytest.raises(ValueError, match="'sdpa', 'eager' or 'math'"):
        attention_kernel("flash")


# ------------------------------------------------------------------------------------------ tokens

@pytest.mark.parametrize("w,h,n,tokens,newlines", [(384, 384, 1, 421, 28), (768, 768, 1, 1023, 42),
                                                    (1024, 512, 1, 1415, 42), (384, 3456, 1, 2101, 140),
                                                    (1920, 1080, 3, 421, 28)])
def test_token_layout(w, h, n, tokens, newlines):
    lay = baseline.token_layout(w, h, n)
    tw, th = lay["tiles"]
    assert lay["tokens"] == lay["counted"] == tokens
    assert lay["global_cells"] == 196 and lay["global_newlines"] == 14 and lay["separator_at"] == 210
    assert lay["local_cells"] == 196 * tw * th and lay["global_newlines"] + lay["local_newlines"] == newlines
    assert lay["kinds"][14] == 1 and lay["kinds"][-1] == 1             # each row ends in a newline


def test_sample_images_exist_offline():
    ims = baseline.sample_images(scene_seeds=(1,))
    assert set(baseline.PHOTOS) < set(ims) and "scene 1" in ims
    assert all(im.mode == "RGB" and im.width > 0 for im in ims.values())


# ------------------------------------------------------------------------------------------ memory

def test_prefill_activation_bytes():
    cfg = get_config("deepseek-vl2-small")
    for attn, logits in memory.MODES.values():
        one = memory.prefill_activation_bytes(cfg, 4096, None, attn=attn, logits=logits)
        assert one == memory.prefill_activation_bytes(cfg, 4096, 8192, attn=attn, logits=logits)
        assert one == sizing.activation_bytes(cfg, 1, 4096, 0, attn=attn, logits=logits)["lm_peak"]
        assert memory.prefill_activation_bytes(cfg, 4096, 512, attn=attn, logits=logits) < one / 4
    # eager scores of 512 queries against 4096 keys, not 512²
    a = sizing.activation_bytes(cfg, 1, 512, 0, attn="eager")
    assert memory.prefill_activation_bytes(cfg, 4096, 512, attn="eager", logits="last") >= a["lm_scores"] * 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is read from /proc")
def test_peak_memory_sees_a_large_tensor():
    with memory.PeakMemory("cpu") as m:
        x = torch.ones(40_000_000)                                     # 160 MB
        del x
    assert m.delta is not None and m.delta > 100e6
    with memory.PeakMemory("cpu") as m:
        torch.ones(1000).sum()
    assert m.delta < 100e6                                             # the earlier block's memory does not count


# ------------------------------------------------------------------------------------------ rank functions

def test_profile_in_process(tiny_snapshot):
    out = memory.profile(tiny_snapshot, batch_sizes=(1,), new_tokens=2, repeats=1, warmup=0)
    assert out["device"] == "cpu" and [r["batch"] for r in out["runs"]] == [1]
    for r in out["runs"]:
        assert set(r["times"]) == {"preprocess", "vision", "projector", "prefill", "generate_first", "decode", "generate"}
        assert r["image_tokens"] == 1023 and r["tiles"] == 5 * r["batch"] and r["prompt_len"] > 1023
        assert all(t["median"] > 0 for t in r["times"].values())
        assert r["predicted"]["total"] == sum(r["predicted"][k] for k in ("weights", "kv_cache", "activations"))
        assert set(r["peak_delta_bytes"]) == {"vision", "projector", "prefill", "generate"}
        assert r["times"]["decode"]["n"] == 1 and r["decode_s_per_token"] == r["times"]["decode"]["median"] > 0


def test_prefill_memory_in_process(tiny_snapshot):
    out = memory.prefill_memory(tiny_snapshot, chunk_size=64, n_images=1, image_size=384)
    rows = out["model"]["rows"]
    assert out["real"] == {} and out["tokens"] > 421
    want = [(m, p) for m in memory.MODES for p in ("one-shot", "chunked")]
    assert [(r["mode"], r["prefill"]) for r in rows] == want
    assert all(r["equal"] for r in rows)
    assert all(r["predicted_bytes"] > r["kv_bytes"] > 0 for r in rows)


def test_plots_draw(tiny_model):
    """Each figure draws its inputs: the tiles the processor cut (as many as the layout says, each the pixels of
    its tile), the token grid (one square per image token, by kind), the boxes of an answer, the stage times as
    stacked bars of their medians, throughputs, memory bars, and the hardware / title strings."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from vl2lab.workbook import baseline_plots as plots
    _, processor = tiny_model
    im = baseline.sample_images(scene_seeds=())["logo2.png"]
    lay = baseline.token_layout(im.width, im.height)
    tw, th = lay["tiles"]
    b = processor(conversation=[{"role": "<|User|>", "content": "<image>\nx", "images": [im]},
                                {"role": "<|Assistant|>", "content": ""}])
    tiles = b["images"][0]
    fig = plots.draw_tiles(im, tiles, lay["tiles"], lay)
    titles = [a.get_title() for a in fig.axes]
    assert len(fig.axes) == 2 + tw * th + 1 and titles[2:-1] == [f"tile {i}" for i in range(tw * th)], titles
    assert titles[0] == f"original {im.width}×{im.height}" and titles[-1] == f"{lay['tokens']} image tokens"
    assert f"{tw}×{th} tiles" in fig.get_suptitle() and f"{lay['vit_passes']} ViT passes" in fig.get_suptitle()
    for i, ax in enumerate(fig.axes[1:-1]):                       # the global view, then the local tiles in order
        want = ((tiles[i].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), want, atol=1e-6)
    grid = np.asarray(fig.axes[-1].images[0].get_array()).reshape(-1, 3)        # one square per image token
    colours, count = np.unique(grid, axis=0, return_counts=True)
    kinds = sorted(int(n) for c, n in zip(colours, count) if not np.allclose(c, 1.0))   # white: no token there
    assert kinds == sorted([lay["global_cells"] + lay["local_cells"], lay["global_newlines"] + lay["local_newlines"],
                            1]), kinds                                    # cells, newlines, the one separator
    plt.close(fig)

    fig = plots.draw_answers([{"image": im, "question": "q", "answer": "a", "truth": "a", "ok": True,
                               "boxes": [[1, 1, 20, 20]], "truth_boxes": [[2, 2, 30, 30]], "iou": 0.5},
                              {"image": im, "question": "colour?", "answer": "red", "truth": "blue", "ok": False}])
    assert len(fig.axes) == 4 and fig.axes[0].get_title() == "q\n→ box, IoU 0.50 ✓"
    assert fig.axes[1].get_title() == "colour?\n→ 'red' ✗" and not fig.axes[2].images
    boxes = sorted((r.get_x(), r.get_y(), r.get_width(), r.get_height(), r.get_linestyle())
                   for r in fig.axes[0].patches if isinstance(r, Rectangle))
    assert boxes == [(1, 1, 19, 19, "-"), (2, 2, 28, 28, "--")], boxes
    plt.close(fig)

    medians = {"preprocess": 0.1, "vision": 0.2, "projector": 0.3, "prefill": 0.4}
    runs = [{"batch": bs, "times": {k: {"median": v * bs} for k, v in medians.items()}, "decode_s_per_token": 0.01 * bs,
             "tokens_per_s": 10.0 * bs, "images_per_s": 1.5 * bs} for bs in (1, 2)]
    fig = plots.plot_profile({"runs": runs, "new_tokens": 4, "dtype": "float32"}, "CPU (2 cores)")
    a1, a2, a3 = fig.axes
    assert "CPU (2 cores)" in fig.get_suptitle() and "float32" in fig.get_suptitle()
    names = [c.get_label() for c in a1.containers]
    assert names == ["preprocess", "vision", "projector", "LM prefill", "decode (3 steps)"], names
    want = [[v * bs * 1e3 for bs in (1, 2)] for v in (*medians.values(), 0.03)]          # ms; decode = 3 steps
    np.testing.assert_allclose([[r.get_height() for r in c] for c in a1.containers], want)
    np.testing.assert_allclose([[r.get_y() for r in c] for c in a1.containers],          # stacked, in this order
                               np.cumsum([[0.0, 0.0]] + want[:-1], axis=0))
    assert list(a2.lines[0].get_ydata()) == [10.0, 20.0] and list(a3.lines[0].get_ydata()) == [1.5, 3.0]
    plt.close(fig)

    rows = [{"mode": "vl2lab (x)", "prefill": "chunked", "chunk": 8, "measured_bytes": 1e6, "predicted_bytes": 2e6},
            {"mode": "eager (y)", "prefill": "one-shot", "chunk": 8, "measured_bytes": None, "predicted_bytes": 5e6}]
    fig = plots.plot_prefill_memory(rows, "prefill of t")
    ax, = fig.axes
    assert ax.get_title() == "prefill of t" and [t.get_text() for t in ax.get_xticklabels()] == [
        "vl2lab\nchunked 8", "eager\none-shot"]
    np.testing.assert_allclose([[r.get_height() for r in c] for c in ax.containers], [[1.0, 0.0], [2.0, 5.0]])  # MB
    plt.close(fig)
