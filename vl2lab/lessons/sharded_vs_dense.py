"""Rank functions for the whole model on N ranks: the sharded model against the single-device one, and a deployment.

Lesson: notebook 04, sections "2. Run it on 4 ranks", "3. Identical answers to one device" and
"5. Communication per generated token".

Every public function here runs on every rank (``vl2lab.run`` initialises the process
group; without one they run as world size 1) and returns plain data.

Tolerance. The sharded model computes every attention and FFN output as a sum of per-rank partial sums added by an
all-reduce, an order the dense matmul never uses, so the prefill logits can differ by rounding. They are checked
like ``torch.testing.assert_close`` with its defaults: |Δ| <= atol + rtol·|ref|, (atol, rtol) = (1e-5, 1.3e-6) in
float32 and (1e-7, 1e-7) in float64 (bfloat16 is reported, not judged). Greedy tokens must be identical.
"""
from __future__ import annotations

import contextlib
import functools
import io
import time
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from vl2lab.lessons.tp_layers import TOLERANCES
from vl2lab.model import build_model
from vl2lab.model.config import get_config
from vl2lab.model.dtypes import as_dtype
from vl2lab.parallel.comm import CommCounter, comm_modules, describe_rank, param_bytes
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.groups import rank_world
from vl2lab.parallel.load import load_sharded
from vl2lab.parallel.plan import ShardingError
from vl2lab.parallel.shard import set_vision_mode, shard_model
from vl2lab.serve.deploy import cleanup_snapshot, deploy, snapshot_for, sync
from vl2lab.serve.generate import main as generate_main
from vl2lab.weights.pretrained import load_pretrained, load_processor

__all__ = ["compare_with_dense", "compare_all", "sharding_error", "check_world", "deploy_and_compare", "picture",
           "test_batches", "greedy_with_logits", "record_order", "TOLERANCES"]



def picture(width: int, height: int, seed: int = 0):
    """A deterministic RGB test picture: colour gradients and a few coloured squares."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    for _ in range(3):
        s = int(rng.integers(8, max(9, min(width, height) // 3)))
        x0, y0 = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
        img[y0:y0 + s, x0:x0 + s] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(img)


def test_batches(processor, with_image: bool, device="cpu") -> dict:
    """'single': one prompt (with one 1×1-tile image: 2 tiles); 'pair': two prompts of different lengths,
    left-padded (images 1×1 and 2×1: 5 tiles, so tile shares are uneven on 2 and 4 ranks)."""
    def conv(text, img):
        user = {"role": "<|User|>", "content": ("<image>\n" if img is not None else "") + text}
        if img is not None:
            user["images"] = [img]
        return [user, {"role": "<|Assistant|>", "content": ""}]
    a, b = (picture(300, 200, 0), picture(600, 300, 1)) if with_image else (None, None)
    return {"single": processor(conversation=conv("What is in the picture?", a)).to(device),
            "pair": processor(conversations=[conv("Describe it.", a), conv(
                "What colour is the biggest square in this picture?", b)]).to(device)}


def _logit_diff(got: torch.Tensor, ref: torch.Tensor, dtype) -> dict:
    got, ref = got.double().cpu(), ref.double().cpu()
    d = (got - ref).abs()
    out = {"max_abs_diff": float(d.max()), "exact": bool((d == 0).all())}
    if dtype in TOLERANCES:
        atol, rtol = TOLERANCES[dtype]
        out.update(atol=atol, rtol=rtol, within_tol=bool((d <= atol + rtol * ref.abs()).all()))
    return out


def record_order(model, counter: CommCounter, log: list) -> list:
    """Hooks that append to ``log``, in the order they run, one entry per forward of the embedding, of each layer's
    attention and feed-forward, and of the LM head: {"step": the language forward it ran in (0 = prefill, 1 = the
    first decode step, ...), "module", "t0", "t1" (perf_counter, the device synchronised: one clock for every
    process of a host), "all_reduce", "all_gather", "all_reduce_bytes", "all_gather_bytes"} — the collectives it
    made, read from ``counter``'s running totals. Returns the handles (remove them when done)."""
    device = next(model.parameters()).device
    mods = comm_modules(model)
    step, open_ = [-1], {}

    def next_step(*_):
        step[0] += 1

    def pre(name, *_):
        sync(device)
        open_[name] = (dict(counter.totals), time.perf_counter())

    def post(name, *_):
        sync(device)
        before, t0 = open_.pop(name)
        log.append({"step": step[0], "module": name, "t0": t0, "t1": time.perf_counter(),
                    **{k: counter.totals[k] - before[k] for k in counter.totals}})
    hooks = [mods.pop("language").register_forward_pre_hook(next_step)]
    for name, mod in mods.items():
        hooks += [mod.register_forward_pre_hook(functools.partial(pre, name)),
                  mod.register_forward_hook(functools.partial(post, name))]
    return hooks


