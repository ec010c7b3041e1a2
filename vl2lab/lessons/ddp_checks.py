"""Checks of notebook 03: DDP's gradient equals one process's, what DDP all-reduces per step, and what DDP around an
inference-only model costs.

Lesson: notebook 03, sections "3. DDP training: N ranks × b equals one process with N·b" and
"5. DDP around an inference-only model".

- :func:`grad_equivalence_check` (rank function): W ranks × b dialogues through DDP against one process on all W·b
  of them, with the step of :func:`vl2lab.train.batches.backward_step` (the global normaliser N)::

      max_p |∇_DDP p − ∇_one p|  ≤  1e-5 · max_p |∇_one p|     (fp32 sums in another order)

- :func:`allreduce_bytes_per_step`: the gradient bytes and initial buckets DDP all-reduces per step, computed from
  the parameters (``vl2lab.train.ddp.train`` measures the same with a communication hook).
- :func:`inference_ddp_overhead` (rank function): same outputs, a parameter broadcast and gradient buckets for
  nothing.
"""
from __future__ import annotations

import copy
import time

import psutil
import torch

from vl2lab.model import build_model
from vl2lab.parallel import groups as vdist
from vl2lab.train.batches import backward_step, task_processor
from vl2lab.train.eval import load_eval_model
from vl2lab.train.loop import resolve_config, wrap_ddp
from vl2lab.train.scenes import dataset, dialogues

__all__ = ["grad_equivalence_check", "allreduce_bytes_per_step", "inference_ddp_overhead"]


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
    """This process's resident memory, in bytes."""
    return psutil.Process().memory_info().rss


def inference_ddp_overhead(model_path: str, n: int = 4, repeats: int = 3) -> dict:
    """Rank function: what wrapping an inference-only model in DDP costs and gives. Same outputs (the wrapper's
    forward just calls the module); construction broadcasts every parameter from rank 0 and allocates the
    gradient buckets, which inference never fills. Returns times (s), RSS growth (bytes) and the outputs' max
    difference, measured on this rank."""
    model, processor = load_eval_model(model_path)
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
    wrapped = wrap_ddp(model) if vdist.world_size() > 1 else model
    t_wrap = time.perf_counter() - t
    rss1 = _rss()
    out, t_ddp = timed(wrapped)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"max_abs_diff": float((out - plain).abs().max()), "forward_s": t_plain, "forward_ddp_s": t_ddp,
            "wrap_s": t_wrap, "rss_growth_bytes": rss1 - rss0, "param_bytes_broadcast": param_bytes,
            "bucket_bytes": allreduce_bytes_per_step(model)["total_bytes"], "world_size": vdist.world_size()}
