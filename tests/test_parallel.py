"""Tensor-parallel layers against dense ones (notebook 02): split arithmetic, then 1, 2 and 4 gloo ranks; the
collectives' benchmark and bandwidth formulas."""
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from vl2lab.lessons.tp_layers import shard_table
from vl2lab.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from vl2lab.parallel.ops import shard_range, shard_tensor, split_sizes
from vl2lab.perf import collectives
from vl2lab.perf.collectives import bus_factor, comm_bytes_per_token

LAUNCH_TIMEOUT = 180
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:                  # the ranks import this file's rank function (the launcher passes sys.path)
    sys.path.insert(0, TESTS)


# ---------------------------------------------------------------------------------- split arithmetic
def test_split_sizes_even_and_uneven():
    assert split_sizes(12, 4) == [3, 3, 3, 3]
    assert split_sizes(40, 4, unit=4) == [12, 12, 8, 8]  # 10 heads of 4 → 3,3,2,2 heads
    assert split_sizes(50, 4) == [13, 13, 12, 12]
    assert split_sizes(7, 1) == [7]
    assert sum(split_sizes(1000, 7, unit=5)) == 1000


def test_shard_range_tiles_the_dimension():
    ranges = [shard_range(40, r, 4, unit=4) for r in range(4)]
    assert ranges == [(0, 12), (12, 24), (24, 32), (32, 40)]


def test_too_few_blocks_is_one_clear_error():
    with pytest.raises(ValueError, match=r"3 block\(s\) of 4 over 4 ranks.*world size <= 3"):
        split_sizes(12, 4, unit=4)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        split_sizes(10, 2, unit=4)
    with pytest.raises(ValueError, match="outside"):
        shard_range(10, 2, 2)


def test_shard_tensor_is_a_copy():
    t = torch.arange(24.0).reshape(4, 6)
    s = shard_tensor(t, 1, 1, 2, unit=3)
    assert torch.equal(s, t[:, 3:6]) and s.is_contiguous()
    s.zero_()
    assert t[0, 3] == 3.0


def test_shard_table_shapes_add_up():
    tab = shard_table(out_features=40, in_features=24, world_size=4, unit=4)
    assert [c["out_range"] for c in tab["column"]] == [(0, 12), (12, 24), (24, 32), (32, 40)]
    assert [c["weight_shape"] for c in tab["column"]] == [(12, 24), (12, 24), (8, 24), (8, 24)]
    assert [r["weight_shape"] for r in tab["row"]] == [(40, 8), (40, 8), (40, 4), (40, 4)]
    for split in ("column", "row"):
        assert sum(x["weight_numel"] for x in tab[split]) == 40 * 24


def test_comm_bytes_per_token():
    one = comm_bytes_per_token(hidden=1024, dtype_bytes=2, world_size=1)
    assert one["row_all_reduce"] == one["column_gather"] == 0
    four = comm_bytes_per_token(hidden=1024, dtype_bytes=2, world_size=4, intermediate=4096)
    assert four["token_bytes"] == 2048
    assert four["row_all_reduce"] == four["mlp_column_row"] == 2 * 3 / 4 * 2048
    assert four["column_gather"] == 3 / 4 * 2048
    assert four["mlp_gather_intermediate"] == 3 / 4 * 4096 * 2
    assert bus_factor("all_reduce", 4) == 1.5 and bus_factor("all_gather", 4) == 0.75


def test_layers_without_process_group_equal_dense():
    torch.manual_seed(0)
    lin, emb = nn.Linear(8, 12), nn.Embedding(20, 8)
    x, ids = torch.randn(3, 8), torch.randint(0, 20, (3,))
    col = ColumnParallelLinear.from_dense(lin, unit=4)
    assert torch.equal(col(x), lin(x))
    assert torch.equal(RowParallelLinear.from_dense(lin)(x), lin(x))
    assert torch.equal(VocabParallelEmbedding.from_dense(emb)(ids), emb(ids))
    assert torch.equal(ParallelLMHead.from_dense(emb)(x), x @ emb.weight.T)
    assert "rank=0/1" in repr(col) and "out shard [0:12)" in repr(col)


# ----------------------------------------------------------------------------------- on N gloo ranks
@pytest.fixture(scope="module", params=[(1, "float32"), (2, "float64"), (4, "float32")],
                ids=["ws1-fp32", "ws2-fp64", "ws4-fp32"])
def layer_checks(request):
    from vl2lab.launch.launcher import run

    ws, dtype = request.param
    res = run("vl2lab.lessons.tp_layers:check_layers", world_size=ws, backend="gloo", timeout=LAUNCH_TIMEOUT,
              dtype=dtype)
    return ws, [res[r] for r in range(ws)]


def test_every_layer_matches_dense_on_every_rank(layer_checks):
    ws, ranks = layer_checks
    for r, out in enumerate(ranks):
        assert out["rank"] == r and out["world_size"] == ws
        failed = {k: v for k, v in out["checks"].items() if not v["pass"]}
        assert not failed, f"rank {r}: {failed}"
        assert out["all_pass"]
        assert len(out["checks"]) == 27


def test_mlp_forward_has_exactly_one_all_reduce(layer_checks):
    ws, ranks = layer_checks
    for out in ranks:
        assert out["mlp_forward_all_reduces"] == (1 if ws > 1 else 0)
        assert out["mlp_forward_all_gathers"] == 0


def test_copies_are_exact(layer_checks):
    _, ranks = layer_checks
    for out in ranks:
        assert out["checks"]["embedding.out"]["exact"]


