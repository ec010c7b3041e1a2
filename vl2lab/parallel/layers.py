"""Tensor-parallel layers: column- and row-parallel Linear, vocab-parallel embedding and LM head.

Lesson: notebook 02, sections "1. Two ways to split a linear layer",
"2. Both splits on N ranks, checked against the dense layer" and "3. Column → row: one all-reduce per block".

A Linear layer computes Y = X W^T with W of shape [out, in] (nn.Linear's layout). Two ways to split it
over N ranks:

* **Column parallel** — split W by rows of the *out* dimension, W = [W_1; ...; W_N]. Rank r computes
  Y_r = X W_r^T, which is exactly Y's column block r: every output element is the same dot product as in
  the dense layer, only computed somewhere else. X is needed whole on every rank; the output stays split
  (or is all-gathered when the next layer needs it whole).
* **Row parallel** — split W by columns (the *in* dimension), W = [W_1 | ... | W_N]. Then
  Y = X W^T = sum_r X_r W_r^T, where X_r is X's matching column block. Each rank computes a partial sum
  of full shape; one all-reduce adds them. The bias is added once, after the reduction.

Column then row (gate/up column, down row) needs no communication in between: the column layer's split
output is exactly the split input the row layer wants, so an MLP costs one all-reduce in forward.

The communication is Megatron's f/g operators (:mod:`vl2lab.parallel.ops`). Every layer takes its (rank, world
size) from ``group``, or explicitly (``rank=, world_size=``) to build any rank's shard on the meta device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vl2lab.parallel.groups import rank_world
from vl2lab.parallel.ops import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp, shard_range, split_sizes

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "ParallelLMHead"]


def _uniform_(t: torch.Tensor | None, fan_in: int) -> None:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with the *dense* fan_in."""
    if t is not None and not t.is_meta:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(t, -bound, bound)


def _placement(group, rank, world_size) -> tuple[int, int]:
    """(rank, world size): given explicitly (a shard built for inspection, any rank), or read from ``group``."""
    if rank is None and world_size is None:
        return rank_world(group)
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: give both, with 0 <= rank < world_size")
    return rank, world_size


def _materialise(layer: nn.Module, like: torch.Tensor) -> nn.Module:
    """Give a layer built on the meta device real (uninitialised) storage on ``like``'s device, and the
    dense weight's requires_grad (a frozen inference model stays frozen)."""
    return layer.to_empty(device=like.device).requires_grad_(like.requires_grad)


