"""Stage 0 of vl2-micro: pre-train the SigLIP tower to see each shape — its kind and, on request, its colour, its
box as the answer writes it and its left neighbour — before the language model ever runs.

Lesson: notebook 03, section "1. The task and the model" (vl2-micro, which ``vl2lab.train.micro`` builds in two
stages; this is the first).

DeepSeek-VL2 never trains its vision tower from nothing: it starts from a pre-trained SigLIP and keeps it frozen
while the adaptor learns to feed the language model (its first training stage). vl2-micro does the same at its
scale. Trained end to end from random weights, the tower picks up colour and blob count within minutes but not the
kind of a shape (square, circle, triangle, cross): the kind is a property of a shape's outline spread over several
patches, and the only signal for it is a few answer tokens behind the whole language model. Nor does it learn
*where* a shape is: the left-of and grounding answers are a few digits behind the same long path. Here the tower
gets direct, dense signals instead — every cell of the global view's patch grid is labelled with the shape under
its centre, one *target* per property (``TARGETS``; a run picks some, ``DEFAULT_TARGETS`` = kind only)::

    s[i, j]  = shape_map(scene)[centre of cell (i, j) of the square-padded image]     0 background, 1 + shape index
    kind        ∈ {0..4}            0 background, 1 + SHAPES.index          CE over every cell
    colour      ∈ {0..4}            0 background, 1 + COLOURS index         CE over the cells on a shape (so below)
    box         ∈ [0, 1]⁴           grid_box / 999 (the answer's 0–999 grid) BOX_WEIGHT · L1
    left_colour, left_kind ∈ {0..4} the shape just left of s (0: none)      CE
    box_chars   ∈ {0..10}¹²         the characters of x1, y1, x2, y2 as the  CE, mean over the 12 slots
                                    answer spells them (10: the number is shorter: 45 → 4, 5, ·)

    head = Linear(W, Σ widths) on each cell's feature; its columns are the chosen targets in TARGETS order
    (:func:`head_slices`), and the loss is the sum of the chosen targets' terms

so each patch feature that lies on a shape carries what a colour, left-of or grounding answer writes about it, and
the language model only has to find the named shape's patches and read them out; then the head is thrown away
and the tower (:func:`load_tower`) starts :func:`vl2lab.train.ddp.train`. The labels use the global view's geometry
(``tiling.pad_resize``: the image centred on a square, scaled to 384): a cell of a G×G patch grid covers side/G
pixels of the square canvas of side max(W, H).

Run as a rank function (``vl2lab.run("vl2lab.train.tower:pretrain_tower", world_size=W, out=...)``): DDP over the
tower and head, W·b scenes per step (train-split seeds, a pure function of the step), AdamW with the warm-up and
cosine of :func:`vl2lab.train.loop.lr_schedule`. Rank 0 writes ``out/tower.safetensors`` and returns the loss
history and, on the eval split's scenes (cells on a shape only: the background is easy), a score per chosen
target (:func:`patch_scores`).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vl2lab.inputs.tiling import global_view
from vl2lab.model import build_model
from vl2lab.model.vision import encode_tiles
from vl2lab.parallel import groups as vdist
from vl2lab.train.batches import step_examples
from vl2lab.train.loop import TrainingError, lr_schedule, resolve_config, wrap_ddp
from vl2lab.train.prefetch import prefetched
from vl2lab.train.scenes import COLOURS, EVAL_OFFSET, SHAPES, make_scene
from vl2lab.weights.pretrained import CheckpointError

__all__ = ["TOWER_FILE", "N_KINDS", "N_COLOURS", "N_CHARS", "BOX_WEIGHT", "Target", "TARGETS", "DEFAULT_TARGETS",
           "check_targets", "head_slices", "describe_scores", "patch_targets", "patch_labels", "patch_scores", "patch_loss",
           "global_views", "eval_batch", "shape_accuracy", "pretrain_tower", "load_tower"]

TOWER_FILE = "tower.safetensors"
N_KINDS, N_COLOURS = 1 + len(SHAPES), 1 + len(COLOURS)     # classes of the kind and colour targets (0: none)
N_CHARS = 11              # a box character: the digits 0–9, and 10 where the number has fewer than 3 digits
BOX_WEIGHT = 3.0          # weight of the box's L1 error (0–1 units) beside the cross-entropies


@dataclass(frozen=True)
class Target:
    """One property each cell learns: ``classes`` > 0 is a classification in each of ``slots`` slots, 0 a
    regression of ``slots`` numbers in [0, 1]; ``score`` is the key of its eval score."""
    name: str
    classes: int
    slots: int
    score: str

    @property
    def width(self) -> int:
        return self.slots * max(1, self.classes)


TARGETS = {t.name: t for t in (
    Target("kind", N_KINDS, 1, "shape_patch_accuracy"),
    Target("colour", N_COLOURS, 1, "colour_patch_accuracy"),
    Target("box", 0, 4, "box_error"),
    Target("left_colour", N_COLOURS, 1, "left_colour_patch_accuracy"),
    Target("left_kind", N_KINDS, 1, "left_kind_patch_accuracy"),
    Target("box_chars", N_CHARS, 12, "box_chars_patch_accuracy"),
)}
DEFAULT_TARGETS = ("kind",)   # the recipe of the shipped vl2-micro


def check_targets(names) -> tuple:
    """The chosen target names in ``TARGETS`` order (``kind`` always first), or one clear :class:`TrainingError`."""
    names = tuple(names)
    bad = [n for n in names if n not in TARGETS]
    if bad or "kind" not in names:
        raise TrainingError(f"tower targets {list(names)}: {'unknown ' + ', '.join(bad) if bad else 'kind is missing'};"
                            f" choose kind and any of {', '.join(t for t in TARGETS if t != 'kind')}")
    return tuple(n for n in TARGETS if n in names)


def head_slices(names) -> dict:
    """name → the slice of the head's outputs that belongs to that target (the head's layout, in one place)."""
    out, at = {}, 0
    for n in check_targets(names):
        out[n] = slice(at, at + TARGETS[n].width)
        at += TARGETS[n].width
    return out


def _chars(v: int) -> list:
    """The 3 character classes of a 0–999 coordinate as the answer spells it: 45 → [4, 5, 10]."""
    s = str(int(v))
    return [int(c) for c in s] + [N_CHARS - 1] * (3 - len(s))


def patch_targets(scene, grid: int, names=tuple(TARGETS)) -> dict:
    """The dense targets of each cell of the scene's global view, row-major, from the shape under the cell's
    centre (module docstring): name → [grid²] long for a one-slot class, [grid², slots] long for several,
    [grid², 4] float for ``box``; every target is 0 on the background."""
    side = max(scene.width, scene.height)
    canvas = np.zeros((side, side), np.uint8)                       # the global view's square, before scaling
    ox, oy = (side - scene.width) // 2, (side - scene.height) // 2
    canvas[oy:oy + scene.height, ox:ox + scene.width] = np.asarray(scene.shape_map())
    idx = ((np.arange(grid) + 0.5) * side / grid).astype(int)       # cell centres
    which = torch.from_numpy(canvas[np.ix_(idx, idx)].reshape(-1).astype(np.int64))   # 0 background, 1 + i
    sh = scene.shapes
    by_x = sorted(sh, key=lambda s: s.cx)
    left = {id(b): a for a, b in zip([None] + by_x, by_x)}          # each shape → the one just left of it, or None
    kind_of = lambda s: 0 if s is None else 1 + SHAPES.index(s.kind)             # noqa: E731
    colour_of = lambda s: 0 if s is None else 1 + list(COLOURS).index(s.colour)  # noqa: E731
    of_shape = {"kind": kind_of, "colour": colour_of, "box": lambda s: [v / 999 for v in scene.grid_box(s)],
                "left_colour": lambda s: colour_of(left[id(s)]), "left_kind": lambda s: kind_of(left[id(s)]),
                "box_chars": lambda s: [c for v in scene.grid_box(s) for c in _chars(v)]}
    out = {}
    for n in check_targets(names):                                  # only the targets asked for are computed
        rows = torch.tensor([of_shape[n](s) for s in sh])           # [shapes] or [shapes, slots]
        out[n] = torch.cat([torch.zeros_like(rows[:1]), rows])[which]   # row 0: the background
    return out


def patch_labels(scene, grid: int) -> torch.Tensor:
    """[grid²] long: the kind (0 background, 1 + ``SHAPES.index``) under the centre of each cell of the scene's
    global view, row-major (the ``kind`` of :func:`patch_targets`)."""
    return patch_targets(scene, grid, ("kind",))["kind"]


def global_views(scenes_: list, image_size: int = 384) -> torch.Tensor:
    """[N, 3, S, S]: the normalized global view of each scene (``tiling.global_view``, tile 0 of every image)."""
    return torch.stack([global_view(s.render(), image_size) for s in scenes_])


class _TowerWithHead(torch.nn.Module):
    def __init__(self, tower: torch.nn.Module, width: int, n_out: int):
        super().__init__()
        self.tower, self.head = tower, torch.nn.Linear(width, n_out)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(encode_tiles(self.tower, pixels))         # [N, grid², n_out]


def _batch(seeds, grid: int, names) -> tuple:
    """(global views, {target: stacked :func:`patch_targets`}) of the scenes of ``seeds``."""
    sc = [make_scene(int(s)) for s in seeds]
    per = [patch_targets(s, grid, names) for s in sc]
    return global_views(sc), {n: torch.stack([p[n] for p in per]) for n in per[0]}


def _step_batch(n_train: int, batch_size: int, world: int, rank: int, seed: int, grid: int, names, step: int) -> tuple:
    """Rank ``rank``'s :func:`_batch` of step ``step`` (train-split seeds; on the CPU)."""
    return _batch(step_examples(range(n_train), step, batch_size, world, rank, seed), grid, names)


