"""The sharding plan: one table says how every weight of DeepSeek-VL2 is split over N ranks.

Lesson: notebook 04, section "1. What each rank holds".

Each row of :data:`PLAN` maps a module path pattern to a :class:`Rule`: how :mod:`vl2lab.parallel.shard` swaps the
module (``style``), which dimension of each of its tensors is split, and in what unit::

    unit "head"     whole attention heads: blocks of size(dim) / n_heads (head_dim; MLA: q_head_dim, nope + v_dim)
    unit "channel"  FFN and expert channels, in blocks of 8 when every rank still gets a block (bf16 rows stay
                    16-byte aligned, as CUDA's grouped_mm needs), else one by one
    unit "expert"   whole routed experts (moe="ep")
    unit "row"      vocabulary rows

Splits may be uneven (10 heads on 4 ranks → 3, 3, 2, 2; the first ranks take one unit more), but every rank must
hold at least one unit, else :class:`ShardingError` names every quantity that cannot be split. What no rule matches
is replicated: norms, the router, MLA's kv_a_proj_with_mqa and kv_a_layernorm (so the latent KV cache is
replicated), the projector, image_newline / view_seperator, and the vision tower (except its MLP with vision="tp").

Everything that needs to know what a rank holds reads this table: :func:`vl2lab.parallel.shard.shard_model`
(applies it), :func:`check_plan` (can this world size split the model?), :func:`plan_slices` (what rank r holds,
from tensor shapes alone: no launch, no weights), the per-rank loader (:mod:`vl2lab.parallel.load` reads only those
slices) and the planner's per-GPU bytes (:func:`vl2lab.planner.layouts.rank_weight_params`).
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional

from vl2lab.model.config import VL2Config
from vl2lab.model.vl2 import build_model
from vl2lab.parallel.ops import split_sizes

__all__ = ["ShardingError", "Rule", "Slice", "PLAN", "MOE_MODES", "VISION_MODES", "vision_mode", "rule_for",
           "ffn_unit", "plan_slices", "check_plan", "model_shapes", "holdings_by_rank"]

MOE_MODES = ("tp", "ep")
VISION_MODES = ("replicated", "data_parallel", "tp")   # tower on every rank | tiles split over ranks | MLP split
VISION_ALIASES = {"dp": "data_parallel", "data-parallel": "data_parallel", "replicate": "replicated"}


class ShardingError(ValueError):
    """The model cannot be split over this many ranks (the message names the dimension and what to do)."""


@dataclass(frozen=True)
class Rule:
    """How one module is split. ``dims``: (tensor name, dimension split) for each of its split tensors (a tensor
    the module lacks, such as an absent bias, is skipped; tensors not named stay whole). ``key``/``what``: the
    split quantity, as :func:`check_plan` reports it. ``moe``/``vision``: the rule holds only in that mode."""
    style: str                      # column | row | partial_row | vocab | lm_head | experts
    dims: tuple
    unit: str                       # head | channel | expert | row
    key: str
    what: str
    moe: Optional[str] = None
    vision: Optional[str] = None


_L = r"language\.model\.layers\.\d+\."
_COL, _ROW = (("weight", 0), ("bias", 0)), (("weight", 1),)   # a row split adds the whole bias once, after the sum
PLAN = (
    (r"language\.model\.embed_tokens", Rule("vocab", (("weight", 0),), "row", "vocab", "vocabulary rows")),
    (_L + r"self_attn\.(q_proj|k_proj|v_proj|kv_b_proj)", Rule("column", _COL, "head", "heads", "attention heads")),
    (_L + r"self_attn\.o_proj", Rule("row", _ROW, "head", "heads", "attention heads")),
    (_L + r"mlp\.(gate_proj|up_proj)", Rule("column", _COL, "channel", "dense_width", "dense MLP width")),
    (_L + r"mlp\.down_proj", Rule("row", _ROW, "channel", "dense_width", "dense MLP width")),
    (_L + r"mlp\.shared_experts\.(gate_proj|up_proj)",
     Rule("column", _COL, "channel", "shared_width", "shared-experts width")),
    (_L + r"mlp\.shared_experts\.down_proj",           # its partial sum joins the routed experts' one all-reduce
     Rule("partial_row", _ROW, "channel", "shared_width", "shared-experts width")),
    (_L + r"mlp\.experts", Rule("experts", (("gate_proj", 1), ("up_proj", 1), ("down_proj", 2)), "channel",
                                "expert_width", "expert width with moe='tp'", moe="tp")),
    (_L + r"mlp\.experts", Rule("experts", (("gate_proj", 0), ("up_proj", 0), ("down_proj", 0)), "expert",
                                "experts", "routed experts with moe='ep' (moe='tp' splits every expert's width "
                                "instead)", moe="ep")),
    (r"language\.lm_head", Rule("lm_head", (("weight", 0),), "row", "vocab", "vocabulary rows")),
    (r"vision\.encoder\.layers\.\d+\.mlp\.fc1",
     Rule("column", _COL, "channel", "vision_mlp_width", "vision MLP width", vision="tp")),
    (r"vision\.encoder\.layers\.\d+\.mlp\.fc2",
     Rule("row", _ROW, "channel", "vision_mlp_width", "vision MLP width", vision="tp")),
)
_COMPILED = tuple((re.compile(p + "$"), r) for p, r in PLAN)


class Slice(NamedTuple):
    """Rank r's part of one tensor: the dense shape, the split dimension and [start, end) along it."""
    dense_shape: tuple
    dim: int
    start: int
    end: int
    unit: int = 1                   # the block size the split is made of (head_dim for whole heads, 8 channels, …)

    @property
    def shape(self) -> tuple:
        return self.dense_shape[:self.dim] + (self.end - self.start,) + self.dense_shape[self.dim + 1:]

    @property
    def slices(self) -> tuple:
        """Leading-dim slices, as the snapshot reader takes them."""
        return (slice(None),) * self.dim + (slice(self.start, self.end),)


