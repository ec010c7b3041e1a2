"""The layer split (consecutive decoder layers on consecutive ranks, the official repository's placement): the
placement arithmetic, and one 2-rank gloo launch whose greedy tokens and prefill logits equal one device's."""
from __future__ import annotations

import pytest

from vl2lab.parallel.pipeline import LayerSplitError, layer_ranges


def test_official_placements():
    assert layer_ranges(27, 2) == [(0, 13), (13, 27)]                 # small, [13, 14]
    assert layer_ranges(30, 3) == [(0, 10), (10, 20), (20, 30)]       # base, [10, 10, 10]
    assert layer_ranges(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert layer_ranges(3, 4) == [(0, 0), (0, 1), (1, 2), (2, 3)]     # rank 0: vision + embedding only
    assert layer_ranges(27, 2, sizes=[15, 12]) == [(0, 15), (15, 27)]


@pytest.mark.parametrize("n, world, sizes, words", [
    (3, 6, None, "at most 5 ranks"),
    (27, 2, [13, 13], "summing to the 27"),
    (27, 3, [13, 14], "3 non-negative counts"),
    (4, 3, [2, 0, 2], "rank(s) [1]"),
])
def test_bad_placements_say_what_to_do(n, world, sizes, words):
    with pytest.raises(LayerSplitError, match=r"\S") as e:
        layer_ranges(n, world, sizes)
    assert words in str(e.value)


def test_two_ranks_match_one_device():
    from vl2lab.launch.launcher import run

    res = run("vl2lab.lessons.layer_split:check_layer_split", world_size=2, backend="gloo", timeout=600.0,
              model="random-tiny", max_new_tokens=6)
    r0, r1 = res[0], res[1]
    assert r0["holds"]["layers"] == (0, 1) and r1["holds"]["layers"] == (1, 3)
    assert r0["holds"]["vision"] and r0["holds"]["embedding"] and not r0["holds"]["head"]
    assert r1["holds"]["head"] and not r1["holds"]["vision"] and not r1["holds"]["embedding"]
    # the two parts are the whole model, nothing held twice
    assert r0["holds"]["param_bytes"] + r1["holds"]["param_bytes"] == r0["dense_param_bytes"]
    for r in (r0, r1):
        assert r["tokens_equal"] and r["logits_exact"], "layer split differs from one device"
        assert all(t.shape[1] == 6 for t in r["tokens"].values())
    assert r0["tokens"]["pair"].shape[0] == 2
    # per forward, rank 0 sends its hidden states; rank 1 computes only after it received them
    assert r0["sent_bytes"] > 0 and r1["sent_bytes"] == 0
    assert len(r0["intervals"]) == len(r1["intervals"]) == 6
    assert all(a[1] <= b[0] for a, b in zip(r0["intervals"], r1["intervals"]))
