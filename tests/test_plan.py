"""The planner (vl2lab.planner.plan): layouts and fits from the sizing maths, commands, article claims, CLI and panel."""
import inspect
import json
import re
import subprocess
import sys

import pytest

from vl2lab.planner import cli
from vl2lab.planner import layouts as S
from vl2lab.__main__ import main
from vl2lab.model.config import PRESETS, REAL_PRESETS, preset_name
from vl2lab.planner.commands import ONE_NODE
from vl2lab.planner.claims import article_claims
from vl2lab.planner.panel import show_planner
from vl2lab.planner.plan import VARIANTS, PlanError, plan
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
    assert cmd["vl2lab"][0].startswith("# /path/to/deepseek-vl2-tiny: the folder you downloaded")
    assert "python -m vl2lab.launch.agent --standalone --nproc-per-node 4 -m vl2lab.serve.generate" in cmd["vl2lab"][1]
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
    assert c["vl2lab"][1].startswith("# 4 independent copies")  # [0]: what /path/to/deepseek-vl2-small stands for
    assert [x.split()[0] for x in c["vl2lab"][2:6]] == [f"CUDA_VISIBLE_DEVICES={i}" for i in range(4)]
    assert all("--model /path/to/deepseek-vl2-small --moe tp --vision replicated --dtype bfloat16 "
               "--max-new-tokens 512 --image image.jpg" in x for x in c["vl2lab"][2:6]) and c["vl2lab"][-1] == "wait"
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
    assert dpep["vl2lab"][-1].startswith(f"{ONE_NODE} --nproc-per-node 4")  # nearest vl2lab layout
    two = plan("small", n_gpus=2, images_per_prompt=2, image_size="640x480", vision="dp").commands()
    run = [x for x in two["vl2lab"] if x.startswith("CUDA_VISIBLE_DEVICES=1 python -m vl2lab.launch.agent --standalone")][0]
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
    ({"moe_modes": ("dp",)}, "moe_modes"), ({"vision": "pipeline"}, "vision"), ({"margin": 1.5}, "margin"),
    ({"gpu_gb": float("inf")}, "gpu_gb must be a finite number > 0"), ({"gpu_gb": -1}, "gpu_gb"),
    ({"context": 0}, "context must be a positive integer or None"), ({"images_per_prompt": -1}, "images_per_prompt")])
def test_bad_input_is_one_clear_error(kw, match):
    with pytest.raises(PlanError, match=match) as e:
        plan(**kw)
    assert str(e.value).startswith(e.value.arg)  # Python callers read the keyword; the CLI swaps in its option
    assert "--" not in str(e.value)


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
    (["--images", "2", "--image-size", "384x3456"], "context is 4096"), (["--tp", "3"], "not a legal layout")])
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
    micro = panel(variant="vl2-micro", n_gpus=1)  # not in the dropdown's three: it gets its own entry
    assert micro.controls["variant"].value == "vl2-micro" and "vl2-micro: 3.29M parameters" in micro.view.value
    assert capsys.readouterr().out == ""  # re-planning writes to the widget, never to stdout


# ------------------------------------------------------------------------------------- issue 16: the command line

