"""The static decode step (vl2lab.model.graph_decode) gives the tokens of the eager loop; the ladder and its report."""
import json

import pytest
import torch

from vl2lab.launch.launcher import run
from vl2lab.model.config import get_config
from vl2lab.model.generation import generate
from vl2lab.model.graph_decode import GraphDecoder, decoder_for
from vl2lab.model.vl2 import build_model
from vl2lab.perf import ladder, rungs
from vl2lab.perf import report as ladder_report
from vl2lab.train.scenes import make_scene
from vl2lab.weights.pretrained import project_processor


@pytest.fixture(scope="module", params=["random-tiny", "random-small"])
def lm(request):
    return build_model(request.param, seed=1).language


def _prompt(lm, B=3, T=20):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(B, T, lm.config.hidden_size, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0                                            # left padding of different lengths
    mask[2, :11] = 0
    return emb, mask


def test_static_step_equals_eager_loop(lm):
    emb, mask = _prompt(lm)
    ref = generate(lm, emb, mask, 12, ignore_eos=True)
    dec = GraphDecoder(lm, 3, 40, "cpu", eos_token_id=1, pad_token_id=7, ignore_eos=True)
    assert torch.equal(dec.generate(emb, mask, 12), ref)
    assert torch.equal(dec.generate(emb, mask, 5), ref[:, :5])   # the same decoder serves a shorter run


@pytest.mark.parametrize("max_len", [32, 128])              # exactly full (20 + 12), and roomier than needed
def test_each_step_writes_the_next_cache_slot(lm, max_len):
    """After the prefill of T slots and k decode steps the decoder's cache position is T + k, the RoPE position
    the real tokens + k, and the slots written are exactly T..T+k−1 (each step advances by one slot: a step of two
    still gives the eager tokens, with gaps in the cache, until it runs off the end of the buffer)."""
    emb, mask = _prompt(lm)
    T, n = emb.shape[1], 12
    ref = generate(lm, emb, mask, n, ignore_eos=True)
    dec = GraphDecoder(lm, 3, max_len, "cpu", ignore_eos=True)
    for k in (n, 4):                                           # the second run starts from the first one's state
        assert torch.equal(dec.generate(emb, mask, k), ref[:, :k])
        steps = k - 1                                          # the first token comes from the prefill
        assert int(dec.index) == T + steps and int(dec.step_i) == k
        assert torch.equal(dec.positions[:, 0], mask.sum(-1) + steps)
        assert torch.equal(dec.key_ok[:, :T], mask.bool())
        assert dec.key_ok[:, T:T + steps].all() and not dec.key_ok[:, T + steps:].any()
    for bufs in dec.kv.buffers:                                 # the slots past the last step were never written
        for b in bufs:
            assert b.shape[-2] == max_len and not b[..., T + n - 1:, :].any()
            assert b[..., T:T + n - 1, :].abs().sum(-1).gt(0).all()


def test_eos_pads_like_the_eager_loop(lm):
    emb, mask = _prompt(lm)
    eos = int(generate(lm, emb, mask, 4, ignore_eos=True)[0, 2])
    ref = generate(lm, emb, mask, 10, eos_token_id=eos, pad_token_id=7)
    out = GraphDecoder(lm, 3, 40, "cpu", eos_token_id=eos, pad_token_id=7).generate(emb, mask, 10)
    assert torch.equal(out, ref) and (out[0, 3:] == 7).all()


def test_wrong_shape_is_one_clear_error(lm):
    emb, mask = _prompt(lm)
    dec = GraphDecoder(lm, 2, 24, "cpu")
    with pytest.raises(ValueError, match="serves batch 2 and 24 positions"):
        dec.generate(emb, mask, 8)
    with pytest.raises(ValueError, match="'graph' or 'compile'"):
        GraphDecoder(lm, 2, 24, "cpu", mode="fast")


def test_decoders_are_kept_per_shape(lm):
    a = decoder_for(lm, 2, 100, "cpu")
    assert decoder_for(lm, 2, 120, "cpu") is a and a.max_len == 128
    assert decoder_for(lm, 2, 129, "cpu") is not a


def test_vl2_generate_decode_graph():
    model = build_model("random-tiny", seed=2)
    proc = project_processor(model.config)
    conv = [{"role": "<|User|>", "content": "<image>\nWhat colour?", "images": [make_scene(1).render()]},
            {"role": "<|Assistant|>", "content": ""}]
    batch = proc(conversations=[conv, conv[:1] + [conv[1]]])
    eager = model.generate(**batch, max_new_tokens=6)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, decode="graph"), eager)
    with pytest.raises(ValueError, match="greedy only"):
        model.generate(**batch, max_new_tokens=2, do_sample=True, decode="graph")


