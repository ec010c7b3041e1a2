"""Data parallelism for real: DDP training of vl2-micro, sharded inference, and the checks that go with them.

Lesson: notebook 04, "Data parallel training and inference".

**Training step** (each of W ranks holds a full replica; rank r sees its own b examples)::

    loss_r = Σ_{answer tokens of rank r} CE  ·  W / N          N = Σ_r n_r  (answer tokens of the whole step)
    DDP:    g = (1/W) Σ_r ∇ loss_r = ∇ (Σ_all CE / N)           (the all-reduce averages; buckets overlap backward)

so W ranks × b examples give the gradient of one process on W·b examples (``grad_equivalence_check``), whatever
the token counts per rank. Only answer tokens count (the processor with ``mask_prompt=True`` labels the prompt,
the image positions and the padding −100). A rank's examples are grouped by image size into micro-batches (no
padding of a 421-token prompt to a 1023-token one); all but the last backward run under ``no_sync``.

**Data order**: ``DistributedSampler(shuffle=True, seed)``, ``set_epoch(e)``; an epoch gives each rank
⌈n/W⌉ indices (the sampler repeats a few to even the ranks out) and ⌊⌈n/W⌉/b⌋ steps — the uneven last batch is
dropped, so every step averages W·b examples. Step s is a pure function of (seed, s): resuming replays exactly.

**Checkpoints** (``out/checkpoint``, replaced atomically by a rename): the official snapshot layout
(``save_pretrained`` on rank 0: config.json, model.safetensors in fp32, tokenizer, processor_config.json) plus
``trainer_state.pt`` (step, AdamW moments, schedule, the run's arguments). ``resume=True`` continues from it.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import dist as vdist
from .checkpoint import CheckpointError
from .config import VL2Config, get_config

__all__ = ["task_processor", "micro_batches", "make_batch", "loss_sum", "step_examples", "train", "shard_eval",
           "grad_equivalence_check", "allreduce_bytes_per_step", "inference_ddp_overhead", "TrainingError"]

STATE = "trainer_state.pt"
RESUME_KEYS = ("seed", "n_train", "batch_size", "world_size", "steps", "lr", "warmup", "min_lr_ratio",
               "weight_decay", "grad_clip")


class TrainingError(ValueError):
    """A training or evaluation request that cannot run as asked (the message says what to change)."""


# ------------------------------------------------------------------------------------------------ pieces
def task_processor(path: str, vocab_size: int = 512):
    """The processor of the shapes task (labels on answer tokens only). Rank 0 builds the tokenizer into ``path``
    if it is not there yet; the others wait for it."""
    from .processor import VL2Processor
    from .scenes import task_texts
    from .tokenizer import build_tokenizer

    if vdist.is_main() and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        build_tokenizer(texts=task_texts(), vocab_size=vocab_size, path=path)
    vdist.barrier()
    return VL2Processor.from_pretrained(path, mask_prompt=True)


def _config(config) -> VL2Config:
    if isinstance(config, VL2Config):
        return config
    if isinstance(config, dict):
        return VL2Config.from_dict(config)
    return get_config(config)


def micro_batches(examples: Sequence) -> list:
    """Group examples by image size (same size → same prompt length up to a few text tokens), first-seen order."""
    groups: dict = {}
    for ex in examples:
        groups.setdefault((ex.scene.width, ex.scene.height), []).append(ex)
    return list(groups.values())


def make_batch(processor, examples: Sequence):
    """Training batch of one micro-batch: the processor's output with ``labels`` (−100 off the answers)."""
    return processor(conversations=[ex.conversation(with_answer=True) for ex in examples], inference_mode=False,
                     return_labels=True).to(vdist.device())


def loss_sum(model, batch) -> torch.Tensor:
    """Σ cross-entropy over the answer tokens of one batch (``labels`` from :func:`make_batch`)."""
    batch = dict(batch)
    labels = batch.pop("labels")                                    # [B, T], −100 off the answers
    logits = model(**batch).logits[:, :-1]                          # [B, T−1, V]: position t predicts t+1
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="sum")


