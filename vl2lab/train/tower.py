"""Stage 0 of vl2-micro: pre-train the SigLIP tower to see each shape's kind, colour and box, before the language
model ever runs.

Lesson: notebook 03, section "1. The task and the model" (vl2-micro, which ``vl2lab.train.micro`` builds in two
stages; this is the first).

DeepSeek-VL2 never trains its vision tower from nothing: it starts from a pre-trained SigLIP and keeps it frozen
while the adaptor learns to feed the language model (its first training stage). vl2-micro does the same at its
scale. Trained end to end from random weights, the tower picks up colour and blob count within minutes but not the
kind of a shape (square, circle, triangle, cross): the kind is a property of a shape's outline spread over several
patches, and the only signal for it is a few answer tokens behind the whole language model. Nor does it learn
*where* a shape is: the left-of and grounding answers are a few digits behind the same long path. Here the tower
gets direct, dense signals instead — every cell of the global view's patch grid is labelled with the shape under
its centre: its kind, its colour and its box (on the answers' 0–999 grid)::

    s[i, j]  = shape_map(scene)[centre of cell (i, j) of the square-padded image]     0 background, 1 + shape index
    targets  = kind(s) ∈ {0..4},  colour(s) ∈ {0..4},  box(s) / 999 ∈ [0, 1]⁴        (box only on shapes)
    loss     = CE(kind) over all cells + CE(colour) + BOX_WEIGHT · L1(box) over the cells on a shape
               head: Linear(W, 5 + 5 + 4) on each cell's feature

so each patch feature that lies on a shape carries the numbers a grounding answer writes and the centre a left-of
answer compares, and the language model only has to find the named shape's patches and read them out;
then the head is thrown away and the tower (:func:`load_tower`) starts :func:`vl2lab.train.ddp.train`. The labels use the
global view's geometry (``tiling.pad_resize``: the image centred on a square, scaled to 384): a cell of a G×G patch
grid covers side/G pixels of the square canvas of side max(W, H).

Run as a rank function (``vl2lab.run("vl2lab.train.tower:pretrain_tower", world_size=W, out=...)``): DDP over the
tower and head, W·b scenes per step (train-split seeds, a pure function of the step), AdamW with the warm-up and
cosine of :func:`vl2lab.train.loop.lr_schedule`. Rank 0 writes ``out/tower.safetensors`` and returns the loss
history and, on the eval split's scenes (cells on a shape only: the background is easy), the kind and colour
accuracy and the mean box error on the 0–999 grid (:func:`patch_scores`).
"""
from __future__ import annotations

import os
import time

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
from vl2lab.train.scenes import COLOURS, EVAL_OFFSET, SHAPES, make_scene
from vl2lab.weights.pretrained import CheckpointError

__all__ = ["TOWER_FILE", "N_KINDS", "N_COLOURS", "BOX_WEIGHT", "patch_targets", "patch_labels", "patch_scores",
           "patch_loss", "global_views", "eval_batch", "shape_accuracy", "pretrain_tower",
           "load_tower"]

TOWER_FILE = "tower.safetensors"
N_KINDS, N_COLOURS = 1 + len(SHAPES), 1 + len(COLOURS)     # classes of the kind and colour targets (0: background)
BOX_WEIGHT = 3.0          # weight of the box's L1 error (0–1 units) beside the two cross-entropies


def patch_targets(scene, grid: int) -> tuple:
    """The dense targets of each cell of the scene's global view, row-major, from the shape under the cell's
    centre: (kind [grid²] long: 0 background, 1 + ``SHAPES.index``; colour [grid²] long: 0 background,
    1 + index in ``COLOURS``; box [grid², 4] float: that shape's box on the answers' 0–999 grid, divided by 999,
    zeros on the background)."""
    side = max(scene.width, scene.height)
    canvas = np.zeros((side, side), np.uint8)                       # the global view's square, before scaling
    ox, oy = (side - scene.width) // 2, (side - scene.height) // 2
    canvas[oy:oy + scene.height, ox:ox + scene.width] = np.asarray(scene.shape_map())
    idx = ((np.arange(grid) + 0.5) * side / grid).astype(int)       # cell centres
    which = torch.from_numpy(canvas[np.ix_(idx, idx)].reshape(-1).astype(np.int64))   # 0 background, 1 + i
    sh = scene.shapes
    kind = torch.tensor([0] + [1 + SHAPES.index(s.kind) for s in sh])[which]
    colour = torch.tensor([0] + [1 + list(COLOURS).index(s.colour) for s in sh])[which]
    box = torch.tensor([[0.0] * 4] + [[v / 999 for v in scene.grid_box(s)] for s in sh])[which]
    return kind, colour, box


def patch_labels(scene, grid: int) -> torch.Tensor:
    """[grid²] long: the kind (0 background, 1 + ``SHAPES.index``) under the centre of each cell of the scene's
    global view, row-major (the first of :func:`patch_targets`)."""
    return patch_targets(scene, grid)[0]


