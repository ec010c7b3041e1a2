"""The shipped vl2-micro snapshot: found by name, a faithful DeepSeek-VL2, and it answers the shapes task."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vl2lab.lessons.baseline import BaselineError, resolve_model
from vl2lab.train import scenes, score
from vl2lab.weights import pretrained

ASSET = Path(__file__).resolve().parents[1] / "vl2lab" / "assets" / "vl2-micro"
pytestmark = pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(),
                                reason="vl2-micro snapshot not built (python -m vl2lab.train.micro)")


@pytest.fixture(scope="module")
def micro():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return pretrained.load_pretrained("vl2-micro")


def test_found_by_name_and_small():
    assert os.path.samefile(pretrained.shipped_micro(), ASSET)
    assert os.path.samefile(resolve_model("vl2-micro")["path"], ASSET)
    files = {p.name: p.stat().st_size for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "eval.json",
            "README.md"} <= set(files)
    assert sum(files.values()) < 12 * 2**20                       # a few MB: it ships inside the package


def test_missing_snapshot_names_the_rebuild_command(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "MICRO_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(pretrained.CheckpointError, match="python -m vl2lab.train.micro"):
        pretrained.load_pretrained("vl2-micro")
    with pytest.raises(BaselineError, match="python -m vl2lab.train.micro"):
        resolve_model("vl2-micro")


# eval accuracy the shipped snapshot must reach per question type (chance: colour 0.25, count about 0.33)
BARS = {"colour": 0.9, "count": 0.9}
RERUN = 24                               # eval questions of each type answered again here (eval.json: 100 each)


@pytest.fixture(scope="module")
def rerun(micro):
    """The first RERUN eval-split questions of each type (the split cycles through the types), answered greedily
    by the shipped snapshot now: (examples, answers)."""
    model, processor = micro
    ex = list(scenes.dataset("eval", RERUN * len(scenes.QTYPES)))
    return ex, score.predict(model, processor, ex, batch_size=RERUN)


def _tolerance(p: float, n: int) -> float:
    """3 binomial standard deviations of an accuracy over n questions at rate p (p kept ≥ 1/n away from 0 and 1,
    so that a reported 100 % or 0 % still allows a couple of answers either way)."""
    p = min(max(p, 1 / n), 1 - 1 / n)
    return 3 * (p * (1 - p) / n) ** 0.5


def test_report_meets_the_bar(rerun):
    """eval.json clears the bars, and the snapshot shipped beside it still scores what it reports: a fresh greedy
    evaluation of RERUN questions per type agrees with each reported accuracy within 3 binomial σ (a snapshot
    retrained without re-running the report, or answers broken since, fail here)."""
    report = json.loads((ASSET / "eval.json").read_text())
    for q in ("colour", "count"):
        assert report["eval"][q]["accuracy"] >= BARS[q], (q, report["eval"][q])
    assert {"left_of", "ground"} <= set(report["eval"])                 # reported, whatever they reach
    assert report["train"]["world_size"] == 2
    ex, answers = rerun
    now = score.score(ex, answers)
    for q in scenes.QTYPES:
        was = report["eval"][q]["accuracy"]
        assert now[q]["n"] == RERUN and abs(now[q]["accuracy"] - was) <= _tolerance(was, RERUN), (q, now[q], was)
    for q in ("colour", "count"):
        assert now[q]["accuracy"] >= BARS[q] - _tolerance(BARS[q], RERUN), (q, now[q])


def test_same_modules_as_the_real_model(micro):
    model, processor = micro
    names = {n for n, _ in model.named_parameters()}
    for key in ("image_newline", "view_seperator", "projector.layers.0.weight", "projector.layers.2.weight",
                "language.model.layers.1.mlp.gate.weight", "language.model.layers.1.mlp.experts.gate_proj",
                "language.model.layers.1.mlp.shared_experts.up_proj.weight", "language.model.layers.0.mlp.up_proj.weight",
                "language.model.layers.0.self_attn.q_proj.weight", "language.lm_head.weight"):
        assert key in names, key
    lm = model.config.language_config
    assert not lm.use_mla and lm.topk_method == "greedy" and lm.n_shared_experts >= 1
    assert model.config.vision_config.image_size == 384
    assert processor.patch_size == model.config.vision_config.patch_size


def test_answers_fixed_colour_and_count_questions(rerun):
    ex, answers = rerun
    pairs = [(e.answer, p) for e, p in zip(ex[:32], answers[:32]) if e.qtype in ("colour", "count")]   # 8 of each
    assert len(pairs) == 16
    assert sum(p == a for a, p in pairs) >= 12, pairs


def test_predict_moves_inputs_to_the_models_device_and_dtype():
    """On a GPU the processor's CPU tensors must follow the model (the eval ranks of ``eval.shard_eval``)."""
    model, processor = pretrained.load_pretrained("vl2-micro", dtype=torch.bfloat16)
    moved = []

    class Spy:
        def __call__(self, **kw):
            out = processor(**kw)
            real_to = out.to

            def to(*a, **k):
                moved.append(a)
                return real_to(*a, **k)
            out.to = to
            return out

        def __getattr__(self, name):
            return getattr(processor, name)

    ex = [e for e in scenes.dataset("eval", 8) if e.qtype in ("colour", "count")]
    pred = score.predict(model, Spy(), ex, batch_size=4)
    assert all(isinstance(p, str) and p for p in pred), pred
    assert moved and all(a == (torch.device("cpu"), torch.bfloat16) for a in moved), moved


