"""The whole DeepSeek-VL2 sharded over 1, 2 and 4 gloo ranks (tensor + expert parallel) against the single-device
model: identical greedy tokens, prefill logits within tolerance, one all-reduce per attention block and per
feed-forward, the collectives per generated token, and per-rank reads of only the rank's shard.

World size 1 runs in this process; 2 and 4 are one launch each that loops over every case."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from vl2lab.model.config import get_config

LAUNCH_TIMEOUT = 600.0
MAX_NEW = 8
MICRO = os.path.join(os.path.dirname(__file__), os.pardir, "vl2lab", "assets", "vl2-micro")
# every preset with both MoE modes; each preset also sees both vision modes
CASES = [("random-tiny", "tp", "replicated"), ("random-tiny", "ep", "data_parallel"),
         ("random-small", "tp", "data_parallel"), ("random-small", "ep", "replicated"),
         ("random-base", "tp", "replicated"), ("random-base", "ep", "data_parallel")]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """{label: snapshot folder}: the random presets (weights split over several files), and vl2-micro when the
    trained asset is present."""
    from vl2lab.weights.pretrained import make_random_snapshot

    out = {p: make_random_snapshot(str(tmp_path_factory.mktemp(p)), p, seed=0, max_shard_bytes=1 << 20)
           for p in dict.fromkeys(c[0] for c in CASES)}
    if os.path.isfile(os.path.join(MICRO, "config.json")):
        out["vl2-micro"] = os.path.abspath(MICRO)
    return out


@pytest.fixture(scope="module")
def combos(snapshots):
    cases = CASES + ([("vl2-micro", "tp", "data_parallel"), ("vl2-micro", "ep", "replicated")]
                     if "vl2-micro" in snapshots else [])
    return [(snapshots[m], moe, v) for m, moe, v in cases]


@pytest.fixture(scope="module")
def single_device(combos):
    """World size 1, in this process: the sharding code with no process group, and the dense reference."""
    import torch

    from vl2lab.lessons.sharded_vs_dense import compare_all

    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # like each launched rank; several threads on a busy 2-core machine crawl
    try:
        return compare_all(combos, max_new_tokens=MAX_NEW)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[1, 2, 4], ids=["ws1", "ws2", "ws4"])
def world(request, combos, single_device):
    """(world size, [each rank's check_world result]); world size 2 also runs the generate command."""
    from vl2lab.launch.launcher import run

    ws = request.param
    if ws == 1:
        return 1, [single_device]
    extra = {"bad_heads": 3} if ws == 4 else {
        "generate_argv": ["--model", "random-tiny", "--prompt", "Say hello.", "--max-new-tokens", "4",
                          "--moe", "ep", "--vision", "dp"]}
    res = run("vl2lab.lessons.sharded_vs_dense:check_world", world_size=ws, backend="gloo", timeout=LAUNCH_TIMEOUT,
              combos=combos, reference=single_device["reference"], max_new_tokens=MAX_NEW, **extra)
    return ws, [res[r] for r in range(ws)]


def _label(path, snapshots):
    return next(k for k, v in snapshots.items() if v == path)


def _each(world):
    ws, ranks = world
    for out in ranks:
        assert out["world_size"] == ws
        for key, res in out["results"].items():
            yield ws, out["rank"], key, res


def test_greedy_tokens_identical_to_single_device(world, combos):
    ws, ranks = world
    for out in ranks:
        assert len(out["results"]) == len(combos)
    for ws, rank, key, res in _each(world):
        assert res["tokens_equal"], f"ws={ws} rank={rank} {key}: {res['tokens']} vs {res['dense_tokens']}"
        assert res["in_place_equals_loaded"], f"ws={ws} rank={rank} {key}: shard_model != load_sharded"
        assert res["tokens"]["pair"].shape == (2, MAX_NEW)


def test_prefill_logits_within_tolerance(world):
    for ws, rank, key, res in _each(world):
        for batch, d in res["logits"].items():
            assert (d["atol"], d["rtol"]) == (1e-5, 1.3e-6)
            assert d["within_tol"], f"ws={ws} rank={rank} {key} {batch}: max |Δ| {d['max_abs_diff']:.3g}"
            if ws == 1:
                assert d["exact"]


def test_each_attention_block_and_ffn_does_one_all_reduce(world):
    for ws, rank, key, res in _each(world):
        one = {(1, 0)} if ws > 1 else {(0, 0)}
        assert res["collectives_per_block"] == {"self_attn": one, "mlp": one}, (ws, rank, key)


def test_collectives_per_generated_token(world):
    """Decode step: embedding + 2 per layer all-reduces of [1, 1, H], one all-gather of the logits — counted on
    the ranks, and what ``perf.collectives.decode_collectives`` (notebooks 02 and 04) predicts from the config."""
    from types import SimpleNamespace

    from vl2lab.perf.collectives import decode_collectives

    for ws, rank, key, res in _each(world):
        c, L, H = res["comm_per_token"], res["layers"], res["hidden"]
        assert c is not None and res["comm_per_token_constant"]
        lm = SimpleNamespace(num_hidden_layers=L, hidden_size=H, vocab_size=res["vocab"])
        pred = decode_collectives(lm, ws, dtype_bytes=4)                   # float32 ranks, batch 1
        assert (c["all_reduce"], c["all_gather"]) == (pred["all_reduces"], pred["all_gathers"]), (key, c, pred)
        assert (c["all_reduce_bytes"], c["all_gather_bytes"]) == (pred["all_reduce_bytes"], pred["all_gather_bytes"])
        if ws == 1:
            assert c == dict.fromkeys(c, 0)
            continue
        assert c["all_reduce"] == 2 * L + 1 and c["all_gather"] == 1, (key, c)
        assert c["all_gather_bytes"] == ws * -(-res["vocab"] // ws) * 4      # padded to the largest share
        prefill = res["comm_prefill"]                      # + the tiles' all-gather in data-parallel vision
        assert prefill["all_reduce"] == 2 * L + 1
        assert prefill["all_gather"] == 1 + (res["vision"] == "data_parallel")


def test_each_rank_reads_only_its_shard(world):
    ws, ranks = world
    seen = {}
    for _, rank, key, res in _each(world):
        rep = res["load_report"]
        assert rep["bytes_read"] == rep["split_bytes"] + rep["replicated_bytes"]
        assert res["param_bytes"] < res["dense_param_bytes"] or ws == 1
        if ws > 1:
            assert rep["bytes_read"] < rep["snapshot_bytes"], "a rank read the whole file"
            assert rep["split_bytes"] <= 1.5 * rep["split_dense_bytes"] / ws
        seen.setdefault(key, []).append(rep)
    for key, reps in seen.items():
        assert sum(r["split_bytes"] for r in reps) == reps[0]["split_dense_bytes"], key
        assert len({r["replicated_bytes"] for r in reps}) == 1, key


def test_what_each_rank_holds_random_tiny_on_4(world, snapshots):
    ws, ranks = world
    if ws != 4:
        pytest.skip("the uneven head split needs 4 ranks")
    tp = [out["results"][f"{snapshots['random-tiny']}|tp|replicated"]["holds"] for out in ranks]
    ep = [out["results"][f"{snapshots['random-tiny']}|ep|data_parallel"]["holds"] for out in ranks]
    assert [h["heads"] for h in tp] == [2, 2, 1, 1]
    assert [h["kv_cache"] for h in tp] == ["K,V of 2 heads"] * 2 + ["K,V of 1 heads"] * 2
    assert [h["vocab_rows"] for h in tp] == [(0, 256), (256, 512), (512, 768), (768, 1024)]
    assert [h["expert_width"] for h in tp] == [8] * 4 and [h["experts"] for h in tp] == [(0, 16)] * 4
    assert [h["experts"] for h in ep] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert [h["expert_width"] for h in ep] == [32] * 4
    assert [h["dense_width"] for h in tp] == [48] * 4 and [h["shared_width"] for h in tp] == [16] * 4
    small = [out["results"][f"{snapshots['random-small']}|tp|data_parallel"]["holds"] for out in ranks]
    assert all(h["kv_cache"].startswith("latent") for h in small)


def test_bad_world_size_is_one_clear_error(world):
    from vl2lab.parallel.plan import ShardingError, check_plan

    with pytest.raises(ShardingError, match=r"6 attention heads .* over 8 ranks; at most 6"):
        check_plan(get_config("random-tiny"), 8)
    with pytest.raises(ShardingError, match=r"12 routed experts with moe='ep'.*16 ranks"):
        check_plan(get_config("random-base"), 16, moe="ep")
    ws, ranks = world
    if ws == 4:
        for out in ranks:
            assert "3 attention heads" in out["sharding_error"] and "over 4 ranks" in out["sharding_error"]


def test_checkpoint_of_another_config_is_a_checkpoint_error(snapshots, tmp_path):
    from vl2lab.weights.pretrained import CheckpointError
    from vl2lab.parallel.load import load_sharded

    bad = tmp_path / "tiny-weights-small-config"
    shutil.copytree(snapshots["random-tiny"], bad)
    get_config("random-small").save(str(bad))
    with pytest.raises(CheckpointError, match="missing|no place|wrong tensor shape"):
        load_sharded(str(bad), moe="ep")
    with open(bad / "config.json") as f:
        assert json.load(f)["language_config"]["use_mla"]


def test_generate_command_on_2_ranks(world):
    ws, ranks = world
    if ws != 2:
        pytest.skip("the command runs once, on 2 ranks")
    out = ranks[0]
    text = out["generate_stdout"]
    assert out["generate_rc"] == 0 and ranks[1]["generate_stdout"] == ""
    assert "on 2 rank(s): moe=ep, vision=data_parallel" in text and "weights are random" in text
    assert "[rank 0] params" in text and "[rank 1] params" in text
    assert "per generated token: 7 all-reduces" in text and "answer (" in text
