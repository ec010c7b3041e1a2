"""Data parallelism for real: DDP training of vl2-micro, sharded inference, and the checks that go with them.

Lesson: notebook 03, sections "2. Data-parallel inference",
"3. DDP training: N ranks × b equals one process with N·b", "4. A short training run",
"5. DDP around an inference-only model" and "6. Bad input".

**Training step** (each of W ranks holds a full replica; rank r sees its own b examples)::

    loss_r = Σ_{answer tokens t of rank r} w_t · CE_t  ·  W / N     N = Σ_r Σ_t w_t  (over the whole step)
    DDP:    g = (1/W) Σ_r ∇ loss_r = ∇ (Σ_all w·CE / N)        (the all-reduce averages; buckets overlap backward)

so W ranks × b examples give the gradient of one process on W·b examples (``grad_equivalence_check``), whatever
the token counts per rank. Only answer tokens count (the processor with ``mask_prompt=True`` labels the prompt,
the image positions and the padding −100); the tokens of one answer share its question type's weight
(``QTYPE_WEIGHTS``: w_t = weight / answer length), so N is a weighted count of answers. A rank's examples are grouped by image size into micro-batches (no
padding of a one-tile prompt to a 2×2-tile one); all but the last backward run under ``no_sync``.

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

from vl2lab.parallel import groups as vdist
from vl2lab.weights.checkpoint import CheckpointError
from vl2lab.model.config import VL2Config, get_config

__all__ = ["task_processor", "micro_batches", "make_batch", "loss_sum", "step_examples", "train", "shard_eval",
           "grad_equivalence_check", "allreduce_bytes_per_step", "inference_ddp_overhead", "TrainingError"]

STATE = "trainer_state.pt"
RESUME_KEYS = ("seed", "n_train", "batch_size", "world_size", "steps", "lr", "warmup", "min_lr_ratio",
               "weight_decay", "grad_clip", "curriculum", "qtype_weights", "vision_lr_mult")
CURRICULUM = ((0.0, 1), (0.1, 2), (0.25, 3))  # (from this fraction of the steps, scenes of at most k shapes)
# loss weight of each answer by question type: colour and count first, the hard left-of and grounding answers less
QTYPE_WEIGHTS = {"colour": 2.0, "count": 3.0, "shapes": 1.0, "describe": 2.0, "left_of": 0.5, "ground": 0.5}
VISION_LR_MULT = 3.0   # the vision tower's learning rate is this multiple of ``lr`` (it learns from scratch too)


class TrainingError(ValueError):
    """A training or evaluation request that cannot run as asked (the message says what to change)."""


# ------------------------------------------------------------------------------------------------ pieces
def task_processor(path: str, vocab_size: int = 512, patch_size: int = 14):
    """The processor of the shapes task (labels on answer tokens only) for a tower of ``patch_size``. Rank 0 builds
    the tokenizer into ``path`` if it is not there yet; the others wait for it."""
    from vl2lab.inputs.processor import VL2Processor
    from vl2lab.train.scenes import task_texts
    from vl2lab.inputs.tokenizer import build_tokenizer

    if vdist.is_main() and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        build_tokenizer(texts=task_texts(), vocab_size=vocab_size, path=path)
    vdist.barrier()
    return VL2Processor.from_pretrained(path, mask_prompt=True, patch_size=patch_size)


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


def answer_qtypes(example) -> list:
    """The question type of each answer of one training example, in order (a dialogue's turns, or one question)."""
    return [t[0] for t in example.turns] if hasattr(example, "turns") else [example.qtype]


def make_batch(processor, examples: Sequence, qtype_weights: Optional[dict] = None):
    """Training batch of one micro-batch: the processor's output with ``labels`` (−100 off the answers) and
    ``answer_weights`` [B, T−1] (aligned with ``labels[:, 1:]``): each answer's tokens sum to its question type's
    weight in ``qtype_weights`` (1 for a type it does not name; all 1 when None)."""
    batch = processor(conversations=[ex.conversation(with_answer=True) for ex in examples], inference_mode=False,
                      return_labels=True)
    w = answer_weights(batch["labels"][:, 1:])                      # [B, T−1], each answer sums to 1
    if qtype_weights:
        scale = torch.tensor([1.0] + [float(qtype_weights.get(q, 1.0)) for ex in examples for q in answer_qtypes(ex)])
        run = _answer_ids(batch["labels"][:, 1:])                   # 1, 2, … in the examples' turn order; 0 off
        if int(run.max()) != len(scale) - 1:
            raise TrainingError(f"the batch holds {int(run.max())} answers but its examples have {len(scale) - 1} "
                                "turns: an answer was cut (prompt longer than the processor's max_length?)")
        w = w * scale[run]
    batch["answer_weights"] = w
    return batch.to(vdist.device())


def _answer_ids(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels → [B, T] answer ids: 1, 2, … for the runs of labelled tokens in row-major order, 0 elsewhere."""
    on = labels != -100                                             # [B, T]
    start = on & ~F.pad(on, (1, 0))[:, :-1]                         # first token of each answer
    run = torch.cumsum(start.flatten().long(), 0).view_as(labels)   # answer id (1, 2, …) over the whole batch
    return torch.where(on, run, 0)


def answer_weights(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels → [B, T] weights: each answer (a run of labelled tokens, its EOS included) sums to 1, so a
    one-word colour counts as much as a 20-token box; 0 off the answers."""
    on = labels != -100                                             # [B, T]
    run = _answer_ids(labels)
    size = torch.bincount(run.flatten())                            # tokens per answer id
    return torch.where(on, 1.0 / size[run].float(), 0.0)


def loss_sum(model, batch) -> torch.Tensor:
    """Σ over the answers of one batch of their weighted mean token cross-entropy (``labels`` and
    ``answer_weights`` from :func:`make_batch`)."""
    batch = dict(batch)
    labels = batch.pop("labels")                                    # [B, T], −100 off the answers
    weights = batch.pop("answer_weights", None)
    target = labels[:, 1:]
    if weights is None:
        weights = answer_weights(target)
    logits = model(**batch).logits[:, :-1]                          # [B, T−1, V]: position t predicts t+1
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                         reduction="none")                          # [B·(T−1)], 0 where ignored
    return (ce * weights.flatten().to(ce.dtype)).sum()


def n_answers(batch) -> float:
    """Σ of the answers' weights in a batch (the number of answers when all weights are 1): the loss normaliser."""
    w = batch["answer_weights"] if "answer_weights" in batch else answer_weights(batch["labels"][:, 1:])
    return float(w.sum())


def _backward_step(ddp_model, processor, examples, world: int, qtype_weights: Optional[dict] = None) -> tuple:
    """Forward + backward of one rank's examples with the global token normalisation → (Σ CE, local tokens,
    global tokens). All but the last micro-batch skip the all-reduce (``no_sync``); the last one syncs the sum."""
    batches = [make_batch(processor, g, qtype_weights) for g in micro_batches(examples)]
    n_local = sum(n_answers(b) for b in batches)
    n_all = torch.tensor([float(n_local)], device=vdist.device())
    if world > 1:
        dist.all_reduce(n_all)                                      # the normaliser N is global
    total = 0.0
    for i, b in enumerate(batches):
        sync = i == len(batches) - 1 or not hasattr(ddp_model, "no_sync")
        with (_nullcontext() if sync else ddp_model.no_sync()):
            s = loss_sum(ddp_model, b)
            (s * world / n_all).backward()
            total += float(s.detach())
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

    import inspect

    dev = vdist.device()
    newer = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters   # the name in torch ≥ 2.13
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
               **{"forward_sync_buffers" if newer else "broadcast_buffers": False})


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
    from vl2lab.weights.checkpoint import load_pretrained

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
def train(out: str, config="vl2-micro", steps: int = 1000, batch_size: int = 4, lr: float = 1e-3,
          warmup: int = 50, min_lr_ratio: float = 0.05, weight_decay: float = 0.0, grad_clip: float = 1.0,
          n_train: int = 100_000, seed: int = 0, save_every: int = 100, resume: bool = False,
          stop_at: Optional[int] = None, log_every: int = 10, curriculum=CURRICULUM,
          qtype_weights: Optional[dict] = None, vision_lr_mult: float = VISION_LR_MULT, tower: str = "") -> dict:
    """Rank function (``vl2lab.run("vl2lab.train.ddp:train", world_size=W, out=...)``): train ``config`` on the shapes
    task for ``steps`` steps of W·``batch_size`` examples; checkpoint every ``save_every`` steps and at the end.
    ``tower``: a pre-trained vision tower (:mod:`vl2lab.train.tower`) to start from; ``vision_lr_mult=0``
    freezes the tower (no gradient, no all-reduce for it), as DeepSeek-VL2's first stage does.
    ``stop_at``: stop after the checkpoint of that step (an interruption, for resume tests). Returns (every rank)
    the loss history, the measured all-reduce bytes per step and timings."""
    from vl2lab.model.vl2 import build_model
    from vl2lab.train.scenes import dialogues

    world, rank = vdist.world_size(), vdist.rank()
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
    cfg = _config(config)
    curriculum = [(float(f), int(k)) for f, k in curriculum]
    if not curriculum or curriculum[0][0] != 0.0:
        raise TrainingError(f"curriculum={curriculum} must start at fraction 0.0, e.g. {CURRICULUM}")
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
        from vl2lab.train.tower import load_tower
        load_tower(model, tower)
    if vision_lr_mult == 0:
        model.vision.requires_grad_(False)
    vision = [p for n, p in model.named_parameters() if n.startswith("vision.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision.")]
    groups = [{"params": rest, "lr_mult": 1.0}] + ([{"params": vision, "lr_mult": float(vision_lr_mult)}] if vision else [])
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
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
    stages = [(int(f * steps), dialogues("train", n_train, max_shapes=k)) for f, k in curriculum]
    t0, end = time.time(), stop_at or steps
    for step in range(start, end):
        for grp in opt.param_groups:
            grp["lr"] = lr * grp["lr_mult"] * _schedule(step, steps, warmup, min_lr_ratio)
        ds = [d for s0, d in stages if step >= s0][-1]
        examples = step_examples(ds, step, batch_size, world, rank, seed)
        loss, _, n_all = _backward_step(ddp, processor, examples, world, args["qtype_weights"])
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