def eval_batch(grid: int, n: int = 48, names=DEFAULT_TARGETS) -> tuple:
    """(global views, targets) of the first ``n`` eval-split scenes."""
    return _batch(range(EVAL_OFFSET, EVAL_OFFSET + n), grid, names)


def shape_accuracy(model: torch.nn.Module, batch: tuple) -> float:
    """Kind accuracy on the cells that lie on a shape; ``batch`` = (views, kinds [N, cells]) for a head of the
    kind alone."""
    x, kind = batch
    return patch_scores(model, (x, {"kind": kind}))["shape_patch_accuracy"]


def _split(logits: torch.Tensor, names) -> dict:
    """name → that target's outputs [..., slots, classes] (or [..., slots] for a regression)."""
    out = {}
    for n, sl in head_slices(names).items():
        t = TARGETS[n]
        out[n] = logits[..., sl] if not t.classes else logits[..., sl].unflatten(-1, (t.slots, t.classes))
    return out


def patch_scores(model: torch.nn.Module, batch: tuple) -> dict:
    """On the cells that lie on a shape, one score per target in ``batch`` (views, {name: targets}): the accuracy
    of each class target (over its slots), the mean absolute box error on the 0–999 grid."""
    x, targets = batch
    with torch.no_grad():
        out = _split(model(x.to(vdist.device())).float().cpu(), targets)
    on = targets["kind"] > 0
    res = {}
    for n, y in targets.items():
        t, pred = TARGETS[n], out[n][on]
        y = y[on].reshape(pred.shape[:2]) if t.classes else y[on]
        res[t.score] = (float((pred - y).abs().mean() * 999) if not t.classes else
                        float((pred.argmax(-1) == y).float().mean()))
    return res