def vision_mode(vision: str) -> str:
    """The canonical name of a vision mode ('dp' → 'data_parallel'), or one clear error."""
    mode = VISION_ALIASES.get(vision, vision)
    if mode not in VISION_MODES:
        raise ValueError(f"vision={vision!r}: choose 'replicated', 'data_parallel' (alias 'dp') or 'tp' "
                         "(the vision MLP split over the ranks)")
    return mode


def _check_moe(moe: str) -> None:
    if moe not in MOE_MODES:
        raise ValueError(f"moe={moe!r}: choose 'tp' (split every expert's width) or 'ep' (whole experts per rank)")


@functools.lru_cache(maxsize=4096)
def rule_for(module_path: str, moe: str = "tp", vision: str = "replicated") -> Optional[Rule]:
    """The rule that splits ``module_path`` under these modes, or None (the module is replicated)."""
    for pattern, rule in _COMPILED:
        if pattern.match(module_path) and rule.moe in (None, moe) and rule.vision in (None, vision):
            return rule
    return None


def ffn_unit(width: int, world_size: int) -> int:
    """Split granularity of an FFN/expert width: 8 channels when every rank still gets a block, else 1."""
    return 8 if width % 8 == 0 and width // 8 >= world_size else 1


def _unit(rule: Rule, size: int, n_heads: int, world: int) -> int:
    if rule.unit == "head":
        return size // n_heads
    return ffn_unit(size, world) if rule.unit == "channel" else 1


def plan_slices(shapes: dict, n_heads: int, rank: int, world_size: int, moe: str = "tp",
                vision: str = "replicated", ep: Optional[tuple] = None) -> dict:
    """What rank ``rank`` of ``world_size`` holds of every split tensor: {tensor key: :class:`Slice`} (keys not
    returned are replicated). ``shapes``: {tensor key: dense shape} (:func:`model_shapes`). ``ep``: (rank, size)
    of the expert-parallel group when it differs from the tensor-parallel one (the planner's layouts; vl2lab's
    moe="ep" splits the experts over the same ranks). One ShardingError lists every quantity that cannot give each
    rank at least one unit."""
    _check_moe(moe)
    vision = vision_mode(vision)
    out, bad = {}, {}
    for key, shape in shapes.items():
        module, _, tensor = key.rpartition(".")
        rule = rule_for(module, moe, vision)
        dim = dict(rule.dims).get(tensor) if rule else None
        if dim is None:
            continue
        r, w = ep if (ep and rule.unit == "expert") else (rank, world_size)
        size = shape[dim]
        unit = _unit(rule, size, n_heads, w)
        if size // unit < w:
            bad[rule.key] = (f"{size // unit} {rule.what} cannot be split over {w} ranks; "
                             f"at most {size // unit} rank(s)")
            continue
        sizes = split_sizes(size, w, unit)
        start = sum(sizes[:r])
        out[key] = Slice(tuple(shape), dim, start, start + sizes[r], unit)
    if bad:
        raise ShardingError("cannot shard this model: " + "; ".join(bad.values()) + ". Use a smaller world size"
                            + (" (or moe='tp')" if "experts" in bad else ""))
    return out


