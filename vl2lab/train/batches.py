"""The pieces one DDP training step is made of: which examples a rank sees, their batches, the weighted loss and
the backward pass with the global normalisation.

Lesson: notebook 03, section "3. DDP training: N ranks × b equals one process with N·b".

**Training step** (each of W ranks holds a full replica; rank r sees its own b examples)::

    loss_r = Σ_{answer tokens t of rank r} w_t · CE_t  ·  W / N     N = Σ_r Σ_t w_t  (over the whole step)
    DDP:    g = (1/W) Σ_r ∇ loss_r = ∇ (Σ_all w·CE / N)        (the all-reduce averages; buckets overlap backward)

so W ranks × b examples give the gradient of one process on W·b examples (``vl2lab.lessons.ddp_checks``
checks it), whatever the token counts per rank. Only answer tokens count (the processor with ``mask_prompt=True``
labels the prompt, the image positions and the padding −100); the tokens of one answer share its question type's
weight (``qtype_weights``: w_t = weight / answer length), so N is a weighted count of answers. A rank's examples
are grouped by image size into micro-batches (no padding of a one-tile prompt to a 2×2-tile one); all but the
last backward run under ``no_sync`` (:func:`backward_step`).

**Data order** (:func:`step_examples`): ``DistributedSampler(shuffle=True, seed)``, ``set_epoch(e)``; an epoch
gives each rank ⌈n/W⌉ indices (the sampler repeats a few to even the ranks out) and ⌊⌈n/W⌉/b⌋ steps — the uneven
last batch is dropped, so every step averages W·b examples. Step s is a pure function of (seed, s): resuming
replays exactly.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from vl2lab.inputs.processor import VL2Processor
from vl2lab.inputs.tokenizer import build_tokenizer
from vl2lab.parallel import groups as vdist
from vl2lab.train.loop import TrainingError
from vl2lab.train.scenes import task_texts

__all__ = ["task_processor", "step_examples", "micro_batches", "answer_qtypes", "make_batch", "answer_ids",
           "answer_weights", "loss_sum", "n_answers", "step_batches", "backward_batches", "backward_step"]


def task_processor(path: str, vocab_size: int = 512, patch_size: int = 14) -> VL2Processor:
    """The processor of the shapes task (labels on answer tokens only) for a tower of ``patch_size``. Rank 0 builds
    the tokenizer into ``path`` if it is not there yet; the others wait for it."""
    if vdist.is_main() and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        build_tokenizer(texts=task_texts(), vocab_size=vocab_size, path=path)
    vdist.barrier()
    return VL2Processor.from_pretrained(path, mask_prompt=True, patch_size=patch_size)


def step_examples(ds, step: int, batch_size: int, world: int, rank: int, seed: int) -> list:
    """Rank ``rank``'s examples at global step ``step`` (a pure function of its arguments)."""
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    per_epoch = len(sampler) // batch_size
    epoch, k = divmod(step, per_epoch)
    sampler.set_epoch(epoch)
    idx = list(sampler)[k * batch_size:(k + 1) * batch_size]
    return [ds[i] for i in idx]


def micro_batches(examples: Sequence) -> list:
    """Group examples by image size (same size → same prompt length up to a few text tokens), first-seen order."""
    groups: dict = {}
    for ex in examples:
        groups.setdefault((ex.scene.width, ex.scene.height), []).append(ex)
    return list(groups.values())


def answer_qtypes(example) -> list:
    """The question type of each answer of one training example, in order (a dialogue's turns, or one question)."""
    return [t[0] for t in example.turns] if hasattr(example, "turns") else [example.qtype]


def make_batch(processor, examples: Sequence, qtype_weights: Optional[dict] = None, device=None):
    """Training batch of one micro-batch: the processor's output with ``labels`` (−100 off the answers) and
    ``answer_weights`` [B, T−1] (aligned with ``labels[:, 1:]``): each answer's tokens sum to its question type's
    weight in ``qtype_weights`` (1 for a type it does not name; all 1 when None); on ``device`` (default: the
    rank's)."""
    batch = processor(conversations=[ex.conversation(with_answer=True) for ex in examples], inference_mode=False,
                      return_labels=True)
    w = answer_weights(batch["labels"][:, 1:])                      # [B, T−1], each answer sums to 1
    if qtype_weights:
        scale = torch.tensor([1.0] + [float(qtype_weights.get(q, 1.0)) for ex in examples for q in answer_qtypes(ex)])
        run = answer_ids(batch["labels"][:, 1:])                    # 1, 2, … in the examples' turn order; 0 off
        if int(run.max()) != len(scale) - 1:
            raise TrainingError(f"the batch holds {int(run.max())} answers but its examples have {len(scale) - 1} "
                                "turns: an answer was cut (prompt longer than the processor's max_length?)")
        w = w * scale[run]
    batch["answer_weights"] = w
    return batch.to(vdist.device() if device is None else device)


def answer_ids(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels → [B, T] answer ids: 1, 2, … for the runs of labelled tokens in row-major order, 0 elsewhere."""
    on = labels != -100                                             # [B, T]
    start = on & ~F.pad(on, (1, 0))[:, :-1]                         # first token of each answer
    run = torch.cumsum(start.flatten().long(), 0).view_as(labels)   # answer id (1, 2, …) over the whole batch
    return torch.where(on, run, 0)


def answer_weights(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels → [B, T] weights: each answer (a run of labelled tokens, its EOS included) sums to 1, so a
    one-word colour counts as much as a 20-token box; 0 off the answers."""
    on = labels != -100                                             # [B, T]
    run = answer_ids(labels)
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


def step_batches(processor, examples, qtype_weights: Optional[dict] = None, device=None) -> list:
    """The batches of one rank's step, one per micro-batch (:func:`micro_batches`), on ``device`` (default: the
    rank's; ``"cpu"`` where a worker process prepares them ahead, :mod:`vl2lab.train.prefetch`)."""
    return [make_batch(processor, g, qtype_weights, device) for g in micro_batches(examples)]


def backward_step(ddp_model, processor, examples, world: int, qtype_weights: Optional[dict] = None) -> tuple:
    """Forward + backward of one rank's examples with the global normalisation → (Σ weighted CE, local N,
    global N): :func:`backward_batches` of their :func:`step_batches`."""
    return backward_batches(ddp_model, step_batches(processor, examples, qtype_weights), world)


def backward_batches(ddp_model, batches: list, world: int) -> tuple:
    """Forward + backward of one rank's step, already made into ``batches`` (:func:`step_batches`, e.g. on the
    CPU by a worker; moved to the rank's device here) → (Σ weighted CE, local N, global N). All but the last
    micro-batch skip the all-reduce (``no_sync``); the last one syncs the sum."""
    batches = [b.to(vdist.device()) for b in batches]
    n_local = sum(n_answers(b) for b in batches)
    n_all = torch.tensor([float(n_local)], device=vdist.device())
    if world > 1:
        dist.all_reduce(n_all)                                      # the normaliser N is global
    total = 0.0
    for i, b in enumerate(batches):
        sync = i == len(batches) - 1 or not hasattr(ddp_model, "no_sync")
        with (contextlib.nullcontext() if sync else ddp_model.no_sync()):
            s = loss_sum(ddp_model, b)
            (s * world / n_all).backward()
            total += float(s.detach())
    return total, n_local, float(n_all)
