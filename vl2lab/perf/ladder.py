"""The tuning ladder, run: the fixed workload at every rung (:mod:`vl2lab.perf.rungs`), every rung measured in the
same run, beside the device's ceilings and the workload's floor: ``python -m vl2lab.perf.ladder``.

Lesson: notebook 05, sections "2. The ladder, run here" and "7. Tensor parallelism or data-parallel replicas".

Each rung is measured at every batch size with :func:`vl2lab.perf.rungs.measure` (CUDA events, warm-up, medians;
each decode step timed on its own). The rank reports which rung and batch it runs (:mod:`vl2lab.launch.progress`).
The model is built once, on the device, with random weights in the first rung's dtype (no snapshot: the ladder is
about speed) and cast to bf16 in place at rung 2. With ``--e2e`` the last rung at the largest batch is also
measured from image files to answers, preprocessing in the main process and then in worker processes
(:mod:`vl2lab.perf.pipeline_e2e`): ``end_to_end`` in the JSON. After the rungs, one eager generation per batch
size counts the routed experts a decode step reads (:mod:`vl2lab.perf.routing`): ``experts_read``, and
``floor_routed``, the floor at that count, beside ``floor`` (uniform routing). :func:`run` is one device;
:func:`run_ranks` is the rank function that runs the workload as one tensor-parallel model or as data-parallel
replicas.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from vl2lab.launch import progress
from vl2lab.launch.options import at_least
from vl2lab.model.attention import attention_kernel
from vl2lab.model.build import build_on_device
from vl2lab.model.config import get_config
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.shard import shard_model
from vl2lab.perf import roofline
from vl2lab.perf.collectives import bench_collectives
from vl2lab.perf.peer import peer_timings
from vl2lab.perf.pipeline_e2e import end_to_end_runs
from vl2lab.perf.routing import experts_read
from vl2lab.perf.rungs import RUNGS, Rung, apply, measure
from vl2lab.perf.step_profile import profile_steps
from vl2lab.perf.workload import environment, pick_device
from vl2lab.planner.layouts import layout_bytes
from vl2lab.weights.pretrained import project_processor

__all__ = ["Rung", "RUNGS", "run", "run_ranks", "parser", "main"]


def run(model: str = "deepseek-vl2-tiny", device: str = "auto", batch_sizes=(1, 32), repeats: int = 3,
        warmup: int = 1, rungs=RUNGS, new_tokens: int = 64, seed: int = 0, profile: bool = False, log=print,
        out: str | None = None, peer: bool = False, e2e: bool = False, e2e_workers: int = 4,
        e2e_images: int | None = None) -> dict:
    """Every rung at every batch size, plus the device's ceilings and the workload's floor → one dict (JSON).
    ``profile``: also a :mod:`~vl2lab.perf.step_profile` of batch-1 decode steps at the first and the last rung.
    ``rungs``: :class:`Rung` objects or rung numbers (1-based, :data:`RUNGS`).
    ``peer``: also transformers' own causal LM of the preset (MLA presets), timed the same way
    (:func:`vl2lab.perf.peer.peer_timings`).
    ``e2e``: also the last rung at the largest batch from ``e2e_images`` files (default 8 batches) to answers, with 0
    and ``e2e_workers`` preprocessing workers (:func:`vl2lab.perf.pipeline_e2e.end_to_end_runs`), beside that rung's
    images/s from a ready batch.
    A rung that fails is recorded with its error and the ladder goes on; with ``out`` the JSON is rewritten after
    every measurement, so that a run cut short keeps what it measured."""
    dev = pick_device(device)
    cfg = get_config(model)
    rungs = tuple(RUNGS[r - 1] if isinstance(r, int) else r for r in rungs)
    result = {"model": model, "device": str(dev), "environment": environment(), "repeats": repeats,
              "warmup": warmup, "new_tokens": new_tokens, "rungs": [asdict(r) for r in rungs], "runs": []}
    t0 = time.perf_counter()
    todo, done = len(rungs) * len(batch_sizes), 0

    def save():
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=1)

    progress.report("measuring the device's ceilings (copy, matmul)")
    result["ceilings"] = roofline.measure_device(dev)
    log(f"ceilings: {result['ceilings']['copy_bytes_per_s'] / 1e9:.0f} GB/s copy, "
        f"{result['ceilings']['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s bf16 matmul")
    processor = project_processor(cfg)
    progress.report(f"building {model} on {dev}")
    first_dtype = rungs[0].dtype if rungs else "bfloat16"
    vl2 = build_on_device(model, first_dtype, dev, seed)
    result["build_s"] = time.perf_counter() - t0
    for i, rung in enumerate(rungs):
        apply(vl2, rung)
        if profile and i in (0, len(rungs) - 1):
            progress.report(f"rung {i + 1}/{len(rungs)} {rung.name}: profiling decode steps", done, todo)
            try:
                with attention_kernel(rung.attention), torch.inference_mode():
                    p = profile_steps(vl2, processor, 1, 8, rung.decode, seed)
            except Exception as e:  # noqa: BLE001 — recorded, the ladder goes on
                p = {"error": f"{type(e).__name__}: {e}"[:500]}
            result.setdefault("profiles", []).append({"rung": rung.name, **p})
            log(f"profile {rung.name}: {p.get('wall_us', 0):.0f} µs/step wall, "
                f"{p.get('kernels_per_step', 0):.0f} kernels/step {p.get('error', '')}")
        for b in batch_sizes:
            progress.report(f"rung {i + 1}/{len(rungs)} {rung.name}: batch {b}, {new_tokens} tokens × "
                            f"{warmup} + {repeats} runs", done, todo)
            done += 1
            try:
                r = measure(vl2, processor, rung, b, repeats, warmup, new_tokens, seed)
            except Exception as e:  # noqa: BLE001 — recorded, the ladder goes on
                result["runs"].append({"rung": rung.name, "batch": b, "error": f"{type(e).__name__}: {e}"[:500]})
                log(f"{rung.name:<48} b{b:<3} FAILED: {result['runs'][-1]['error']}")
                continue
            result["runs"].append(r)
            save()
            d = r["decode_step_s"] or {"median": float("nan"), "p10": float("nan"), "p90": float("nan")}
            log(f"{rung.name:<48} b{b:<3} prefill {r['prefill_s']['median'] * 1e3:8.1f} ms  decode "
                f"{d['median'] * 1e3:8.2f} ms/step (p10 {d['p10'] * 1e3:.2f}, p90 {d['p90'] * 1e3:.2f})  "
                f"{r['images_per_s']:7.2f} img/s  vision {r['tiles_per_s']:6.0f} tiles/s")
    for b in batch_sizes:
        run0 = next((r for r in result["runs"] if r["batch"] == b and "error" not in r), None)
        if run0 is None:
            continue
        floor_args = (cfg, b, run0["prompt_len"], new_tokens, run0["tiles"] // b, result["ceilings"])
        result.setdefault("floor", {})[str(b)] = roofline.workload_floor(*floor_args)
        progress.report(f"counting the experts a decode step of batch {b} reads", todo, todo)
        try:
            with attention_kernel(rungs[-1].attention):
                read = experts_read(vl2, processor, b, new_tokens, seed)
        except Exception as e:  # noqa: BLE001 — recorded, the ladder goes on
            read = {"error": f"{type(e).__name__}: {e}"[:500]}
        if read is not None:
            result.setdefault("experts_read", {})[str(b)] = read
        if read and "mean" in read:
            result.setdefault("floor_routed", {})[str(b)] = roofline.workload_floor(*floor_args, touched=read["mean"])
            log(f"batch {b}: a decode step reads {read['mean']:.1f} routed experts per layer (uniform routing: "
                f"{read['uniform']:.1f}); decode floor {result['floor'][str(b)]['decode_s_per_step'] * 1e3:.2f} ms, "
                f"at the counted experts {result['floor_routed'][str(b)]['decode_s_per_step'] * 1e3:.2f} ms")
    if peer:
        progress.report(f"transformers' own {model} language model (the peer)", todo, todo)
        try:
            prompt = next(r["prompt_len"] for r in result["runs"] if "prompt_len" in r)
            result["peer"] = peer_timings(model, batch_sizes, prompt, new_tokens, dev, repeats, warmup)
        except Exception as e:  # noqa: BLE001 — recorded
            result["peer"] = [{"error": f"{type(e).__name__}: {e}"[:500]}]
        log(f"peer: {result['peer']}")
    if e2e and rungs:
        rung, b = rungs[-1], max(batch_sizes)
        progress.report(f"end to end: {rung.name}, batch {b}, from files, 0 and {e2e_workers} workers", todo, todo)
        ready = next((r["images_per_s"] for r in result["runs"] if (r["rung"], r["batch"]) == (rung.name, b)
                      and "error" not in r), None)
        try:
            with attention_kernel(rung.attention):
                runs = end_to_end_runs(vl2, processor, b, (0, e2e_workers), e2e_images, new_tokens, rung.decode,
                                       seed, device=dev)
            result["end_to_end"] = {"rung": rung.name, "ready_batch_images_per_s": ready, **runs}
            log("end to end: " + ", ".join(f"{r['num_workers']} workers {r['images_per_s']:.2f} img/s (waited "
                                           f"{r['wait_fraction']:.0%})" for r in runs["runs"])
                + f"; ready batch {ready or float('nan'):.2f} img/s")
        except Exception as e:  # noqa: BLE001 — recorded
            result["end_to_end"] = {"rung": rung.name, "batch": b, "error": f"{type(e).__name__}: {e}"[:500]}
            log(f"end to end FAILED: {result['end_to_end']['error']}")
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
    if layout not in ("tp", "dp"):
        raise ValueError(f"layout must be 'tp' or 'dp', got {layout!r}")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = rank_device()
    cfg = get_config(model)
    processor = project_processor(cfg)
    vl2 = build_on_device(model, "bfloat16", dev, seed)
    if layout == "tp" and world > 1:
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
    pred = layout_bytes(cfg, tp=tp, dtype="bfloat16", batch=max(batch_sizes),
                        seq_len=runs[-1]["prompt_len"] + new_tokens, tiles=runs[-1]["tiles"] // max(batch_sizes))
    h = cfg.language_config.hidden_size
    comm = bench_collectives(sizes_bytes=tuple(b * h * 2 for b in batch_sizes), repeats=50, ops=("all_reduce",),
                             dtype="bfloat16") if world > 1 else None
    return {"rank": rank, "world_size": world, "layout": layout, "model": model, "decode": decode, "runs": runs,
            "predicted_bytes": {k: v for k, v in pred.items() if isinstance(v, (int, float))},
            "all_reduce": comm["ops"]["all_reduce"] if comm else None, "backend": dist.get_backend()}


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m vl2lab.perf.ladder``."""
    ap = argparse.ArgumentParser(prog="python -m vl2lab.perf.ladder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-vl2-tiny",
                    help="preset: random weights at its real size, built on the device (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto (the first GPU if any, else the CPU), cpu, cuda, cuda:N "
                                                     "(default: %(default)s)")
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default: %(default)s)")
    ap.add_argument("--rungs", default=None,
                    help="comma-separated rung numbers, 1-based: " + "; ".join(f"{r.name}" for r in RUNGS)
                    + " (default: all)")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="timed runs per measurement; the median is reported "
                                                           "(default: %(default)s)")
    ap.add_argument("--warmup", type=at_least(0), default=1, help="untimed runs before them (default: %(default)s)")
    ap.add_argument("--new-tokens", type=at_least(1), default=64, help="tokens generated per request, EOS ignored "
                                                               "(default: %(default)s)")
    ap.add_argument("--seed", type=at_least(0), default=0, help="seed of the random weights and of the test picture "
                                                        "(default: %(default)s)")
    ap.add_argument("--profile", action="store_true", help="also profile decode steps of the first and last rung")
    ap.add_argument("--peer", action="store_true", help="also time transformers' own LM of the preset (MLA only)")
    ap.add_argument("--e2e", action="store_true", help="also the last rung at the largest batch from image files to "
                                                       "answers, preprocessing with 0 and --e2e-workers workers")
    ap.add_argument("--e2e-workers", type=int, default=4, help="preprocessing worker processes for --e2e "
                                                               "(default: %(default)s)")
    ap.add_argument("--e2e-images", type=int, default=None, help="image files for --e2e (default: 8 batches)")
    ap.add_argument("--out", default=None, help="write the JSON here, rewritten after every measurement "
                                                "(default: print it)")
    return ap


def main(argv=None) -> int:
    """``python -m vl2lab.perf.ladder --model deepseek-vl2-tiny --batch 1,32 --out FILE [--profile] [--e2e]``"""
    a = parser().parse_args(argv)
    rungs = RUNGS if a.rungs is None else tuple(int(i) for i in a.rungs.split(","))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    res = run(a.model, a.device, [int(b) for b in a.batch.split(",")], a.repeats, a.warmup, rungs, a.new_tokens,
              seed=a.seed, profile=a.profile, out=a.out, peer=a.peer, e2e=a.e2e, e2e_workers=a.e2e_workers,
              e2e_images=a.e2e_images)
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
