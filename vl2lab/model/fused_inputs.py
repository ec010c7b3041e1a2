"""Fused input projections: the linears that read one layer's input, as one matmul.

Lesson: notebook 05, section "2. The ladder, run here" (rung 9).

At decode an attention layer's input projections are matrix-vector products, each its own kernel with its own
launch and tail: q_proj, k_proj and v_proj in MHA (tiny), q_proj and kv_a_proj_with_mqa in MLA (small, base). All
of them read the same x, so stacking their weights as the row blocks of one matrix makes them one product::

    [y_1 | y_2 | …] = x · [W_1; W_2; …]ᵀ  (+ [b_1; b_2; …])        then split along the last dimension

Each row of the result depends only on its own weight row, so every y_i is what its linear gives (up to the
matmul kernel's summation order, which a different shape may change: a bf16 rounding at most).
:meth:`FusedInputs.fuse_inputs` makes the linears' parameters views of the stacked weight, so their names,
values and the state dict are unchanged and a later ``load_state_dict`` writes through to it. Fuse after casting
and moving the model (``.to`` gives the parameters storage of their own again: still equal, but twice the
memory). Only plain ``nn.Linear`` layers are stacked: a tensor-parallel layer's forward can carry a collective
(in its backward), so a sharded model keeps its own projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusedInputs"]


class FusedInputs:
    """Mixin of an attention module whose linears named in ``INPUTS`` all read the layer's input."""

    INPUTS: tuple = ()

    def fuse_inputs(self, on: bool = True) -> bool:
        """Stack the input linears into one weight (``on``) or give them their own storage back; → whether the
        layer now runs them as one matmul."""
        linears = [getattr(self, n) for n in self.INPUTS]
        if not on or any(type(lin) is not nn.Linear for lin in linears):
            if getattr(self, "fused_weight", None) is not None:
                for lin in linears:
                    lin.weight = nn.Parameter(lin.weight.detach().clone(), lin.weight.requires_grad)
                    if lin.bias is not None:
                        lin.bias = nn.Parameter(lin.bias.detach().clone(), lin.bias.requires_grad)
            self.register_buffer("fused_weight", None, persistent=False)
            self.register_buffer("fused_bias", None, persistent=False)
            return False
        sizes = [lin.out_features for lin in linears]
        biased = [lin.bias is not None for lin in linears]
        weight = torch.cat([lin.weight.detach() for lin in linears])
        bias = torch.cat([lin.bias.detach() if b else lin.weight.new_zeros(lin.out_features)
                          for lin, b in zip(linears, biased)]) if any(biased) else None
        for lin, w in zip(linears, weight.split(sizes)):
            lin.weight = nn.Parameter(w, lin.weight.requires_grad)
        if bias is not None:
            for lin, b, part in zip(linears, biased, bias.split(sizes)):
                if b:
                    lin.bias = nn.Parameter(part, lin.bias.requires_grad)
        self.register_buffer("fused_weight", weight, persistent=False)
        self.register_buffer("fused_bias", bias, persistent=False)
        self.fused_sizes = sizes
        return True

    def project_inputs(self, x: torch.Tensor) -> list:
        """The ``INPUTS`` linears of x, in order: one matmul where fused, else each linear."""
        if getattr(self, "fused_weight", None) is None:
            return [getattr(self, n)(x) for n in self.INPUTS]
        return list(F.linear(x, self.fused_weight, self.fused_bias).split(self.fused_sizes, dim=-1))
