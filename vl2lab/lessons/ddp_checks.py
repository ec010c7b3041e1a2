"""Checks of notebook 03, each measured on W ranks: DDP's gradient equals one process's, what DDP all-reduces per
step (read from DDP's own buckets), and what DDP around an inference-only model does, wrapped as the article wraps
it.

Lesson: notebook 03, sections "3. DDP training: N ranks × b equals one process with N·b" and
"5. DDP around an inference-only model".

- :func:`grad_equivalence_check` (rank function): W ranks × b dialogues through DDP against one process on all W·b
  of them, with the step of :func:`vl2lab.train.batches.backward_step` (the global normaliser N)::

      max_p |∇_DDP p − ∇_one p|  ≤  1e-5 · max_p |∇_one p|     (fp32 sums in another order)

- :func:`gradient_traffic` (rank function): a few real training steps with DDP's communication hook
  (:func:`vl2lab.train.loop.log_buckets`) logging every bucket the reducer all-reduces; beside it, what the module
  says should be sent (4 bytes × each parameter that needs a gradient) and DDP's own record of its buckets.
- :func:`inference_ddp_overhead` (rank function): the article's ``DDP(model, device_ids=[rank],
  output_device=rank)``, defaults kept (``broadcast_buffers=True``), with every ``_broadcast_coalesced`` DDP makes
  counted (:func:`count_broadcasts`): at construction, and before each forward, in inference mode and with
  gradients on.
"""
from __future__ import annotations

import contextlib
import copy
import time

import psutil
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vl2lab.launch import progress
from vl2lab.model import build_model
from vl2lab.parallel import groups as vdist
from vl2lab.train.batches import backward_step, micro_batches, step_examples, task_processor
from vl2lab.train.eval import load_eval_model
from vl2lab.train.loop import TrainingError, log_buckets, resolve_config, wrap_ddp
from vl2lab.train.scenes import dataset, dialogues

__all__ = ["grad_equivalence_check", "gradient_traffic", "count_broadcasts", "inference_ddp_overhead"]


def grad_equivalence_check(config="vl2-micro", batch_size: int = 2, seed: int = 0, tokenizer_dir: str = "") -> dict:
    """Rank function: W ranks × ``batch_size`` dialogues through DDP vs one process on all W·b of them (every rank
    computes the reference on an undistributed copy). Returns max |Δgrad|, max |grad| and the tolerance
    ``1e-5 · max|grad|`` (fp32 sums in another order: padding lengths and reduction trees differ)."""
    world, rank = vdist.world_size(), vdist.rank()
    cfg = resolve_config(config)
    processor = task_processor(tokenizer_dir, vocab_size=cfg.language_config.vocab_size,
                               patch_size=cfg.vision_config.patch_size)
    model = build_model(cfg, seed=seed, device=vdist.device()).train()
    reference = copy.deepcopy(model)
    examples = list(dialogues("train", world * batch_size))
    ddp = wrap_ddp(model) if world > 1 else model
    backward_step(ddp, processor, examples[rank * batch_size:(rank + 1) * batch_size], world)
    backward_step(reference, processor, examples, 1)
    diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), reference.parameters()))
    scale = max(float(q.grad.abs().max()) for q in reference.parameters())
    return {"max_abs_diff": diff, "max_abs_grad": scale, "tolerance": 1e-5 * scale, "ok": diff <= 1e-5 * scale,
            "world_size": world, "batch_per_rank": batch_size}


def _sizes(text) -> list:
    """DDP's logging record of bucket sizes ("1327872, 10627584") → [1327872, 10627584]."""
    return [int(x) for x in str(text or "").split(",") if x.strip()]


def gradient_traffic(config="vl2-micro", batch_size: int = 2, steps: int = 3, seed: int = 0,
                     tokenizer_dir: str = "") -> dict:
    """Rank function: ``steps`` training steps (forward, backward with DDP's all-reduce; no optimizer step: the
    traffic does not depend on it) of the whole model, then of the model with its vision tower frozen (as in
    stage 1 of vl2-micro). Per variant: the buckets DDP's hook saw, step by step (``steps``), the backward passes
    of each step (``micro_batches``: all but the last run under ``no_sync``), what the module holds (parameters
    that need a gradient, ``trainable_numel``; all of them, ``all_numel``) and DDP's own logging record of its
    first buckets and of the rebuilt ones (``ddp_bucket_sizes``, ``ddp_rebuilt_bucket_sizes``, bytes). DDP
    rebuilds its buckets at the start of step 2 and updates that record at the start of each forward with
    gradients, before the rebuild: the rebuilt sizes are in it from step 3 on, hence ``steps`` ≥ 3."""
    if steps < 3:
        raise TrainingError(f"steps={steps}: gradient_traffic needs ≥ 3 steps (DDP's record of its rebuilt buckets "
                            "is written at the start of step 3)")
    world, rank = vdist.world_size(), vdist.rank()
    cfg = resolve_config(config)
    processor = task_processor(tokenizer_dir, vocab_size=cfg.language_config.vocab_size,
                               patch_size=cfg.vision_config.patch_size)
    ds = dialogues("train", max(world * batch_size * steps, world))
    out = {}
    for name, frozen in (("whole model", False), ("tower frozen", True)):
        model = build_model(cfg, seed=seed, device=vdist.device()).train()
        if frozen:
            model.vision.requires_grad_(False)
        ddp = wrap_ddp(model)
        sent = log_buckets(ddp)
        micro = []
        for step in range(steps):
            progress.report(f"{name}: training step", step, steps)
            examples = step_examples(ds, step, batch_size, world, rank, seed)
            micro.append(len(micro_batches(examples)))
            backward_step(ddp, processor, examples, world)
            model.zero_grad(set_to_none=True)
        log = ddp._get_ddp_logging_data()             # DDP's own record (a prototype interface of torch)
        out[name] = {"steps": sent, "micro_batches": micro,
                     "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "trainable_tensors": sum(1 for p in model.parameters() if p.requires_grad),
                     "all_numel": sum(p.numel() for p in model.parameters()),
                     "element_size": next(model.parameters()).element_size(),
                     "ddp_bucket_sizes": _sizes(log.get("bucket_sizes")),
                     "ddp_rebuilt_bucket_sizes": _sizes(log.get("rebuilt_bucket_sizes"))}
    out["world_size"], out["batch_per_rank"] = world, batch_size
    return out