# ------------------------------------------------------------------------------------------------ inference
def _load(model_path, dtype=torch.float32):
    from vl2lab.weights.checkpoint import load_pretrained

    model, processor = load_pretrained(model_path, dtype=dtype, device=vdist.device())
    if processor is None:
        raise CheckpointError(f"{model_path} has no tokenizer.json; shard_eval needs a complete snapshot folder")
    return model, processor


def shard_eval(model_path: str, split: str = "eval", n: int = 200, batch_size: int = 8) -> Optional[dict]:
    """Rank function: answer the first ``n`` examples of ``split`` data-parallel; rank 0 returns them in dataset
    order (``answers``), with ``per_rank`` counts and how many sampler padding slots were skipped.

    ``DistributedSampler(shuffle=False)`` gives rank r the indices r, r+W, … of the list padded (by repeating its
    head) to a multiple of W. A padded slot — global position ≥ n — is skipped, not answered, so no example is
    counted twice; with more ranks than examples the extra ranks simply get no work."""
    from torch.utils.data.distributed import DistributedSampler

    from vl2lab.train.scenes import dataset, predict

    if n < 1:
        raise TrainingError(f"n={n}: shard_eval needs at least one example")
    world, rank = vdist.world_size(), vdist.rank()
    ds = dataset(split, n)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    mine = [i for k, i in enumerate(sampler) if rank + k * world < n]   # position rank + k·W of the padded list
    model, processor = _load(model_path)
    t0 = time.time()
    answers = predict(model, processor, [ds[i] for i in mine], batch_size) if mine else []
    local = {"rank": rank, "pairs": list(zip(mine, answers)), "time_s": time.time() - t0}
    gathered = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(local, gathered, dst=0)
    else:
        gathered = [local]
    if rank != 0:
        return None
    out: list = [None] * n
    for part in gathered:
        for i, a in part["pairs"]:
            if out[i] is not None:
                raise RuntimeError(f"example {i} was answered twice: the sharding is wrong")
            out[i] = a
    missing = [i for i, a in enumerate(out) if a is None]
    if missing:
        raise RuntimeError(f"examples {missing[:5]} were answered by no rank: the sharding is wrong")
    return {"answers": out, "per_rank": [len(p["pairs"]) for p in gathered],
            "padded_slots_skipped": len(sampler) * world - n, "time_s": [p["time_s"] for p in gathered]}


