"""The tuning ladder: the benchmark's fixed workload, one change at a time, every rung measured in the same run.

Lesson: notebook 05, section "The ladder".

    rung                                   what changes                                  expected effect
    1 fp32, eager attention, expert loop   the official code's way: a Python loop over   host sync per expert per
                                           experts with index selection, scores          layer per step; fp32 reads
                                           materialised, fp32 weights                    twice the bytes
    2 bf16                                 weights and activations in bf16               half the bytes
    3 grouped experts                      sort the (token, expert) pairs, one grouped   no host syncs, one kernel
                                           matmul per projection                         per projection
    4 SDPA attention                       fused attention kernels (flash / efficient)   prefill of long prompts
    5 static cache + CUDA graph            one decode step captured, replayed per token  no launch gaps at decode
    6 torch.compile                        the captured step and the vision tower        fewer, fused kernels
                                           compiled
    then batching (batch 32 of the last rung) for images/s.

Each rung is measured at every batch size with :func:`vl2lab.perf.bench.timed` (CUDA events, warm-up, median):
prefill (``generate`` of one token: vision, projector, language-model prefill), decode ms per step
((t(N tokens) − t(1 token)) / (N − 1)), end to end, images/s. The model is built once, on the device, with random
weights in fp32 (no snapshot: the ladder is about speed) and cast to bf16 in place at rung 2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vl2lab.lessons.baseline import attention_kernel

__all__ = ["Rung", "RUNGS", "apply", "measure", "run"]


@dataclass(frozen=True)
class Rung:
    name: str
    dtype: str = "bfloat16"
    experts: str = "grouped"      # Experts.impl: loop | grouped
    attention: str = "sdpa"       # sdpa | math (SDPA's math kernel: the scores materialised, as eager attention)
    decode: str = "eager"         # eager | graph | compile (see vl2lab.model.graph_decode)
    vision: str = "eager"         # eager | compile


RUNGS = (
    Rung("1 fp32 · eager attention · expert loop", dtype="float32", experts="loop", attention="math"),
    Rung("2 bf16", experts="loop", attention="math"),
    Rung("3 grouped experts (no host sync)", attention="math"),
    Rung("4 SDPA attention"),
    Rung("5 static cache + CUDA graph", decode="graph"),
    Rung("6 torch.compile (decode step, vision tower)", decode="compile", vision="compile"),
)


def apply(vl2, rung: Rung) -> None:
    """Put the model in the state the rung describes (dtype casts are one-way: rungs go fp32 → bf16)."""
    dt = getattr(torch, rung.dtype)
    if next(vl2.parameters()).dtype != dt:
        vl2.to(dt)
    vl2.language.set_experts_impl(rung.experts)
    if rung.vision == "compile" and not getattr(vl2, "_vision_compiled", False):
        from vl2lab.model.graph_decode import compile_regions
        layers = next(m for n, m in vl2.vision.named_modules() if n.endswith("encoder.layers"))
        for i, layer in enumerate(compile_regions(list(layers))):
            layers[i] = layer
        vl2._vision_compiled = True


def measure(vl2, processor, rung: Rung, batch_size: int, repeats: int = 3, warmup: int = 1,
            new_tokens: int = 64, seed: int = 0) -> dict:
    """The workload at ``batch_size`` in the rung's state → times (seconds, median/p10/p90) and throughput."""
    from vl2lab.perf.bench import measure_generate, workload_conversation, workload_image

    conv = workload_conversation(processor, workload_image(seed))
    with attention_kernel(rung.attention):
        m = measure_generate(vl2, processor, conv, batch_size, rung.decode, repeats, warmup, new_tokens)
    batch, tiles, vis, pre, e2e, tokens = m["batch"], m["tiles"], m["vision_s"], m["prefill_s"], m["e2e_s"], m["tokens"]
    out = {"rung": rung.name, "batch": batch_size, "vision_s": vis, "prefill_s": pre, "e2e_s": e2e,
           "tiles": int(tiles.shape[0]), "tiles_per_s": tiles.shape[0] / vis["median"],
           "decode_ms_per_step": (e2e["median"] - pre["median"]) / (new_tokens - 1) * 1e3,
           "images_per_s": batch_size / e2e["median"], "prompt_len": int(batch["input_ids"].shape[1]),
           "new_tokens": int(tokens.shape[1]), "tokens": tokens[0, :8].tolist()}
    if "peak_bytes" in m:
        out["peak_bytes"] = m["peak_bytes"]
    return out


