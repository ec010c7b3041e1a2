"""Rank-side proofs that the tensor-parallel layers compute what the dense layers compute.

Lesson: notebook 02, sections "1. Two ways to split a linear layer",
"2. Both splits on N ranks, checked against the dense layer" and "3. Column → row: one all-reduce per block".

:func:`check_layers` is a *rank function*: it runs on every rank with ``torch.distributed`` initialised and
returns a plain dict (numbers, strings, CPU tensors). :func:`shard_table`, :func:`column_row_block` and
:func:`check_hand_mlp` run in the notebook: the shards of a split, the f/g placement of a column → row block
(what the figure draws), and the verdicts on a tensor-parallel MLP built by hand in a ``%%torchrun`` cell.

Tolerances. Each comparison reports max |Δ|, its rule, ``exact`` (Δ == 0 everywhere) and ``pass``:

* ``copy`` — tol 0. Gathers and embedding lookups only move numbers (adding the zeros of other
  ranks is exact). ``exact`` — tol 0 too: sums of small integers in float64 are exact in any order.
* ``reorder(K)`` — the split computes the same K-term dot products as the dense layer (column output,
  weight gradients, the gathered blocks), so the result *could* be bit-exact, and in float32 often
  is. It is not guaranteed: on MKL (the CPU BLAS here) the GEMM kernel and its blocking/vector order
  over K are chosen from the matrix shape, and a shard has a different N than the dense layer, so
  some elements round differently by a few ulp (float64 differs for most shapes; cuBLAS on an H200
  differs too in float32 and bfloat16, though not in float64). The tolerance is the
  bound for *any* summation order of K terms: |Δ| <= K·eps·max Σ|terms| (twice Higham's γ_K with
  u = eps/2), derived, not fitted: about 3e-6·Σ|terms| for K=24 in float32.
* ``close`` — an all-reduce adds per-rank partial sums in an order the dense GEMM never used (row
  output, input gradients of column layers, the whole MLP): torch.testing.assert_close's defaults,
  |Δ| <= atol + rtol·|ref|, with (atol, rtol) = (1e-5, 1.3e-6) for float32 and (1e-7, 1e-7) for float64.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vl2lab.model.dtypes import as_dtype
from vl2lab.parallel.comm import CommCounter
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from vl2lab.parallel.ops import gather_from_tp, shard_range, split_sizes

__all__ = ["check_layers", "shard_table", "column_row_block", "check_hand_mlp", "FG_STAGES", "Report",
           "close_dtype", "abs_mm", "TOLERANCES"]

# torch.testing.assert_close's defaults (atol, rtol), for sums an all-reduce reorders
TOLERANCES = {torch.float32: (1e-5, 1.3e-6), torch.float64: (1e-7, 1e-7)}


def close_dtype(name) -> torch.dtype:
    """float32 or float64 (the dtypes the tolerances are stated for), or one clear error."""
    dt = as_dtype(name)
    if dt not in TOLERANCES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {name!r}")
    return dt


class Report:
    """Collects comparisons as {name: {max_abs_diff, rule, atol, rtol, exact, pass}}."""

    def __init__(self, dtype):
        self.dtype, self.eps, self.rows = dtype, torch.finfo(dtype).eps, {}

    def add(self, name, got, ref, rule, k=None, scale=None):
        got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
        if got.shape != ref.shape:
            raise ValueError(f"{name}: shape {tuple(got.shape)} vs dense {tuple(ref.shape)}")
        diff = (got - ref).abs()
        if rule in ("copy", "exact"):
            atol, rtol, text = 0.0, 0.0, f"{rule}: 0"
        elif rule == "reorder":  # any order of k terms: |Δ| <= k·eps·Σ|terms| / (1 - k·eps/2)
            atol = k * self.eps * float(torch.as_tensor(scale).detach()) / (1 - k * self.eps / 2)
            rtol, text = 0.0, f"reorder(K={k}): K·eps·max Σ|terms|"
        else:
            (atol, rtol), text = TOLERANCES[self.dtype], "close: assert_close defaults"
        ok = bool((diff <= atol + rtol * ref.abs()).all())
        self.rows[name] = {"max_abs_diff": float(diff.max()) if diff.numel() else 0.0, "rule": text,
                           "atol": atol, "rtol": rtol, "exact": bool((diff == 0).all()), "pass": ok}


def abs_mm(a, b):  # max over elements of Σ|a_ik b_kj|: the size of the terms a dot product adds
    return (a.detach().abs().double() @ b.detach().abs().double()).max()


def check_layers(seed: int = 0, dtype: str = "float32", batch: int = 2, seq: int = 3, hidden: int = 24,
                 heads: int = 10, head_dim: int = 4, intermediate: int = 42, vocab: int = 50) -> dict:
    """Dense vs tensor-parallel, forward and backward, on this rank (tolerances: module docstring).

    Every rank builds the same dense layers and data from ``seed``, slices the layers with
    ``from_dense`` and compares output, input gradient and its own weight/bias gradient slices.
    Defaults give uneven splits on 4 ranks: 10 heads of width 4 (3,3,2,2 heads), intermediate 42
    (11,11,10,10), vocab 50 (13,13,12,12). Checks: column (split and gathered output), row (split and
    whole input), vocab embedding, LM head, and a SwiGLU MLP (gate/up column, down row) whose forward
    all-reduces are counted by wrapping torch.distributed.all_reduce.

    Tolerances (details in the module docstring): copies 0; the same dot products as the dense layer
    K·eps·max Σ|terms| (bit-exactness is reported, not required: MKL is not bit-exact across shard
    widths); sums an all-reduce reorders: assert_close defaults (float32 atol 1e-5, rtol 1.3e-6;
    float64 1e-7, 1e-7). TF32 is switched off for the duration.
    Returns {rank, world_size, backend, device, dtype, checks: {name: {max_abs_diff, rule, atol, rtol,
    exact, pass}}, mlp_forward_all_reduces, mlp_forward_all_gathers, mlp_backward_all_reduces,
    same_dot_products_bit_exact, all_pass}.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: the tolerances assume true float32 GEMMs
    try:
        return _check_layers(seed, close_dtype(dtype), batch, seq, hidden, heads, head_dim, intermediate, vocab)
    finally:
        torch.set_float32_matmul_precision(previous)


