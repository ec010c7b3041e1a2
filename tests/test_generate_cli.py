"""``python -m vl2lab.serve.generate`` and ``model.generate``: bad input gets one clear error, once, before any
work (issue 16), and a run ends cleanly (the process group really torn down).

The command line runs as a subprocess at world size 1 (a few seconds each: the interpreter and torch), twice under
a real 2-rank torchrun; the Python API shares one load of the shipped vl2-micro.
"""
from __future__ import annotations

import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vl2lab
from vl2lab.inputs.tiling import ProcessorError, open_image
from vl2lab.model.config import PRESETS, get_config, preset_name
from vl2lab.model.generation import GenerationError, check_context
from vl2lab.model.generation import generate as lm_generate
from vl2lab.model.vl2 import GENERATE_ARGS, DeepseekVL2ForCausalLM
from vl2lab.serve import deploy as deploy_mod
from vl2lab.serve.deploy import DeployError, deploy, is_preset, resolve_model
from vl2lab.serve.generate import build_parser, main
from vl2lab.weights.pretrained import MICRO_DIR, make_random_snapshot

GENERATE = [sys.executable, "-m", "vl2lab.serve.generate"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
OUR_FRAME = re.compile(r'File "[^"]*vl2lab[/\\]')


def run(args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one line on stderr, nothing on stdout, no traceback; → that line."""
    assert p.returncode != 0 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def micro():
    return vl2lab.load_pretrained("vl2-micro")


def text_batch(processor, text="What is in the picture?", **kw):
    return processor(conversation=[{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}],
                     **kw)


@pytest.fixture
def no_work(monkeypatch):
    """Any model's vision/embedding pass fails the test: a check must come before it."""
    def fail(*a, **k):
        raise AssertionError("work was done before the request was checked")
    monkeypatch.setattr(DeepseekVL2ForCausalLM, "prepare_inputs_embeds", fail)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    Image.fromarray(np.full((40, 60), 128 * 257, dtype=np.uint16)).save(d / "grey16.png")   # mid-grey, 16-bit
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "x.png").write_text("this is text, not a picture\n")
    return d


# --- 1. model names ------------------------------------------------------------------------------------------------
def test_model_names_mean_the_same_model_everywhere(tmp_path):
    assert resolve_model("vl2-micro") == ("shipped", MICRO_DIR)
    for name in ("tiny", "deepseek-vl2-tiny", "deepseek-ai/deepseek-vl2-tiny"):   # as the planner reads them
        assert resolve_model(name) == ("preset", preset_name(name)) == ("preset", "deepseek-vl2-tiny")
        assert is_preset(name)
    assert resolve_model("random-tiny") == ("preset", "random-tiny") and not is_preset("vl2-micro")
    assert resolve_model(str(tmp_path)) == ("folder", str(tmp_path)) and not is_preset(str(tmp_path))
    with pytest.raises(DeployError, match="neither a snapshot folder nor a known model name") as e:
        resolve_model("nonesuch")
    assert all(p in str(e.value) for p in PRESETS) and "make_random_snapshot" not in str(e.value)
    assert not is_preset("nonesuch")


def test_cli_unknown_model_is_one_line():
    for cmd in (GENERATE, [sys.executable, "-m", "vl2lab", "generate"]):
        line = one_error_line(run(cmd + ["--model", "nonesuch"]))
        assert line.startswith("error: 'nonesuch' is neither a snapshot folder nor a known model name")
        assert "vl2-micro" in line and "random-tiny" in line and "make_random_snapshot" not in line


# --- 2. the context ------------------------------------------------------------------------------------------------
def test_context_is_checked_before_any_work(micro, no_work):
    model, _ = micro
    assert model.config.language_config.max_position_embeddings == 4096
    ids = torch.zeros(1, 4056, dtype=torch.long)
    with pytest.raises(GenerationError, match=r"4056 tokens and max_new_tokens is 240: 4296 positions, over the "
                                              r"model's context of 4096 .*at most 40 new tokens"):
        model.generate(input_ids=ids, max_new_tokens=240)
    with pytest.raises(GenerationError, match="4296 positions"):            # the language model's own generate too
        lm_generate(model.language, torch.zeros(1, 4056, 4), None, 240)
    with pytest.raises(GenerationError, match="5003 positions, over the model's context of 4096"):
        model.generate(input_ids=ids[:, :3], max_new_tokens=5000)
    check_context(4000, 96, 4096)                                           # exactly full: fine
    with pytest.raises(GenerationError, match="shorten the prompt by at least 5 tokens"):
        check_context(4100, 1, 4096)


def test_cli_too_many_new_tokens_is_one_line():
    line = one_error_line(run(GENERATE + ["--model", "random-tiny", "--max-new-tokens", "5000"]))
    assert line.startswith("error: max_new_tokens=5000 does not fit the model's context of 4096 positions")


# --- 3. unknown keywords -------------------------------------------------------------------------------------------
def test_generate_rejects_unknown_keywords(micro, no_work):
    model, processor = micro
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'max_tokens'; it takes input_ids, .*"
                                        r"max_new_tokens"):
        model.generate(**text_batch(processor), max_tokens=3)


def test_generate_takes_every_processor_batch_key(micro):
    model, processor = micro
    params = list(inspect.signature(model.generate).parameters)
    assert set(params[:-1]) == set(GENERATE_ARGS) and params[-1] == "unknown"
    batch = text_batch(processor, return_labels=True)                     # a training batch: labels too
    assert set(batch) <= set(GENERATE_ARGS)
    assert model.generate(**batch, max_new_tokens=2).shape == (1, 2)