# ------------------------------------------------------------------------------------------------ checks
def grad_equivalence_check(config="vl2-micro", batch_size: int = 2, seed: int = 0, tokenizer_dir: str = "") -> dict:
    """Rank function: W ranks × ``batch_size`` dialogues through DDP vs one process on all W·b of them (every rank
    computes the reference on an undistributed copy). Returns max |Δgrad|, max |grad| and the tolerance
    ``1e-5 · max|grad|`` (fp32 sums in another order: padding lengths and reduction trees differ)."""
    import copy

    from vl2lab.model.vl2 import build_model
    from vl2lab.train.scenes import dialogues

    world, rank = vdist.world_size(), vdist.rank()
    cfg = _config(config)
    processor = task_processor(tokenizer_dir, vocab_size=cfg.language_config.vocab_size,
                               patch_size=cfg.vision_config.patch_size)
    model = build_model(cfg, seed=seed, device=vdist.device()).train()
    reference = copy.deepcopy(model)
    examples = list(dialogues("train", world * batch_size))
    ddp = _wrap(model) if world > 1 else model
    _backward_step(ddp, processor, examples[rank * batch_size:(rank + 1) * batch_size], world)
    _backward_step(reference, processor, examples, 1)
    diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), reference.parameters()))
    scale = max(float(q.grad.abs().max()) for q in reference.parameters())
    return {"max_abs_diff": diff, "max_abs_grad": scale, "tolerance": 1e-5 * scale, "ok": diff <= 1e-5 * scale,
            "world_size": world, "batch_per_rank": batch_size}