def _check_layers(seed, dt, batch, seq, hidden, heads, head_dim, intermediate, vocab) -> dict:
    dev, rank, world = rank_device(), dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)  # same stream on every rank

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt).to(dev)

    def dense_linear(i, o, bias=True):
        lin = nn.Linear(i, o, bias=bias, dtype=dt, device=dev)
        with torch.no_grad():
            lin.weight.copy_(randn(o, i) / i ** 0.5)
            if bias:
                lin.bias.copy_(randn(o))
        return lin

    rep, bt = Report(dt), batch * seq
    out_c = heads * head_dim
    x = randn(batch, seq, hidden)  # [B, T, hidden], the same on every rank

    # Column parallel: 10 heads of width 4, split by whole heads; output split, then gathered.
    for gather in (False, True):
        name = "column_gathered" if gather else "column"
        dense = dense_linear(hidden, out_c)
        gy = randn(batch, seq, out_c)
        xd = x.clone().requires_grad_()
        y = dense(xd)
        y.backward(gy)
        par = ColumnParallelLinear.from_dense(dense, gather_output=gather, unit=head_dim)
        s, e = par.start, par.end
        xp = x.clone().requires_grad_()
        yp = par(xp)
        yp.backward(gy if gather else gy[..., s:e])
        rep.add(f"{name}.out", yp, y if gather else y[..., s:e], "reorder", hidden + 1,
                (x.reshape(bt, -1).abs().double() @ dense.weight.detach().abs().double().T
                 + dense.bias.detach().abs().double()).max())
        rep.add(f"{name}.grad_x", xp.grad, xd.grad, "close")
        rep.add(f"{name}.grad_w", par.weight.grad, dense.weight.grad[s:e], "reorder", bt,
                abs_mm(gy.reshape(bt, -1).T, x.reshape(bt, -1)))
        rep.add(f"{name}.grad_b", par.bias.grad, dense.bias.grad[s:e], "reorder", bt, gy.abs().sum((0, 1)).max())

    # Row parallel: input split by whole heads (as o_proj), input given split or whole.
    for parallel_in in (True, False):
        name = "row" if parallel_in else "row_scatter"
        dense = dense_linear(out_c, hidden)
        xr = randn(batch, seq, out_c)
        gy = randn(batch, seq, hidden)
        xd = xr.clone().requires_grad_()
        y = dense(xd)
        y.backward(gy)
        par = RowParallelLinear.from_dense(dense, input_is_parallel=parallel_in, unit=head_dim)
        s, e = par.start, par.end
        xp = (xr[..., s:e] if parallel_in else xr).clone().requires_grad_()
        yp = par(xp)
        yp.backward(gy)
        rep.add(f"{name}.out", yp, y, "close")
        rep.add(f"{name}.grad_x", xp.grad, xd.grad[..., s:e] if parallel_in else xd.grad, "reorder", hidden,
                abs_mm(gy.reshape(bt, -1), dense.weight))
        rep.add(f"{name}.grad_w", par.weight.grad, dense.weight.grad[:, s:e], "reorder", bt,
                abs_mm(gy.reshape(bt, -1).T, xr.reshape(bt, -1)))
        rep.add(f"{name}.grad_b", par.bias.grad, dense.bias.grad, "reorder", bt, gy.abs().sum((0, 1)).max())

    # Vocab-parallel embedding: ids on every shard, repeated ids accumulate gradient.
    emb = nn.Embedding(vocab, hidden, dtype=dt, device=dev)
    with torch.no_grad():
        emb.weight.copy_(randn(vocab, hidden))
    ids = torch.randint(0, vocab, (batch, seq * 4), generator=gen).to(dev)
    gy = randn(batch, seq * 4, hidden)
    y = emb(ids)
    y.backward(gy)
    par = VocabParallelEmbedding.from_dense(emb)
    yp = par(ids)
    yp.backward(gy)
    rep.add("embedding.out", yp, y, "copy")
    rep.add("embedding.grad_w", par.weight.grad, emb.weight.grad[par.start:par.end], "reorder",
            batch * seq * 4, gy.abs().sum((0, 1)).max())

    # LM head: vocab split (uneven), logits gathered.
    head = dense_linear(hidden, vocab, bias=False)
    gy = randn(batch, seq, vocab)
    xd = x.clone().requires_grad_()
    y = head(xd)
    y.backward(gy)
    par = ParallelLMHead.from_dense(head)
    xp = x.clone().requires_grad_()
    yp = par(xp)
    yp.backward(gy)
    rep.add("lm_head.logits", yp, y, "reorder", hidden, abs_mm(x.reshape(bt, -1), head.weight.T))
    rep.add("lm_head.grad_x", xp.grad, xd.grad, "close")
    with torch.no_grad():  # the same gather, with the widths exchanged instead of given
        rep.add("lm_head.gather_widths_exchanged", gather_from_tp(F.linear(x, par.weight)), yp, "copy")
    rep.add("lm_head.grad_w", par.weight.grad, head.weight.grad[par.start:par.end], "reorder", bt,
            abs_mm(gy.reshape(bt, -1).T, x.reshape(bt, -1)))

    # SwiGLU MLP: down(silu(gate(x)) * up(x)); gate/up column, down row: ONE all-reduce in forward.
    gate, up = dense_linear(hidden, intermediate, False), dense_linear(hidden, intermediate, False)
    down = dense_linear(intermediate, hidden, False)
    gy = randn(batch, seq, hidden)
    xd = x.clone().requires_grad_()
    y = down(F.silu(gate(xd)) * up(xd))
    y.backward(gy)
    pg, pu = ColumnParallelLinear.from_dense(gate), ColumnParallelLinear.from_dense(up)
    pd = RowParallelLinear.from_dense(down)
    xp = x.clone().requires_grad_()
    with CommCounter() as fwd:
        yp = pd(F.silu(pg(xp)) * pu(xp))  # [B,T,I_local] -> [B,T,hidden]
    with CommCounter() as bwd:
        yp.backward(gy)
    s, e = pg.start, pg.end
    rep.add("mlp.out", yp, y, "close")
    rep.add("mlp.grad_x", xp.grad, xd.grad, "close")
    rep.add("mlp.grad_w_gate", pg.weight.grad, gate.weight.grad[s:e], "close")
    rep.add("mlp.grad_w_up", pu.weight.grad, up.weight.grad[s:e], "close")
    rep.add("mlp.grad_w_down", pd.weight.grad, down.weight.grad[:, s:e], "close")

    same_dot = [r for r in rep.rows.values() if r["rule"].startswith("reorder")]
    return {
        "rank": rank, "world_size": world, "backend": dist.get_backend(), "device": str(dev), "dtype": str(dt),
        "checks": rep.rows,
        "mlp_forward_all_reduces": fwd.totals["all_reduce"], "mlp_forward_all_gathers": fwd.totals["all_gather"],
        "mlp_backward_all_reduces": bwd.totals["all_reduce"],
        "same_dot_products_bit_exact": all(r["exact"] for r in same_dot),
        "all_pass": all(r["pass"] for r in rep.rows.values()) and fwd.totals["all_reduce"] == (1 if world > 1 else 0),
    }


