"""DDP training (vl2lab.train.ddp, .batches, .loop), sharded inference (vl2lab.train.eval), notebook 03's DDP
checks (vl2lab.lessons.ddp_checks), and resuming only from a checkpoint that is data, not code. (The shipped
vl2-micro snapshot's answers against its report: tests/test_micro.py.)

One launch at world size 2 runs every distributed check (a launch costs seconds of imports on a small machine):
resume equals an uninterrupted run, W×b gradients equal one process on W·b, sharded answers equal single-process
answers, the bytes DDP's communication hook saw equal 4 bytes × each parameter that needs a gradient (and match
DDP's own record of its buckets), DDP around an inference model (wrapped as the article wraps it) changes no output
and broadcasts what the notebook says, and each bad input gives its one clear error.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

import vl2lab
from vl2lab.lessons import ddp_checks
from vl2lab.model import build_model
from vl2lab.model.config import published_config_dict
from vl2lab.parallel import groups as vdist
from vl2lab.train import batches, ddp, prefetch, scenes, score
from vl2lab.train.eval import shard_eval
from vl2lab.train.loop import log_buckets, resolve_config
from vl2lab.train.tower import eval_batch, pretrain_tower
from vl2lab.weights.pretrained import CheckpointError, load_pretrained

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

LONG = 600.0


def _square(step: int) -> int:
    return step * step


def _error(fn, **kw) -> str:
    try:
        fn(**kw)
    except Exception as e:  # noqa: BLE001 — the test looks at the type and message
        return f"{type(e).__name__}: {e}"
    return "no error"


def rank_suite(root: str) -> dict:
    """Rank function: every distributed check of this file, in one launch."""
    torch.set_num_threads(1)
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    common = dict(steps=2, batch_size=1, warmup=1, save_every=1, log_every=1)
    full = ddp.train(a, **common)
    part = ddp.train(b, stop_at=1, **common)
    rest = ddp.train(b, resume=True, **common)
    wa = load_pretrained(os.path.join(a, "checkpoint"))[0].state_dict()
    wb = load_pretrained(os.path.join(b, "checkpoint"))[0].state_dict()
    other = published_config_dict("vl2-micro")
    other["language_config"]["hidden_size"] = other["projector_config"]["n_embed"] = 96
    errors = {
        "missing": _error(ddp.train, out=os.path.join(root, "nothing"), resume=True, **common),
        "foreign": _error(ddp.train, out=a, config=other, resume=True, **common),
        "settings": _error(ddp.train, out=a, resume=True, **{**common, "batch_size": 2}),
        "few_samples": _error(ddp.train, out=os.path.join(root, "c"), n_train=1, **common),
    }
    stage0 = pretrain_tower(os.path.join(root, "t"), steps=2, batch_size=1, log_every=1, eval_n=2)
    prefetched = {"train": ddp.train(os.path.join(root, "p"), workers=2, **common),
                  "tower": pretrain_tower(os.path.join(root, "tp"), steps=2, batch_size=1, log_every=1, eval_n=2,
                                          workers=1)}
    frozen = ddp.train(os.path.join(root, "f"), tower=stage0["path"], vision_lr_mult=0.0, **common)
    errors["no_tower"] = _error(ddp.train, out=os.path.join(root, "g"), tower=os.path.join(root, "none.safetensors"),
                                **common)
    tower_w = load_file(stage0["path"])
    wf = load_pretrained(os.path.join(root, "f", "checkpoint"))[0].state_dict()
    frozen["tower_unchanged"] = all(torch.equal(wf["vision." + k], v) for k, v in tower_w.items())
    init = build_model(resolve_config("vl2-micro"), seed=0).vision.state_dict()
    frozen["tower_differs_from_init"] = any(not torch.equal(init[k], v) for k, v in tower_w.items())
    grads = ddp_checks.grad_equivalence_check(batch_size=1, tokenizer_dir=os.path.join(a, "tokenizer"))
    model_path = os.path.join(a, "checkpoint")
    sharded = shard_eval(model_path, n=5, batch_size=1)
    single = None
    if vdist.rank() == 0:
        model, processor = load_pretrained(model_path)
        single = score.predict(model, processor, list(scenes.dataset("eval", 5)), batch_size=1)
    overhead = ddp_checks.inference_ddp_overhead(model_path, n=2, repeats=2)
    traffic = ddp_checks.gradient_traffic(batch_size=1, steps=3, tokenizer_dir=os.path.join(a, "tokenizer"))
    return {"full": full, "part": part, "rest": rest, "max_weight_diff": max(float((wa[k] - wb[k]).abs().max())
                                                                            for k in wa),
            "errors": errors, "grads": grads, "sharded": sharded, "single": single, "overhead": overhead,
            "traffic": traffic, "stage0": stage0, "frozen": frozen, "prefetched": prefetched}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    res = vl2lab.run("test_ddp:rank_suite", world_size=2, timeout=LONG, root=str(tmp_path_factory.mktemp("ddp")))
    return res


def test_resume_equals_uninterrupted(suite):
    r = suite[0]
    assert [h["step"] for h in r["part"]["history"]] == [1]
    assert [h["step"] for h in r["rest"]["history"]] == [1, 2] and r["rest"]["steps_run"] == 1
    assert r["rest"]["history"][-1]["loss"] == pytest.approx(r["full"]["history"][-1]["loss"], rel=1e-5)
    assert r["max_weight_diff"] <= 1e-6


def test_batches_prepared_by_workers_give_the_same_run(suite):
    """Stage 0 and stage 1 with their next steps' batches prepared in worker processes train on the very batches
    of the run without workers: the same losses, step by step, on every rank."""
    for r in suite:
        p = r["prefetched"]
        assert [h["loss"] for h in p["train"]["history"]] == [h["loss"] for h in r["full"]["history"]]
        assert [h["loss"] for h in p["tower"]["history"]] == [h["loss"] for h in r["stage0"]["history"]]
    with pytest.raises(ValueError, match="workers=-1"):
        list(prefetch.prefetched(_square, range(2), workers=-1))
    assert list(prefetch.prefetched(_square, range(5), workers=2, ahead=1)) == [(s, s * s) for s in range(5)]


def test_gradients_of_w_ranks_equal_one_process(suite):
    for g in suite.values:
        assert g["grads"]["world_size"] == 2
        assert g["grads"]["max_abs_diff"] <= g["grads"]["tolerance"], g["grads"]


def test_sharded_eval_equals_single_process_in_order(suite):
    s = suite[0]["sharded"]
    assert suite[1]["sharded"] is None
    assert s["answers"] == suite[0]["single"]
    assert s["per_rank"] == [3, 2] and s["padded_slots_skipped"] == 1


def _trainable(frozen_tower: bool) -> dict:
    """{name: numel} of vl2-micro's parameters that need a gradient (read from the module, on the meta device)."""
    return {n: p.numel() for n, p in build_model("vl2-micro", device="meta").named_parameters()
            if not (frozen_tower and n.startswith("vision."))}