class ColumnParallelLinear(nn.Module):
    """Y = X W^T with W [out, in] split by rows of the out dim; rank r holds W[start:end, :].

    Rank r computes Y_r = X W_r^T + b_r: Y's column block [start:end) (each element is the same dot product
    as in the dense layer). Forward: f (identity) → F.linear → optional all-gather of Y's blocks.
    Backward: dL/dX = sum_r dL/dY_r W_r, the all-reduce inside f.
    ``unit`` splits in whole blocks (unit=head_dim: whole heads). Uneven block counts are allowed. ``from_dense``
    passes ``rank=, world_size=`` (``**place``) through to the constructor.
    Built from a dense nn.Linear with :meth:`from_dense`; the constructor alone draws a fresh local init.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 unit: int = 1, group=None, device=None, dtype=None,
                 rank=None, world_size=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.unit, self.group = gather_output, unit, group
        self.rank, self.world_size = _placement(group, rank, world_size)
        self.sizes = split_sizes(out_features, self.world_size, unit)
        self.start, self.end = shard_range(out_features, self.rank, self.world_size, unit)
        local = self.end - self.start
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(local, in_features, **kw))  # [out_local, in]
        self.register_parameter("bias", nn.Parameter(torch.empty(local, **kw)) if bias else None)  # [out_local]
        _uniform_(self.weight, in_features)
        _uniform_(self.bias, in_features)

    @classmethod
    def from_dense(cls, module: nn.Linear, group=None, gather_output: bool = False, unit: int = 1, **place):
        """This rank's rows of a dense nn.Linear (copied, so the dense layer can be freed)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"ColumnParallelLinear.from_dense needs an nn.Linear, got {type(module).__name__}")
        w = module.weight  # [out, in]
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    gather_output=gather_output, unit=unit, group=group, device="meta", dtype=w.dtype, **place)
        _materialise(layer, w)
        with torch.no_grad():
            layer.weight.copy_(w[layer.start:layer.end])
            if module.bias is not None:
                layer.bias.copy_(module.bias[layer.start:layer.end])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in], the same on every rank
        x = copy_to_tp(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # [..., out_local] = Y[..., start:end]
        if self.gather_output:
            y = gather_from_tp(y, self.group, self.sizes)  # [..., out]
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}/{self.world_size}, out shard [{self.start}:{self.end}) "
                f"({self.end - self.start} rows), bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Y = X W^T + b with W [out, in] split by columns (the in dim); rank r holds W[:, start:end).

    Y = sum_r X_r W_r^T, X_r = X[..., start:end): each rank computes a full-shape partial sum, g
    all-reduces them, then b is added ONCE (adding it on every rank would count it N times).
    ``input_is_parallel=True`` takes X_r directly (the output of a column layer); False takes the whole X
    and keeps this rank's block. Backward: dL/dX_r = dL/dY W_r, no communication (g is identity backward).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 unit: int = 1, group=None, device=None, dtype=None,
                 rank=None, world_size=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.unit, self.group = input_is_parallel, unit, group
        self.rank, self.world_size = _placement(group, rank, world_size)
        self.sizes = split_sizes(in_features, self.world_size, unit)
        self.start, self.end = shard_range(in_features, self.rank, self.world_size, unit)
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, self.end - self.start, **kw))  # [out, in_local]
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **kw)) if bias else None)  # [out]
        _uniform_(self.weight, in_features)
        _uniform_(self.bias, in_features)

    @classmethod
    def from_dense(cls, module: nn.Linear, group=None, input_is_parallel: bool = True, unit: int = 1, **place):
        """This rank's columns of a dense nn.Linear's weight, plus its whole bias (copied)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"RowParallelLinear.from_dense needs an nn.Linear, got {type(module).__name__}")
        w = module.weight  # [out, in]
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    input_is_parallel=input_is_parallel, unit=unit, group=group, device="meta", dtype=w.dtype, **place)
        _materialise(layer, w)
        with torch.no_grad():
            layer.weight.copy_(w[:, layer.start:layer.end])
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group, self.unit)  # [..., in] -> [..., in_local]
        if x.shape[-1] != self.end - self.start:
            raise ValueError(f"RowParallelLinear on rank {self.rank} expects its input block of "
                             f"{self.end - self.start} features ([{self.start}:{self.end}) of {self.in_features}), "
                             f"got {x.shape[-1]}; pass input_is_parallel=False to give it the whole input")
        partial = F.linear(x, self.weight)  # [..., out]: this rank's term of the sum
        y = reduce_from_tp(partial, self.group)  # [..., out]: the full sum, on every rank
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}/{self.world_size}, in shard [{self.start}:{self.end}) "
                f"({self.end - self.start} columns), bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table E [vocab, dim] split by rows; rank r owns ids [start, end).

    out = sum_r onehot(ids)[:, start:end) E_r: each rank looks up the ids it owns (others are mapped to
    row 0 and their rows zeroed), and g all-reduces: exactly one rank contributes each token's row.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, group=None,
                 device=None, dtype=None, rank=None, world_size=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.group = group
        self.rank, self.world_size = _placement(group, rank, world_size)
        self.sizes = split_sizes(num_embeddings, self.world_size)
        self.start, self.end = shard_range(num_embeddings, self.rank, self.world_size)
        owns_pad = padding_idx is not None and self.start <= padding_idx < self.end
        self.local_padding_idx = padding_idx - self.start if owns_pad else None
        self.weight = nn.Parameter(torch.empty(self.end - self.start, embedding_dim, device=device, dtype=dtype))
        if not self.weight.is_meta:
            nn.init.normal_(self.weight)  # nn.Embedding's default init
            if self.local_padding_idx is not None:
                with torch.no_grad():
                    self.weight[self.local_padding_idx].zero_()

    @classmethod
    def from_dense(cls, module: nn.Embedding, group=None, **place):
        """This rank's rows of a dense nn.Embedding (copied)."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding.from_dense needs an nn.Embedding, got {type(module).__name__}")
        w = module.weight  # [vocab, dim]
        layer = cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx, group=group,
                    device="meta", dtype=w.dtype, **place)
        _materialise(layer, w)
        with torch.no_grad():
            layer.weight.copy_(w[layer.start:layer.end])
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [...] int64 in [0, vocab)
        outside = (ids < self.start) | (ids >= self.end)  # [...] not mine
        local = (ids - self.start).masked_fill(outside, 0)  # [...] in [0, rows)
        out = F.embedding(local, self.weight, self.local_padding_idx)  # [..., dim]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # zero the rows other ranks own
        return reduce_from_tp(out, self.group)  # [..., dim]

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"rank={self.rank}/{self.world_size}, vocab shard [{self.start}:{self.end}) "
                f"({self.end - self.start} rows), padding_idx={self.padding_idx}")


class ParallelLMHead(ColumnParallelLinear):
    """logits = h W^T, W [vocab, hidden] split over the vocab (a column split); the logits are
    all-gathered by default (uneven vocab splits are padded, gathered and trimmed)."""

    def __init__(self, hidden: int, vocab: int, bias: bool = False, gather_output: bool = True, group=None,
                 device=None, dtype=None, rank=None, world_size=None):
        super().__init__(hidden, vocab, bias=bias, gather_output=gather_output, group=group,
                         device=device, dtype=dtype, rank=rank, world_size=world_size)

    @classmethod
    def from_dense(cls, module: nn.Linear | nn.Embedding, group=None, gather_output: bool = True, **place):
        """From an nn.Linear lm_head, or an nn.Embedding whose table is tied to it (same [vocab, hidden])."""
        if isinstance(module, nn.Embedding):
            w, b = module.weight, None
        elif isinstance(module, nn.Linear):
            w, b = module.weight, module.bias
        else:
            raise TypeError(f"ParallelLMHead.from_dense needs an nn.Linear or nn.Embedding, "
                            f"got {type(module).__name__}")
        layer = cls(w.shape[1], w.shape[0], bias=b is not None, gather_output=gather_output, group=group,
                    device="meta", dtype=w.dtype, **place)
        _materialise(layer, w)
        with torch.no_grad():
            layer.weight.copy_(w[layer.start:layer.end])
            if b is not None:
                layer.bias.copy_(b[layer.start:layer.end])
        return layer