def _backward_step(ddp_model, processor, examples, world: int) -> tuple:
    """Forward + backward of one rank's examples with the global token normalisation → (Σ CE, local tokens,
    global tokens). All but the last micro-batch skip the all-reduce (``no_sync``); the last one syncs the sum."""
    batches = [make_batch(processor, g) for g in micro_batches(examples)]
    n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_all = torch.tensor([float(n_local)], device=vdist.device())
    if world > 1:
        dist.all_reduce(n_all)                                      # the normaliser N is global
    total = 0.0
    for i, b in enumerate(batches):
        sync = i == len(batches) - 1 or not hasattr(ddp_model, "no_sync")
        with (_nullcontext() if sync else ddp_model.no_sync()):
            s = loss_sum(ddp_model, b)
            (s * world / n_all).backward()
            total += float(s)
    return total, n_local, float(n_all)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def step_examples(ds, step: int, batch_size: int, world: int, rank: int, seed: int) -> list:
    """Rank ``rank``'s examples at global step ``step`` (a pure function of its arguments)."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    per_epoch = len(sampler) // batch_size
    epoch, k = divmod(step, per_epoch)
    sampler.set_epoch(epoch)
    idx = list(sampler)[k * batch_size:(k + 1) * batch_size]
    return [ds[i] for i in idx]


def _schedule(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 down to ``min_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _counting_hook(state: dict, bucket):
    """DDP communication hook: count the bytes of each gradient bucket, then all-reduce it (average)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state["bytes"] += buf.numel() * buf.element_size()
    state["buckets"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _wrap(model):
    """DDP on every device; buffers are constants here (positions, RoPE), so they are not re-broadcast."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = vdist.device()
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)


# ------------------------------------------------------------------------------------------------ checkpoints
def _save(out: str, model, processor, state: dict) -> None:
    """Rank 0 writes ``out/checkpoint`` through a temporary folder and a rename (never half a checkpoint)."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, processor=processor)
    torch.save(state, os.path.join(tmp, STATE))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(out: str, cfg: VL2Config, args: dict) -> tuple:
    """(trainer state, fp32 state dict) of ``out/checkpoint``, checked against this run's config and args."""
    from .checkpoint import load_pretrained

    path = os.path.join(out, "checkpoint")
    fn = os.path.join(path, STATE)
    if not os.path.isfile(fn):
        raise CheckpointError(f"resume=True but {path} holds no checkpoint ({STATE} missing); start the run without "
                              "resume=True, or pass the out folder of the run you want to continue")
    state = torch.load(fn, map_location="cpu", weights_only=False)
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
def train(out: str, config="vl2-micro", steps: int = 600, batch_size: int = 8, lr: float = 3e-3,
          warmup: int = 30, min_lr_ratio: float = 0.05, weight_decay: float = 0.0, grad_clip: float = 1.0,
          n_train: int = 100_000, seed: int = 0, save_every: int = 100, resume: bool = False,
          stop_at: Optional[int] = None, log_every: int = 10, qtypes: Optional[Sequence[str]] = None) -> dict:
    """Rank function (``vl2lab.run("vl2lab.ddp:train", world_size=W, out=...)``): train ``config`` on the shapes
    task for ``steps`` steps of W·``batch_size`` examples; checkpoint every ``save_every`` steps and at the end.
    ``stop_at``: stop after the checkpoint of that step (an interruption, for resume tests). Returns (every rank)
    the loss history, the measured all-reduce bytes per step and timings."""
    from .model.vl2 import build_model
    from .scenes import QTYPES, dataset

    world, rank = vdist.world_size(), vdist.rank()
    if n_train < world:
        raise TrainingError(f"n_train={n_train} examples cannot feed {world} ranks (each rank needs at least one); "
                            "use more examples or fewer ranks")
    if -(-n_train // world) < batch_size:
        raise TrainingError(f"n_train={n_train} gives each of {world} ranks {-(-n_train // world)} examples per "
                            f"epoch, fewer than batch_size={batch_size}: not one full step; lower batch_size")
    if steps < 1 or (stop_at is not None and not 0 < stop_at <= steps):
        raise TrainingError(f"steps={steps} must be ≥ 1 and stop_at={stop_at} in [1, steps]")
    cfg = _config(config)
    args = dict(seed=seed, n_train=n_train, batch_size=batch_size, world_size=world, steps=steps, lr=lr,
                warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, grad_clip=grad_clip)
    os.makedirs(out, exist_ok=True)
    processor = task_processor(os.path.join(out, "tokenizer"), vocab_size=cfg.language_config.vocab_size)
    torch.manual_seed(seed)
    model = build_model(cfg, seed=seed, device=vdist.device()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    start, history = 0, []
    if resume:
        state, weights = _load_state(out, cfg, args)
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    ddp = _wrap(model) if world > 1 else model
    comm = {"bytes": 0, "buckets": 0}
    if world > 1:
        ddp.register_comm_hook(comm, _counting_hook)
    ds = dataset("train", n_train, qtypes or QTYPES)
    t0, end = time.time(), stop_at or steps
    for step in range(start, end):
        for grp in opt.param_groups:
            grp["lr"] = lr * _schedule(step, steps, warmup, min_lr_ratio)
        examples = step_examples(ds, step, batch_size, world, rank, seed)
        loss, _, n_all = _backward_step(ddp, processor, examples, world)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = torch.tensor([loss], device=vdist.device())
        if world > 1:
            dist.all_reduce(loss_t)
        history.append({"step": step + 1, "loss": float(loss_t) / n_all, "lr": opt.param_groups[0]["lr"],
                        "grad_norm": float(norm), "time_s": time.time() - t0})
        if rank == 0 and (step + 1) % log_every == 0:
            h = history[-1]
            print(f"step {h['step']:5d}  loss {h['loss']:.4f}  lr {h['lr']:.2e}  {h['time_s']:.0f} s", flush=True)
        if (step + 1) % save_every == 0 or step + 1 == end:
            if rank == 0:
                _save(out, model, processor, {"step": step + 1, "optimizer": opt.state_dict(), "history": history,
                                              "config": cfg.to_dict(), "args": args})
            vdist.barrier()
    steps_run = max(1, end - start)
    return {"history": history, "steps_run": end - start, "train_s": time.time() - t0,
            "allreduce_bytes_per_step": comm["bytes"] / steps_run, "buckets_per_step": comm["buckets"] / steps_run,
            "checkpoint": os.path.join(out, "checkpoint")}