@functools.lru_cache(maxsize=16)
def _shapes(config_json: str) -> tuple:
    model = build_model(VL2Config.from_dict(json.loads(config_json)), device="meta")
    return tuple((k, tuple(t.shape)) for k, t in model.state_dict().items())


def model_shapes(config) -> dict:
    """{tensor key: dense shape} of every parameter and persistent buffer of the model of ``config`` (built once
    on the meta device and cached)."""
    return dict(_shapes(json.dumps(config.to_dict(), sort_keys=True)))


def check_plan(config, world_size: int, moe: str = "tp", vision: str = "replicated") -> dict:
    """The per-rank split of every split quantity — {"heads": [3, 3, 2, 2], "vocab": [rows...], "dense_width":
    [channels...], "experts": [counts...], ...} — or one ShardingError naming every quantity that cannot give each
    of ``world_size`` ranks a unit. ``config``: a VL2Config."""
    lc = config.language_config
    if not lc.use_mla and lc.num_key_value_heads != lc.num_attention_heads:
        raise ShardingError(f"{lc.num_key_value_heads} key/value heads for {lc.num_attention_heads} query heads: "
                            "grouped-query attention is not part of this sharding plan (DeepSeek-VL2 has none)")
    n_heads, vision = lc.num_attention_heads, vision_mode(vision)
    out = {}
    for key, sl in plan_slices(model_shapes(config), n_heads, 0, world_size, moe, vision).items():
        rule = rule_for(key.rpartition(".")[0], moe, vision)
        if rule.key not in out:
            size = sl.dense_shape[sl.dim]
            unit = _unit(rule, size, n_heads, world_size)
            sizes = split_sizes(size, world_size, unit)
            out[rule.key] = [s // unit for s in sizes] if rule.unit in ("head", "expert") else sizes
    return out


def holdings_by_rank(config, world_size: int, vision: str = "replicated") -> dict:
    """What each rank holds under moe="tp" and moe="ep", from the plan and the config alone (no model weights, no
    launch): {moe: [one row per rank] or the ShardingError message}. Row: heads (count and [start, end) of the
    head index), vocab_rows [start, end), dense / shared widths, experts [start, end) and expert width."""
    lc = config.language_config
    shapes = model_shapes(config)
    out = {}
    for moe in MOE_MODES:
        try:
            check_plan(config, world_size, moe, vision)
        except ShardingError as e:
            out[moe] = str(e)
            continue
        rows = []
        for r in range(world_size):
            got = plan_slices(shapes, lc.num_attention_heads, r, world_size, moe, vision)
            first = {}                                   # the first split tensor of each quantity says it all
            for key, sl in got.items():
                first.setdefault(rule_for(key.rpartition(".")[0], moe, vision_mode(vision)).key, sl)
            q = first["heads"]
            hd = q.dense_shape[q.dim] // lc.num_attention_heads
            row = {"rank": r, "heads": (q.end - q.start) // hd, "head_range": (q.start // hd, q.end // hd),
                   "vocab_rows": (first["vocab"].start, first["vocab"].end)}
            for k in ("dense_width", "shared_width"):
                if k in first:
                    row[k] = first[k].end - first[k].start
            if lc.is_moe:
                E, I = lc.n_routed_experts, lc.moe_intermediate_size
                if moe == "ep":
                    row["experts"], row["expert_width"] = (first["experts"].start, first["experts"].end), I
                else:
                    row["experts"], row["expert_width"] = (0, E), first["expert_width"].end - first["expert_width"].start
            rows.append(row)
        out[moe] = rows
    return out