def describe_scores(scores: dict) -> str:
    """Eval scores (:func:`patch_scores`' keys) in words: "kind 91.7%, colour 100.0%, box error 34/999"."""
    name = {t.score: t for t in TARGETS.values()}
    return ", ".join(f"{name[k].name.replace('_', ' ')} " + (f"{v:.1%}" if name[k].classes else f"error {v:.0f}/999")
                     for k, v in scores.items() if k in name)


def patch_loss(logits: torch.Tensor, targets: dict, box_weight: float = BOX_WEIGHT,
               shape_kind_weight: float = 0.0) -> torch.Tensor:
    """CE(kind) over every cell + the other targets' terms over the cells on a shape (module docstring), +
    ``shape_kind_weight`` · CE(kind) over the cells on a shape alone (the background, most of the cells and easy,
    otherwise sets the kind's share of the gradient)."""
    out = _split(logits, targets)
    kind = targets["kind"]
    loss = F.cross_entropy(out["kind"].reshape(-1, N_KINDS), kind.reshape(-1))
    on = kind > 0
    if not on.any():
        return loss
    if shape_kind_weight:
        loss = loss + shape_kind_weight * F.cross_entropy(out["kind"][on].reshape(-1, N_KINDS), kind[on])
    for n, y in targets.items():
        t = TARGETS[n]
        if n == "kind":
            continue
        if t.classes:
            loss = loss + F.cross_entropy(out[n][on].reshape(-1, t.classes), y[on].reshape(-1))
        else:
            loss = loss + box_weight * F.l1_loss(out[n][on], y[on])
    return loss