# ------------------------------------------------------------------------------ notebook side: shards and f/g

def shard_table(out_features: int, in_features: int, world_size: int, unit: int = 1) -> dict:
    """Per-rank shard ranges and shapes of a dense W [out, in] split column-wise (out dim) and row-wise
    (in dim), both in blocks of ``unit`` (e.g. head_dim: q_proj splits its out dim by heads, o_proj its
    in dim). No torch.distributed needed."""
    column, row = [], []
    for r in range(world_size):
        s, e = shard_range(out_features, r, world_size, unit)
        column.append({"rank": r, "out_range": (s, e), "weight_shape": (e - s, in_features),
                       "bias_shape": (e - s,), "input_shape": (in_features,), "output_shape": (e - s,),
                       "weight_numel": (e - s) * in_features})
        s, e = shard_range(in_features, r, world_size, unit)
        row.append({"rank": r, "in_range": (s, e), "weight_shape": (out_features, e - s),
                    "bias_shape": (out_features,), "input_shape": (e - s,), "output_shape": (out_features,),
                    "weight_numel": out_features * (e - s)})
    return {"dense_weight_shape": (out_features, in_features), "world_size": world_size, "unit": unit,
            "column": column, "row": row,
            "column_finish": "output split: all-gather along the last dim if needed whole",
            "row_finish": "partial sums of full shape: one all-reduce, then the bias once"}


