"""DeepSeekMoE feed-forward: the SwiGLU MLP, the router, the routed experts and the MoE layer.

Lesson: notebook 01, section "1. Load the model" (routed and shared experts), and notebook 05, sections
"2. The ladder, run here" and "3. The ladder on one H200" (why a grouped matmul beats a loop over experts).

For a token x (N tokens, E routed experts, top-k of them per token)::

    SwiGLU_e(x) = W_down,e · (silu(W_gate,e x) ⊙ W_up,e x)
    y           = Σ_{e ∈ topk(x)} w_e(x) · SwiGLU_e(x)  +  SharedSwiGLU(x)     (shared width n_shared·I)

Router (scores in fp32, input and weight upcast):

* ``greedy`` (tiny, small): p = softmax(x W_gᵀ); top-k of p; w_e = p_e · routed_scaling_factor (not renormalised
  unless norm_topk_prob).
* ``noaux_tc`` (base): s = sigmoid(x W_gᵀ); the experts are chosen by s + b (b = e_score_correction_bias; with
  n_group > 1 only the topk_group groups with the best sum of their two best scores compete); the weights use s
  alone: w_e = s_e / (Σ_topk s + 1e-20) if norm_topk_prob, times routed_scaling_factor.

The routed sum is accumulated in fp32 and cast back. Every top-k is unsorted, as in the official gate: the order of a
token's k experts is arbitrary and nothing depends on it (on a GPU this spares a sort kernel per layer).

Parallel layouts act on these modules in place: a tensor-parallel rank holds a slice of the expert width I (read
from the tensors), an expert-parallel rank the experts [expert_start, expert_start + n_local_experts) and gives
zero for the others; either way its output is a partial sum that ``MoE.reduce`` (identity here) all-reduces.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vl2lab.model import expert_gemv

__all__ = ["MLP", "Router", "Experts", "MoE", "IMPLS", "grouped_mm_available"]

IMPLS = ("grouped", "dense", "loop", "gemv")                               # Experts.impl

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``grouped_mm`` runs this dtype here without a host sync: CPU fp32/bf16/fp16 (no fp64); CUDA bf16
    only (torch 2.11 on an H200 computes fp32/fp16 too, but through a fallback that synchronises)."""
    if _grouped_mm is None:
        return False
    ok = (torch.float32, torch.bfloat16, torch.float16) if torch.device(device).type == "cpu" else (torch.bfloat16,)
    return dtype in ok


class MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) ⊙ up(x)) (layer 0, and the shared experts)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k gate. ``weight`` [E, H]; for noaux_tc also the fp32 buffer ``e_score_correction_bias`` [E]."""

    def __init__(self, config):
        super().__init__()
        E = config.n_routed_experts
        self.top_k, self.method = config.num_experts_per_tok, config.topk_method
        self.n_group, self.topk_group = config.n_group or 1, config.topk_group or 1
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        """``.to(bf16)`` etc. move the correction bias but keep it fp32 (its exact value decides the routing)."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None:
            moved = self.e_score_correction_bias
            self.e_score_correction_bias = (moved if bias.is_meta else bias).to(moved.device, torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] → expert ids [N, k] (int64) and weights [N, k] (fp32)."""
        logits = F.linear(x.float(), self.weight.float())                  # [N, E]
        if self.method == "noaux_tc":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
            if self.n_group > 1:                                            # keep the best topk_group groups
                N, E = choice.shape
                groups = choice.view(N, self.n_group, -1)
                group_score = groups.topk(2, dim=-1).values.sum(-1)         # [N, G]
                keep = group_score.topk(self.topk_group, dim=-1, sorted=False).indices
                gmask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
                choice = groups.masked_fill(~gmask[..., None], float("-inf")).view(N, E)
            idx = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, idx)
        else:
            scores = logits.softmax(dim=-1)
            weights, idx = scores.topk(self.top_k, dim=-1, sorted=False)      # unsorted, as the official gate
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weights * self.scaling


class Experts(nn.Module):
    """Routed experts as fused 3-D weights: ``gate_proj``/``up_proj`` [E, I, H], ``down_proj`` [E, H, I].

    ``impl`` picks the computation (all give the same result):

    * ``"grouped"``: sort the (token, expert) pairs by expert, find each expert's slice with a searchsorted on the
      device, run three grouped matmuls over the slices, scatter-add back. No host synchronisation (no
      ``.item()``, nonzero or boolean indexing), so it can be captured in a CUDA graph. Uses ``grouped_mm``
      when it takes the dtype (see :func:`grouped_mm_available`), otherwise the ``"dense"`` computation.
    * ``"dense"``: every local expert on every token as batched matmuls, combined with a [N, E] weight matrix that
      is zero off the chosen experts: E/k times the work, also free of host syncs.
    * ``"loop"``: the official style, a Python loop over experts with index selection (one host sync per expert).
    * ``"gemv"``: forwards of at most :data:`~vl2lab.model.expert_gemv.MAX_PAIRS` (token, expert) pairs (decode)
      run two Triton kernels that read only the chosen experts' rows (:mod:`vl2lab.model.expert_gemv`); larger
      forwards, or a device without Triton, use ``"grouped"``.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts                   # global count; this module holds n_local_experts of them
        self.expert_start = 0
        self.impl = "grouped"
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    @property
    def n_local_experts(self) -> int:
        return self.gate_proj.shape[0]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], idx [N, k] global expert ids, weights [N, k] fp32 → Σ_k w·SwiGLU_e(x) [N, H] in x.dtype;
        experts outside this module's range contribute zero."""
        impl = self.impl
        if impl not in IMPLS:
            raise ValueError(f"Experts.impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
        acc = torch.promote_types(x.dtype, torch.float32)                  # weighted sum in fp32 (or wider)
        if impl == "gemv":                                                  # shapes only: fixed per captured step
            y = self._gemv(x, idx, weights)
            if y is not None:
                return y
            impl = "grouped"
        if impl == "grouped" and not grouped_mm_available(x.dtype, x.device):
            impl = "dense"
        return getattr(self, "_" + impl)(x, idx - self.expert_start, weights.to(acc), acc).to(x.dtype)

    def with_shared(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, shared: MLP):
        """``forward`` plus ``shared(x)`` in the same two kernels when ``impl="gemv"`` and they apply (see
        :mod:`~vl2lab.model.expert_gemv`); None otherwise (the caller adds the shared experts itself)."""
        if self.impl != "gemv":
            return None
        return self._gemv(x, idx, weights, (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight))

    def _gemv(self, x, idx, weights, shared=None):
        """The kernels of :mod:`~vl2lab.model.expert_gemv` on this forward (and the shared experts' weights), or
        None where they do not apply."""
        w = self.gate_proj, self.up_proj, self.down_proj
        if not expert_gemv.applies(x, idx, *w, *(shared or ())):
            return None
        return expert_gemv.routed_gemv(x, idx - self.expert_start, weights, *w, shared=shared)

    def _loop(self, x, local, weights, acc):
        out = torch.zeros(x.shape, dtype=acc, device=x.device)
        for e in range(self.n_local_experts):
            token, slot = torch.where(local == e)                           # host sync (nonzero)
            if token.numel() == 0:
                continue
            xe = x[token]                                                   # [n_e, H]
            h = F.silu(xe @ self.gate_proj[e].T) * (xe @ self.up_proj[e].T)  # [n_e, I]
            out.index_add_(0, token, (h @ self.down_proj[e].T).to(acc) * weights[token, slot, None])
        return out

    def _dense(self, x, local, weights, acc):
        E = self.n_local_experts
        valid = (local >= 0) & (local < E)
        combine = torch.zeros(x.shape[0], E + 1, dtype=acc, device=x.device)   # [N, E+1]
        combine.scatter_add_(1, torch.where(valid, local, E), weights * valid)
        h = F.silu(torch.einsum("nh,eih->eni", x, self.gate_proj)) * torch.einsum("nh,eih->eni", x, self.up_proj)
        y = torch.einsum("eni,ehi->enh", h, self.down_proj)                # [E, N, H]
        return torch.einsum("ne,enh->nh", combine[:, :E], y.to(acc))

    def _grouped(self, x, local, weights, acc):
        N, k = local.shape
        E = self.n_local_experts
        valid = (local >= 0) & (local < E)
        bucket = torch.where(valid, local, E).flatten()                     # [N·k]; E = not on this rank
        bucket, order = bucket.sort(stable=True)                           # pairs grouped by expert
        token = order // k                                                  # [P] token of each sorted pair
        ends = torch.searchsorted(bucket, torch.arange(E, device=x.device), right=True).to(torch.int32)
        xs = x[token]                                                       # [P, H]
        h = F.silu(_grouped_mm(xs, self.gate_proj.transpose(1, 2), offs=ends)) \
            * _grouped_mm(xs, self.up_proj.transpose(1, 2), offs=ends)      # [P, I]
        ys = _grouped_mm(h, self.down_proj.transpose(1, 2), offs=ends)     # [P, H]; rows past ends[-1] undefined
        w = weights.flatten()[order]                                        # [P]
        ys = torch.where((bucket < E)[:, None], ys.to(acc) * w[:, None], 0.0)
        return torch.zeros(x.shape, dtype=acc, device=x.device).index_add_(0, token, ys)


class MoE(nn.Module):
    """Router + routed experts + shared experts, and the ``reduce`` hook.

    ``reduce`` (identity here) is applied once to the combined output; parallel code replaces it with an
    all-reduce. ``shared_in_reduce`` says whether the shared experts' output goes through it (True: they are
    sharded the same way as the routed partial sums, e.g. tensor parallel; False: they are replicated and added
    after the reduction, e.g. expert parallel)."""

    def __init__(self, config):
        super().__init__()
        I = config.moe_intermediate_size
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, I)
        self.shared_experts = MLP(config.hidden_size, I * config.n_shared_experts) if config.n_shared_experts \
            else None
        self.reduce = _identity
        self.shared_in_reduce = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape                                                     # [B, T, H]
        flat = x.reshape(-1, shape[-1])                                     # [N, H]
        idx, weights = self.gate(flat)
        shared_first = self.shared_experts is not None and self.shared_in_reduce   # joins the sum before reduce
        y = self.experts.with_shared(flat, idx, weights, self.shared_experts) if shared_first else None
        if y is None:                                                       # not fused into the expert kernels
            y = self.experts(flat, idx, weights)
            if shared_first:
                y = y + self.shared_experts(flat)
        y = self.reduce(y.view(shape))
        if self.shared_experts is not None and not self.shared_in_reduce:
            y = y + self.shared_experts(x)
        return y


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