def pretrain_tower(out: str, config="vl2-micro", steps: int = 2000, batch_size: int = 8, lr: float = 1e-3,
                   warmup: int = 50, min_lr_ratio: float = 0.05, n_train: int = 100_000, seed: int = 0,
                   log_every: int = 100, eval_n: int = 48, box_weight: float = BOX_WEIGHT,
                   targets=DEFAULT_TARGETS, shape_kind_weight: float = 0.0, workers: int = 0) -> dict:
    """Rank function: pre-train ``config``'s tower for ``steps`` steps of W·``batch_size`` scenes on the cell
    ``targets`` (names in ``TARGETS``; see the module docstring); rank 0 saves ``out/tower.safetensors``.
    ``workers``: processes per rank drawing the next steps' scenes (:mod:`vl2lab.train.prefetch`). Returns
    the history, the eval scores on shapes (every ``log_every`` steps and at the end) and the wall time."""
    if steps < 1 or batch_size < 1:
        raise TrainingError(f"steps={steps} and batch_size={batch_size} must both be ≥ 1")
    targets = check_targets(targets)
    world, rank = vdist.world_size(), vdist.rank()
    cfg = resolve_config(config)
    grid = cfg.vision_config.grid
    torch.manual_seed(seed)
    tower = build_model(cfg, seed=seed).vision                      # the same initial tower as ddp.train's
    width = sum(TARGETS[n].width for n in targets)
    model = _TowerWithHead(tower, cfg.vision_config.width, width).to(vdist.device()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
    net = wrap_ddp(model) if world > 1 else model
    held_out = eval_batch(grid, eval_n, targets) if rank == 0 else None   # rendered once, scored every log_every steps
    history, evals, t0 = [], [], time.time()
    make = functools.partial(_step_batch, n_train, batch_size, world, rank, seed, grid, targets)
    for step, (x, y) in prefetched(make, range(steps), workers):
        for g in opt.param_groups:
            g["lr"] = lr * lr_schedule(step, steps, warmup, min_lr_ratio)
        logits = net(x.to(vdist.device()))                          # [b, grid², Σ widths]
        loss = patch_loss(logits, {n: t.to(logits.device) for n, t in y.items()}, box_weight=box_weight,
                          shape_kind_weight=shape_kind_weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = loss.detach().reshape(1)
        if world > 1:
            dist.all_reduce(loss_t)
        history.append({"step": step + 1, "loss": float(loss_t) / world, "time_s": time.time() - t0})
        if (step + 1) % log_every == 0 or step + 1 == steps:
            if rank == 0:
                evals.append({"step": step + 1, **patch_scores(model, held_out)})
                print(f"tower step {step + 1:5d}  loss {history[-1]['loss']:.4f}  eval on shapes: "
                      f"{describe_scores(evals[-1])}  {time.time() - t0:.0f} s", flush=True)
            vdist.barrier()
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()},
                  os.path.join(out, TOWER_FILE))
    vdist.barrier()
    return {"history": history, "evals": evals, "train_s": time.time() - t0, "path": os.path.join(out, TOWER_FILE)}


def load_tower(model: torch.nn.Module, path: str) -> None:
    """Put the pre-trained tower in ``path`` (a ``tower.safetensors``) into ``model.vision``, or one clear error."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no pre-trained tower at {path}; run stage 0 first "
                              "(vl2lab.run('vl2lab.train.tower:pretrain_tower', out=...)) or pass tower=''")
    state = load_file(path)
    mine = model.vision.state_dict()
    bad = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
    if bad or len(state) != len(mine):
        raise CheckpointError(f"{path} does not fit this model's vision tower ({len(bad)} missing or mis-shaped "
                              f"tensors, e.g. {bad[:2]}); pre-train the tower with the same config")
    model.vision.load_state_dict({k: v.to(mine[k].dtype) for k, v in state.items()})
