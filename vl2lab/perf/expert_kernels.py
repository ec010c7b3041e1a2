"""One MoE layer of a decode step, timed per experts computation: ``python -m vl2lab.perf.expert_kernels``.

Lesson: notebook 05, section "2. The ladder, run here" (rung 8).

One MoE layer (router, routed and shared experts) at a preset's real sizes, random bf16 weights, on a batch of N
decode tokens, with ``Experts.impl`` = ``grouped`` (one grouped matmul per projection, then the shared MLP) and
``gemv`` (:mod:`vl2lab.model.expert_gemv`: routed and shared experts in two kernels) at each block configuration
asked for. Each is captured in a CUDA graph of ``calls`` back-to-back forwards and replayed, so the time per
forward is its kernels' time, not their launches. The bytes a forward must read are the router, the shared
experts and the chosen experts' weights (each counted once); their rate beside the copy bandwidth of
:func:`~vl2lab.perf.roofline.measure_device` says how close the layer is to its floor. A benchmark, not a test:
run it on a GPU; the JSON names the hardware.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from vl2lab.model import expert_gemv
from vl2lab.model.config import get_config
from vl2lab.model.moe import MoE
from vl2lab.perf.roofline import measure_device
from vl2lab.perf.workload import environment

__all__ = ["run", "main"]


def _graph_time_s(fn, calls: int, repeats: int) -> float:
    """Median seconds per ``fn()`` over ``repeats`` replays of a CUDA graph of ``calls`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return sorted(times[1:])[len(times[1:]) // 2]


GATE_UP_BLOCKS = ((16, 256, 4), (8, 256, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8), (4, 1024, 4))
DOWN_BLOCKS = ((8, 256, 4), (4, 256, 4), (16, 256, 4), (4, 512, 4), (8, 512, 8), (2, 512, 4))


def run(model: str = "deepseek-vl2-small", tokens=(1, 2, 4), gate_up_blocks=GATE_UP_BLOCKS, down_blocks=DOWN_BLOCKS,
        calls: int = 50, repeats: int = 5, seed: int = 0) -> dict:
    """Time the layer with grouped experts and with gemv at each batch of ``tokens``: each gate/up block shape
    (BLOCK_N, BLOCK_K, warps) with the default down shape, then each down shape with the best gate/up one."""
    if not torch.cuda.is_available():
        raise SystemExit("vl2lab.perf.expert_kernels times CUDA kernels: run it on a machine with a GPU")
    cfg = get_config(model).language_config
    E, H, I, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    torch.manual_seed(seed)
    moe = MoE(cfg).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    fixed = sum(p.numel() * p.element_size() for p in (*moe.gate.parameters(), *moe.shared_experts.parameters()))
    ceil = measure_device("cuda")
    saved, rows = dict(expert_gemv.BLOCKS), []
    try:
        for n in tokens:
            x = torch.randn(1, n, H, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                touched = moe.gate(x.view(n, H))[0].unique().numel()
                moe.experts.impl = "grouped"
                ref = moe(x).float()
            nbytes = fixed + touched * 3 * I * H * 2

            def timed(impl, blocks):
                moe.experts.impl = impl
                expert_gemv.BLOCKS.update(blocks or saved)
                with torch.no_grad():
                    out = moe(x).float()
                    t = _graph_time_s(lambda: moe(x), calls, repeats)
                rows.append({"tokens": n, "pairs": n * k, "experts_touched": touched, "impl": impl,
                             "blocks": {k_: list(v) for k_, v in blocks.items()} if blocks else None,
                             "us": t * 1e6, "bytes": nbytes, "bytes_per_s": nbytes / t,
                             "of_copy": nbytes / t / ceil["copy_bytes_per_s"],
                             "rel_err_vs_grouped": ((out - ref).norm() / ref.norm()).item()})
                print(f"N={n} {impl:7s} {str(blocks or ''):48s} {t * 1e6:8.1f} µs  {nbytes / t / 1e9:7.0f} GB/s "
                      f"({rows[-1]['of_copy']:.0%} of copy)  err {rows[-1]['rel_err_vs_grouped']:.1e}", flush=True)
                return t

            timed("grouped", None)
            best = min(gate_up_blocks, key=lambda b: timed("gemv", {"gate_up": b, "down": saved["down"]}))
            for b in down_blocks:
                timed("gemv", {"gate_up": best, "down": b})
    finally:
        expert_gemv.BLOCKS.update(saved)
    return {"model": model, "sizes": {"experts": E, "hidden": H, "intermediate": I, "top_k": k,
                                      "shared": cfg.n_shared_experts},
            "environment": environment(), "ceilings": ceil, "calls_per_graph": calls, "repeats": repeats,
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2lab.perf.expert_kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-vl2-small",
                    help="preset whose MoE sizes to use (default: %(default)s)")
    ap.add_argument("--tokens", default="1,2,4", help="comma-separated decode batch sizes (default: %(default)s)")
    ap.add_argument("--out", help="JSON file to write")
    a = ap.parse_args(argv)
    res = run(a.model, tuple(int(t) for t in a.tokens.split(",")))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