# --- 4. max_new_tokens ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,error", [(0, GenerationError), (-1, GenerationError), (2.5, TypeError),
                                       (None, TypeError), ("8", TypeError), (True, TypeError)])
def test_max_new_tokens_is_checked_before_any_work(micro, no_work, bad, error):
    model, processor = micro
    with pytest.raises(error, match="max_new_tokens must be"):
        model.generate(**text_batch(processor), max_new_tokens=bad)


def test_cli_max_new_tokens_zero_is_one_line():
    for value, says in (("0", "must be an integer >= 1, got '0'"), ("2.5", "must be an integer >= 1, got '2.5'")):
        p = run(GENERATE + ["--model", "random-tiny", "--max-new-tokens", value])
        assert p.returncode == 2 and f"argument --max-new-tokens: {says}" in one_error_line(p)


# --- 5. pictures, and everything checked before the weights ----------------------------------------------------------
def test_16_bit_png_keeps_its_grey(pictures, micro):
    img = open_image(pictures / "grey16.png")
    assert img.mode == "RGB" and abs(float(np.asarray(img).mean()) - 128) <= 1
    _, processor = micro
    batch = processor(conversation=[{"role": "<|User|>", "content": "<image>\nWhat?", "images": [img]},
                                    {"role": "<|Assistant|>", "content": ""}])
    tiles = batch["images"][0, :1 + int(batch["images_spatial_crop"][0, 0].prod())]
    assert float(tiles.max()) < 0.05                     # grey is (128/255 - 0.5)/0.5 ≈ 0.004; white: 1.0


def test_bad_requests_fail_before_weights_are_made_or_read(pictures, monkeypatch, micro):
    def fail(*a, **k):
        raise AssertionError("weights were made or read before the request was checked")
    monkeypatch.setattr(deploy_mod, "load_sharded", fail)
    monkeypatch.setattr(deploy_mod, "make_random_snapshot", fail)
    for name in ("truncated.png", "x.png", "missing.png"):
        with pytest.raises(ProcessorError, match="image file"):
            deploy("random-tiny", image_path=str(pictures / name))
    with pytest.raises(GenerationError):
        deploy("vl2-micro", max_new_tokens=0)
    _, processor = micro
    long_prompt = "a red square " * 200
    n = int(text_batch(processor, long_prompt)["input_ids"].shape[1])
    with pytest.raises(GenerationError, match=f"the prompt has {n} tokens and max_new_tokens is {4097 - n}"):
        deploy("vl2-micro", long_prompt, max_new_tokens=4097 - n)          # the processor is read, not the weights


def test_cli_bad_pictures_are_one_line(pictures):
    for name in ("truncated.png", "x.png"):
        line = one_error_line(run(GENERATE + ["--model", "random-tiny", "--image", str(pictures / name)]))
        assert line.startswith(f"error: image file '{pictures / name}' cannot be read as a picture")


# --- 6. a model that cannot be split over the ranks: one line, from rank 0 -----------------------------------------
def test_unsplittable_model_on_2_ranks_reports_once(tmp_path):
    cfg = get_config("random-tiny").replace(num_attention_heads=1, num_key_value_heads=1)
    folder = make_random_snapshot(str(tmp_path / "one-head"), cfg)
    p = run(TORCHRUN + ["-m", "vl2lab.serve.generate", "--model", folder, "--max-new-tokens", "2"])
    text = p.stdout + p.stderr
    msg = "error: cannot shard this model: 1 attention heads cannot be split over 2 ranks"
    assert p.returncode != 0 and text.count(msg) == 1 and text.count("cannot shard") == 1, text
    assert not OUR_FRAME.search(text), text                                 # torchrun's own report only
    # Every rank exits with 1; torchrun stops the others (SIGTERM) as soon as the first one has, so its report may
    # show one rank's 1 and the other's -15.
    assert text.count("exitcode  : 1") >= 1


# --- 7. teardown ---------------------------------------------------------------------------------------------------
COUNT_GLOO_THREADS = """
import os, sys, time
from vl2lab.serve.generate import main
rc = main(sys.argv[1:])
def gloo_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read().strip())
        except FileNotFoundError:          # the thread ended while we listed it
            pass
    return sum("gloo" in n for n in names)
deadline = time.monotonic() + 5            # a destroyed group's threads end on their own, a leaked one's never do
while gloo_threads() and time.monotonic() < deadline:
    time.sleep(0.05)
print(f"rank {os.environ['RANK']}: gloo threads left {gloo_threads()}", flush=True)
sys.exit(rc)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_two_rank_run_tears_the_process_group_down():
    """Before: torch.distributed.nn, imported (by transformers) after init_process_group, kept the default group
    alive past destroy_process_group, its gloo threads running into interpreter shutdown (SIGABRT at times)."""
    p = run(TORCHRUN + ["--no-python", sys.executable, "-c", COUNT_GLOO_THREADS, "--model", "random-tiny",
                        "--moe", "ep", "--max-new-tokens", "2", "--backend", "gloo"], timeout=180)
    text = p.stdout + p.stderr
    assert p.returncode == 0 and "answer (" in text and "terminate called" not in text, text
    assert "rank 0: gloo threads left 0" in text and "rank 1: gloo threads left 0" in text, text


# --- 8. --help -----------------------------------------------------------------------------------------------------
def test_help_gives_every_default_and_how_to_run_on_n_ranks(capsys):
    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.dest
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "python -m vl2lab.launch.agent --standalone --nproc-per-node N" in out
    assert "(default: 32)" in out and "(default: tp)" in out and "(default: 'Describe this image.')" in out
