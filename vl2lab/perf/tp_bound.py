"""The best speed-up tensor parallelism can give one workload on N GPUs, from measured ceilings and all-reduce times.

Lesson: notebook 04, section "7. The article checked".

Inputs, all measured: one GPU's copy bandwidth BW (bytes/s) and bf16 matmul rate F (FLOP/s) — the ``ceilings`` of
a bench or ladder result (:func:`vl2lab.perf.roofline.measure_device`) — and t_ar(S), the time of one all-reduce of
S bytes between the GPUs (:func:`vl2lab.perf.collectives.nccl_settings_sweep`). The work is the floor of
:mod:`vl2lab.perf.roofline` (B sequences, one image of ``tiles`` tiles each, a prompt of P positions, G new tokens,
mean context C = P + G/2), cut into what N ranks share and what every rank repeats::

    replicated  R = norms + router + MLA's kv_a_proj_with_mqa (params);  MLA: the latent KV cache too
    decode      t_step(N) = (D − D_R) / (N·BW) + D_R / BW + (2L + 1) · t_ar(B·H·b)
    prefill     t_pre(N)  = max(c·((1 − ρ_c)/N + ρ_c), m·((1 − ρ_m)/N + ρ_m)) + (2L + 1) · t_ar(B·P·H·b)
    vision      t_vis(N)  = t_vis(1) (the tower is replicated)   or  ⌈B·tiles / N⌉ tiles' worth (data_parallel)
    T(N) = t_vis(N) + t_pre(N) + (G − 1) · t_step(N),     speed-up bound  S(N) = T(1) / T(N)

where D is the decode step's bytes (weights read once, touched experts, KV cache), D_R its replicated part, c and m
the one-GPU prefill compute and weight-read times (c = 2·B·P·activated / F, m = LM bytes / BW), ρ their replicated
shares, L layers, H hidden, b bytes per value. At N = 1 no collective runs and T(1) is the roofline's floor.

Why a bound: the split is perfectly even (vl2lab splits 10 heads 3, 3, 2, 2: the largest share sets the pace),
kernels reach the ceilings, nothing is lost to launches or host work (a rank launches every kernel of every layer
whatever N is), and the logits all-gather is free. Longer answers weigh decode more: over every answer length the
speed-up never exceeds ``best_speedup`` = max(t_step(1)/t_step(N), (t_vis + t_pre)(1) / (t_vis + t_pre)(N)).

t_ar from measured points (bytes, seconds): an all-reduce of S bytes takes at least the fastest time measured for
any size ≤ S (bigger messages are never faster); below the smallest measured size, that size's time (small
all-reduces cost a fixed latency: the measured times barely change from 4 to 64 KiB).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re

from vl2lab.model.config import VL2Config
from vl2lab.model.dtypes import dtype_bytes
from vl2lab.perf.collectives import decode_collectives
from vl2lab.perf.roofline import decode_bytes, prefill_floor_s, vision_floor_s
from vl2lab.perf.workload import NEW_TOKENS
from vl2lab.planner.layouts import rank_weight_params
from vl2lab.planner.sizing import param_counts

__all__ = ["RESULTS", "allreduce_time", "free_allreduce", "recorded_ceilings", "recorded_allreduce",
           "split_floor", "tp_speedup_bound"]

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "results")
PROMPT_LEN, TILES = 1055, 5          # the fixed workload: 1023 image tokens + a 32-token prompt; 5 tiles (768²)
_REPLICATED_LM = ("norms", "router", "kv_a_proj")   # the LM's replicated parts (vl2lab.parallel.plan)


def allreduce_time(points):
    """t_ar(S) from measured ``points`` [(bytes, seconds)]: the fastest time of any measured size ≤ S, or the
    smallest size's time below it (see the module docstring). Returns a function bytes → seconds."""
    pts = sorted((int(s), float(t)) for s, t in points)
    if not pts:
        raise ValueError("no measured all-reduce: give at least one (bytes, seconds) point")

    def t_ar(nbytes: float) -> float:
        below = [t for s, t in pts if s <= nbytes]
        return min(below) if below else pts[0][1]
    return t_ar


def free_allreduce(nbytes: float) -> float:
    """An all-reduce that costs nothing: what the split alone allows."""
    return 0.0


def recorded_ceilings(folder: str = os.path.join(RESULTS, "h200-1gpu")) -> list[dict]:
    """The ceilings of every bench or ladder JSON in ``folder``: [{file, device, copy_bytes_per_s,
    matmul_flops_per_s}], in file-name order."""
    out = []
    for fn in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(fn) as f:
            c = json.load(f).get("ceilings")
        if c:
            out.append({"file": os.path.relpath(fn, os.path.dirname(RESULTS)), "device": c["device"],
                        "copy_bytes_per_s": c["copy_bytes_per_s"], "matmul_flops_per_s": c["matmul_flops_per_s"]})
    return out