# A column → row block (an MLP: up, activation, down) on every rank, in order: what each stage does to the
# activations going forward and to their gradients coming back. "local": this rank's shard, no communication.
# f and g are vl2lab.parallel.ops.copy_to_tp and reduce_from_tp (tests/test_parallel.py counts their collectives).
FG_STAGES = (
    {"stage": "f", "code": "copy_to_tp", "forward": "identity", "backward": "all-reduce"},
    {"stage": "column", "code": "X·W1[s:e]ᵀ + b1[s:e]", "forward": "local", "backward": "local"},
    {"stage": "activation", "code": "SiLU", "forward": "local", "backward": "local"},
    {"stage": "row", "code": "H_r·W2[:, s:e]ᵀ", "forward": "local", "backward": "local"},
    {"stage": "g", "code": "reduce_from_tp", "forward": "all-reduce", "backward": "identity"},
)


def column_row_block(intermediate: int, world_size: int, unit: int = 1) -> dict:
    """The stages of a column → row block (:data:`FG_STAGES`) and each rank's block [s, e) of the intermediate
    dimension: what :func:`vl2lab.workbook.tp_plots.draw_fg_block` draws. No torch.distributed needed."""
    blocks = [shard_range(intermediate, r, world_size, unit) for r in range(world_size)]
    return {"world_size": world_size, "intermediate": intermediate, "blocks": blocks,
            "stages": [dict(st) for st in FG_STAGES]}


