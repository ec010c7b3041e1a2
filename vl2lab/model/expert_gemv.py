"""Decode-shaped routed experts: two Triton kernels that read only the chosen experts' weights, one row block each.

Lesson: notebook 05, section "2. The ladder, run here" (rung 8).

At decode a batch of N tokens picks k experts each: P = N·k (token, expert) pairs, a handful at batch 1. Each
pair is a matrix-vector product per projection, so the work is reading the weights: per pair, gate and up
[I, H] and down [H, I]. The grouped matmul (:class:`~vl2lab.model.moe.Experts`, ``impl="grouped"``) tiles each
expert's rows in blocks of 64–128 *tokens*, almost all padding at P ≈ 6, and gives a few dozen blocks to a GPU of
132 SMs, each streaming a large slice of one weight: far below the copy bandwidth. Here every program owns one
pair and BLOCK_N rows of one projection, so a step has P·I/BLOCK_N programs, every one a short stream::

    gate_up   program (p, n):  t = p // k, e = expert of pair p
              g = W_gate[e, n-block, :] · x[t],  u = W_up[e, n-block, :] · x[t]      fp32 accumulators
              h[p, n-block] = silu(g) · u                                            (one kernel, x read once)
    down      program (t, n):  out[t, n-block] = Σ_j w_j · (W_down[e_j, n-block, :] · h[t·k + j])
                               fp32 sum over the token's k pairs, w_j the routing weights, stored in x's dtype
    shared    N more gate/up programs, one per token, over the shared experts' [Is, H] weights, and one more
              term (weight 1) in each down program's sum: the layer's whole feed-forward in two kernels, with
              no combine or cast after them (where the shared experts' output joins the routed sum before the
              reduction, as it does unsharded and under tensor parallelism)

The pairs stay in token order (pair p = t·k + j), so nothing is sorted and the combine is the down kernel's own
loop over a token's k pairs, deterministic. A pair whose expert is not held here (expert parallelism: local id
outside [0, E)) loads nothing and gives zero. The choice between these kernels and the grouped matmul reads shapes
only (P ≤ :data:`MAX_PAIRS`), so it is fixed for a captured decode step; past it (batch 32: 192 pairs over 64
experts) the grouped matmul reads each expert once for several tokens and wins.

Needs Triton and a CUDA device (or ``TRITON_INTERPRET=1``, Triton's CPU interpreter, which the tests use where
Triton is installed); elsewhere :func:`available` is False and the experts use the grouped matmul.
"""
from __future__ import annotations

import os

import torch

try:                                                  # not on CPU-only installs (CI): the grouped matmul serves
    import triton
    import triton.language as tl
except ImportError:                                   # pragma: no cover - depends on the install
    triton = None

__all__ = ["MAX_PAIRS", "BLOCKS", "available", "applies", "gate_up_kernel", "down_kernel", "routed_gemv"]

MAX_PAIRS = 32                 # up to this many (token, expert) pairs a forward uses these kernels
BLOCKS = {"gate_up": (4, 1024, 4), "down": (2, 512, 4)}    # (BLOCK_N rows, BLOCK_K columns, warps) per kernel


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device: Triton installed, and CUDA (or the interpreter)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def applies(x: torch.Tensor, idx: torch.Tensor, *experts: torch.Tensor) -> bool:
    """Whether a forward of ``x`` routed as ``idx`` [N, k] runs these kernels: at most :data:`MAX_PAIRS` pairs,
    the kernels :func:`available`, and the expert weights contiguous (the kernels compute their offsets)."""
    return idx.numel() <= MAX_PAIRS and available(x) and all(w.is_contiguous() for w in experts)