def test_rebuild_command_takes_answer_weights_and_refuses_unknown_ones(capsys):
    from vl2lab.train import micro as rebuild
    a = rebuild.parser().parse_args(["--out", "x", "--weight", "ground=4", "--weight", "left_of=2.5"])
    assert a.weight == [("ground", 4.0), ("left_of", 2.5)]
    for bad in ("size=2", "ground=lots", "ground"):
        with pytest.raises(SystemExit):
            rebuild.parser().parse_args(["--out", "x", "--weight", bad])
        err = capsys.readouterr().err
        assert "QTYPE=WEIGHT" in err and "left_of" in err and "Traceback" not in err, err


def test_rebuild_command_refuses_counts_out_of_range_before_any_stage(capsys):
    """--steps 0 used to run all of stage 0 and then fail with a rank traceback: now argparse says what is wrong."""
    from vl2lab.train import micro as rebuild
    for opt, bad in (("--steps", "0"), ("--batch-size", "-1"), ("--world-size", "two"), ("--tower-steps", "-5")):
        with pytest.raises(SystemExit):
            rebuild.parser().parse_args(["--out", "x", opt, bad])
        err = capsys.readouterr().err
        assert opt in err and "must be an integer >=" in err and "Traceback" not in err, err
    assert rebuild.parser().parse_args(["--out", "x", "--tower-steps", "0"]).tower_steps == 0


def test_stage0_runs_with_every_setting_asked_and_records_them(tmp_path, monkeypatch):
    """The rebuild command hands pretrain_tower all of its stage-0 options and writes them to tower.json (a
    resume compares them), the launches replaced by a recorder that stops before stage 1."""
    from vl2lab.train import micro as rebuild
    calls = []

    class Stop(Exception):
        pass

    def record(target, **kw):
        calls.append((target, kw))
        if target.endswith("pretrain_tower"):
            return [{"evals": [{"step": 5, "shape_patch_accuracy": 0.5}]}]
        raise Stop

    monkeypatch.setattr(rebuild.vl2lab, "run", record)
    work = tmp_path / "work"
    work.mkdir()                                  # pretrain_tower would make it
    with pytest.raises(Stop):
        rebuild.main(["--out", str(tmp_path / "out"), "--work", str(work), "--world-size", "1", "--tower-steps", "5",
                      "--tower-batch-size", "3", "--tower-targets", "kind,box", "--tower-kind-weight", "2"])
    asked = {"steps": 5, "batch_size": 3, "targets": ["kind", "box"], "shape_kind_weight": 2.0}
    target, kw = calls[0]
    assert target == "vl2lab.train.tower:pretrain_tower" and {k: kw[k] for k in asked} == asked
    facts = json.loads((work / "tower.json").read_text())
    assert {k: facts[k] for k in asked} == asked