def test_hook_bytes_are_four_bytes_per_trainable_parameter(suite):
    """What DDP's hook saw in the training runs and in gradient_traffic against the module's parameter count, and
    the buckets against DDP's own logging record; every rank logged the same buckets."""
    whole, frozen = _trainable(False), _trainable(True)
    for r in suite.values:
        assert r["full"]["allreduce_bytes_by_step"] == [4 * sum(whole.values())] * 2
        assert r["frozen"]["allreduce_bytes_by_step"] == [4 * sum(frozen.values())] * 2
        for variant, names in (("whole model", whole), ("tower frozen", frozen)):
            v = r["traffic"][variant]
            assert v["trainable_numel"] == sum(names.values()) and len(v["steps"]) == 3
            for st in v["steps"]:
                assert sorted(n for b in st for n in b["params"]) == sorted(names)      # each gradient once
                assert sum(b["bytes"] for b in st) == 4 * sum(names.values())
            assert [b["bytes"] for b in v["steps"][0]] == v["ddp_bucket_sizes"]
            assert all([b["bytes"] for b in st] == v["ddp_rebuilt_bucket_sizes"] for st in v["steps"][1:])
            assert v["steps"] == suite[0]["traffic"][variant]["steps"]


def test_ddp_around_inference_as_the_article_wraps_it(suite):
    """Default DDP (broadcast_buffers=True): the construction broadcasts parameters and buffers; the buffers again
    before the first inference-mode forward only, and before each forward that follows one with gradients; no
    gradient is all-reduced in inference mode; the outputs are unchanged."""
    for r in suite.values:
        o = r["overhead"]
        buffers = sum(b for _, b in o["buffers"])
        sent = lambda calls: sum(c["bytes"] for c in calls)
        assert o["max_abs_diff"] == 0.0 and o["wrap_s"] > 0
        assert [n for n, _ in o["buffers"]] == ["vision.embeddings.position_ids"]
        assert sent(o["construction_broadcasts"]) == o["param_bytes"] + buffers
        assert [sent(c) for c in o["inference_broadcasts"]] == [buffers, 0]
        assert [sent(c) for c in o["grad_broadcasts"]] == [0, buffers, buffers]
        assert o["buckets_reduced_in_inference"] == 0 and o["buckets_reduced_with_grad"] >= 3
        assert sum(o["ddp_bucket_sizes"]) == o["param_bytes"]


