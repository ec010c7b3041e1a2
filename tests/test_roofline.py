"""The floor maths of vl2lab.perf.roofline against hand-computed values and the published anchors; the perf layer's
shape (no higher layer imported, the command lines documented) and its shared workload."""
import math
import subprocess
import sys

import pytest
import torch

from vl2lab.model.config import get_config
from vl2lab.perf import bench, ladder, roofline, routing, workload
from vl2lab.planner.sizing import param_counts

PERF_MODULES = ("workload", "rungs", "memory", "bench", "ladder", "report", "roofline", "step_profile", "peer",
                "collectives", "routing")


def test_experts_touched_uniform_routing():
    assert roofline.experts_touched(64, 6, 1) == pytest.approx(6.0)
    assert roofline.experts_touched(64, 6, 32) == pytest.approx(64 * (1 - (58 / 64) ** 32))
    assert 61.2 < roofline.experts_touched(64, 6, 32) < 61.4      # 61.3 at batch 32 in the perf anchors
    assert roofline.experts_touched(0, 0, 8) == 0.0


def test_decode_bytes_parts_add_up():
    cfg = get_config("deepseek-vl2-tiny")
    c = param_counts(cfg)
    b = roofline.decode_bytes(cfg, 1, 1000)
    assert b["total"] == pytest.approx(b["dense"] + b["experts"] + b["kv_cache"])
    assert b["experts"] == pytest.approx(2 * 6 * c["routed_expert"] * c["n_moe_layers"])
    assert b["kv_cache"] == 1000 * 61440                           # tiny's MHA cache: 60 KiB per token
    assert 1.1e9 < b["dense"] + b["experts"] < 1.2e9               # ~1.15 GB of weights per step at batch 1


def test_decode_bytes_at_a_counted_number_of_experts():
    """The floor at a counted number of experts read per layer: the expert bytes scale with it, the rest stays."""
    cfg = get_config("deepseek-vl2-small")
    uniform, counted = roofline.decode_bytes(cfg, 32, 1000), roofline.decode_bytes(cfg, 32, 1000, touched=20.0)
    assert counted["experts_touched_per_layer"] == 20.0 and 61.2 < uniform["experts_touched_per_layer"] < 61.4
    assert counted["experts"] == pytest.approx(uniform["experts"] * 20.0 / uniform["experts_touched_per_layer"])
    assert (counted["dense"], counted["kv_cache"]) == (uniform["dense"], uniform["kv_cache"])
    assert roofline.decode_bytes(cfg, 1, 1000, touched=6.0) == roofline.decode_bytes(cfg, 1, 1000)


def test_experts_read_counts_the_routers_choices(tiny_model):
    """One token reads exactly its k experts in every layer; two requests read between k and min(E, 2k), counted
    at every decode step (new_tokens − 1 of them) of every MoE layer, never in the prefill."""
    model, processor = tiny_model
    lm = model.config.language_config
    E, k = lm.n_routed_experts, lm.num_experts_per_tok
    moe_layers = sum(1 for m in model.modules() if type(m).__name__ == "Router")
    one = routing.experts_read(model, processor, 1, new_tokens=3)
    assert (one["min"], one["max"], one["samples"]) == (k, k, 2 * moe_layers) and one["uniform"] == pytest.approx(k)
    two = routing.experts_read(model, processor, 2, new_tokens=4)
    assert two["samples"] == 3 * moe_layers and k <= two["min"] <= two["max"] <= min(E, 2 * k)
    assert two["n_experts"] == E and two["uniform"] == pytest.approx(roofline.experts_touched(E, k, 2))


def test_floors_on_the_anchor_ceilings():
    dev = {"copy_bytes_per_s": 4.8e12, "matmul_flops_per_s": 989e12}
    tiny, small = get_config("deepseek-vl2-tiny"), get_config("deepseek-vl2-small")
    assert roofline.vision_tile_flops(tiny) == pytest.approx(0.667e12, rel=0.01)
    assert roofline.decode_floor_s(tiny, 1, 1097, dev["copy_bytes_per_s"]) * 1e3 == pytest.approx(0.25, abs=0.02)
    assert roofline.decode_floor_s(small, 1, 1097, dev["copy_bytes_per_s"]) * 1e3 == pytest.approx(1.03, abs=0.03)
    f = roofline.workload_floor(small, 32, 1065, 64, 5, dev)
    assert math.isclose(f["e2e_s"], f["vision_s"] + f["prefill_s"] + 63 * f["decode_s_per_step"])
    assert 40 < f["images_per_s"] < 55                             # 47 images/s "serial" in the perf anchors


def test_measure_device_on_cpu():
    m = roofline.measure_device("cpu", copy_bytes=1 << 24, matmul_n=256, repeats=2)
    assert m["device"] == "cpu" and m["copy_bytes"] == 1 << 24 and m["matmul_n"] == 256
    assert m["copy_bytes_per_s"] > 1e7 and m["matmul_flops_per_s"] > 1e6            # any working CPU does more


