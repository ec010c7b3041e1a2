"""Tensor and expert parallelism for the whole DeepSeek-VL2: shard a model in place on every rank.

Lesson: notebook 04 (full 4-GPU deployment), sections 1-3.

Every rank starts from the same model; ``shard_model`` keeps this rank's slice of each split weight and swaps in
the layers of :mod:`vl2lab.parallel.layers`. The maths of one decoder layer on rank r (N ranks)::

    attention:  heads h ∈ H_r.  q,k,v = x W_{q,k,v}[H_r]       (column split, whole heads)
                y = Σ_r o_r W_o[:, H_r]ᵀ                        (row split: ONE all-reduce)
    MLA:        q = x W_q[H_r]; [c | k_pe] = x W_kv_a (replicated, so the latent cache is replicated);
                [k_nope | v] = c W_kv_b[H_r]; then as above
    dense MLP:  y = Σ_r (silu(x W_gate[I_r]ᵀ) ⊙ x W_up[I_r]ᵀ) W_down[:, I_r]ᵀ          (ONE all-reduce)
    MoE:        y = Σ_r ( Σ_{e∈topk} w_e · SwiGLU_e^{(r)}(x) + Shared^{(r)}(x) )        (ONE all-reduce)
                moe="tp": SwiGLU_e^{(r)} uses columns I_r of every expert (fused gate/up [E,I,H] by dim 1,
                          down [E,H,I] by dim 2); moe="ep": rank r holds whole experts [e_r, e_{r+1}) and gives
                          zero for the others. The shared experts are always split by width (Shared^{(r)}), so
                          their partial sum rides in the same all-reduce (``MoE.reduce``, shared_in_reduce=True).
    router, norms, kv_a_proj_with_mqa, kv_a_layernorm, projector, image_newline, view_seperator: replicated.
    embedding:  vocab rows split, one all-reduce (VocabParallelEmbedding); lm_head: vocab split, logits gathered.

KV cache: MHA (tiny) caches K and V of the rank's own heads only (1/N of it, uneven with the heads); the MLA
latent c and k_pe (small, base) are computed by the replicated kv_a_proj_with_mqa, so every rank caches all of it.

Communication per generated token (L layers, batch B, hidden H, vocab V): 2L + 1 all-reduces of B·H values and
one all-gather of the logits (B·V). Vision: ``replicated`` (every rank runs the tower on every tile, no
communication) or ``data_parallel`` (rank r encodes and projects its share of the batch's tiles, then one
all-gather of [N, 196, D]; shares may be uneven, even zero).

Uneven splits are allowed wherever a rank can still hold a whole unit: heads (10 heads on 4 ranks → 3,3,2,2;
vLLM requires heads % N == 0), FFN and expert widths (blocks of 8 channels when every rank gets at least one, so
that bf16 rows stay 16-byte aligned as CUDA's grouped_mm needs; otherwise channel by channel), whole experts
(moe="ep"), vocab rows. A split that would leave a rank with nothing (fewer heads than ranks, …) raises
:class:`~vl2lab.parallel.plan.ShardingError` before the model is touched. Inference only: the backward all-reduces of the column
inputs are not wired for the experts.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vl2lab.model.moe import MoE
from vl2lab.model.vision import layout_images
from vl2lab.parallel.groups import rank_world
from vl2lab.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from vl2lab.parallel.ops import all_gather_rows, reduce_from_tp
from vl2lab.parallel.plan import ShardingError, check_plan, plan_slices, rule_for, vision_mode

__all__ = ["shard_model", "set_vision_mode", "PartialRowLinear"]


class PartialRowLinear(RowParallelLinear):
    """A row-split Linear that returns this rank's partial product X_r W_rᵀ without reducing it: the MoE layer
    adds it to the routed partial sums and reduces once (``MoE.reduce``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)                          # [..., out]: this rank's term only


_LAYERS = {"column": ColumnParallelLinear, "row": RowParallelLinear, "partial_row": PartialRowLinear,
           "vocab": VocabParallelEmbedding, "lm_head": ParallelLMHead}


def _swap(parent: nn.Module, name: str, style: str, weight, group, place: dict) -> nn.Module:
    """Replace ``parent.name`` by its parallel layer for this rank's slice ``weight`` of the plan."""
    dense = getattr(parent, name)
    cls = _LAYERS[style]
    if style == "partial_row" and dense.bias is not None:
        raise ShardingError(f"{name} has a bias; a partial row split needs a bias-free Linear")
    kw = {} if style in ("vocab", "lm_head") else {"unit": weight.unit}
    new = cls.from_dense(dense, group=group, **kw, **place)
    if (new.start, new.end) != (weight.start, weight.end):   # the layer's own range must be the plan's
        raise RuntimeError(f"{name}: the layer holds [{new.start}, {new.end}), the plan says "
                           f"[{weight.start}, {weight.end})")
    setattr(parent, name, new)
    return new


