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


# ------------------------------------------------------------------- f and g in a column → row block (section 3)
def fg_collectives():
    """Rank function: the all-reduces that f (copy_to_tp) and g (reduce_from_tp) make, forward and backward."""
    from vl2lab.parallel.comm import CommCounter
    from vl2lab.parallel.ops import copy_to_tp, reduce_from_tp

    out = {}
    for stage, op in (("f", copy_to_tp), ("g", reduce_from_tp)):
        x = torch.ones(3, 4, requires_grad=True)
        with CommCounter() as fwd:
            y = op(x)
        with CommCounter() as bwd:
            y.backward(torch.ones_like(y))
        out[stage] = {"forward": fwd.totals["all_reduce"], "backward": bwd.totals["all_reduce"]}
    return out


def test_fg_stages_say_what_the_ops_do():
    """The table the f/g figure draws (tp_layers.FG_STAGES) agrees with the collectives the package's f and g
    really make on 2 gloo ranks: 'all-reduce' is one all-reduce, 'identity' none."""
    from vl2lab.launch.launcher import run
    from vl2lab.lessons.tp_layers import FG_STAGES

    counted = run("test_parallel:fg_collectives", world_size=2, backend="gloo", timeout=LAUNCH_TIMEOUT)[0]
    stages = {st["stage"]: st for st in FG_STAGES}
    for stage, dirs in counted.items():
        for direction, n in dirs.items():
            assert stages[stage][direction] == ("all-reduce" if n == 1 else "identity"), (stage, direction, n)
    assert [st["stage"] for st in FG_STAGES if "local" not in (st["forward"], st["backward"])] == ["f", "g"]


def test_fg_figure_draws_its_table():
    """draw_fg_block: per panel, one all-reduce box spanning every lane where the table says all-reduce (g going
    forward, f coming back), a dashed identity box per rank where it says identity, and one box per rank and
    local stage in the rank's colour, labelled with the rank's block of the intermediate dimension."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vl2lab.lessons.tp_layers import column_row_block
    from vl2lab.workbook import tp_plots
    from vl2lab.workbook.plots import rank_color

    block = column_row_block(intermediate=10, world_size=3)             # blocks [0,4) [4,7) [7,10)
    fig = tp_plots.draw_fg_block(block)
    try:
        assert len(fig.axes) == 2
        for ax, direction, reduced, copied in zip(fig.axes, ("forward", "backward"), ("g", "f"), ("f", "g")):
            gids = [p.get_gid() for p in ax.patches]
            assert [g for g in gids if g.startswith("all-reduce")] == [f"all-reduce:{reduced}"], direction
            assert sorted(g for g in gids if g.startswith("identity")) == [f"identity:{copied}:{r}" for r in range(3)]
            local = {g: p for g, p in zip(gids, ax.patches) if g.startswith("local")}
            assert len(local) == 3 * 3
            for r in range(3):
                assert matplotlib.colors.same_color(local[f"local:column:{r}"].get_facecolor(), rank_color(r))
            tall = next(p for g, p in zip(gids, ax.patches) if g.startswith("all-reduce"))
            lane = local["local:row:0"]
            assert tall.get_height() > 2.5 * lane.get_height()           # across all three lanes
            assert abs(tall.get_x() - lane.get_x()) > 0.5                   # in its own stage's column
            texts = [t.get_text() for t in ax.texts]
            assert "X·W1[4:7]ᵀ\n+ b1[4:7]" in texts and "H_r·W2[:, 7:10]ᵀ" in texts
            assert ax.get_title(loc="left").endswith(f"sits in {reduced}")
        assert "[4, 3, 3]" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_check_hand_mlp_passes_true_shards_and_catches_a_wrong_one():
    """check_hand_mlp on shards cut from the dense MLP itself: every row passes; a rank that reports the wrong
    block (its neighbour's columns), or a dL/dX that skipped f's all-reduce, fails its rows."""
    import torch.nn.functional as F

    from vl2lab.lessons.tp_layers import check_hand_mlp

    g = torch.Generator().manual_seed(0)
    ints = lambda *s: torch.randint(-3, 4, s, generator=g).double()  # noqa: E731
    x, gy, w = ints(3, 8), ints(3, 8), {"w1": ints(10, 8), "b1": ints(10), "w2": ints(8, 10), "b2": ints(8)}
    xd = x.clone().requires_grad_()
    p = {k: v.clone().requires_grad_() for k, v in w.items()}
    pre = F.linear(xd, p["w1"], p["b1"])
    y = F.linear(F.silu(pre), p["w2"], p["b2"])
    y.backward(gy)
    dense = {"pre": pre.detach(), "y": y.detach(), "grad_x": xd.grad, **{f"grad_{k}": v.grad for k, v in p.items()}}
    # two ranks' honest results: their blocks, and halves of dL/dX as the terms reaching f (they add up)
    ranks = [{"block": (s, e), "pre": dense["pre"][:, s:e], "y_by_hand": dense["y"], "y": dense["y"],
              "grad_x": dense["grad_x"], "grad_x_reaching_f": dense["grad_x"] * f, "grad_w1": dense["grad_w1"][s:e],
              "grad_b1": dense["grad_b1"][s:e], "grad_w2": dense["grad_w2"][:, s:e], "grad_b2": dense["grad_b2"]}
             for (s, e), f in (((0, 5), 0.25), ((5, 10), 0.75))]
    rows = {r["check"]: r for r in check_hand_mlp(ranks, dense)}
    assert len(rows) == 10 and all(r["pass"] for r in rows.values()), [k for k, r in rows.items() if not r["pass"]]
    assert rows["column output"]["rule"] == "exact: 0" and rows["column output"]["exact"]
    ranks[1] = {**ranks[1], "block": (0, 5)}                          # claims the other rank's columns
    bad = {r["check"]: r["pass"] for r in check_hand_mlp(ranks, dense)}
    assert not bad["column output"] and not bad["dL/dW1 shard"] and bad["Y, with f and g"]
    ranks[1] = {**ranks[1], "block": (5, 10), "grad_x": ranks[1]["grad_x_reaching_f"]}   # no all-reduce in f
    bad = {r["check"]: r["pass"] for r in check_hand_mlp(ranks, dense)}
    assert not bad["dL/dX (after f's all-reduce)"] and bad["column output"]
