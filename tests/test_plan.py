"""The planner (vl2lab.planner.plan): layouts and fits from the sizing maths, commands, article claims, CLI and panel."""
import json
import subprocess
import sys

import pytest

from vl2lab.planner import layouts as S
from vl2lab.__main__ import main
from vl2lab.planner.claims import article_claims
from vl2lab.planner.panel import show_planner
from vl2lab.planner.plan import PlanError, plan
from vl2lab.planner.sizing import gb

VLLM_ARCH = '--hf-overrides \'{"architectures": ["DeepseekVLV2ForCausalLM"]}\''


def key(x):
    return x["tp"], x["ep"], x["dp"], x["moe"]


def test_small_needs_two_24gb_gpus():
    one = plan("small", gpu_gb=24, n_gpus=1)
    assert one.recommended is None and not one.single["fits"]
    assert gb(one.single["weights"]) > 21.1 > gb(one.usable) - 0.01
    assert "tp=2" in one.request["hint"] and "none fits" in one.table()
    with pytest.raises(PlanError, match="no layout fits"):
        one.commands()
    two = plan("small", gpu_gb=24, n_gpus=2)
    best = two.recommended
    assert key(best) == (2, 1, 1, "tp") and best["fits"]
    assert 16 < gb(best["weights"]) < 17 and gb(best["total"]) < gb(two.usable)


def test_base_fits_one_80gb_gpu():
    p = plan("base", gpu_gb=80, n_gpus=1)
    assert gb(p.single["weights"]) == pytest.approx(54.93, abs=0.01)  # vl2lab holds no attn_pool
    assert p.single["fits"] and key(p.recommended) == (1, 1, 1, "tp")
    assert "\n 1 GPU" not in p.table()  # on one GPU the single-GPU row is the only layout row


def test_default_small_on_four_80gb():
    p = plan()  # small, bf16, 4 x 80 GB, batch 1, one 768x768 image, context 4096
    assert p.request["image_tokens"] == 1023 and p.request["vit_passes"] == 5
    assert p.request["seq_len"] == 1023 + 64 + 512 and p.request["planned_len"] == 4096
    assert key(p.recommended) == (1, 1, 4, "tp") and p.recommended["group"] == 1
    # the fitting rows are exactly sizing.feasible_layouts for the same workload
    feasible = S.feasible_layouts(p.cfg, 4, 80e9, batch=1, seq_len=4096, tiles=5, rule="vl2lab")
    assert {key(x) for x in p.layouts if x["fits"]} == {key(x) for x in feasible}
    assert p.table() == plan().table()
    assert "* pick   1   1   4   tp" in p.table()


def test_recommendation_prefers_fewest_gpus_per_copy():
    p = plan("base", gpu_gb=40, n_gpus=4, batch=8)
    assert not p.layout(1, "tp")["fits"]
    assert key(p.recommended) == (2, 1, 2, "tp")
    fitting = [x for x in p.layouts if x["fits"]]
    assert fitting[0] is p.recommended and all(x["group"] >= 2 for x in fitting)
    only_ep = plan("small", n_gpus=4, moe_modes=("ep",))
    assert {x["moe"] for x in only_ep.layouts} == {"ep"}


def test_tiny_tp4_needs_uneven_heads_and_vllm_warns():
    p = plan("tiny", n_gpus=4)
    t4 = p.layout(4, "tp")
    assert t4["fits"] and "attention heads 10 % 4 = 2" in t4["vllm_problem"]
    assert (4, "tp") not in {(x["tp"], x["moe"]) for x in plan("tiny", n_gpus=4, uneven_heads=False).layouts}
    assert p.recommended["vllm_problem"] is None  # the pick (tp=1, dp=4) runs everywhere
    cmd = p.commands(t4)
    assert "torchrun --standalone --nproc-per-node 4 -m vl2lab.serve.generate" in cmd["vl2lab"][0]
    assert cmd["vllm"][0].startswith("# WARNING: vLLM cannot shard deepseek-vl2-tiny with tensor-parallel size 4")
    assert "vLLM-legal layouts that fit: tp=1 ep=1 dp=4 moe=tp, tp=2 ep=1 dp=2 moe=tp" in cmd["vllm"][0]
    assert cmd["vllm"][1] == "# nearest vLLM layout, tp=1 ep=1 dp=4 moe=tp:"
    assert all("--tensor-parallel-size 1" in x for x in cmd["vllm"] if x.startswith("CUDA_VISIBLE_DEVICES"))
    assert cmd["sglang"][0].startswith("# WARNING: SGLang cannot")
    assert cmd["sglang"][-1].endswith("--tp 1 --dp 4")
    base6 = plan("base", n_gpus=6, gpu_gb=24)  # the pick tp=3 needs uneven heads; vLLM fits only with EP over 6
    assert key(base6.recommended) == (3, 1, 2, "tp") and "32 % 3" in base6.warnings[0]
    vllm = base6.commands()["vllm"]
    assert vllm[0].endswith("vLLM-legal layouts that fit: tp=2 ep=6 dp=3 moe=ep, tp=1 ep=6 dp=6 moe=ep")
    assert "--tensor-parallel-size 2" in vllm[-1]
    assert vllm[-1].endswith("--data-parallel-size 3 --enable-expert-parallel")
    none = plan("base", n_gpus=3, gpu_gb=24).commands()["vllm"]  # tp=3 only: no layout vLLM can run fits
    assert none[0].endswith("vLLM-legal layouts that fit: none") and len(none) == 1
    assert "vLLM can't: tp=4" in p.table()