def test_measure_device_formulas_on_a_known_clock(monkeypatch):
    """With the timer answering known medians (copy 0.25 s, matmul 0.5 s): copy bandwidth = (bytes read + bytes
    written) / t of a copy of ``copy_bytes``, matmul rate = 2·n³ / t; the sizes timed are the ones reported, with
    the CPU caps applied."""
    timed = []

    def fake_timed(fn, dev, repeats, warmup, run=True):
        timed.append(fn() if run else fn)
        return {"median": (0.25, 0.5)[len(timed) - 1], "p10": 1e-9, "p90": 1e9, "n": repeats}

    monkeypatch.setattr(roofline, "workload_timed", fake_timed)
    m = roofline.measure_device("cpu", copy_bytes=1 << 20, matmul_n=48, repeats=2)
    copied, product = timed
    assert copied.dim() == 1 and copied.numel() * copied.element_size() == m["copy_bytes"] == 1 << 20
    assert product.shape == (48, 48) and m["matmul_n"] == 48
    assert m["copy_bytes_per_s"] == 2 * (1 << 20) / 0.25                           # read + written, over the median
    assert m["matmul_flops_per_s"] == 2 * 48 ** 3 / 0.5                            # 2·n³ FLOPs
    timed.clear()
    monkeypatch.setattr(roofline, "workload_timed", lambda fn, dev, r, w: fake_timed(fn, dev, r, w, run=False))
    m = roofline.measure_device("cpu", copy_bytes=1 << 34, matmul_n=8192)          # capped on a CPU: never timed
    assert (m["copy_bytes"], m["matmul_n"]) == (1 << 26, 1024)
    assert m["copy_bytes_per_s"] == 2 * (1 << 26) / 0.25 and m["matmul_flops_per_s"] == 2 * 1024 ** 3 / 0.5


def test_perf_layer_loads_no_higher_layer():
    """Importing every perf module (in a fresh interpreter) loads nothing of lessons, train or serve, and none of
    the heavy optional packages (matplotlib, ipywidgets, transformers): ranks import perf modules."""
    code = ("import importlib, sys\n"
            f"for m in {PERF_MODULES!r}: importlib.import_module('vl2lab.perf.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('vl2lab.lessons', 'vl2lab.train', 'vl2lab.serve', "
            "'matplotlib', 'ipywidgets', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("cli", [bench, ladder], ids=lambda m: m.__name__)
def test_command_lines_document_every_option(cli):
    ap = cli.parser()
    assert all(a.help for a in ap._actions), [a.dest for a in ap._actions if not a.help]
    out = subprocess.run([sys.executable, "-m", cli.__name__, "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"python -m {cli.__name__}" in out.stdout, out.stderr
    assert all(a.option_strings[-1] in out.stdout for a in ap._actions)


def test_workload_picture_and_timer():
    a, b = workload.workload_image(3), workload.workload_image(3)
    assert a.size == workload.IMAGE_SIZE and a.tobytes() == b.tobytes()             # deterministic
    assert workload.workload_image(0, (1152, 640)).size == (1152, 640)
    t = workload.timed(lambda: torch.ones(10).sum(), torch.device("cpu"), repeats=3, warmup=1)
    assert t["n"] == 3 and 0 < t["p10"] <= t["median"] <= t["p90"]
    assert workload.pick_device("cpu") == torch.device("cpu")


def test_workload_batch_is_distinct_requests_of_one_shape(tiny_model):
    """A batch of the workload is B different pictures under one question (so its rows route apart, as the decode
    floor assumes), every row the same length, row 0 the batch-1 request."""
    _, processor = tiny_model
    convs = workload.workload_requests(processor, 3)
    pixels = [c[0]["images"][0].tobytes() for c in convs]
    assert len(set(pixels)) == 3 and len({c[0]["content"] for c in convs}) == 1
    assert convs[0] == workload.workload_requests(processor, 1)[0]
    batch = processor(conversations=convs)
    assert batch["attention_mask"].all() and not torch.equal(batch["images"][0], batch["images"][1])
    text = int(batch["input_ids"].shape[1] - batch["images_seq_mask"][0].sum())
    assert text == workload.PROMPT_TOKENS, text


def test_real_tiles_skip_padding(tiny_model):
    _, processor = tiny_model
    im = workload.workload_image(0)
    one = [{"role": "<|User|>", "content": "<image>\nx", "images": [im]}, {"role": "<|Assistant|>", "content": ""}]
    two = [{"role": "<|User|>", "content": "<image>\n<image>\nx", "images": [im, im.resize((384, 384))]},
           {"role": "<|Assistant|>", "content": ""}]
    batch = processor(conversations=[one, two])
    tiles = workload.real_tiles(batch)
    assert tiles.shape[0] == 5 + (5 + 2)                        # 2×2 + global; then that again and 1×1 + global
    assert torch.equal(tiles[:5], batch["images"][0, :5]) and torch.equal(tiles[5:], batch["images"][1, :7])
