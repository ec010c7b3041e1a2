"""Data parallelism for real: the DDP training run of vl2-micro, with checkpoints it can resume from.

Lesson: notebook 03, sections "3. DDP training: N ranks × b equals one process with N·b",
"4. A short training run" and "6. Bad input".

:func:`train` is a rank function: every one of W ranks holds a full replica in ``DistributedDataParallel``
(:func:`vl2lab.train.loop.wrap_ddp`) and runs, per step, its own b examples (:mod:`vl2lab.train.batches`: which
examples, the weighted answer loss normalised over the whole step, micro-batches under ``no_sync``), so each step
is one step of a single process on W·b examples. The learning rate follows :func:`vl2lab.train.loop.lr_schedule`;
the scenes grow harder along ``CURRICULUM``; the answers are weighted by question type (``QTYPE_WEIGHTS``); the
vision tower learns at ``VISION_LR_MULT`` × the rate (0 freezes it, as after stage 0, :mod:`vl2lab.train.tower`).

**Checkpoints** (``out/checkpoint``, replaced atomically by a rename): the official snapshot layout
(``save_pretrained`` on rank 0: config.json, model.safetensors in fp32, tokenizer, processor_config.json) plus
``trainer_state.pt`` (step, AdamW moments, history, the run's arguments: plain containers, numbers, strings and
tensors only). ``resume=True`` continues from it, and refuses a checkpoint of another config or of other settings
(``RESUME_KEYS``), which would not replay the same run. The state is read with ``torch.load(weights_only=True)``:
a checkpoint copied from elsewhere is data, never code (a pickle that names any other class or function is refused
with one clear error, before anything in it runs).
"""
from __future__ import annotations

import functools
import os
import pickle
import shutil
import time
from typing import Optional

import torch
import torch.distributed as dist

from vl2lab.launch import progress
from vl2lab.launch.payload import refusal
from vl2lab.model import build_model
from vl2lab.model.config import VL2Config
from vl2lab.parallel import groups as vdist
from vl2lab.train.batches import backward_batches, step_batches, step_examples, task_processor
from vl2lab.train.loop import TrainingError, log_buckets, lr_schedule, resolve_config, wrap_ddp
from vl2lab.train.prefetch import prefetched
from vl2lab.train.scenes import dialogues
from vl2lab.train.tower import load_tower
from vl2lab.weights.pretrained import CheckpointError, load_pretrained, save_pretrained

__all__ = ["train", "TrainingError", "CURRICULUM", "QTYPE_WEIGHTS", "VISION_LR_MULT", "STATE", "STATE_KEYS",
           "RESUME_KEYS", "save_checkpoint", "read_state", "load_checkpoint"]

STATE = "trainer_state.pt"
STATE_KEYS = ("step", "optimizer", "history", "config", "args")   # what save_checkpoint writes into STATE
RESUME_KEYS = ("seed", "n_train", "batch_size", "world_size", "steps", "lr", "warmup", "min_lr_ratio",
               "weight_decay", "grad_clip", "curriculum", "qtype_weights", "vision_lr_mult")