def gate_up_kernel(x_ptr, e_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, H, I, Is, Imax, E, P, K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # program (p, nb): rows [nb·BLOCK_N, +BLOCK_N) of h[p] = silu(W_gate x) · (W_up x), for pair p's expert or,
    # for p ≥ P, for the shared experts of token p − P: one weight pointer per projection, chosen once, so each
    # step of the loop is two loads (EVEN_K: H a multiple of BLOCK_K, no column mask)
    p, nb = tl.program_id(0), tl.program_id(1)
    shared = p >= P                                   # programs past the P pairs: token p − P's shared experts
    e = tl.load(e_ptr + tl.minimum(p, P - 1))
    held = (e >= 0) & (e < E) & (p < P)
    base = tl.where(held, e, 0).to(tl.int64) * I * H
    wg = tl.where(shared, sg_ptr, wg_ptr + base)
    wu = tl.where(shared, su_ptr, wu_ptr + base)
    n_rows = tl.where(shared, Is, tl.where(held, I, 0))   # rows of this weight; none for an expert held elsewhere
    x_row = x_ptr + tl.where(shared, p - P, p // K).to(tl.int64) * H
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.zeros([BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    if nb * BLOCK_N < n_rows:                         # a block past this weight's rows reads nothing
        for k0 in range(0, H, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            off = rows[:, None].to(tl.int64) * H + cols[None, :]
            if EVEN_K:
                xk = tl.load(x_row + cols).to(tl.float32)[None, :]
                m = rows[:, None] < n_rows
            else:
                xk = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
                m = (rows[:, None] < n_rows) & (cols[None, :] < H)
            g += tl.sum(tl.load(wg + off, mask=m, other=0.0).to(tl.float32) * xk, axis=1)
            u += tl.sum(tl.load(wu + off, mask=m, other=0.0).to(tl.float32) * xk, axis=1)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + p.to(tl.int64) * Imax + rows, h.to(h_ptr.dtype.element_ty), mask=rows < Imax)


def down_kernel(h_ptr, e_ptr, w_ptr, wd_ptr, sd_ptr, out_ptr, H, I, Is, Imax, E, P, K: tl.constexpr,
                SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (t, nb): rows [nb·BLOCK_N, +BLOCK_N) of out[t] = Σ_j w_j · W_down[e_j] h[t·K + j], plus the shared
    # experts' W_down h[P + t] if SHARED; summed in fp32 in that order, stored in out's dtype
    t, nb = tl.program_id(0), tl.program_id(1)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(K):
        p = t * K + j
        e = tl.load(e_ptr + p)
        held = (e >= 0) & (e < E)
        base = tl.where(held, e, 0).to(tl.int64) * H * I
        n_routed = tl.where(held, H, 0)               # an expert held elsewhere reads nothing and gives zero
        h_row = h_ptr + p.to(tl.int64) * Imax
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            hk = tl.load(h_row + cols, mask=cols < I, other=0.0).to(tl.float32)[None, :]
            m = (rows[:, None] < n_routed) & (cols[None, :] < I)
            wr = tl.load(wd_ptr + base + rows[:, None].to(tl.int64) * I + cols[None, :], mask=m, other=0.0)
            part += tl.sum(wr.to(tl.float32) * hk, axis=1)
        acc += part * tl.where(held, tl.load(w_ptr + p), 0.0)
    if SHARED:
        h_row = h_ptr + (P + t).to(tl.int64) * Imax
        for k0 in range(0, Is, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            hk = tl.load(h_row + cols, mask=cols < Is, other=0.0).to(tl.float32)[None, :]
            m = (rows[:, None] < H) & (cols[None, :] < Is)
            ws = tl.load(sd_ptr + rows[:, None].to(tl.int64) * Is + cols[None, :], mask=m, other=0.0)
            acc += tl.sum(ws.to(tl.float32) * hk, axis=1)
    tl.store(out_ptr + t.to(tl.int64) * H + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < H)


def routed_gemv(x: torch.Tensor, local: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, shared=None) -> torch.Tensor:
    """x [N, H], local [N, k] expert ids on this module (others give zero), weights [N, k] fp32, gate/up
    [E, I, H] and down [E, H, I] (contiguous) → Σ_j w_j · SwiGLU_{e_j}(x) [N, H] in fp32, plus the shared
    experts' SwiGLU(x) if ``shared`` = (gate [Is, H], up [Is, H], down [H, Is]) is given (N more gate/up programs,
    one per token; the down kernel adds them into its sum), in x's dtype: the layer's experts in two launches."""
    N, k = local.shape
    E, I, H = gate.shape
    P = N * k
    S, (sg, su, sd) = (N, shared) if shared is not None else (0, (gate, up, down))   # unused pointers if S = 0
    Is = sg.shape[0] if S else 0
    Imax = max(I, Is)
    x, e, w = x.contiguous(), local.reshape(P).contiguous(), weights.reshape(P).float().contiguous()
    h = torch.empty(P + S, Imax, dtype=x.dtype, device=x.device)
    bn, bk, warps = BLOCKS["gate_up"]
    _gate_up[(P + S, triton.cdiv(Imax, bn))](x, e, gate, up, sg, su, h, H, I, Is, Imax, E, P, K=k, BLOCK_N=bn,
                                             BLOCK_K=bk, EVEN_K=H % bk == 0, num_warps=warps)
    out = torch.empty(N, H, dtype=x.dtype, device=x.device)
    bn, bk, warps = BLOCKS["down"]
    _down[(N, triton.cdiv(H, bn))](h, e, w, down, sd, out, H, I, Is, Imax, E, P, K=k, SHARED=S > 0, BLOCK_N=bn,
                                   BLOCK_K=bk, num_warps=warps)
    return out


# The kernels: the functions above, compiled by Triton; routed_gemv a graph break under torch.compile (captured as it
# is). Without Triton it never runs, and no process pays the seconds that torch.compiler.disable's import of
# torch._dynamo takes.
if triton is not None:
    _gate_up, _down = triton.jit(gate_up_kernel), triton.jit(down_kernel)
    routed_gemv = torch.compiler.disable(routed_gemv)
