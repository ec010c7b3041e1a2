"""Rank functions for the whole model on N ranks: the sharded model against the single-device one, and a deployment.

Lesson: notebook 04 (full 4-GPU deployment), sections 4-6.

Every public function except :func:`describe_rank` runs on every rank (``vl2lab.run`` initialises the process
group; without one they run as world size 1) and returns plain data.

Tolerance. The sharded model computes every attention and FFN output as a sum of per-rank partial sums added by an
all-reduce, an order the dense matmul never uses, so the prefill logits can differ by rounding. They are checked
like ``torch.testing.assert_close`` with its defaults: |Δ| <= atol + rtol·|ref|, (atol, rtol) = (1e-5, 1.3e-6) in
float32 and (1e-7, 1e-7) in float64 (bfloat16 is reported, not judged). Greedy tokens must be identical.
"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from vl2lab.parallel.layers import _rank_world
from vl2lab.parallel.load import as_dtype, load_sharded
from vl2lab.parallel.shard import CommCounter, ShardingError, comm_modules, param_bytes, set_vision_mode, shard_model

__all__ = ["compare_with_dense", "compare_all", "deploy", "describe_rank", "sharding_error", "check_world", "picture",
           "TOLERANCES"]

TOLERANCES = {torch.float32: (1e-5, 1.3e-6), torch.float64: (1e-7, 1e-7)}


def picture(width: int, height: int, seed: int = 0):
    """A deterministic RGB test picture: colour gradients and a few coloured squares."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    for _ in range(3):
        s = int(rng.integers(8, max(9, min(width, height) // 3)))
        x0, y0 = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
        img[y0:y0 + s, x0:x0 + s] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(img)


def _is_preset(model: str) -> bool:
    from vl2lab.model.config import PRESETS

    return not os.path.isdir(model) and model in PRESETS


def _snapshot(model: str, seed: int, group) -> tuple[str, bool]:
    """(snapshot folder, made here): a folder as is; a preset → random weights saved by rank 0 in a temp dir
    (split into several files), the path broadcast to every rank."""
    if not _is_preset(model):
        return model, False
    from vl2lab.weights.checkpoint import make_random_snapshot

    rank, world = _rank_world(group)
    path = [None]
    if rank == 0:
        path[0] = make_random_snapshot(tempfile.mkdtemp(prefix=f"vl2lab-{model}-"), model, seed=seed,
                                       max_shard_bytes=1 << 20)
    if world > 1:
        dist.broadcast_object_list(path, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return path[0], True


def _barrier(group) -> None:
    if _rank_world(group)[1] > 1:
        if dist.get_backend(group) == "nccl":
            dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=group)


def _cleanup(path: str, made: bool, group) -> None:
    rank, _ = _rank_world(group)
    _barrier(group)
    if made and rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def _batches(processor, with_image: bool, device="cpu") -> dict:
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


def describe_rank(model) -> dict:
    """What this rank holds: heads, KV cache, vocab rows, FFN widths, experts, vision mode, parameter bytes."""
    from vl2lab.model.attention import MLAttention
    from vl2lab.model.moe import MoE

    plan = getattr(model, "tp_plan", None) or {"rank": 0, "world_size": 1, "moe": "-", "vision": "replicated"}
    lm = model.language
    at = lm.model.layers[0].self_attn
    mla = isinstance(at, MLAttention)
    unit = at.q_head_dim if mla else at.head_dim
    emb = lm.model.embed_tokens
    out = {"rank": plan["rank"], "world_size": plan["world_size"], "moe": plan["moe"], "vision": plan["vision"],
           "heads": at.q_proj.weight.shape[0] // unit,
           "kv_cache": "latent c + k_pe (replicated)" if mla else f"K,V of {at.k_proj.weight.shape[0] // unit} heads",
           "vocab_rows": (getattr(emb, "start", 0), getattr(emb, "end", emb.weight.shape[0])),
           "param_bytes": param_bytes(model)}
    for ly in lm.model.layers:
        if not isinstance(ly.mlp, MoE):
            out["dense_width"] = ly.mlp.gate_proj.weight.shape[0]
            continue
        ex = ly.mlp.experts
        out["experts"] = (ex.expert_start, ex.expert_start + ex.n_local_experts)
        out["expert_width"] = ex.gate_proj.shape[1]
        if ly.mlp.shared_experts is not None:
            out["shared_width"] = ly.mlp.shared_experts.gate_proj.weight.shape[0]
    return out


def _generate(model, batch, max_new_tokens: int, count: bool = False):
    """Greedy tokens [B, N] and the prefill logits generate used (last position of each row, [B, 1, V]); with
    ``count``, also the CommCounter of the call."""
    first = []
    hook = model.language.register_forward_hook(lambda m, a, out: first.append(out[0]) if not first else None)
    try:
        with CommCounter(comm_modules(model) if count else None) as c, torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        hook.remove()
    return tokens.cpu(), first[0].cpu(), c


def _same_as_sharded_in_place(sharded, path, group, moe, dtype, device) -> bool:
    """Whether the whole model loaded, then sharded in place, holds exactly what ``load_sharded`` read."""
    from vl2lab.weights.checkpoint import load_pretrained

    in_place = shard_model(load_pretrained(path, dtype=dtype, device=device)[0], group=group, moe=moe)
    a, b = in_place.state_dict(), sharded.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_combo(model, ref: dict, batches: dict, max_new_tokens: int, dtype) -> dict:
    """Prefill logits and greedy tokens of ``model`` against the dense reference, with the collectives counted."""
    out = {"tokens": {}, "tokens_equal": True, "logits": {}, "collectives_per_block": {}}
    for name, batch in batches.items():
        tokens, logits, c = _generate(model, batch, max_new_tokens, count=True)
        out["logits"][name] = _logit_diff(logits, ref[name]["logits"], dtype)
        out["tokens"][name] = tokens
        out["tokens_equal"] &= bool(torch.equal(tokens, ref[name]["tokens"]))
        steps = c.calls["language"]
        if name == "single":
            out["comm_prefill"] = {k: c.totals[k] - sum(s[k] for s in steps[1:]) for k in c.totals}
            out["comm_per_token"] = steps[1] if len(steps) > 1 else None
            out["comm_per_token_constant"] = all(s == steps[1] for s in steps[1:])
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
    from vl2lab.weights.checkpoint import _load_processor, load_pretrained
    from vl2lab.parallel.groups import device as rank_device

    dt = as_dtype(dtype)
    device = torch.device(device) if device is not None else rank_device()
    rank, world = _rank_world(group)
    results, refs = {}, {}
    for name in dict.fromkeys(c[0] for c in combos):
        path, made = _snapshot(name, seed, group)
        try:
            if reference and name in reference:
                ref = reference[name]
                batches = _batches(_load_processor(path), with_image, device)
            else:
                dense, processor = load_pretrained(path, dtype=dt, device=device)
                batches, ref = _batches(processor, with_image, device), {"dense_param_bytes": param_bytes(dense)}
                for k, b in batches.items():
                    tokens, logits, _ = _generate(dense, b, max_new_tokens)
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
            _cleanup(path, made, group)
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
    from vl2lab.model.config import get_config
    from vl2lab.model import build_model

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
    import contextlib
    import io

    out = compare_all(combos, max_new_tokens=max_new_tokens, reference=reference)
    out.pop("reference")
    if bad_heads is not None:
        out["sharding_error"] = sharding_error(bad_heads)
    if generate_argv is not None:
        from vl2lab.serve.generate import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            out["generate_rc"] = main(list(generate_argv))
        out["generate_stdout"] = buf.getvalue()
    return out


def _peak_memory(device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024        # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None
    return {"peak_rss_bytes": rss, "peak_cuda_bytes": cuda}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def forward_intervals(module, device, store: list):
    """Hooks that append [t_start, t_end] (perf_counter, the device synchronised) of every forward of ``module``
    to ``store``; returns the handles (remove them when done)."""
    def pre(*_):
        _sync(device)
        store.append([time.perf_counter(), None])

    def post(*_):
        _sync(device)
        store[-1][1] = time.perf_counter()
    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def deploy(snapshot_path: str, prompt: str = "Describe the image.", image_path: Optional[str] = None,
           moe: str = "tp", vision: str = "replicated", max_new_tokens: int = 32, dtype: str = "float32",
           seed: int = 0, device=None, group=None) -> dict:
    """Load this rank's shard of ``snapshot_path`` (or of a preset's random weights), answer ``prompt`` about
    ``image_path`` greedily, and return the answer text and tokens, this rank's memory (parameter bytes, bytes
    read, peak RSS / CUDA) and timings (load, vision + embedding, prefill, decode; seconds)."""
    from PIL import Image

    from vl2lab.parallel.groups import device as rank_device

    rank, world = _rank_world(group)
    device = torch.device(device) if device is not None else rank_device()
    image = Image.open(image_path).convert("RGB") if image_path else None   # a bad path fails before loading
    import transformers.models.siglip.modeling_siglip  # noqa: F401  (imported before the load is timed)
    path, made = _snapshot(snapshot_path, seed, group)
    try:
        t0 = time.perf_counter()
        model, processor = load_sharded(path, group=group, moe=moe, vision=vision, dtype=dtype, device=device)
        _sync(device)
        load_s = time.perf_counter() - t0
    finally:
        _cleanup(path, made, group)
    if processor is None:
        raise FileNotFoundError(f"{path} has no tokenizer.json: the snapshot needs its processor files to answer")
    user = {"role": "<|User|>", "content": prompt}
    if image is not None:
        user["content"] = "<image>\n" + prompt
        user["images"] = [image]
    batch = processor(conversation=[user, {"role": "<|Assistant|>", "content": ""}]).to(device, as_dtype(dtype))
    spans: list = []                                                 # [start, end] of each language forward
    hooks = forward_intervals(model.language, device, spans)
    try:
        with CommCounter(comm_modules(model)) as c:
            t0 = time.perf_counter()
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            _sync(device)
            total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    steps = len(spans)
    decode_s = sum(b - a for a, b in spans[1:])
    n_new = int((tokens[0] != model.pad_token_id).sum()) if getattr(model, "pad_token_id", None) is not None \
        else tokens.shape[1]
    return {"rank": rank, "world_size": world, "moe": moe, "vision": model.tp_plan["vision"], "dtype": dtype,
            "device": str(device), "random_weights": made, "prompt_tokens": int(batch["input_ids"].shape[1]),
            "answer": processor.decode(tokens[0]), "tokens": tokens.cpu(),
            "memory": {"param_bytes": param_bytes(model), **_peak_memory(device),
                       **{k: v for k, v in model.load_report.items() if k not in ("rank", "world_size")}},
            "holds": describe_rank(model),
            "comm_per_token": c.calls["language"][1] if steps > 1 else None,
            "timings": {"load_s": load_s, "vision_embed_s": spans[0][0] - t0 if spans else None,
                        "prefill_s": spans[0][1] - spans[0][0] if spans else None, "decode_s": decode_s,
                        "decode_steps": steps - 1, "new_tokens": n_new, "generate_s": total,
                        "decode_tokens_per_s": (steps - 1) / decode_s if decode_s > 0 else None}}


# ------------------------------------------------------------------- notebook 04: the deployment in few launches
def holdings_plan(config, world_size: int) -> dict:
    """What each rank holds under ``moe`` = "tp" and "ep", computed from the config alone (no model, no launch):
    {moe: [one row per rank] or the ShardingError message}. Row: heads (count and [start, end) of the head
    index), vocab rows [start, end), dense / shared widths, experts [start, end) and expert width (moe="tp":
    every expert, a slice of its width; moe="ep": whole experts). The counts are what :func:`describe_rank`
    reports from a sharded model."""
    from vl2lab.parallel.layers import shard_range
    from vl2lab.parallel.shard import MOE_MODES, check_plan, ffn_unit

    lc = getattr(config, "language_config", config)
    out = {}
    for moe in MOE_MODES:
        try:
            check_plan(lc, world_size, moe)
        except ShardingError as e:
            out[moe] = str(e)
            continue
        rows = []
        for r in range(world_size):
            h = shard_range(lc.num_attention_heads, r, world_size)
            row = {"rank": r, "heads": h[1] - h[0], "head_range": h,
                   "vocab_rows": shard_range(lc.vocab_size, r, world_size)}
            if any(not lc.is_moe_layer(i) for i in range(lc.num_hidden_layers)):
                a, b = shard_range(lc.intermediate_size, r, world_size, ffn_unit(lc.intermediate_size, world_size))
                row["dense_width"] = b - a
            if lc.is_moe:
                S = lc.moe_intermediate_size * (lc.n_shared_experts or 0)
                if S:
                    a, b = shard_range(S, r, world_size, ffn_unit(S, world_size))
                    row["shared_width"] = b - a
                I, E = lc.moe_intermediate_size, lc.n_routed_experts
                if moe == "ep":
                    row["experts"], row["expert_width"] = shard_range(E, r, world_size), I
                else:
                    a, b = shard_range(I, r, world_size, ffn_unit(I, world_size))
                    row["experts"], row["expert_width"] = (0, E), b - a
            rows.append(row)
        out[moe] = rows
    return out


class _NoTF32:
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
    with _NoTF32():
        res = compare_all(combos, max_new_tokens=compare_new_tokens, dtype=compare_dtype, group=group)
    out["compare"] = {f"{r['moe']}|{r['vision']}": r for r in res["results"].values()}
    return out


def die_after_first_token(snapshot_path: str, dying_rank: int = 1, prompt: str = "Describe the image.",
                          image_path: Optional[str] = None, moe: str = "tp", dtype: str = "float32",
                          max_new_tokens: int = 8, exit_code: int = 3, group=None) -> dict:
    """Rank function: the deployment of :func:`deploy`, except that rank ``dying_rank`` ends its process with
    ``os._exit(exit_code)`` as soon as the first token is chosen (when the second forward starts), the way a
    crash or the out-of-memory killer ends it: no exception, no status file. The other ranks wait for it in their
    next collective until the launcher stops them; ``vl2lab.run`` then raises RankFailedError naming it."""
    from PIL import Image

    rank, world = _rank_world(group)
    if not 0 <= dying_rank < world:
        raise ValueError(f"dying_rank={dying_rank} is not a rank of this launch (0..{world - 1})")
    model, processor = load_sharded(snapshot_path, group=group, moe=moe, dtype=dtype)
    user = {"role": "<|User|>", "content": prompt}
    if image_path:
        user = {"role": "<|User|>", "content": "<image>\n" + prompt, "images": [Image.open(image_path).convert("RGB")]}
    batch = processor(conversation=[user, {"role": "<|Assistant|>", "content": ""}])
    batch = batch.to(next(model.parameters()).device, as_dtype(dtype))
    calls = []

    def maybe_die(*_):
        calls.append(1)
        if rank == dying_rank and len(calls) == 2:
            print(f"[rank {rank}] first token chosen; this process now ends (os._exit({exit_code}))", flush=True)
            os._exit(exit_code)
    model.language.register_forward_pre_hook(maybe_die)
    tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return {"rank": rank, "tokens": tokens.cpu()}                    # never reached when a rank died