# The hand-built MLP of notebook 02, section 3: (check, compared with, rule, key pulled from the rank, dense key,
# the dim along which the dense tensor is cut to the rank's block [s, e), or None when the rank holds it whole)
_HAND_MLP = (
    ("column output", "dense pre-activation[:, s:e]", "exact", "pre", "pre", -1),
    ("Y, one dist.all_reduce", "dense Y", "close", "y_by_hand", "y", None),
    ("Y, with f and g", "dense Y", "close", "y", "y", None),
    ("dL/dW1 shard", "dense dL/dW1[s:e]", "close", "grad_w1", "grad_w1", 0),
    ("dL/db1 shard", "dense dL/db1[s:e]", "close", "grad_b1", "grad_b1", 0),
    ("dL/dW2 shard", "dense dL/dW2[:, s:e]", "close", "grad_w2", "grad_w2", -1),
    ("dL/db2 (whole)", "dense dL/db2", "exact", "grad_b2", "grad_b2", None),
    ("dL/dX (after f's all-reduce)", "dense dL/dX", "close", "grad_x", "grad_x", None),
)


def check_hand_mlp(ranks: list, dense: dict) -> list:
    """Every rank's hand-built tensor-parallel MLP (``ranks[r]``: the dict its ``%%torchrun`` cell pulled back)
    against the dense MLP (``dense``: pre-activation, Y and every gradient), one row per check.

    Rules (module docstring): ``exact`` where the numbers are sums of small integers (the column layer's output,
    dL/db2 = Σ_tokens dL/dY), ``close`` — assert_close's float64 defaults — where they went through the SiLU and a
    sum was reordered (by the all-reduce, or by a narrower GEMM). Two more rows show what f is for: the
    gradient that reaches f on one rank is that rank's term only (it differs from dL/dX when N > 1), and the
    terms of all ranks add up to dL/dX. Each row: check, compared with, rule, max |Δ| and exact over the ranks,
    pass on every rank.
    """
    reports = [Report(torch.float64) for _ in ranks]
    for rep, got in zip(reports, ranks):
        s, e = got["block"]
        for name, _, rule, key, dkey, dim in _HAND_MLP:
            ref = dense[dkey] if dim is None else dense[dkey].narrow(dim, s, e - s)
            rep.add(name, got[key], ref, rule)
    rows = []
    for name, versus, *_ in _HAND_MLP:
        per_rank = [rep.rows[name] for rep in reports]
        rows.append({"check": name, "compared with": versus, "rule": per_rank[0]["rule"],
                     "max |Δ|": max(r["max_abs_diff"] for r in per_rank),
                     "exact": all(r["exact"] for r in per_rank), "pass": all(r["pass"] for r in per_rank)})
    ref = dense["grad_x"].double()
    terms = [got["grad_x_reaching_f"].double() for got in ranks]
    atol, rtol = TOLERANCES[torch.float64]
    alone = [bool(torch.allclose(t, ref, rtol=rtol, atol=atol)) for t in terms]
    rows.append({"check": "dL/dX reaching f, one rank", "compared with": "dense dL/dX",
                 "rule": "differs when N > 1", "max |Δ|": max(float((t - ref).abs().max()) for t in terms),
                 "exact": None, "pass": len(ranks) == 1 or not any(alone)})
    total = Report(torch.float64)
    total.add("sum", torch.stack(terms).sum(0), ref, "close")
    rows.append({"check": "Σ over ranks of dL/dX reaching f", "compared with": "dense dL/dX",
                 "rule": total.rows["sum"]["rule"], "max |Δ|": total.rows["sum"]["max_abs_diff"],
                 "exact": total.rows["sum"]["exact"], "pass": total.rows["sum"]["pass"]})
    return rows