def test_article_examples_on_2_ranks():
    from vl2lab.launch.launcher import run

    res = run("vl2lab.lessons.article_tp:article_examples", world_size=2, backend="gloo", timeout=LAUNCH_TIMEOUT)
    for r in range(2):
        col, row = res[r]["column_allreduce"], res[r]["row_as_batch_split"]
        assert col["allreduce_shape"] == (4, 4) and not col["allreduce_shape_matches"]
        assert not col["allreduce_equal"] and col["allreduce_max_err_vs_own_block"] > 0.1
        assert col["allgather_shape"] == (4, 8) and col["allgather"]["pass"]
        assert row["batch_split"]["pass"] and row["row_parallel"]["pass"]
        assert row["w_bytes_per_rank_batch_split"] == row["w_bytes_total"]
        assert row["w_bytes_per_rank_row_parallel"] * 2 == row["w_bytes_total"]


UNIT_S = (1e-3, 4e-3)                    # the fake clock's time unit at each message size
SHAPE = (4, 1, 2, 3, 5)                  # the measured repeats, in units (median 3, p10 1.4, p90 4.6)
WARMUP_S = 100.0                         # each warm-up "takes" this long: it must not count


def bench_on_a_known_clock(sizes_bytes, repeats, warmup):
    """Rank function: :func:`bench_collectives` as is, then again on a virtual clock that only the collectives
    move: the k-th collective (for real, then) takes the k-th of: per op, per size i, ``warmup`` × WARMUP_S, then
    SHAPE × UNIT_S[i]."""
    real = collectives.bench_collectives(sizes_bytes=sizes_bytes, repeats=repeats, warmup=warmup)
    durations = [d for _op in ("all_reduce", "all_gather") for u in UNIT_S
                 for d in [WARMUP_S] * warmup + [k * u for k in SHAPE]]          # in the bench's loop order
    clock = {"now": 0.0, "k": 0}

    def slow(op):
        def run(*a, **kw):
            op(*a, **kw)
            clock["now"] += durations[clock["k"]]
            clock["k"] += 1
        return run

    class Dist:                            # torch.distributed, with collectives that take known times
        all_reduce, all_gather = staticmethod(slow(dist.all_reduce)), staticmethod(slow(dist.all_gather))
        all_gather_into_tensor = staticmethod(slow(dist.all_gather_into_tensor))

        def __getattr__(self, name):
            return getattr(dist, name)

    collectives.time, collectives.dist = types.SimpleNamespace(perf_counter=lambda: clock["now"]), Dist()
    try:
        fake = collectives.bench_collectives(sizes_bytes=sizes_bytes, repeats=len(SHAPE), warmup=warmup)
    finally:
        collectives.time, collectives.dist = time, dist
    return {"real": real, "fake": fake, "collectives_run": clock["k"], "scheduled": len(durations)}


def test_bench_collectives_times_and_bandwidths():
    """Real gloo collectives give positive, ordered numbers; on a known clock the medians and quantiles are those
    of the measured repeats (warm-ups left out), algbw = S / median and busbw = algbw × 2(n−1)/n (all-reduce) or
    (n−1)/n (all-gather), S the bytes really moved (1030 B rounds down to 256 float32 = 1024 B)."""
    from vl2lab.launch.launcher import run

    res = run("test_parallel:bench_on_a_known_clock", world_size=2, backend="gloo", timeout=LAUNCH_TIMEOUT,
              sizes_bytes=(1030, 65536), repeats=3, warmup=1)
    out = res[0]["real"]
    assert out["world_size"] == 2 and out["backend"] == "gloo"
    for op in ("all_reduce", "all_gather"):
        rows = out["ops"][op]
        assert rows["sizes"] == [1024, 65536]
        for key in ("median_s", "p10", "p90", "algbw", "busbw"):
            assert all(v > 0 for v in rows[key]), (op, key, rows[key])
        assert all(a <= m <= b for a, m, b in zip(rows["p10"], rows["median_s"], rows["p90"]))
        assert rows["algbw"] == pytest.approx([s / t / 1e9 for s, t in zip(rows["sizes"], rows["median_s"])])
    fake = res[0]["fake"]
    assert res[0]["collectives_run"] == res[0]["scheduled"] == 2 * 2 * (1 + len(SHAPE))
    for op, factor in (("all_reduce", 2 * 1 / 2), ("all_gather", 1 / 2)):
        rows = fake["ops"][op]
        assert rows["sizes"] == [1024, 65536]
        assert rows["median_s"] == pytest.approx([3 * u for u in UNIT_S], rel=1e-9)
        assert rows["p10"] == pytest.approx([1.4 * u for u in UNIT_S], rel=1e-9)
        assert rows["p90"] == pytest.approx([4.6 * u for u in UNIT_S], rel=1e-9)
        algbw = [s / (3 * u) / 1e9 for s, u in zip((1024, 65536), UNIT_S)]     # GB/s
        assert rows["algbw"] == pytest.approx(algbw, rel=1e-9)
        assert rows["busbw"] == pytest.approx([a * factor for a in algbw], rel=1e-9)


def test_bus_factor():
    """busbw / algbw of the ring algorithms: 2(n−1)/n for all-reduce, (n−1)/n for all-gather; 0 alone."""
    for n in (1, 2, 3, 8):
        assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
        assert bus_factor("all_gather", n) == pytest.approx((n - 1) / n)
    assert bus_factor("all_reduce", 1) == 0.0 and bus_factor("all_gather", 8) == 0.875
    with pytest.raises(ValueError, match="op must be one of"):
        bus_factor("broadcast", 2)