@contextlib.contextmanager
def count_broadcasts():
    """Count every ``torch.distributed._broadcast_coalesced`` made inside the block: what DDP broadcasts (its
    parameters and buffers at construction, its buffers before a forward). Yields the list of calls, each
    ``{"tensors", "bytes"}``; the original function is put back on exit."""
    calls: list = []
    original = dist._broadcast_coalesced

    def counted(group, tensors, buffer_size, src=0):
        calls.append({"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors)})
        return original(group, tensors, buffer_size, src)

    dist._broadcast_coalesced = counted
    try:
        yield calls
    finally:
        dist._broadcast_coalesced = original


def _memory() -> int:
    """Bytes this rank holds: CUDA memory allocated on a GPU rank, else the process's resident memory."""
    dev = vdist.device()
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else psutil.Process().memory_info().rss


def _sync() -> None:
    if vdist.device().type == "cuda":
        torch.cuda.synchronize()


def inference_ddp_overhead(model_path: str, n: int = 4, repeats: int = 3) -> dict:
    """Rank function: the article's wrapper around an inference model, measured. The plain model's forward
    (``torch.inference_mode``, best of ``repeats``), then ``DistributedDataParallel(model, device_ids=[rank],
    output_device=rank)`` with its defaults: what its construction broadcasts, what each of ``repeats`` forwards
    in inference mode broadcasts and how long it takes, and what two forwards with gradients on (each with a
    backward, as in training) broadcast; and the gradient buckets all-reduced in each phase (DDP's hook). Returns
    bytes, counts, times (s), the memory growth of the wrapping and the outputs' max difference, measured on this
    rank; ``buffers``: the module's own list (name, bytes)."""
    progress.report("loading the snapshot")
    model, processor = load_eval_model(model_path)
    dev = vdist.device()
    batch = processor(conversations=[ex.conversation() for ex in dataset("eval", n)]).to(dev)

    def forward(m):
        _sync()
        t = time.perf_counter()
        logits = m(**batch).logits
        _sync()
        return logits, time.perf_counter() - t

    progress.report("forward without DDP")
    with torch.inference_mode():
        runs = [forward(model) for _ in range(repeats)]
    plain, t_plain = runs[-1][0], min(t for _, t in runs)
    mem0 = _memory()
    vdist.barrier()
    progress.report("wrapping in DDP")
    with count_broadcasts() as calls:
        t = time.perf_counter()
        wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                          output_device=dev.index if dev.type == "cuda" else None)
        t_wrap = time.perf_counter() - t
        at_construction = list(calls)
        mem1 = _memory()
        sent = log_buckets(wrapped)                      # gradient all-reduces, to see that inference makes none
        per_forward, times = [], []
        with torch.inference_mode():
            for i in range(repeats):
                progress.report("forward with DDP (inference mode)", i, repeats)
                calls.clear()
                out, dt = forward(wrapped)
                per_forward.append(list(calls))
                times.append(dt)
        reduced_in_inference = sum(len(st) for st in sent)
        with_grad = []
        for _ in range(3):
            calls.clear()
            wrapped(**batch).logits.float().mean().backward()
            with_grad.append(list(calls))
    return {"max_abs_diff": float((out - plain).abs().max()), "forward_s": t_plain, "forward_ddp_s": min(times),
            "forward_ddp_first_s": times[0], "repeats": repeats, "wrap_s": t_wrap,
            "memory_growth_bytes": mem1 - mem0, "memory_kind": "CUDA allocated" if dev.type == "cuda" else "RSS",
            "construction_broadcasts": at_construction, "inference_broadcasts": per_forward,
            "grad_broadcasts": with_grad, "buckets_reduced_in_inference": reduced_in_inference,
            "buckets_reduced_with_grad": sum(len(st) for st in sent) - reduced_in_inference,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "buffers": [(k, b.numel() * b.element_size()) for k, b in model.named_buffers()],
            "ddp_bucket_sizes": _sizes(wrapped._get_ddp_logging_data().get("bucket_sizes")),
            "world_size": vdist.world_size()}