def greedy_with_logits(model, batch, max_new_tokens: int, count: bool = False, order: Optional[list] = None):
    """Greedy tokens [B, N] and the prefill logits generate used (last position of each row, [B, 1, V]); with
    ``count``, also the CommCounter of the call; with ``order`` (a list), the :func:`record_order` log too."""
    first = []
    hooks = [model.language.register_forward_hook(lambda m, a, out: first.append(out[0]) if not first else None)]
    try:
        with CommCounter(comm_modules(model) if count or order is not None else None) as c, torch.no_grad():
            if order is not None:
                hooks += record_order(model, c, order)
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    return tokens.cpu(), first[0].cpu(), c


def _same_as_sharded_in_place(sharded, path, group, moe, dtype, device) -> bool:
    """Whether the whole model loaded, then sharded in place, holds exactly what ``load_sharded`` read."""
    in_place = shard_model(load_pretrained(path, dtype=dtype, device=device)[0], group=group, moe=moe)
    a, b = in_place.state_dict(), sharded.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_combo(model, ref: dict, batches: dict, max_new_tokens: int, dtype) -> dict:
    """Prefill logits and greedy tokens of ``model`` against the dense reference, with the collectives counted."""
    out = {"tokens": {}, "tokens_equal": True, "logits": {}, "collectives_per_block": {}}
    for name, batch in batches.items():
        order = [] if name == "single" else None
        tokens, logits, c = greedy_with_logits(model, batch, max_new_tokens, count=True, order=order)
        out["logits"][name] = _logit_diff(logits, ref[name]["logits"], dtype)
        out["tokens"][name] = tokens
        out["tokens_equal"] &= bool(torch.equal(tokens, ref[name]["tokens"]))
        steps = c.calls["language"]
        if name == "single":
            out["comm_prefill"] = {k: c.totals[k] - sum(s[k] for s in steps[1:]) for k in c.totals}
            out["comm_per_token"] = steps[1] if len(steps) > 1 else None
            out["comm_per_token_constant"] = all(s == steps[1] for s in steps[1:])
            out["decode_order"] = [e for e in order if e["step"] == 1]      # the first decode step, in order
        for mod_name, calls in c.calls.items():
            kind = mod_name.split(".")[-1]
            if kind in ("self_attn", "mlp"):
                seen = out["collectives_per_block"].setdefault(kind, set())
                seen.update((s["all_reduce"], s["all_gather"]) for s in calls)
    out["max_abs_logits"] = max(v["max_abs_diff"] for v in out["logits"].values())
    out["logits_within_tol"] = all(v.get("within_tol", True) for v in out["logits"].values())
    return out


def compare_all(combos: Sequence[tuple] = (("random-tiny", "tp", "replicated"),), max_new_tokens: int = 8,
                seed: int = 0, dtype: str = "float32", with_image: bool = True, group=None,
                reference: Optional[dict] = None, device=None) -> dict:
    """:func:`compare_with_dense` for each (model, moe, vision) of ``combos``, reusing each model's snapshot and
    dense reference, and each (model, moe) shard (the vision mode is switched in place). ``reference``: the
    single-device results of an earlier call ({model: its "reference" entry}), so that a launch need not
    recompute them on every rank. ``device``: this rank's device by default (cuda:LOCAL_RANK under NCCL).
    → {"rank", "world_size", "results": {"model|moe|vision": result}, "reference": {model: {"single"/"pair":
    {"tokens", "logits"}, "dense_param_bytes"}}}."""
    dt = as_dtype(dtype)
    device = torch.device(device) if device is not None else rank_device()
    rank, world = rank_world(group)
    results, refs = {}, {}
    for name in dict.fromkeys(c[0] for c in combos):
        path, made = snapshot_for(name, seed, group)
        try:
            if reference and name in reference:
                ref = reference[name]
                batches = test_batches(load_processor(path, required=True), with_image, device)
            else:
                dense, processor = load_pretrained(path, dtype=dt, device=device)
                batches, ref = test_batches(processor, with_image, device), {"dense_param_bytes": param_bytes(dense)}
                for k, b in batches.items():
                    tokens, logits, _ = greedy_with_logits(dense, b, max_new_tokens)
                    ref[k] = {"tokens": tokens, "logits": logits}
                del dense
            refs[name] = ref
            for moe in dict.fromkeys(c[1] for c in combos if c[0] == name):
                sharded = None
                for vision in [c[2] for c in combos if c[:2] == (name, moe)]:
                    if sharded is None:
                        sharded, _ = load_sharded(path, group=group, moe=moe, vision=vision, dtype=dt, device=device)
                        same = _same_as_sharded_in_place(sharded, path, group, moe, dt, device)
                    set_vision_mode(sharded, vision, group)
                    res = _run_combo(sharded, ref, batches, max_new_tokens, dt)
                    lc = sharded.config.language_config
                    res.update(model=name, moe=moe, vision=sharded.tp_plan["vision"], in_place_equals_loaded=same,
                               layers=lc.num_hidden_layers, hidden=lc.hidden_size, vocab=lc.vocab_size,
                               dense_param_bytes=ref["dense_param_bytes"], param_bytes=param_bytes(sharded),
                               load_report=dict(sharded.load_report), holds=describe_rank(sharded),
                               dense_tokens={k: ref[k]["tokens"] for k in batches})
                    results[f"{name}|{moe}|{res['vision']}"] = res
                del sharded
        finally:
            cleanup_snapshot(path, made, group)
    return {"rank": rank, "world_size": world, "results": results, "reference": refs}


