"""Notebook 04's lesson code: the ordered log of one decode step's collectives, its figures, the article's tables."""
import pytest

import vl2lab
from vl2lab.lessons.sharded_vs_dense import compare_with_dense
from vl2lab.model.config import get_config
from vl2lab.perf.collectives import decode_collectives
from vl2lab.planner.claims import ARTICLE_TUNING, tuning_rows


def _expected_order(layers):
    return ["embed_tokens"] + [f"layers.{i}.{k}" for i in range(layers) for k in ("self_attn", "mlp")] + ["lm_head"]


def test_one_rank_logs_every_module_of_a_decode_step_in_order():
    r = compare_with_dense("vl2-micro", max_new_tokens=3)
    L = get_config("vl2-micro").language_config.num_hidden_layers
    order = r["decode_order"]
    assert [e["module"] for e in order] == _expected_order(L)
    assert all(e["step"] == 1 and e["t0"] <= e["t1"] for e in order)
    assert all(a["t1"] <= b["t0"] for a, b in zip(order, order[1:]))      # one after the other
    assert sum(e["all_reduce"] + e["all_gather"] for e in order) == 0      # world size 1: nothing to reduce


def test_two_ranks_reduce_once_per_block_and_gather_the_logits():
    res = vl2lab.run("vl2lab.lessons.sharded_vs_dense:compare_with_dense", world_size=2, backend="gloo",
                     timeout=300, model="vl2-micro", max_new_tokens=3)
    lc = get_config("vl2-micro").language_config
    want = decode_collectives(lc, 2, 4)                                  # float32
    for r in res.values:
        order = r["decode_order"]
        assert [e["module"] for e in order] == _expected_order(lc.num_hidden_layers)
        assert [e["all_reduce"] for e in order] == [1] * want["all_reduces"] + [0]
        assert [e["all_gather"] for e in order] == [0] * want["all_reduces"] + [want["all_gathers"]]
        assert sum(e["all_reduce_bytes"] for e in order) == want["all_reduce_bytes"]
        assert order[-1]["all_gather_bytes"] == want["all_gather_bytes"]


def test_the_figures_draw(tmp_path):
    pytest.importorskip("matplotlib")
    from vl2lab.workbook.deploy_plots import plot_decode_timeline, plot_tp_bound

    r = compare_with_dense("vl2-micro", max_new_tokens=2)
    fig = plot_decode_timeline([r["decode_order"]] * 2, "CPU")
    fig.savefig(tmp_path / "timeline.png")
    rows = [{"variant": "tiny", "N": n, "bound": 1 / n, "free": n ** 0.8} for n in (1, 2, 4)]
    plot_tp_bound(rows, (4, 3.97, "claim")).savefig(tmp_path / "bound.png")
    assert (tmp_path / "timeline.png").stat().st_size > 0 and (tmp_path / "bound.png").stat().st_size > 0


def test_the_article_tuning_table_is_one_request_at_a_time():
    rows = tuning_rows()
    assert [r["row"] for r in rows] == [name for name, _, _ in ARTICLE_TUNING]
    assert all(abs(r["1000 / latency"] - r["img/s"]) < 0.11 for r in rows)
    assert rows[0]["speed-up over the row before"] == "-" and rows[2]["speed-up over the row before"] == 1.08
