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
    assert rows[0]["decode_speedup"] == 1.0 and json.loads(out.read_text())["floor"]["1"]["e2e_s"] > 0


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