def global_views(scenes_: list, image_size: int = 384) -> torch.Tensor:
    """[N, 3, S, S]: the normalized global view of each scene (``tiling.global_view``, tile 0 of every image)."""
    return torch.stack([global_view(s.render(), image_size) for s in scenes_])


class _TowerWithHead(torch.nn.Module):
    def __init__(self, tower: torch.nn.Module, width: int, n_out: int):
        super().__init__()
        self.tower, self.head = tower, torch.nn.Linear(width, n_out)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(encode_tiles(self.tower, pixels))         # [N, grid², n_out]


def _batch(seeds, grid: int) -> tuple:
    """(global views, kinds, colours, boxes) of the scenes of ``seeds`` (:func:`patch_targets`, stacked)."""
    sc = [make_scene(int(s)) for s in seeds]
    kinds, colours, boxes = zip(*(patch_targets(s, grid) for s in sc))
    return global_views(sc), torch.stack(kinds), torch.stack(colours), torch.stack(boxes)


def eval_batch(grid: int, n: int = 48) -> tuple:
    """(global views, kinds, colours, boxes) of the first ``n`` eval-split scenes."""
    return _batch(range(EVAL_OFFSET, EVAL_OFFSET + n), grid)


def shape_accuracy(model: torch.nn.Module, batch: tuple) -> float:
    """Kind accuracy on the cells that lie on a shape, over an :func:`eval_batch` (or its first two parts)."""
    return patch_scores(model, batch)["shape_patch_accuracy"]


def patch_scores(model: torch.nn.Module, batch: tuple) -> dict:
    """On the cells that lie on a shape: kind accuracy, and (with colours and boxes in ``batch``) colour accuracy
    and the mean absolute box error on the 0–999 grid."""
    x, y = batch[0], batch[1]
    with torch.no_grad():
        out = model(x.to(vdist.device())).float().cpu()
    on = y > 0
    res = {"shape_patch_accuracy": float((out[..., :N_KINDS].argmax(-1)[on] == y[on]).float().mean())}
    if len(batch) == 4:
        colour, box = batch[2], batch[3]
        res["colour_patch_accuracy"] = float((out[..., N_KINDS:N_KINDS + N_COLOURS].argmax(-1)[on]
                                              == colour[on]).float().mean())
        res["box_error"] = float((out[..., N_KINDS + N_COLOURS:][on] - box[on]).abs().mean() * 999)
    return res


def patch_loss(logits: torch.Tensor, kind: torch.Tensor, colour: torch.Tensor, box: torch.Tensor,
               box_weight: float = BOX_WEIGHT) -> torch.Tensor:
    """CE(kind) over every cell + CE(colour) + ``box_weight`` · L1(box) over the cells on a shape."""
    k, c = N_KINDS, N_KINDS + N_COLOURS
    on = kind > 0
    loss = F.cross_entropy(logits[..., :k].reshape(-1, k), kind.reshape(-1))
    if on.any():
        loss = loss + F.cross_entropy(logits[..., k:c][on], colour[on]) + box_weight * F.l1_loss(logits[..., c:][on], box[on])
    return loss


def pretrain_tower(out: str, config="vl2-micro", steps: int = 2000, batch_size: int = 8, lr: float = 1e-3,
                   warmup: int = 50, min_lr_ratio: float = 0.05, n_train: int = 100_000, seed: int = 0,
                   log_every: int = 100, eval_n: int = 48, box_weight: float = BOX_WEIGHT) -> dict:
    """Rank function: pre-train ``config``'s tower for ``steps`` steps of W·``batch_size`` scenes (see the module
    docstring); rank 0 saves ``out/tower.safetensors``. Returns the history, the eval patch accuracy on shapes
    (every ``log_every`` steps and at the end) and the wall time."""
    if steps < 1 or batch_size < 1:
        raise TrainingError(f"steps={steps} and batch_size={batch_size} must both be ≥ 1")
    world, rank = vdist.world_size(), vdist.rank()
    cfg = resolve_config(config)
    grid = cfg.vision_config.grid
    torch.manual_seed(seed)
    tower = build_model(cfg, seed=seed).vision                      # the same initial tower as ddp.train's
    model = _TowerWithHead(tower, cfg.vision_config.width, N_KINDS + N_COLOURS + 4).to(vdist.device()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
    net = wrap_ddp(model) if world > 1 else model
    held_out = eval_batch(grid, eval_n) if rank == 0 else None      # rendered once, scored every log_every steps
    history, evals, t0 = [], [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_schedule(step, steps, warmup, min_lr_ratio)
        x, *targets = _batch(step_examples(range(n_train), step, batch_size, world, rank, seed), grid)
        logits = net(x.to(vdist.device()))                          # [b, grid², kinds + colours + 4]
        loss = patch_loss(logits, *(t.to(logits.device) for t in targets), box_weight=box_weight)
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
                e = evals[-1]
                print(f"tower step {step + 1:5d}  loss {history[-1]['loss']:.4f}  eval on shapes: kind "
                      f"{e['shape_patch_accuracy']:.1%}, colour {e['colour_patch_accuracy']:.1%}, box error "
                      f"{e['box_error']:.0f}/999  {time.time() - t0:.0f} s", flush=True)
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