CURRICULUM = ((0.0, 1), (0.1, 2), (0.25, 3))  # (from this fraction of the steps, scenes of at most k shapes)
# loss weight of each answer by question type: colour and count first, the hard left-of and grounding answers less
QTYPE_WEIGHTS = {"colour": 2.0, "count": 3.0, "shapes": 1.0, "describe": 2.0, "left_of": 0.5, "ground": 0.5}
VISION_LR_MULT = 3.0   # the vision tower's learning rate is this multiple of ``lr`` (it learns from scratch too)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(out: str, model, processor, state: dict) -> None:
    """Write ``out/checkpoint`` (call on rank 0) through a temporary folder and a rename: never half a checkpoint."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, processor=processor)
    torch.save(state, os.path.join(tmp, STATE))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_state(fn: str) -> dict:
    """The trainer state in ``fn``, unpickled with ``weights_only=True`` (containers, numbers, strings, tensors: no
    class or function of the file is looked up, so none runs); anything else is one :class:`CheckpointError`."""
    try:
        state = torch.load(fn, map_location="cpu", weights_only=True)
        ok = isinstance(state, dict) and set(STATE_KEYS) <= set(state) and all(
            isinstance(state[k], dict) for k in ("optimizer", "config", "args"))
        why = "" if ok else (f"it holds a {type(state).__name__}, not a dict of {', '.join(STATE_KEYS)} "
                             "(nothing in it was run)")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        state, why = None, refusal(fn, e)          # torch's reason, not its advice to load the file the unsafe way
    if why:
        raise CheckpointError(f"{fn} is not a vl2lab trainer state (or was written by an older vl2lab): {why}; "
                              "start without --resume (resume=False) or delete it")
    return state


def load_checkpoint(out: str, cfg: VL2Config, args: dict) -> tuple:
    """(trainer state, fp32 state dict) of ``out/checkpoint``, checked against this run's config and args."""
    path = os.path.join(out, "checkpoint")
    fn = os.path.join(path, STATE)
    if not os.path.isfile(fn):
        raise CheckpointError(f"resume=True but {path} holds no checkpoint ({STATE} missing); start the run without "
                              "resume=True, or pass the out folder of the run you want to continue")
    state = read_state(fn)
    mine, theirs = cfg.to_dict(), state["config"]
    diff = [f"{sec}.{k}: {theirs.get(sec, {}).get(k)!r} in the checkpoint, {v!r} now"
            for sec in ("vision_config", "projector_config", "language_config") for k, v in mine[sec].items()
            if theirs.get(sec, {}).get(k) != v]
    if diff:
        raise CheckpointError(f"the checkpoint in {path} belongs to another model config ({'; '.join(diff[:3])}); "
                              "resume with the config it was trained with, or start a fresh run in a new out folder")
    changed = [f"{k}={state['args'].get(k)!r} (now {args[k]!r})" for k in RESUME_KEYS if state["args"].get(k) != args[k]]
    if changed:
        raise CheckpointError(f"the checkpoint in {path} was written by a run with {', '.join(changed)}; resuming "
                              "with other settings would not replay the same run: pass the same settings")
    model, _ = load_pretrained(path)
    return state, model.state_dict()


# ------------------------------------------------------------------------------------------------ training
def _check_request(world: int, n_train: int, batch_size: int, steps: int, stop_at: Optional[int],
                   vision_lr_mult: float, curriculum: list) -> None:
    """One clear :class:`TrainingError` for a run that cannot go as asked."""
    if n_train < world:
        raise TrainingError(f"n_train={n_train} examples cannot feed {world} ranks (each rank needs at least one); "
                            "use more examples or fewer ranks")
    if -(-n_train // world) < batch_size:
        raise TrainingError(f"n_train={n_train} gives each of {world} ranks {-(-n_train // world)} examples per "
                            f"epoch, fewer than batch_size={batch_size}: not one full step; lower batch_size")
    if steps < 1 or (stop_at is not None and not 0 < stop_at <= steps):
        raise TrainingError(f"steps={steps} must be ≥ 1 and stop_at={stop_at} in [1, steps]")
    if vision_lr_mult < 0:
        raise TrainingError(f"vision_lr_mult={vision_lr_mult} must be ≥ 0 (0 freezes the vision tower)")
    if not curriculum or curriculum[0][0] != 0.0:
        raise TrainingError(f"curriculum={curriculum} must start at fraction 0.0, e.g. {CURRICULUM}")


def _optimizer(model, lr: float, weight_decay: float, vision_lr_mult: float) -> torch.optim.AdamW:
    """AdamW over two groups: the tower's trainable parameters at ``vision_lr_mult`` × ``lr``, the rest at ``lr``
    (``lr_mult`` in each group; the schedule multiplies both)."""
    vision = [p for n, p in model.named_parameters() if n.startswith("vision.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision.")]
    groups = [{"params": rest, "lr_mult": 1.0}] + ([{"params": vision, "lr_mult": float(vision_lr_mult)}] if vision else [])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)


def _rank_step(stages, batch_size: int, world: int, rank: int, seed: int, processor, weights: dict, step: int) -> list:
    """Rank ``rank``'s batches of step ``step`` on the CPU, from the curriculum stage the step falls in."""
    ds = [d for s0, d in stages if step >= s0][-1]
    return step_batches(processor, step_examples(ds, step, batch_size, world, rank, seed), weights, device="cpu")