def run(model: str = "deepseek-vl2-tiny", device: str = "auto", batch_sizes=(1, 32), repeats: int = 3,
        warmup: int = 1, rungs=RUNGS, new_tokens: int = 64, seed: int = 0, profile: bool = False, log=print,
        out: str | None = None, peer: bool = False) -> dict:
    """Every rung at every batch size, plus the device's ceilings and the workload's floor → one dict (JSON).
    ``profile``: also a :mod:`~vl2lab.perf.step_profile` of batch-1 decode steps at the first and the last rung.
    ``rungs``: :class:`Rung` objects or rung numbers (1-based, :data:`RUNGS`).
    ``peer``: also transformers' own causal LM of the preset (MLA presets), timed the same way
    (:func:`vl2lab.perf.peer.peer_timings`).
    A rung that fails is recorded with its error and the ladder goes on; with ``out`` the JSON is rewritten after
    every measurement, so that a run cut short keeps what it measured."""
    import json
    import time

    from vl2lab.perf import roofline
    from vl2lab.lessons.baseline import build_on_device
    from vl2lab.perf.bench import environment, pick_device
    from vl2lab.weights.checkpoint import project_processor
    from vl2lab.model.config import get_config

    dev = pick_device(device)
    cfg = get_config(model)
    rungs = tuple(RUNGS[r - 1] if isinstance(r, int) else r for r in rungs)
    result = {"model": model, "device": str(dev), "environment": environment(), "repeats": repeats,
              "warmup": warmup, "new_tokens": new_tokens, "rungs": [asdict(r) for r in rungs], "runs": []}
    t0 = time.perf_counter()

    def save():
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=1)

    result["ceilings"] = roofline.measure_device(dev)
    log(f"ceilings: {result['ceilings']['copy_bytes_per_s'] / 1e9:.0f} GB/s copy, "
        f"{result['ceilings']['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s bf16 matmul")
    processor = project_processor(cfg)
    first_dtype = rungs[0].dtype if rungs else "bfloat16"
    vl2 = build_on_device(model, first_dtype, dev, seed)
    result["build_s"] = time.perf_counter() - t0
    for i, rung in enumerate(rungs):
        apply(vl2, rung)
        if profile and i in (0, len(rungs) - 1):
            from vl2lab.perf.step_profile import profile_steps
            try:
                with attention_kernel(rung.attention), torch.inference_mode():
                    p = profile_steps(vl2, processor, 1, 8, rung.decode, seed)
            except Exception as e:  # noqa: BLE001 — recorded, the ladder goes on
                p = {"error": f"{type(e).__name__}: {e}"[:500]}
            result.setdefault("profiles", []).append({"rung": rung.name, **p})
            log(f"profile {rung.name}: {p.get('wall_us', 0):.0f} µs/step wall, "
                f"{p.get('kernels_per_step', 0):.0f} kernels/step {p.get('error', '')}")
        for b in batch_sizes:
            try:
                r = measure(vl2, processor, rung, b, repeats, warmup, new_tokens, seed)
            except Exception as e:  # noqa: BLE001 — recorded, the ladder goes on
                result["runs"].append({"rung": rung.name, "batch": b, "error": f"{type(e).__name__}: {e}"[:500]})
                log(f"{rung.name:<48} b{b:<3} FAILED: {result['runs'][-1]['error']}")
                continue
            result["runs"].append(r)
            save()
            log(f"{rung.name:<48} b{b:<3} prefill {r['prefill_s']['median'] * 1e3:8.1f} ms  decode "
                f"{r['decode_ms_per_step']:8.2f} ms/step  {r['images_per_s']:7.2f} img/s  "
                f"vision {r['tiles_per_s']:6.0f} tiles/s")
    for b in batch_sizes:
        run0 = next((r for r in result["runs"] if r["batch"] == b and "error" not in r), None)
        if run0 is None:
            continue
        result.setdefault("floor", {})[str(b)] = roofline.workload_floor(
            cfg, b, run0["prompt_len"], new_tokens, run0["tiles"] // b, result["ceilings"])
    if peer:
        from vl2lab.perf.peer import peer_timings
        try:
            prompt = next(r["prompt_len"] for r in result["runs"] if "prompt_len" in r)
            result["peer"] = peer_timings(model, batch_sizes, prompt, new_tokens, dev, repeats, warmup)
        except Exception as e:  # noqa: BLE001 — recorded
            result["peer"] = [{"error": f"{type(e).__name__}: {e}"[:500]}]
        log(f"peer: {result['peer']}")
    result["wall_s"] = time.perf_counter() - t0
    save()
    return result


def run_ranks(model: str = "deepseek-vl2-small", layout: str = "tp", batch_sizes=(1, 32), decode: str = "graph",
              moe: str = "tp", repeats: int = 3, warmup: int = 1, new_tokens: int = 64, seed: int = 0) -> dict:
    """Rank function: the workload on every rank of the launch, as one tensor-parallel model (``layout="tp"``:
    :func:`vl2lab.parallel.shard.shard_model`, requests as one batch) or as independent data-parallel replicas
    (``"dp"``: each rank its own whole model and its own batch, all at once). Each rank builds the same random
    model on its device (same seed), so no snapshot is needed. Also times bf16 all-reduces of one decode step's
    message (batch × hidden × 2 bytes) on the launch's backend. Returns this rank's measurements, peak memory
    and the planner's prediction for it.

    Lesson: notebook 05, section "Tensor parallelism or data-parallel replicas"."""
    import torch.distributed as dist

    from vl2lab.planner import sizing
    from vl2lab.lessons.baseline import build_on_device
    from vl2lab.weights.checkpoint import project_processor
    from vl2lab.perf.collectives import bench_collectives
    from vl2lab.model.config import get_config
    from vl2lab.parallel.groups import device as rank_device

    if layout not in ("tp", "dp"):
        raise ValueError(f"layout must be 'tp' or 'dp', got {layout!r}")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = rank_device()
    cfg = get_config(model)
    processor = project_processor(cfg)
    vl2 = build_on_device(model, "bfloat16", dev, seed)
    if layout == "tp" and world > 1:
        from vl2lab.parallel.shard import shard_model
        shard_model(vl2, moe=moe)
    rung = Rung(f"{layout}{world} {decode}", decode=decode)
    apply(vl2, rung)
    runs = []
    for b in batch_sizes:
        dist.barrier()
        r = measure(vl2, processor, rung, b, repeats, warmup, new_tokens, seed)
        dist.barrier()
        runs.append(r)
    tp = world if layout == "tp" else 1
    pred = sizing.layout_bytes(cfg, tp=tp, dtype="bfloat16", batch=max(batch_sizes),
                               seq_len=runs[-1]["prompt_len"] + new_tokens, tiles=runs[-1]["tiles"] // max(batch_sizes))
    h = cfg.language_config.hidden_size
    comm = bench_collectives(sizes_bytes=tuple(b * h * 2 for b in batch_sizes), repeats=50, ops=("all_reduce",),
                             dtype="bfloat16") if world > 1 else None
    return {"rank": rank, "world_size": world, "layout": layout, "model": model, "decode": decode, "runs": runs,
            "predicted_bytes": {k: v for k, v in pred.items() if isinstance(v, (int, float))},
            "all_reduce": comm["ops"]["all_reduce"] if comm else None, "backend": dist.get_backend()}


def main(argv=None) -> int:
    """``python -m vl2lab.perf.ladder --model deepseek-vl2-tiny --batch 1,32 --out FILE [--profile]``"""
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(prog="python -m vl2lab.perf.ladder", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek-vl2-tiny", help="preset (random weights at its size)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--rungs", default=None, help="comma-separated rung numbers (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="also profile decode steps of the first and last rung")
    ap.add_argument("--peer", action="store_true", help="also time transformers' own LM of the preset (MLA only)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    a = ap.parse_args(argv)
    rungs = RUNGS if a.rungs is None else tuple(RUNGS[int(i) - 1] for i in a.rungs.split(","))
    res = run(a.model, a.device, [int(b) for b in a.batch.split(",")], a.repeats, a.warmup, rungs, a.new_tokens,
              profile=a.profile, out=a.out, peer=a.peer)
    text = json.dumps(res, indent=1)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