def allreduce_bytes_per_step(model, bucket_cap_mb: float = 25.0, first_bucket_bytes: int = 1 << 20) -> dict:
    """Gradient bytes DDP all-reduces per step, and its initial buckets: parameters that need a gradient, in
    reverse registration order (the backward produces the last layers first), packed per dtype until a bucket
    reaches its cap (1 MiB for the first, so communication starts early; ``bucket_cap_mb`` MiB after)."""
    params = [p for p in model.parameters() if p.requires_grad]
    buckets: list = []
    open_: dict = {}
    limits: dict = {}
    for p in reversed(params):
        b = open_.setdefault(p.dtype, [0, 0])
        b[0] += p.numel() * p.element_size()
        b[1] += 1
        cap = limits.setdefault(p.dtype, first_bucket_bytes)
        if b[0] >= cap:
            buckets.append({"bytes": b[0], "params": b[1], "dtype": str(p.dtype)})
            open_.pop(p.dtype)
            limits[p.dtype] = int(bucket_cap_mb * 2**20)
    buckets += [{"bytes": b[0], "params": b[1], "dtype": str(dt)} for dt, b in open_.items()]
    return {"total_bytes": sum(b["bytes"] for b in buckets), "buckets": buckets,
            "n_params": sum(p.numel() for p in params)}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def inference_ddp_overhead(model_path: str, n: int = 4, repeats: int = 3) -> dict:
    """Rank function: what wrapping an inference-only model in DDP costs and gives. Same outputs (the wrapper's
    forward just calls the module); construction broadcasts every parameter from rank 0 and allocates the
    gradient buckets, which inference never fills. Returns times (s), RSS growth (bytes) and the outputs' max
    difference, measured on this rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vl2lab.train.scenes import dataset

    model, processor = _load(model_path)
    batch = processor(conversations=[ex.conversation() for ex in dataset("eval", n)]).to(vdist.device())

    def timed(m):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                logits = m(**batch).logits
            best = min(best, time.perf_counter() - t)
        return logits, best

    plain, t_plain = timed(model)
    rss0 = _rss()
    vdist.barrier()
    t = time.perf_counter()
    wrapped = _wrap(model) if vdist.world_size() > 1 else model
    t_wrap = time.perf_counter() - t
    rss1 = _rss()
    out, t_ddp = timed(wrapped)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"max_abs_diff": float((out - plain).abs().max()), "forward_s": t_plain, "forward_ddp_s": t_ddp,
            "wrap_s": t_wrap, "rss_growth_bytes": rss1 - rss0, "param_bytes_broadcast": param_bytes,
            "bucket_bytes": allreduce_bytes_per_step(model)["total_bytes"], "world_size": vdist.world_size()}