def _narrow(module: nn.Module, name: str, sl) -> None:
    p = getattr(module, name)
    module._parameters[name] = nn.Parameter(p.detach().narrow(sl.dim, sl.start, sl.end - sl.start).clone(),
                                            requires_grad=p.requires_grad)


@torch.no_grad()
def shard_model(model, group=None, moe: str = "tp", vision: str = "replicated", rank=None, world_size=None):
    """Shard a DeepseekVL2ForCausalLM in place for this rank of ``group`` (every rank calls it on the same
    model), or for an explicit ``rank`` of ``world_size`` (any rank's shard, e.g. on the meta device, without a
    launch). Works on real weights (slices are copied, the dense tensors freed) and on the meta device (only
    shapes change; :func:`vl2lab.parallel.load.load_sharded` then reads the slices). Records ``model.tp_layout``
    {tensor key: (dense shape, slices)} and ``model.tp_plan``. Returns the model."""
    if getattr(model, "tp_plan", None):
        raise ShardingError("this model is already sharded; shard a fresh copy (or load_sharded again)")
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank= and world_size=, or neither (then they come from the group)")
    rank, world = rank_world(group) if rank is None else (rank, world_size)
    vision = vision_mode(vision)
    splits = check_plan(model.config, world, moe, vision)                 # ShardingError before any change
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    slices = plan_slices(shapes, model.config.language_config.num_attention_heads, rank, world, moe, vision)
    place = {"rank": rank, "world_size": world}
    modules = dict(model.named_modules())
    for path in [p for p in modules if p and rule_for(p, moe, vision)]:
        rule = rule_for(path, moe, vision)
        parent_path, _, name = path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        if rule.style == "experts":                                      # fused [E, I, H] tensors: narrow them
            experts = getattr(parent, name)
            for tensor, _ in rule.dims:
                _narrow(experts, tensor, slices[f"{path}.{tensor}"])
            if rule.unit == "expert":
                experts.expert_start = slices[f"{path}.gate_proj"].start
        else:
            _swap(parent, name, rule.style, slices[f"{path}.weight"], group, place)
    for layer in model.language.model.layers:
        if isinstance(layer.mlp, MoE):                       # routed + shared partial sums, then ONE all-reduce
            layer.mlp.shared_in_reduce = True
            layer.mlp.reduce = functools.partial(reduce_from_tp, group=group)
    model.tp_layout = {k: (sl.dense_shape, sl.slices) for k, sl in slices.items()}
    model.tp_plan = {"rank": rank, "world_size": world, "moe": moe, "vision": vision, "splits": splits}
    set_vision_mode(model, vision, group)
    return model


class DataParallelImageFeatures:
    """``model.image_features`` with the tiles split over the ranks: rank r runs the tower and the projector on
    tiles [a_r, a_{r+1}) (shares differ by at most one, possibly zero), then one all-gather of the projected
    [n_r, 196, D] (3.7× fewer bytes than gathering the tower's [n_r, 729, 1152]) and the usual layout."""

    def __init__(self, model, group):
        self.model, self.group = model, group

    def __call__(self, pixel_tiles: torch.Tensor, crops) -> torch.Tensor:
        m = self.model
        rank, world = rank_world(self.group)
        n = pixel_tiles.shape[0]
        sizes = [n // world + (r < n % world) for r in range(world)]
        start = sum(sizes[:rank])
        h, d = m.projector.out_grid, m.projector.layers[-1].out_features
        w = m.projector.layers[0].weight
        if sizes[rank]:
            mine = m.projector(m.encode_tiles(pixel_tiles[start:start + sizes[rank]]))   # [n_r, h·h, D]
        else:
            mine = torch.zeros(0, h * h, d, dtype=w.dtype, device=w.device)
        feats = all_gather_rows(mine, sizes, self.group).view(n, h, h, d)              # [N, h, h, D]
        return layout_images(feats, crops, m.image_newline, m.view_seperator)


def set_vision_mode(model, vision: str, group=None) -> None:
    """Switch the vision side between ``replicated`` and ``data_parallel`` (tiles split over the ranks) in place.
    ``tp`` (the vision MLP split) is chosen when the model is sharded; it cannot be switched to or from."""
    vision = vision_mode(vision)
    plan = getattr(model, "tp_plan", None) or {}
    if plan.get("vision") is not None and (plan["vision"] == "tp") != (vision == "tp"):
        raise ShardingError(f"vision={vision!r} on a model sharded with vision={plan['vision']!r}: the vision "
                            "MLP's weights are split only at shard time; shard a fresh model with that mode")
    model.__dict__.pop("image_features", None)                   # back to the class's own image_features
    if vision == "data_parallel":
        model.__dict__["image_features"] = DataParallelImageFeatures(model, group)
    if plan:
        plan["vision"] = vision