def test_stage0_tower_is_loaded_and_stays_frozen(suite):
    """Stage 0 writes a tower that ``train(tower=..., vision_lr_mult=0)`` starts from and never changes; the
    frozen tower's gradients are not all-reduced."""
    r = suite[0]
    assert len(r["stage0"]["history"]) == 2 and [e["step"] for e in r["stage0"]["evals"]] == [1, 2]   # log_every=1
    # scored on the cells on a shape of the 2 held-out scenes (eval_n=2): a whole number of them is right
    on = int((eval_batch(resolve_config("vl2-micro").vision_config.grid, 2)[1]["kind"] > 0).sum())
    for e in r["stage0"]["evals"]:
        assert abs(e["shape_patch_accuracy"] * on - round(e["shape_patch_accuracy"] * on)) < 1e-3, (e, on)
    assert r["frozen"]["tower_unchanged"] and r["frozen"]["tower_differs_from_init"]
    assert "no pre-trained tower at" in r["errors"]["no_tower"] and "stage 0" in r["errors"]["no_tower"]


def test_bad_inputs_give_one_clear_error(suite):
    e = suite[0]["errors"]
    assert e["missing"].startswith("CheckpointError") and "holds no checkpoint" in e["missing"]
    assert e["foreign"].startswith("CheckpointError") and "another model config" in e["foreign"]
    assert e["settings"].startswith("CheckpointError") and "batch_size=1" in e["settings"]
    assert e["few_samples"].startswith("TrainingError") and "cannot feed 2 ranks" in e["few_samples"]


class _Planted:
    """Unpickled, this object would run code: ``exec`` writes the marker file (what a hostile checkpoint does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_resume_never_runs_code_from_a_foreign_checkpoint(tmp_path):
    """A trainer_state.pt whose pickle calls ``exec`` when loaded: resume refuses it with one clear error and the
    planted code never runs (with ``weights_only=False`` it would write the marker). A pickle of plain data that
    is not a trainer state is refused the same way."""
    cfg, marker = resolve_config("vl2-micro"), tmp_path / "ran.txt"
    (tmp_path / "checkpoint").mkdir()
    state = tmp_path / "checkpoint" / ddp.STATE
    for payload in ({"step": 1, "optimizer": _Planted(str(marker)), "history": [], "config": {}, "args": {}},
                    [_Planted(str(marker))]):
        torch.save(payload, state)
        with pytest.raises(CheckpointError) as e:
            ddp.load_checkpoint(str(tmp_path), cfg, {})
        assert not marker.exists(), "unpickling the trainer state ran the code planted in it"
        msg = str(e.value)
        assert f"{state} is not a vl2lab trainer state (or was written by an older vl2lab)" in msg, msg
        assert "exec" in msg and "start without --resume" in msg and "delete it" in msg, msg
        assert "weights_only" not in msg, msg                       # no advice to load it the unsafe way
    torch.save([1, 2], state)
    with pytest.raises(CheckpointError, match=r"not a vl2lab trainer state .*holds a list"):
        ddp.load_checkpoint(str(tmp_path), cfg, {})
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a vl2lab trainer state"):
        ddp.load_checkpoint(str(tmp_path), cfg, {})


def test_uneven_last_batch_is_dropped_and_order_is_pure():
    ds = scenes.dialogues("train", 5)                   # 2 ranks: 3 indices each per epoch, batch 2 → 1 step
    steps = [[batches.step_examples(ds, s, 2, 2, r, seed=0) for r in (0, 1)] for s in range(3)]
    assert all(len(part) == 2 for st in steps for part in st)
    again = batches.step_examples(ds, 2, 2, 2, 1, seed=0)
    assert [d.seed for d in again] == [d.seed for d in steps[2][1]]
    seen = [d.seed for part in steps[0] for d in part]
    assert len(seen) == 4 and set(seen) <= set(range(5))


def test_hook_logs_every_bucket_of_one_rank():
    """In this process, one gloo rank: ten 256 KiB layers, the last frozen, 1 MiB buckets. Each step the hook logs
    the 9 trainable gradients once (4 bytes per parameter), in buckets equal to DDP's own record of them (which
    holds the rebuilt buckets from the third forward on)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(10)])
        net[9].requires_grad_(False)
        ddp = DistributedDataParallel(net, bucket_cap_mb=1)
        log = log_buckets(ddp)
        for _ in range(3):
            ddp(torch.randn(3, 256)).sum().backward()
        record = ddp._get_ddp_logging_data()
    finally:
        dist.destroy_process_group()
    assert len(log) == 3
    for st in log:
        assert sorted(n for b in st for n in b["params"]) == sorted(f"{i}.weight" for i in range(9))
        assert sum(b["bytes"] for b in st) == 9 * 256 * 256 * 4
    assert ", ".join(str(b["bytes"]) for b in log[0]) == record["bucket_sizes"]
    assert all(", ".join(str(b["bytes"]) for b in st) == record["rebuilt_bucket_sizes"] for st in log[1:])
