"""A published tensor-parallel example, run on N ranks: what its column split computes, and the correct finish.

Lesson: notebook 02, section "5. A published tensor-parallel example, run".

The source article splits a Linear layer by columns and then all-reduces the blocks (a sum of different output
columns: wrong), and calls a split of the batch "row parallel" (that is data parallelism). Both are run here beside
the dense layer, with the tolerances of :mod:`vl2lab.lessons.tp_layers`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from vl2lab.lessons.tp_layers import Report, abs_mm, close_dtype
from vl2lab.parallel.groups import device as rank_device
from vl2lab.parallel.ops import shard_range, split_sizes

__all__ = ["article_column_allreduce", "article_row_as_batch_split", "article_examples"]


def _article_data(seed, batch, in_features, out_features, dt, dev):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_features, generator=gen, dtype=torch.float64).to(dt).to(dev)  # [B, in]
    w = torch.randn(in_features, out_features, generator=gen, dtype=torch.float64).to(dt).to(dev)  # [in, out]
    return x, w


def _gather_cat(t: torch.Tensor, dim: int, sizes: list[int]) -> torch.Tensor:
    """All-gather blocks of possibly different lengths along ``dim`` (pad, gather, trim, concatenate)."""
    pad = max(sizes) - t.shape[dim]
    t = torch.cat([t, t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1:])], dim).contiguous()
    pieces = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(pieces, t)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, sizes)], dim)


def article_column_allreduce(seed: int = 0, batch: int = 4, in_features: int = 6, out_features: int = 8,
                             dtype: str = "float32") -> dict:
    """The article's column-parallel example, Y = X W with W [in, out] split by columns, finished with an
    all-REDUCE — and the correct finish, an all-GATHER.

    Rank r holds Y_r = X W[:, block_r], Y's column block r. Summing the blocks adds *different* output
    columns together: the result has shape [B, out/N] and is Σ_r Y_r, not Y. Concatenating the blocks
    (all-gather) gives Y exactly. At world size 1 both finishes are the identity and agree.
    """
    dt, dev = close_dtype(dtype), rank_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = split_sizes(out_features, world)
    if len(set(sizes)) > 1:
        raise ValueError(f"the article's all-reduce needs equal blocks: {out_features} columns over {world} "
                         f"ranks gives {sizes}; pick out_features divisible by the world size")
    x, w = _article_data(seed, batch, in_features, out_features, dt, dev)
    s, e = shard_range(out_features, rank, world)
    dense = x @ w  # [B, out]
    partial = x @ w[:, s:e]  # [B, out/N] = Y[:, s:e]
    summed = partial.clone()
    dist.all_reduce(summed)  # Σ_r Y_r: [B, out/N] — the article's finish
    gathered = _gather_cat(partial, 1, sizes)  # [B, out] — the correct finish
    shape_ok = tuple(summed.shape) == tuple(dense.shape)
    rep = Report(dt)  # the gathered blocks are the same dot products: reorder(K=in) rule
    rep.add("allgather", gathered, dense, "reorder", in_features, abs_mm(x, w))
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    return {
        "rank": rank, "world_size": world,
        "dense_shape": tuple(dense.shape), "allreduce_shape": tuple(summed.shape),
        "allreduce_shape_matches": shape_ok,
        "allreduce_equal": bool(shape_ok and torch.equal(summed, dense)),
        "allreduce_max_err_vs_own_block": float((summed - dense[:, s:e]).abs().max()),
        "allgather_shape": tuple(gathered.shape), "allgather_equal": bool(torch.equal(gathered, dense)),
        "allgather_max_err": float((gathered - dense).abs().max()), "allgather": rep.rows["allgather"],
        "x": cpu(x), "w": cpu(w), "dense": cpu(dense), "partial": cpu(partial), "allreduce_result": cpu(summed),
        "allgather_result": cpu(gathered),
    }


def article_row_as_batch_split(seed: int = 0, batch: int = 8, in_features: int = 8, out_features: int = 6,
                               dtype: str = "float32") -> dict:
    """The article's "row parallel": split X by rows (the batch), multiply by W, concatenate.

    It gives the right numbers, because rows of Y = X W only need their own rows of X — but every rank
    multiplies by the WHOLE W [in, out]: that is data parallelism (split the batch, replicate the
    weights), and the weight memory per rank does not shrink. True row parallelism splits W by rows of
    its *input* dim, W = [W_1; ...; W_N], X by the matching columns, and all-reduces partial sums:
    Y = Σ_r X[:, block_r] W_r, with |W|/N bytes per rank (tolerance: "close", module docstring).
    """
    dt, dev = close_dtype(dtype), rank_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    x, w = _article_data(seed, batch, in_features, out_features, dt, dev)
    dense = x @ w  # [B, out]
    # article: rows of X, whole W
    bs, be = shard_range(batch, rank, world)
    y_rows = x[bs:be] @ w  # [B/N, out]
    batch_split = _gather_cat(y_rows, 0, split_sizes(batch, world))  # [B, out]
    # true row parallel: columns of X, rows of W's input dim, all-reduce partial sums
    s, e = shard_range(in_features, rank, world)
    w_local = w[s:e].contiguous()  # [in/N, out]
    partial = x[:, s:e] @ w_local  # [B, out], this rank's term
    row = partial.clone()
    dist.all_reduce(row)
    rep = Report(dt)
    rep.add("batch_split", batch_split, dense, "reorder", in_features, abs_mm(x, w))
    rep.add("row_parallel", row, dense, "close")
    el = w.element_size()
    return {
        "rank": rank, "world_size": world,
        "batch_split_equal": bool(torch.equal(batch_split, dense)),
        "batch_split_max_err": float((batch_split - dense).abs().max()), "batch_split": rep.rows["batch_split"],
        "w_bytes_total": w.numel() * el,
        "w_bytes_per_rank_batch_split": w.numel() * el,  # the whole W on every rank
        "w_bytes_per_rank_row_parallel": w_local.numel() * el,
        "w_bytes_all_ranks_batch_split": world * w.numel() * el,
        "w_bytes_all_ranks_row_parallel": w.numel() * el,
        "row_parallel": rep.rows["row_parallel"],
        "verdict": "splitting X by rows replicates W: data parallelism, not tensor parallelism",
        "dense": dense.detach().cpu(), "batch_split_result": batch_split.detach().cpu(),
        "row_parallel_result": row.detach().cpu(),
    }


# ------------------------------------------------------------------------------- both, in one launch

def article_examples(seed: int = 0, dtype: str = "float32") -> dict:
    """Both article reproductions in one rank function (one launch for the notebook cell)."""
    return {"column_allreduce": article_column_allreduce(seed=seed, dtype=dtype),
            "row_as_batch_split": article_row_as_batch_split(seed=seed, dtype=dtype)}
