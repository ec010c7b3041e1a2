"""The one sharding plan (vl2lab.parallel.plan) is what every reader of it sees: shard_model's modules, the
per-rank holdings computed from shapes alone, check_plan, and the planner's per-GPU bytes — for every preset at
every world size the plan can split."""
import pytest
import torch

from vl2lab.launch.launcher import run
from vl2lab.model import build_model
from vl2lab.model.config import PRESETS, get_config
from vl2lab.parallel.comm import describe_rank
from vl2lab.parallel.plan import (PLAN, ShardingError, check_plan, holdings_by_rank, model_shapes, plan_slices,
                                  rule_for)
from vl2lab.parallel.shard import set_vision_mode, shard_model
from vl2lab.planner.layouts import legal_tp_sizes, part_of, rank_weight_params

MODES = [("tp", "replicated"), ("ep", "replicated"), ("tp", "tp")]


def _sizes(name):
    cfg = get_config(name)
    heads = cfg.language_config.num_attention_heads
    return cfg, [w for w in (1, 2, 3, 4, 8) if w <= heads]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("moe,vision", MODES)
def test_shard_model_holds_what_the_plan_says_on_every_rank(name, moe, vision):
    """shard_model with an explicit (rank, world size) on the meta device — no launch — holds exactly the
    shapes of plan_slices, and the planner's rank_weight_params counts exactly those elements."""
    cfg, sizes = _sizes(name)
    shapes = model_shapes(cfg)
    for world in sizes:
        try:
            check_plan(cfg, world, moe, vision)
        except ShardingError:
            continue
        for rank in sorted({0, world - 1}):
            model = shard_model(build_model(cfg, device="meta"), moe=moe, vision=vision, rank=rank,
                                world_size=world)
            got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
            want = plan_slices(shapes, cfg.language_config.num_attention_heads, rank, world, moe, vision)
            assert got.keys() == shapes.keys()
            for key, shape in got.items():
                assert shape == (want[key].shape if key in want else shapes[key]), key
            assert set(model.tp_layout) == set(want)
            counted = rank_weight_params(cfg, tp=world, ep=world, moe=moe, vision=vision, rank=rank)["total"]
            assert counted == sum(t.numel() for t in model.state_dict().values())
            if rank == 0:                                   # the first ranks take the extra units
                assert counted >= rank_weight_params(cfg, world, world, moe, vision, rank=world - 1)["total"]


@pytest.mark.parametrize("name", PRESETS)
def test_holdings_from_the_config_match_a_sharded_model(name):
    cfg, sizes = _sizes(name)
    world = sizes[-1]
    table = holdings_by_rank(cfg, world)
    for moe in ("tp", "ep"):
        if isinstance(table[moe], str):                     # the plan refused: check_plan says the same
            with pytest.raises(ShardingError):
                check_plan(cfg, world, moe)
            continue
        for row in table[moe]:
            held = describe_rank(shard_model(build_model(cfg, device="meta"), moe=moe, rank=row["rank"],
                                             world_size=world))
            assert held["heads"] == row["heads"] and held["vocab_rows"] == row["vocab_rows"]
            for k in ("dense_width", "shared_width", "expert_width", "experts"):
                if k in row:
                    assert held[k] == row[k], k


def test_every_tensor_has_a_part_and_every_rule_matches_something():
    shapes = model_shapes(get_config("random-small")) | model_shapes(get_config("random-tiny"))
    for key in shapes:
        part_of(key)                                        # KeyError for a tensor no part claims
    paths = {k.rpartition(".")[0] for k in shapes}
    for pattern, rule in PLAN:
        modes = (rule.moe or "tp", rule.vision or "replicated")
        assert any(rule_for(p, *modes) is rule for p in paths), pattern


def test_legal_sizes_are_the_plans():
    cfg = get_config("deepseek-vl2-tiny")
    legal = legal_tp_sizes(cfg, 12)
    for t in range(1, 13):
        if t in legal:
            check_plan(cfg, t)
        else:
            with pytest.raises(ShardingError):
                check_plan(cfg, t)
    assert check_plan(cfg, 4)["heads"] == [3, 3, 2, 2]


def test_vision_tp_splits_the_tower_mlp_and_cannot_be_switched():
    cfg = get_config("random-tiny")
    model = shard_model(build_model(cfg, device="meta"), vision="tp", rank=1, world_size=2)
    fc1 = model.vision.encoder.layers[0].mlp.fc1
    assert fc1.weight.shape[0] < cfg.vision_config.mlp_dim
    with pytest.raises(ShardingError, match="shard a fresh model"):
        set_vision_mode(model, "data_parallel")
    with pytest.raises(ValueError, match="rank="):
        shard_model(build_model(cfg, device="meta"), rank=1)


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("moe,vision", MODES)
def test_per_rank_bytes_partition_the_model_at_every_legal_world_size(name, moe, vision):
    """At every world size the plan allows (up to 16): the ranks' slices of each split tensor tile it exactly (no
    overlap, no gap), and the planner's per-rank count is the replicated tensors plus the rank's slices."""
    cfg = get_config(name)
    shapes = model_shapes(cfg)
    heads = cfg.language_config.num_attention_heads
    for t in legal_tp_sizes(cfg, 16, moe, vision):
        ranks = [plan_slices(shapes, heads, r, t, moe, vision) for r in range(t)]
        split = set(ranks[0])
        assert all(set(sl) == split for sl in ranks)
        for key in split:
            pieces = sorted((sl[key].start, sl[key].end) for sl in ranks)
            assert pieces[0][0] == 0 and pieces[-1][1] == shapes[key][ranks[0][key].dim], (t, key)
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), (t, key)
        replicated = sum(_numel(s) for k, s in shapes.items() if k not in split)
        counts = [rank_weight_params(cfg, tp=t, ep=t, moe=moe, vision=vision, rank=r)["total"] for r in range(t)]
        assert counts == [replicated + sum(_numel(v.shape) for v in sl.values()) for sl in ranks], t
        assert counts[0] == max(counts)                      # rank 0 is the most loaded, as the planner assumes


def test_vision_tp_on_two_ranks_answers_what_one_device_answers():
    """The vision MLP split by the plan (vision="tp"), run for real on 2 gloo ranks: identical greedy tokens, and
    prefill logits within the stated tolerance of the dense model."""
    res = run("vl2lab.lessons.sharded_vs_dense:compare_with_dense", world_size=2, backend="gloo", timeout=300,
              model="random-tiny", moe="tp", vision="tp", max_new_tokens=4)
    for r in res.values:
        assert r["tokens_equal"] and r["logits_within_tol"] and r["holds"]["vision"] == "tp"
        assert r["param_bytes"] < r["dense_param_bytes"]
