"""The floor maths of vl2lab.perf.roofline against hand-computed values and the published anchors."""
import math

import pytest

from vl2lab.perf import roofline
from vl2lab.model.config import get_config
from vl2lab.planner.sizing import param_counts


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
    m = roofline.measure_device("cpu", repeats=2)
    assert m["copy_bytes_per_s"] > 0 and m["matmul_flops_per_s"] > 0 and m["device"] == "cpu"