def recorded_allreduce(path: str = os.path.join(RESULTS, "h200-2gpu", "nccl_settings_allreduce_bf16.json")) -> dict:
    """A recorded NCCL settings sweep (rows {"setting", "<k> KiB (µs)": median}) → {"file", "points": [(bytes,
    seconds)] the fastest setting at each size, "settings": the setting that was fastest at each size,
    "range_s": (fastest, slowest) time of any setting and size}."""
    with open(path) as f:
        rows = json.load(f)
    best, every = {}, []
    for row in rows:
        for key, us in row.items():
            m = re.fullmatch(r"(\d+) KiB \(µs\)", key)
            if m:
                size, t = int(m.group(1)) * 1024, us * 1e-6
                every.append(t)
                if size not in best or t < best[size][0]:
                    best[size] = (t, row["setting"])
    return {"file": os.path.relpath(path, os.path.dirname(RESULTS)),
            "points": [(s, best[s][0]) for s in sorted(best)],
            "settings": {s: best[s][1] for s in sorted(best)}, "range_s": (min(every), max(every))}


def split_floor(cfg: VL2Config, world_size: int, ceilings: dict, allreduce_s=free_allreduce, batch: int = 1,
                prompt_len: int = PROMPT_LEN, new_tokens: int = NEW_TOKENS, tiles_per_image: int = TILES,
                vision: str = "replicated", dtype: str = "bfloat16") -> dict:
    """T(N) of the module docstring for ``world_size`` = N ranks: vision_s, prefill_s, decode_s_per_step, e2e_s,
    and the collectives' share of them (allreduce_s_per_step, allreduce_s_prefill). ``allreduce_s``: bytes →
    seconds (:func:`allreduce_time`)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if vision not in ("replicated", "data_parallel"):
        raise ValueError(f"vision={vision!r}: 'replicated' (the tower on every rank) or 'data_parallel' (tiles split)")
    n, b, lm = world_size, dtype_bytes(dtype), cfg.language_config
    bw, fl = ceilings["copy_bytes_per_s"], ceilings["matmul_flops_per_s"]
    parts = rank_weight_params(cfg)                                  # elements per part, the whole model
    rep = sum(parts[k] for k in _REPLICATED_LM)
    coll = decode_collectives(lm, n, b, batch)

    dec = decode_bytes(cfg, batch, prompt_len + new_tokens // 2, dtype)
    d_rep = b * rep + (dec["kv_cache"] if lm.use_mla else 0)        # the MLA latent cache is on every rank
    ar_step = coll["all_reduces"] * allreduce_s(coll["all_reduce_message_bytes"])
    step = (dec["total"] - d_rep) / (n * bw) + d_rep / bw + ar_step

    compute = prefill_floor_s(cfg, batch, prompt_len, fl, math.inf, dtype)   # 2·B·P·activated / F
    memory = prefill_floor_s(cfg, batch, prompt_len, math.inf, bw, dtype)    # LM weight bytes / BW
    rho_c, rho_m = rep / param_counts(cfg)["lm_activated"], b * rep / (memory * bw)
    ar_pre = coll["all_reduces"] * allreduce_s(batch * prompt_len * lm.hidden_size * b)
    pre = max(compute * ((1 - rho_c) / n + rho_c), memory * ((1 - rho_m) / n + rho_m)) + ar_pre

    tiles = batch * tiles_per_image
    vis = vision_floor_s(cfg, tiles if vision == "replicated" else -(-tiles // n), fl)
    return {"world_size": n, "vision_s": vis, "prefill_s": pre, "decode_s_per_step": step,
            "e2e_s": vis + pre + (new_tokens - 1) * step, "allreduces_per_step": coll["all_reduces"],
            "allreduce_s_per_step": ar_step, "allreduce_s_prefill": ar_pre}


def tp_speedup_bound(cfg: VL2Config, world_size: int, ceilings: dict, allreduce_s=free_allreduce,
                     **workload) -> dict:
    """The best speed-up of N = ``world_size`` tensor-parallel GPUs over one for the workload (``workload``: the
    keywords of :func:`split_floor`): {"speedup": T(1)/T(N), "decode_speedup": per decode step, "best_speedup":
    over every answer length, "one": split_floor at 1, "many": at N}."""
    one = split_floor(cfg, 1, ceilings, allreduce_s, **workload)
    many = split_floor(cfg, world_size, ceilings, allreduce_s, **workload)
    prefix = lambda f: f["vision_s"] + f["prefill_s"]
    dec = one["decode_s_per_step"] / many["decode_s_per_step"]
    return {"world_size": world_size, "speedup": one["e2e_s"] / many["e2e_s"], "decode_speedup": dec,
            "best_speedup": max(dec, prefix(one) / prefix(many)), "one": one, "many": many}