def test_commands_carry_the_right_flags():
    p = plan("small", n_gpus=4, batch=8)
    c = p.commands()  # pick: 4 independent single-GPU copies
    assert [x.split()[0] for x in c["vl2lab"][1:5]] == [f"CUDA_VISIBLE_DEVICES={i}" for i in range(4)]
    assert all("--moe tp --vision replicated --dtype bfloat16 --max-new-tokens 512 --image image.jpg" in x
               for x in c["vl2lab"][1:5]) and c["vl2lab"][-1] == "wait"
    serve = [x for x in c["vllm"] if x.startswith("CUDA_VISIBLE_DEVICES")]
    assert len(serve) == 4 and [x.split("--port ")[1][:4] for x in serve] == ["8000", "8001", "8002", "8003"]
    for x in serve:
        assert "vllm serve deepseek-ai/deepseek-vl2-small --tensor-parallel-size 1" in x and VLLM_ARCH in x
        assert "--max-model-len 4096" in x and "--max-num-seqs 2" in x
        assert "--limit-mm-per-prompt '{\"image\": 1}'" in x
    assert c["sglang"] == ["python -m sglang.launch_server --model-path deepseek-ai/deepseek-vl2-small --dtype "
                           "bfloat16 --context-length 4096 --tp 1 --dp 4"]
    tp4 = p.commands(p.layout(4, "ep", 4))
    assert tp4["vllm"][-1].endswith("--enable-expert-parallel") and "--tensor-parallel-size 4" in tp4["vllm"][-1]
    assert tp4["sglang"][-1].endswith("--tp 4 --ep-size 4") and "--moe ep" in tp4["vl2lab"][-1]
    dpep = p.commands(p.layout(1, "ep", 4))
    assert "--data-parallel-size 4 --enable-expert-parallel" in dpep["vllm"][-1]
    assert "--tp 4 --dp 4 --enable-dp-attention --ep-size 4" in dpep["sglang"][-1]
    assert dpep["vl2lab"][-1].startswith("torchrun --standalone --nproc-per-node 4")  # nearest vl2lab layout
    two = plan("small", n_gpus=2, images_per_prompt=2, image_size="640x480", vision="dp").commands()
    run = [x for x in two["vl2lab"] if x.startswith("CUDA_VISIBLE_DEVICES=1 torchrun")][0]
    assert run.count("--image image.jpg") == 1 and "--vision dp" in run
    assert any(x.startswith("# vl2lab.serve.generate takes one --image; 2 images") for x in two["vl2lab"])
    assert "--image" not in plan("tiny", images_per_prompt=0).commands()["vl2lab"][-1]
    assert "multinode" not in two


def test_multinode_commands():
    big = plan("base", gpu_gb=8, n_gpus=16)
    assert key(big.recommended) == (16, 1, 1, "tp")
    mn = big.commands()["multinode"]
    runs = [x for x in mn if x.startswith("torchrun")]
    assert len(runs) == 2 and all("--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d" in x for x in runs)
    assert "--rdzv-endpoint $HEAD_NODE:29500" in runs[0]
    wide = plan("small", n_gpus=16, batch=64).commands()
    assert "no cross-node rendezvous" in wide["multinode"][0]
    assert "# on each of the 2 nodes:" in wide["vl2lab"]
    assert wide["sglang"][-1].endswith("--tp 1 --dp 8")


