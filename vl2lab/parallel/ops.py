"""Megatron's f/g operators as tiny autograd functions, and the split arithmetic every parallel layer shares.

Lesson: notebook 02, sections "1. Two ways to split a linear layer" and "3. Column → row: one all-reduce per block".

f = ``copy_to_tp``: identity forward (every rank needs the whole X), all-reduce backward.
g = ``reduce_from_tp``: all-reduce forward (sum the partial products), identity backward.
``gather_from_tp``: all-gather the last dim forward, own slice backward; ``scatter_to_tp``: the reverse.
Every one is the identity at world size 1 and when torch.distributed is not initialised.

Splits are uneven where they must be: ``split_sizes(10, 4) = [3, 3, 2, 2]`` (the first ranks get one block more),
in whole blocks of ``unit`` elements (unit = head_dim splits by whole heads).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vl2lab.parallel.groups import rank_world

__all__ = ["split_sizes", "shard_range", "shard_tensor", "copy_to_tp", "reduce_from_tp", "gather_from_tp",
           "scatter_to_tp", "all_gather_rows"]


# --------------------------------------------------------------------------------------- split arithmetic

def split_sizes(n: int, world_size: int, unit: int = 1) -> list[int]:
    """Per-rank sizes for splitting ``n`` elements into blocks of ``unit`` (e.g. unit=head_dim splits by
    whole heads). Uneven block counts give the first ranks one block more: 10 heads on 4 ranks → 3,3,2,2."""
    if world_size < 1 or unit < 1 or n < 0:
        raise ValueError(f"split_sizes needs n >= 0, world_size >= 1 and unit >= 1; got n={n}, "
                         f"world_size={world_size}, unit={unit}")
    if n % unit:
        raise ValueError(f"cannot split {n} elements into whole blocks of {unit}: {n} is not a multiple "
                         f"of {unit}; pass a unit that divides it (unit=1 splits element by element)")
    blocks = n // unit
    if blocks < world_size:
        raise ValueError(f"cannot split {blocks} block(s) of {unit} over {world_size} ranks: at least one "
                         f"rank would hold nothing; use a world size <= {blocks}")
    base, extra = divmod(blocks, world_size)
    return [(base + (r < extra)) * unit for r in range(world_size)]


def shard_range(n: int, rank: int, world_size: int, unit: int = 1) -> tuple[int, int]:
    """(start, end) of rank's block of ``n`` elements, split as in :func:`split_sizes`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    sizes = split_sizes(n, world_size, unit)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def shard_tensor(t: torch.Tensor, dim: int, rank: int, world_size: int, unit: int = 1) -> torch.Tensor:
    """Rank's slice of ``t`` along ``dim`` (split as in :func:`split_sizes`), as a fresh contiguous copy,
    so the full tensor can be freed afterwards."""
    start, end = shard_range(t.shape[dim], rank, world_size, unit)
    return t.narrow(dim, start, end - start).clone(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------- Megatron's f / g operators

def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()  # never reduce in place into a tensor someone else holds
    dist.all_reduce(x, group=group)
    return x


def _exchange_widths(x: torch.Tensor, group) -> list[int]:
    """Every rank's last-dim size (one tiny all-gather)."""
    _, world = rank_world(group)
    mine = torch.tensor([x.shape[-1]], device=x.device, dtype=torch.long)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return [int(s.item()) for s in every]


def _all_gather_last(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """All-gather along the last dim; uneven sizes: pad to the largest, gather, trim each piece."""
    rank, world = rank_world(group)
    if len(sizes) != world or x.shape[-1] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {x.shape[-1]} columns but the gather layout is {sizes} "
                         f"for {world} ranks; pass the widths every rank really holds")
    width = max(sizes)
    x = F.pad(x, (0, width - x.shape[-1])).contiguous()  # [..., width]
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x, group=group)
    return torch.cat([p[..., :s] for p, s in zip(pieces, sizes)], dim=-1)  # [..., sum(sizes)]


def _own_slice_last(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    rank, _ = rank_world(group)
    start = sum(sizes[:rank])
    return x[..., start:start + sizes[rank]].contiguous()


class _CopyToTP(torch.autograd.Function):
    """f: forward identity (every rank needs the whole X); backward all-reduce (each rank only has the
    gradient flowing through its own shard, dL/dX = sum_r dL/dY_r W_r)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduce (sum the partial products); backward identity (the sum's gradient reaches
    every term unchanged)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """Forward all-gather along the last dim; backward keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _all_gather_last(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_last(grad, ctx.group, ctx.sizes), None, None


class _ScatterToTP(torch.autograd.Function):
    """Forward keep this rank's slice of the last dim; backward all-gather the gradient slices."""

    @staticmethod
    def forward(ctx, x, group, unit):
        _, world = rank_world(group)
        ctx.group, ctx.sizes = group, split_sizes(x.shape[-1], world, unit)
        return _own_slice_last(x, group, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad, ctx.group, ctx.sizes), None, None


def copy_to_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """f: identity forward, all-reduce backward."""
    return x if rank_world(group)[1] == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """g: all-reduce forward, identity backward."""
    return x if rank_world(group)[1] == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """All-gather along the last dim (forward), own slice (backward). ``sizes``: every rank's width; when
    omitted, the widths are exchanged first."""
    _, world = rank_world(group)
    if world == 1:
        return x
    if sizes is None:
        sizes = _exchange_widths(x, group)
    return _GatherFromTP.apply(x, group, list(sizes))


def scatter_to_tp(x: torch.Tensor, group=None, unit: int = 1) -> torch.Tensor:
    """Own slice of the last dim (forward, split as in :func:`split_sizes`), all-gather (backward)."""
    return x if rank_world(group)[1] == 1 else _ScatterToTP.apply(x, group, unit)



def all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0, ``sizes`` rows each): pad to the largest share, gather, trim."""
    if len(sizes) == 1:
        return x
    pad = max(sizes) - x.shape[0]
    x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x.contiguous()
    pieces = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(pieces, x, group=group)
    return torch.cat([p[:s] for p, s in zip(pieces, sizes)])
