"""The tensor-parallel speed-up bound (vl2lab.perf.tp_bound): its maths, and the committed results it reads."""
import math

import pytest

from vl2lab.model.config import get_config
from vl2lab.perf import tp_bound as T
from vl2lab.perf.collectives import decode_collectives
from vl2lab.perf.roofline import workload_floor

CEIL = {"copy_bytes_per_s": 4e12, "matmul_flops_per_s": 7.5e14}


@pytest.fixture(scope="module")
def tiny():
    return get_config("deepseek-vl2-tiny")


def test_one_gpu_is_the_roofline_floor(tiny):
    one = T.split_floor(tiny, 1, CEIL, T.allreduce_time([(4096, 1e-3)]))
    floor = workload_floor(tiny, 1, T.PROMPT_LEN, 64, T.TILES, CEIL)
    for key in ("vision_s", "prefill_s", "decode_s_per_step", "e2e_s"):
        assert one[key] == pytest.approx(floor[key], rel=1e-12), key
    assert one["allreduces_per_step"] == 0        # nothing to reduce on one GPU, whatever the latency


def test_the_split_part_shrinks_as_one_over_n(tiny):
    step = {n: T.split_floor(tiny, n, CEIL)["decode_s_per_step"] for n in (1, 2, 4)}
    # step(N) = S/N + R: step(1) − step(2) = S/2 and step(1) − step(4) = 3S/4
    assert (step[1] - step[2]) / (step[1] - step[4]) == pytest.approx(2 / 3, rel=1e-9)
    assert step[4] > step[1] / 4                  # the replicated part does not split


def test_every_all_reduce_of_a_step_costs_its_latency(tiny):
    t = 25e-6
    free, paid = (T.split_floor(tiny, 4, CEIL, f)["decode_s_per_step"]
                  for f in (T.free_allreduce, T.allreduce_time([(1, t)])))
    k = decode_collectives(tiny.language_config, 4, 2)["all_reduces"]
    assert k == 2 * tiny.language_config.num_hidden_layers + 1
    assert paid - free == pytest.approx(k * t, rel=1e-9)


def test_the_bound_stays_below_n_and_falls_with_latency(tiny):
    free = T.tp_speedup_bound(tiny, 4, CEIL)
    assert 1 < free["speedup"] < 4 and free["decode_speedup"] < 4
    assert free["speedup"] <= free["best_speedup"] + 1e-12
    slow = T.tp_speedup_bound(tiny, 4, CEIL, T.allreduce_time([(1, 1e-3)]))
    assert slow["speedup"] < 1 < free["speedup"]  # a millisecond per all-reduce: slower than one GPU


def test_tiles_split_over_the_ranks_help(tiny):
    rep = T.tp_speedup_bound(tiny, 4, CEIL)["speedup"]
    dp = T.tp_speedup_bound(tiny, 4, CEIL, vision="data_parallel")["speedup"]
    assert dp > rep


def test_allreduce_time_takes_the_fastest_size_not_above():
    t = T.allreduce_time([(4096, 40e-6), (65536, 30e-6), (1 << 20, 50e-6)])
    assert t(100) == 40e-6 and t(4096) == 40e-6 and t(70000) == 30e-6 and t(1 << 24) == 30e-6
    with pytest.raises(ValueError):
        T.allreduce_time([])


def test_the_committed_results_read_back():
    ar = T.recorded_allreduce()
    assert ar["file"] == "results/h200-2gpu/nccl_settings_allreduce_bf16.json"
    assert [s for s, _ in ar["points"]] == [4096, 65536, 1 << 20]
    lo, hi = ar["range_s"]
    assert 1e-6 < lo <= min(t for _, t in ar["points"]) and hi < 1e-3
    ceil = T.recorded_ceilings()
    assert ceil and all(c["device"] == "NVIDIA H200" and math.isfinite(c["copy_bytes_per_s"]) for c in ceil)