def test_ladder_runs_and_reports_on_cpu(tmp_path):
    out = tmp_path / "ladder_random-tiny_1.json"
    res = ladder.run("random-tiny", "cpu", (1,), repeats=1, warmup=0, rungs=(1, 5), new_tokens=3, out=str(out),
                     profile=True, log=lambda *_: None)
    assert [r["rung"][0] for r in res["runs"]] == ["1", "5"]
    assert all("error" not in r and r["new_tokens"] == 3 for r in res["runs"])
    assert len(res["profiles"]) == 2 and res["profiles"][0]["rows"]
    merged = ladder_report.load(str(tmp_path), "random-tiny")
    rows = ladder_report.rows(merged)
    assert [r["rung"][0] for r in rows] == ["1", "5"] and json.loads(out.read_text())["floor"]["1"]["e2e_s"] > 0
    r1, r5 = rows                                               # rung 5's speed-ups are against rung 1's times
    assert r5["decode_speedup"] == pytest.approx(r1["decode_ms_per_step"] / r5["decode_ms_per_step"])
    assert r5["images_speedup"] == pytest.approx(r5["images_per_s"] / r1["images_per_s"])
    assert r5["decode_ms_per_step"] == res["runs"][1]["decode_step_s"]["median"] * 1e3
    read, k = res["experts_read"]["1"], get_config("random-tiny").language_config.num_experts_per_tok
    assert (read["min"], read["max"]) == (k, k)                 # one sequence reads its k experts per layer
    assert res["floor_routed"]["1"]["decode_s_per_step"] == pytest.approx(res["floor"]["1"]["decode_s_per_step"])


def test_report_speedups_are_against_rung_1_at_the_same_batch():
    """Decode speed-up = rung 1's ms per step / this rung's, images speed-up = this rung's images/s / rung 1's, both
    at the row's batch size (nan where that batch has no rung-1 run); the floor of the row's batch beside it."""
    def run(decode_ms, images):
        return {"prefill_s": {"median": 0.01}, "decode_ms_per_step": decode_ms, "images_per_s": images,
                "tiles_per_s": 5 * images}

    first, graph = rungs.RUNGS[0].name, rungs.RUNGS[4].name
    merged = {"runs": {(first, 1): run(10.0, 2.0), (graph, 1): run(2.5, 5.0), (first, 4): run(20.0, 4.0),
                       (graph, 4): run(4.0, 16.0), (graph, 8): run(5.0, 20.0)},
              "floor": {"1": {"decode_s_per_step": 1e-3, "images_per_s": 100.0}}}
    got = {(r["rung"], r["batch"]): r for r in ladder_report.rows(merged)}
    assert list(got) == [(first, 1), (graph, 1), (first, 4), (graph, 4), (graph, 8)]
    assert got[(first, 1)]["decode_speedup"] == got[(first, 4)]["images_speedup"] == 1.0
    assert got[(graph, 1)]["decode_speedup"] == 4.0 and got[(graph, 1)]["images_speedup"] == 2.5
    assert got[(graph, 4)]["decode_speedup"] == 5.0 and got[(graph, 4)]["images_speedup"] == 4.0   # not batch 1's
    assert got[(graph, 8)]["decode_speedup"] != got[(graph, 8)]["decode_speedup"]                   # nan: no rung 1
    assert got[(graph, 1)]["floor_decode_ms"] == 1.0 and got[(graph, 1)]["floor_images_per_s"] == 100.0
    assert got[(graph, 4)]["floor_decode_ms"] != got[(graph, 4)]["floor_decode_ms"]                 # no floor: nan


def test_rungs_put_the_model_in_their_state():
    model = build_model("random-tiny", seed=0)
    assert ladder.RUNGS is rungs.RUNGS and ladder.Rung is rungs.Rung
    rungs.apply(model, rungs.RUNGS[0])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    rungs.apply(model, rungs.RUNGS[1])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="not a torch dtype"):
        rungs.apply(model, rungs.Rung("bad", dtype="bf16"))


def test_recorded_h200_results_are_readable():
    rec = {m: ladder_report.load(ladder_report.RESULTS_DIR, m) for m in ("deepseek-vl2-tiny", "deepseek-vl2-small")}
    tr = ladder_report.target_rows(rec)
    assert {r["model"] for r in tr} >= {"deepseek-vl2-tiny", "deepseek-vl2-small", "vision tower"}
    assert rec["deepseek-vl2-tiny"]["environment"]["gpu"] == "NVIDIA H200"
    with pytest.raises(FileNotFoundError, match="python -m vl2lab.perf.ladder"):
        ladder_report.load(ladder_report.RESULTS_DIR, "deepseek-vl2")


def test_tensor_parallel_and_replicas_give_the_same_tokens():
    """ladder.run_ranks on 2 gloo ranks: one TP model and two replicas answer alike, with the graph decoder."""
    hidden = get_config("random-small").language_config.hidden_size
    kw = dict(model="random-small", batch_sizes=(1,), decode="graph", repeats=1, warmup=0, new_tokens=3)
    tp = run("vl2lab.perf.ladder:run_ranks", world_size=2, backend="gloo", timeout=600, layout="tp", **kw).values
    dp = run("vl2lab.perf.ladder:run_ranks", world_size=2, backend="gloo", timeout=600, layout="dp", **kw).values
    assert tp[0]["runs"][0]["tokens"] == tp[1]["runs"][0]["tokens"] == dp[0]["runs"][0]["tokens"]
    assert tp[0]["all_reduce"]["sizes"] == [2 * hidden]                   # one bf16 row per sequence
    assert tp[0]["predicted_bytes"]["weights"] < dp[0]["predicted_bytes"]["weights"]
