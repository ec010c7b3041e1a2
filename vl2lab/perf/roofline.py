"""How fast the fixed workload could be: the card's measured ceilings and the model maths (the "floor").

Lesson: notebook 05, section "The floor".

Two ceilings, measured on the device in the same run as the benchmark (:func:`measure_device`): the copy bandwidth
BW (bytes/s, a device-to-device copy counts its bytes read + written) and the dense bf16 matmul rate F (FLOP/s).
Then, with the assumptions of a serving engine (bf16 weights and cache, the LM head only on the last prefill
position, each touched expert read once per step, no launch gaps):

* decode, one step of B sequences at context C (memory-bound: FLOPs are ≤ 5 % of the time at B ≤ 64)::

      bytes = attention + dense FFN + shared experts + routers + lm_head + norms       (read once per step)
            + E_touched(B) · expert bytes · MoE layers        E_touched(B) = E · (1 − (1 − k/E)^B)  (uniform routing)
            + B · C · KV bytes per token                       (the cache read)
      t_decode = bytes / BW

  E_touched can also be counted on the workload itself (:func:`vl2lab.perf.routing.experts_read`): rows whose
  states route alike read fewer experts than independent rows would; the ladder records the floor both ways.

* prefill of B prompts of T tokens (compute-bound once B·T is large, otherwise bounded by reading every expert)::

      t_prefill = max(2 · B · T · activated LM params / F,  LM weight bytes (all experts touched) / BW)

* vision tower, per 384² tile: 2 · (params per token) · 729 + 4 · 729² · width · layers FLOPs; t = FLOPs / F.

These are floors, not predictions: real kernels reach a fraction of BW and F (perf-anchors' "realistic" column uses
70 % and 50 %).
"""
from __future__ import annotations

import torch

from vl2lab.model.config import VL2Config
from vl2lab.model.dtypes import dtype_bytes
from vl2lab.perf.workload import timed as workload_timed
from vl2lab.planner.sizing import kv_cache_bytes_per_token, param_counts

__all__ = ["measure_device", "experts_touched", "decode_bytes", "decode_floor_s", "prefill_floor_s",
           "vision_tile_flops", "vision_floor_s", "workload_floor"]


def measure_device(device, copy_bytes: int = 1 << 30, matmul_n: int = 8192, repeats: int = 10) -> dict:
    """Copy bandwidth (bytes moved / s, read + write) and bf16 matmul rate (FLOP/s) of ``device``, medians of
    ``repeats`` timed runs after a warm-up (CUDA events on GPUs; on a CPU, smaller sizes and a host clock)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if not cuda:
        copy_bytes, matmul_n, repeats = min(copy_bytes, 1 << 26), min(matmul_n, 1024), min(repeats, 3)

    def timed(fn):
        return workload_timed(fn, dev, repeats, 1)["median"]

    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=dev)
    t_mm = timed(lambda: a @ b)
    return {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "copy_bytes_per_s": 2 * copy_bytes / t_copy, "matmul_flops_per_s": 2 * matmul_n ** 3 / t_mm,
            "copy_bytes": copy_bytes, "matmul_n": matmul_n}


def experts_touched(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts chosen by ``tokens`` tokens when each picks ``top_k`` of ``n_experts`` uniformly."""
    if not n_experts:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def decode_bytes(cfg: VL2Config, batch: int, context: int, dtype: str = "bfloat16",
                 touched: float | None = None) -> dict:
    """Bytes one decode step of ``batch`` sequences at ``context`` cached positions must read, by part.
    ``touched``: routed experts read per MoE layer, e.g. as counted on the workload by
    :func:`vl2lab.perf.routing.experts_read` (default: the uniform-routing estimate :func:`experts_touched`)."""
    c, lm = param_counts(cfg), cfg.language_config
    b = dtype_bytes(dtype)
    if touched is None:
        touched = experts_touched(lm.n_routed_experts or 0, lm.num_experts_per_tok or 0, batch)
    parts = {
        "dense": b * (c["attention"] + c["dense_mlp"] + c["shared_experts"] + c["router"] + c["norms"]
                      + c["lm_head"]),
        "experts": b * touched * c["routed_expert"] * c["n_moe_layers"],
        "kv_cache": batch * context * kv_cache_bytes_per_token(cfg, dtype),
    }
    parts["total"] = sum(parts.values())
    parts["experts_touched_per_layer"] = touched
    return parts


def decode_floor_s(cfg: VL2Config, batch: int, context: int, bandwidth: float, dtype: str = "bfloat16",
                   touched: float | None = None) -> float:
    """Seconds per decode step at the copy bandwidth ``bandwidth`` (bytes/s)."""
    return decode_bytes(cfg, batch, context, dtype, touched)["total"] / bandwidth


def prefill_floor_s(cfg: VL2Config, batch: int, tokens: int, flops: float, bandwidth: float,
                    dtype: str = "bfloat16") -> float:
    """Seconds for the language model's prefill of ``batch`` × ``tokens`` positions (see the module docstring)."""
    c = param_counts(cfg)
    lm_active = c["lm_activated"]
    weights = dtype_bytes(dtype) * (c["total"] - c["vision"] - c["projector"] - c["embedding"])
    return max(2.0 * batch * tokens * lm_active / flops, weights / bandwidth)


def vision_tile_flops(cfg: VL2Config) -> float:
    """FLOPs of one 384² tile through the tower (matmuls of every block + attention scores and values)."""
    v = cfg.vision_config
    c = param_counts(cfg)
    n = v.grid * v.grid                                         # 729 tokens
    per_token = c["vision_no_pool"] - v.grid * v.grid * v.width   # position table is a lookup, not a matmul
    return 2.0 * per_token * n + 4.0 * n * n * v.width * v.layers


def vision_floor_s(cfg: VL2Config, tiles: int, flops: float) -> float:
    return tiles * vision_tile_flops(cfg) / flops


def workload_floor(cfg: VL2Config, batch: int, prompt_len: int, new_tokens: int, tiles_per_image: int,
                   device_info: dict, dtype: str = "bfloat16", touched: float | None = None) -> dict:
    """The fixed workload's floor on the measured device: vision, prefill, decode per step (at the mean
    context), end to end and images/s, in seconds (serial phases, as the benchmark runs them). ``touched``: the
    routed experts a decode step reads per MoE layer (default: uniform routing; see :func:`decode_bytes`)."""
    bw, fl = device_info["copy_bytes_per_s"], device_info["matmul_flops_per_s"]
    vis = vision_floor_s(cfg, batch * tiles_per_image, fl)
    pre = prefill_floor_s(cfg, batch, prompt_len, fl, bw, dtype)
    step = decode_floor_s(cfg, batch, prompt_len + new_tokens // 2, bw, dtype, touched)
    e2e = vis + pre + (new_tokens - 1) * step
    return {"vision_s": vis, "prefill_s": pre, "decode_s_per_step": step, "e2e_s": e2e,
            "images_per_s": batch / e2e, "decode_bytes": decode_bytes(cfg, batch, prompt_len + new_tokens // 2,
                                                                      dtype, touched)}