def compare_with_dense(model: str = "random-tiny", moe: str = "tp", vision: str = "replicated",
                       max_new_tokens: int = 8, seed: int = 0, dtype: str = "float32", with_image: bool = True,
                       group=None, device=None) -> dict:
    """Load ``model`` (a preset: random weights written by rank 0 to a temp snapshot; or a snapshot folder)
    whole and sharded on every rank, run the same processor batches ('single': one image + prompt; 'pair': two
    left-padded prompts) through greedy generation on both. Returns tokens_equal, max_abs_logits over the
    prefill logits generate uses (last position of each row) with the tolerance (``logits``), param_bytes (this
    rank) and dense_param_bytes, load_report (bytes read from the snapshot), comm_per_token (collectives of
    one decode step, batch 1), comm_prefill, collectives_per_block ({"self_attn"/"mlp": {(all-reduces,
    all-gathers) seen per forward}}) and holds (:func:`describe_rank`)."""
    out = compare_all(((model, moe, vision),), max_new_tokens, seed, dtype, with_image, group, device=device)
    res = next(iter(out["results"].values()))
    return {"rank": out["rank"], "world_size": out["world_size"], **res}


def sharding_error(heads: int = 3, group=None) -> Optional[str]:
    """The ShardingError a random-small variant with ``heads`` attention heads gives on this world size
    (None when it shards)."""
    cfg = get_config("random-small").replace(num_attention_heads=heads, num_key_value_heads=heads)
    try:
        shard_model(build_model(cfg, device="meta"), group=group)
    except ShardingError as e:
        return str(e)
    return None


def check_world(combos: Sequence[tuple], reference: Optional[dict] = None, max_new_tokens: int = 8,
                bad_heads: Optional[int] = None, generate_argv: Optional[list] = None) -> dict:
    """Everything one launch checks: :func:`compare_all` over ``combos``; with ``bad_heads``, the
    :func:`sharding_error` of that head count; with ``generate_argv``, ``python -m vl2lab.serve.generate``'s main on
    these ranks (its stdout is returned as ``generate_stdout``)."""
    out = compare_all(combos, max_new_tokens=max_new_tokens, reference=reference)
    out.pop("reference")
    if bad_heads is not None:
        out["sharding_error"] = sharding_error(bad_heads)
    if generate_argv is not None:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            out["generate_rc"] = generate_main(list(generate_argv))
        out["generate_stdout"] = buf.getvalue()
    return out


class NoTF32:
    """fp32 means fp32 in the comparisons: TF32 matmuls and convolutions off on CUDA inside the block (restored
    after). Tiles split over ranks (vision="data_parallel") would otherwise meet other TF32 kernels than whole."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


def deploy_and_compare(snapshot_path: str, prompt: str, image_path: Optional[str] = None, moe: str = "tp",
                       vision: str = "replicated", max_new_tokens: int = 16, dtype: str = "float32",
                       compare_dtype: str = "float32", compare_new_tokens: int = 8,
                       moe_modes: Sequence[str] = ("tp", "ep"),
                       vision_modes: Sequence[str] = ("replicated", "data_parallel"), group=None) -> dict:
    """Rank function, everything of one launch: :func:`deploy` (this rank's shard answers ``prompt`` about
    ``image_path``; memory, collectives per token, timings), then :func:`compare_all` at ``compare_dtype`` for every
    (moe, vision) of ``moe_modes`` × ``vision_modes`` against the whole model on this rank's device (TF32 off).
    → {"deploy": deploy's dict, "compare": {"moe|vision": compare_all's result}}."""
    out = {"deploy": deploy(snapshot_path, prompt, image_path, moe=moe, vision=vision,
                            max_new_tokens=max_new_tokens, dtype=dtype, group=group)}
    combos = [(snapshot_path, m, v) for m in moe_modes for v in vision_modes]
    with NoTF32():
        res = compare_all(combos, max_new_tokens=compare_new_tokens, dtype=compare_dtype, group=group)
    out["compare"] = {f"{r['moe']}|{r['vision']}": r for r in res["results"].values()}
    return out