def train(out: str, config="vl2-micro", steps: int = 1000, batch_size: int = 4, lr: float = 1e-3,
          warmup: int = 50, min_lr_ratio: float = 0.05, weight_decay: float = 0.0, grad_clip: float = 1.0,
          n_train: int = 100_000, seed: int = 0, save_every: int = 100, resume: bool = False,
          stop_at: Optional[int] = None, log_every: int = 10, curriculum=CURRICULUM,
          qtype_weights: Optional[dict] = None, vision_lr_mult: float = VISION_LR_MULT, tower: str = "",
          workers: int = 0) -> dict:
    """Rank function (``vl2lab.run("vl2lab.train.ddp:train", world_size=W, out=...)``): train ``config`` on the shapes
    task for ``steps`` steps of W·``batch_size`` examples; checkpoint every ``save_every`` steps and at the end.
    ``tower``: a pre-trained vision tower (:mod:`vl2lab.train.tower`) to start from; ``vision_lr_mult=0``
    freezes the tower (no gradient, no all-reduce for it), as DeepSeek-VL2's first stage does.
    ``stop_at``: stop after the checkpoint of that step (an interruption, for resume tests). ``workers``: worker
    processes per rank that prepare the next steps' batches (:mod:`vl2lab.train.prefetch`; the same batches, so
    the same run; 0: the rank prepares each step itself). Returns (every rank)
    the loss history, the all-reduce bytes and buckets of every step as DDP's communication hook saw them
    (:func:`vl2lab.train.loop.log_buckets`; their mean, ``allreduce_bytes_per_step``) and timings. Reports
    "training step n/N" as the rank's progress."""
    world, rank = vdist.world_size(), vdist.rank()
    curriculum = [(float(f), int(k)) for f, k in curriculum]
    _check_request(world, n_train, batch_size, steps, stop_at, vision_lr_mult, curriculum)
    cfg = resolve_config(config)
    args = dict(seed=seed, n_train=n_train, batch_size=batch_size, world_size=world, steps=steps, lr=lr,
                warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, grad_clip=grad_clip,
                curriculum=curriculum, qtype_weights=dict(QTYPE_WEIGHTS if qtype_weights is None else qtype_weights),
                vision_lr_mult=float(vision_lr_mult), tower=os.path.abspath(tower) if tower else "")
    os.makedirs(out, exist_ok=True)
    processor = task_processor(os.path.join(out, "tokenizer"), vocab_size=cfg.language_config.vocab_size,
                               patch_size=cfg.vision_config.patch_size)
    torch.manual_seed(seed)
    model = build_model(cfg, seed=seed, device=vdist.device()).train()
    if tower:
        load_tower(model, tower)
    if vision_lr_mult == 0:
        model.vision.requires_grad_(False)
    opt = _optimizer(model, lr, weight_decay, vision_lr_mult)
    start, history = 0, []
    if resume:
        state, weights = load_checkpoint(out, cfg, args)
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    ddp = wrap_ddp(model) if world > 1 else model
    sent = log_buckets(ddp) if world > 1 else []          # what DDP all-reduced, bucket by bucket, per step
    stages = [(int(f * steps), dialogues("train", n_train, max_shapes=k)) for f, k in curriculum]
    t0, end = time.time(), stop_at or steps
    progress.report("training step", start, end)
    make = functools.partial(_rank_step, stages, batch_size, world, rank, seed, processor, args["qtype_weights"])
    for step, batches in prefetched(make, range(start, end), workers):
        for grp in opt.param_groups:
            grp["lr"] = lr * grp["lr_mult"] * lr_schedule(step, steps, warmup, min_lr_ratio)
        loss, _, n_all = backward_batches(ddp, batches, world)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = torch.tensor([loss], device=vdist.device())
        if world > 1:
            dist.all_reduce(loss_t)
        history.append({"step": step + 1, "loss": float(loss_t) / n_all, "lr": opt.param_groups[0]["lr"],
                        "grad_norm": float(norm), "time_s": time.time() - t0})
        progress.report("training step", step + 1, end)
        if rank == 0 and (step + 1) % log_every == 0:
            h = history[-1]
            print(f"step {h['step']:5d}  loss {h['loss']:.4f}  lr {h['lr']:.2e}  {h['time_s']:.0f} s", flush=True)
        if (step + 1) % save_every == 0 or step + 1 == end:
            if rank == 0:
                save_checkpoint(out, model, processor, {"step": step + 1, "optimizer": opt.state_dict(),
                                                        "history": history, "config": cfg.to_dict(), "args": args})
            vdist.barrier()
    bytes_per_step = [sum(b["bytes"] for b in st) for st in sent]
    return {"history": history, "steps_run": end - start, "train_s": time.time() - t0,
            "allreduce_bytes_per_step": sum(bytes_per_step) / max(1, len(sent)),
            "allreduce_bytes_by_step": bytes_per_step, "buckets_by_step": [len(st) for st in sent],
            "checkpoint": os.path.join(out, "checkpoint")}
