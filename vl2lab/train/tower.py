"""Stage 0 of vl2-micro: pre-train the SigLIP tower to see shape kinds, before the language model ever runs.

Lesson: notebook 03, section "1. The task and the model" (vl2-micro, which ``vl2lab.train.micro`` builds in two
stages; this is the first).

DeepSeek-VL2 never trains its vision tower from nothing: it starts from a pre-trained SigLIP and keeps it frozen
while the adaptor learns to feed the language model (its first training stage). vl2-micro does the same at its
scale. Trained end to end from random weights, the tower picks up colour and blob count within minutes but not the
kind of a shape (square, circle, triangle, cross): the kind is a property of a shape's outline spread over several
patches, and the only signal for it is a few answer tokens behind the whole language model. Here the tower gets a
direct, dense signal instead — every patch of the global view is labelled with the kind of shape under its centre::

    y[i, j] = kind_map(scene)[centre of cell (i, j) of the square-padded image]   ∈ {0 background, 1..4 kind}
    loss    = mean_{images, cells} CE(head(tower(global view))[i, j], y[i, j])       head: Linear(W, 5)

then the head is thrown away and the tower (:func:`load_tower`) starts :func:`vl2lab.train.ddp.train`. The labels use the
global view's geometry (``tiling.pad_resize``: the image centred on a square, scaled to 384): a cell of a G×G patch
grid covers side/G pixels of the square canvas of side max(W, H).

Run as a rank function (``vl2lab.run("vl2lab.train.tower:pretrain_tower", world_size=W, out=...)``): DDP over the
tower and head, W·b scenes per step (train-split seeds, a pure function of the step), AdamW with the warm-up and
cosine of :func:`vl2lab.train.loop.lr_schedule`. Rank 0 writes ``out/tower.safetensors`` and returns the loss
history and the patch accuracy on the eval split's scenes (cells on a shape only: the background is easy).
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
from vl2lab.train.scenes import EVAL_OFFSET, SHAPES, make_scene
from vl2lab.weights.pretrained import CheckpointError

__all__ = ["TOWER_FILE", "patch_labels", "global_views", "eval_batch", "shape_accuracy", "pretrain_tower",
           "load_tower"]

TOWER_FILE = "tower.safetensors"


def patch_labels(scene, grid: int) -> torch.Tensor:
    """[grid²] long: the kind (0 background, 1 + ``SHAPES.index``) under the centre of each cell of the scene's
    global view, row-major."""
    side = max(scene.width, scene.height)
    canvas = np.zeros((side, side), np.uint8)                       # the global view's square, before scaling
    ox, oy = (side - scene.width) // 2, (side - scene.height) // 2
    canvas[oy:oy + scene.height, ox:ox + scene.width] = np.asarray(scene.kind_map())
    idx = ((np.arange(grid) + 0.5) * side / grid).astype(int)       # cell centres
    return torch.from_numpy(canvas[np.ix_(idx, idx)].reshape(-1).astype(np.int64))


def global_views(scenes_: list, image_size: int = 384) -> torch.Tensor:
    """[N, 3, S, S]: the normalized global view of each scene (``tiling.global_view``, tile 0 of every image)."""
    return torch.stack([global_view(s.render(), image_size) for s in scenes_])


class _TowerWithHead(torch.nn.Module):
    def __init__(self, tower: torch.nn.Module, width: int, n_classes: int):
        super().__init__()
        self.tower, self.head = tower, torch.nn.Linear(width, n_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(encode_tiles(self.tower, pixels))         # [N, grid², n_classes]


def _batch(seeds, grid: int) -> tuple:
    """(global views, patch labels) of the scenes of ``seeds``."""
    sc = [make_scene(int(s)) for s in seeds]
    return global_views(sc), torch.stack([patch_labels(s, grid) for s in sc])


def eval_batch(grid: int, n: int = 48) -> tuple:
    """(global views, patch labels) of the first ``n`` eval-split scenes."""
    return _batch(range(EVAL_OFFSET, EVAL_OFFSET + n), grid)


def shape_accuracy(model: torch.nn.Module, batch: tuple) -> float:
    """Patch accuracy on the cells that lie on a shape, over an :func:`eval_batch`."""
    x, y = batch
    with torch.no_grad():
        pred = model(x.to(vdist.device())).argmax(-1).cpu()
    on = y > 0
    return float((pred[on] == y[on]).float().mean())


def pretrain_tower(out: str, config="vl2-micro", steps: int = 2000, batch_size: int = 8, lr: float = 1e-3,
                   warmup: int = 50, min_lr_ratio: float = 0.05, n_train: int = 100_000, seed: int = 0,
                   log_every: int = 100, eval_n: int = 48) -> dict:
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
    model = _TowerWithHead(tower, cfg.vision_config.width, 1 + len(SHAPES)).to(vdist.device()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
    net = wrap_ddp(model) if world > 1 else model
    held_out = eval_batch(grid, eval_n) if rank == 0 else None      # rendered once, scored every log_every steps
    history, evals, t0 = [], [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_schedule(step, steps, warmup, min_lr_ratio)
        x, y = _batch(step_examples(range(n_train), step, batch_size, world, rank, seed), grid)
        logits = net(x.to(vdist.device()))                          # [b, grid², 5]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(logits.device).reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = loss.detach().reshape(1)
        if world > 1:
            dist.all_reduce(loss_t)
        history.append({"step": step + 1, "loss": float(loss_t) / world, "time_s": time.time() - t0})
        if (step + 1) % log_every == 0 or step + 1 == steps:
            if rank == 0:
                evals.append({"step": step + 1, "shape_patch_accuracy": shape_accuracy(model, held_out)})
                print(f"tower step {step + 1:5d}  loss {history[-1]['loss']:.4f}  eval shape-patch accuracy "
                      f"{evals[-1]['shape_patch_accuracy']:.1%}  {time.time() - t0:.0f} s", flush=True)
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