def test_cli_exit_status_1_when_nothing_fits(capsys):
    argv = ["plan", "--variant", "small", "--gpus", "1", "--gpu-gb", "24"]
    assert main(argv) == cli.EXIT["no_fit"] == 1
    out = capsys.readouterr().out
    assert out.startswith("deepseek-vl2-small: 16.15B parameters") and "  no  " in out  # the table, still
    assert "pick: none fits; one copy needs tp=2 (moe=tp) on 24 GB GPUs" in out and "commands: none" in out
    assert main(argv + ["--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["recommended"] is None and d["commands"] is None and d["exit_status"] == 1
    assert "tp=2" in d["request"]["hint"]
    assert main(["plan", "--variant", "small", "--gpus", "2", "--gpu-gb", "24", "--tp", "1"]) == 1  # tp=1 can't
    assert "note: tp=1 ep=1 dp=2 moe=tp does not fit: 33.30 GB per GPU > 21.10 GB usable" in capsys.readouterr().out
    assert main(["plan", "--variant", "small", "--gpus", "2", "--gpu-gb", "24"]) == 0  # the pick, tp=2, fits
    r = subprocess.run([sys.executable, "-m", "vl2lab", *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "pick: none fits" in r.stdout and r.stderr == ""


@pytest.mark.parametrize("extra,message", [
    (["--gpus", "0"], "--gpus must be an integer >= 1, got '0'"),
    (["--gpus", "x"], "--gpus must be an integer >= 1, got 'x'"),
    (["--gpu-gb", "-1"], "--gpu-gb must be a finite number > 0 (GB = 10^9 bytes per GPU), got '-1'"),
    (["--gpu-gb", "inf"], "--gpu-gb must be a finite number > 0 (GB = 10^9 bytes per GPU), got 'inf'"),
    (["--margin", "1.5"], "--margin must be a fraction in [0, 1) (the share of each GPU kept free), got '1.5'"),
    (["--margin", "nan"], "--margin must be a fraction in [0, 1)"),
    (["--image-size", "12"], "--image-size must be WIDTHxHEIGHT in pixels, both at least 1 (e.g. 768x768), got '12'"),
    (["--image-size", "0x5"], "--image-size must be WIDTHxHEIGHT"),
    (["--context", "abc"], "--context must be a positive integer or 'request', got 'abc'"),
    (["--context", "0"], "--context must be a positive integer or 'request', got '0'"),
    (["--moe-modes", "xx"], "--moe-modes must be tp, ep or tp,ep, got 'xx'"),
    (["--variant", "nosuch"], "--variant: unknown DeepSeek-VL2 variant 'nosuch'; use one of tiny, small, base"),
    (["--images", "-1"], "--images must be an integer >= 0, got '-1'"),
    (["--batch", "0"], "--batch must be an integer >= 1, got '0'"),
    (["--text-tokens", "-1"], "--text-tokens must be an integer >= 0"),
    (["--new-tokens", "1.5"], "--new-tokens must be an integer >= 0"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be an integer >= 1"),
    (["--tp", "0"], "--tp must be an integer >= 1"),
    (["--dtype", "int4"], "--dtype: invalid choice: 'int4'"),
    (["--gpus"], "--gpus: expected one argument"),
    (["--moe", "ep"], "--moe and --ep choose the layout of --tp; give --tp too"),
    (["--tp", "3"], "--tp 3 --moe tp is not a legal layout of deepseek-vl2-small on 4 GPUs; legal: --tp 1 --moe tp, "),
    (["--tp", "2", "--moe", "ep", "--ep", "3"], "--tp 2 --moe ep --ep 3 is not a legal layout"),
])
def test_cli_bad_values_are_one_line_naming_the_option(capsys, extra, message):
    assert main(["plan", *extra]) == cli.EXIT["bad_arguments"] == 2  # returned: no SystemExit, no traceback
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("vl2lab plan: error: " + message)
    assert not any(k in err for k in ("n_gpus", "gpu_gb", "images_per_prompt", "image_size", "moe_modes",
                                      "text_tokens", "new_tokens", "gpus_per_node", "margin=", "Traceback", "usage"))


def test_cli_exit_2_in_a_real_process():
    r = subprocess.run([sys.executable, "-m", "vl2lab", "plan", "--gpus", "0"], capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "vl2lab plan: error: --gpus must be an integer >= 1, got '0'\n"  # one line, no traceback


def test_cli_renames_plan_keywords_to_options(monkeypatch, capsys):
    def fail(*a, **k):
        raise PlanError("gpus_per_node must be an integer >= 1, got 0", "gpus_per_node")
    monkeypatch.setattr(cli, "plan", fail)
    assert main(["plan"]) == 2
    assert capsys.readouterr().err == "vl2lab plan: error: --gpus-per-node must be an integer >= 1, got 0\n"
    assert set(cli.OPTIONS) <= set(inspect.signature(plan).parameters)


def test_cli_help_states_what_it_computes_every_default_and_the_exit_status(capsys):
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "bytes each GPU holds for the weights, the KV cache and the activations" in flat
    assert "every legal layout" in flat and "vl2lab (torchrun), vLLM and SGLang" in flat
    assert "GB means 10^9 bytes" in flat
    options = text.split("\noptions:\n")[1].split("\n\n")[0]
    blocks = [" ".join(b.split()) for b in re.split(r"\n  (?=-)", "\n" + options) if b.strip()]
    assert len(blocks) == 20 and blocks[0].startswith("-h, --help")
    for b in blocks[1:]:
        assert "(default: " in b, b
    assert "--gpu-gb GB memory per GPU in GB of 10^9 bytes (default: 80)" in blocks
    assert "--variant NAME model: tiny, small, base" in blocks[1] and "(default: small)" in blocks[1]
    assert "exit status:\n  0  a layout fits" in text and "\n  1  no layout fits" in text
    assert "\n  2  bad arguments" in text


@pytest.mark.parametrize("variant,count", [("vl2-micro", "3.29M parameters (2.67M activated)"),
                                           ("random-tiny", "917.02K parameters (597.54K activated)"),
                                           ("tiny", "3.37B parameters (1.01B activated)")])
def test_parameter_counts_have_a_unit_that_fits(capsys, variant, count):
    assert main(["plan", "--variant", variant, "--gpus", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{preset_name(variant)}: {count}, bfloat16\n")


def test_accepted_variants_match_the_presets():
    assert set(PRESETS) <= set(VARIANTS)  # everything load_pretrained / generate know as a preset name
    assert {preset_name(v) for v in VARIANTS} == set(PRESETS)
    for v in ("SMALL", "deepseek-ai/deepseek-vl2-small", "deepseek-vl2-base"):
        assert plan(v, n_gpus=1).cfg.name in REAL_PRESETS


def test_vl2lab_command_names_a_model_generate_can_load(capsys):
    micro = plan("vl2-micro", n_gpus=1).commands()
    assert micro["vl2lab"][0] == ("# --model vl2-micro: the trained snapshot shipped with vl2lab "
                                  "(vl2lab/assets/vl2-micro)")
    assert "-m vl2lab.serve.generate --model vl2-micro --moe tp" in micro["vl2lab"][1]
    assert "vl2-micro is vl2lab's own model, not on the Hugging Face Hub" in micro["vllm"][0]
    rnd = plan("random-tiny", n_gpus=1).commands()["vl2lab"]
    assert "random weights" in rnd[0] and "--model random-tiny --moe" in rnd[1]
    small = plan("small", n_gpus=1).commands()
    assert small["vl2lab"][0] == ("# /path/to/deepseek-vl2-small: the folder you downloaded "
                                  "deepseek-ai/deepseek-vl2-small to from the Hugging Face Hub (config.json, "
                                  "*.safetensors, tokenizer files)")
    assert "--model /path/to/deepseek-vl2-small --moe" in small["vl2lab"][1]
    assert small["vllm"][0].startswith("vllm serve deepseek-ai/deepseek-vl2-small ")
    own = plan("small", n_gpus=1).commands(model_path="/models/small")["vl2lab"]
    assert len(own) == 1 and "--model /models/small --moe" in own[0]  # a given folder needs no comment
    for name in PRESETS:
        for gpu_gb in (8, 80):  # 16 GPUs on 2 nodes: base on 8 GB needs tp=16, so [multinode] has torchrun lines
            text = plan(name, n_gpus=16, gpu_gb=gpu_gb).commands_text()
            assert " ./" not in text  # no made-up folder next to the user's shell
            if name in REAL_PRESETS:  # as a preset name generate would build random weights of full size
                assert f"--model {name} " not in text
    assert main(["plan", "--variant", "vl2-micro", "--gpus", "1", "--model-path", "/m"]) == 0
    assert "--model /m --moe" in capsys.readouterr().out