def test_sequence_length_and_context():
    three = plan("small", images_per_prompt=3, image_size=(384, 3456))
    assert three.request["image_tokens"] == 421 and three.request["vit_passes"] == 2  # no tiling with >= 3
    with pytest.raises(PlanError, match=r"4778 tokens .* context is 4096"):
        plan("small", images_per_prompt=2, image_size=(384, 3456))
    own = plan("small", context=None)
    assert own.request["planned_len"] == own.request["seq_len"] == 1599
    assert gb(own.single["kv_cache"]) < gb(plan("small").single["kv_cache"])
    long = plan("small", images_per_prompt=2, image_size=(384, 3456), context=8192)
    assert any("8192" in w for w in long.warnings) and long.request["seq_len"] == 4778
    text = plan("tiny", images_per_prompt=0)
    assert text.request["seq_len"] == 64 + 512


@pytest.mark.parametrize("kw,match", [
    ({"variant": "huge"}, "unknown DeepSeek-VL2 variant"), ({"image_size": "768by768"}, "WIDTHxHEIGHT"),
    ({"image_size": (0, 5)}, "at least 1 pixel"), ({"dtype": "int4"}, "dtype"), ({"n_gpus": 0}, "n_gpus"),
    ({"moe_modes": ("dp",)}, "moe_modes"), ({"vision": "pipeline"}, "vision"), ({"margin": 1.5}, "margin")])
def test_bad_input_is_one_clear_error(kw, match):
    with pytest.raises(PlanError, match=match):
        plan(**kw)


def test_article_claims():
    rows = article_claims()
    assert [r["claim"] for r in rows] == ["13B parameters", "about 260 GB at FP16",
                                         "one A100 80GB can only hold part of the parameters"]
    assert all(r["verdict"].startswith("wrong") for r in rows)
    assert "3.37B / 16.15B / 27.48B" in rows[0]["reality"] and "1.01B / 2.89B / 4.57B" in rows[0]["reality"]
    assert "= 26 GB" in rows[1]["reality"] and "54.96 GB" in rows[1]["reality"]
    assert "chunked prefill" in rows[2]["verdict"] and "chunk_size=512" in rows[2]["reality"]
    assert str(rows) == article_claims().table()


def test_cli_prints_deterministic_table_and_commands(capsys):
    argv = ["plan", "--variant", "small", "--gpus", "4", "--gpu-gb", "80", "--dtype", "bfloat16", "--batch", "8",
            "--images", "1", "--image-size", "768x768"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("deepseek-vl2-small: 16.15B parameters") and "[vllm]" in out and "[sglang]" in out
    assert main(argv) == 0 and capsys.readouterr().out == out
    assert main(argv + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["recommended"]["dp"] == 4 and d["settings"]["batch"] == 8 and d["commands"]["vllm"]
    assert main(["plan", "--variant", "tiny", "--tp", "4"]) == 0
    assert "WARNING: vLLM cannot shard" in capsys.readouterr().out


@pytest.mark.parametrize("extra,match", [
    (["--variant", "huge"], "unknown DeepSeek-VL2 variant"), (["--image-size", "big"], "WIDTHxHEIGHT"),
    (["--images", "2", "--image-size", "384x3456"], "context is 4096"), (["--tp", "3"], "no legal layout")])
def test_cli_errors(capsys, extra, match):
    assert main(["plan"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("vl2lab plan: error:") and match in err


def test_subcommand_table(capsys):
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "plan" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "vl2lab", "plan", "--variant", "base", "--gpus", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("deepseek-vl2: 27.48B parameters")


def test_panel_headless_and_show_planner(capsys):
    pytest.importorskip("ipywidgets")
    from vl2lab.planner.panel import panel, report

    box = show_planner()
    out = capsys.readouterr().out
    assert out == report() + "\n" and out.startswith("deepseek-vl2-small")
    assert "4 x 80 GB" in box.view.value
    box.controls["n_gpus"].value = 2
    box.controls["variant"].value = "deepseek-vl2"
    assert "deepseek-vl2: 27.48B" in box.view.value and "2 x 80 GB" in box.view.value
    box.controls["images_per_prompt"].value = 2
    box.controls["image_size"].value = "384x3456"
    assert box.view.value.startswith("<pre") and "error: the request needs" in box.view.value
    other = panel(variant="tiny", gpu_gb=32, context=None, image_size=(1000, 700), moe_modes=["ep", "tp"])
    assert other.controls["gpu_gb"].value == 32 and other.controls["image_size"].value == "1000x700"
    assert "request length" in other.view.value
    assert capsys.readouterr().out == ""  # re-planning writes to the widget, never to stdout
