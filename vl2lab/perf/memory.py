"""Where time and memory go on one device: peak memory of a block, the fixed workload stage by stage, and a long
prompt's prefill in one shot or in chunks.

Lesson: notebook 01, section "4. Where time and memory go" (the rank functions are :func:`profile` and
:func:`prefill_memory`).

Memory is measured as the peak above what was in use when a block started (:class:`PeakMemory`)::

    GPU:  max_memory_allocated − memory_allocated(before)     (the CUDA caching allocator's own count)
    CPU:  VmHWM − VmRSS(before): the resident set's high-water mark, reset through /proc/self/clear_refs after
          glibc's malloc_trim has returned the free heap pages (else memory freed by an earlier block and reused
          would not count). It also holds the thread pools' scratch: an upper bound on the tensors alive.

Predictions come from the planner only (:mod:`vl2lab.planner.sizing`, :mod:`vl2lab.planner.layouts`). For a
prefill of T prompt tokens in chunks of c, the transient bytes are those of c tokens, except the attention scores
where they materialise (eager attention, or SDPA's "math" kernel): the c queries of a chunk score against up to T
keys, so batch · heads · c · T · (2b + 4) bytes instead of batch · heads · T² · (2b + 4).
"""
from __future__ import annotations

import ctypes
import gc

import torch

from vl2lab.launch import progress
from vl2lab.model.attention import attention_kernel
from vl2lab.model.build import build_on_device
from vl2lab.model.dtypes import as_dtype, dtype_bytes
from vl2lab.model.generation import chunked_prefill, step_hook
from vl2lab.parallel.groups import device as rank_device
from vl2lab.perf.workload import environment, real_tiles, time_steps, timed, workload_image, workload_requests
from vl2lab.planner import sizing
from vl2lab.planner.layouts import layout_bytes
from vl2lab.weights.pretrained import load_pretrained

__all__ = ["PeakMemory", "profile", "prefill_activation_bytes", "MODES", "measure_prefill", "long_prompt",
           "prefill_memory"]


# ------------------------------------------------------------------------------------------------ peak memory

def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc), so that reusing them later counts again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` → ``m.delta`` (bytes above the start), ``m.peak`` (the peak itself:
    allocated bytes on a GPU, the resident set on the CPU); both None where the CPU peak cannot be reset."""

    def __init__(self, device):
        self.device, self.delta, self.peak = torch.device(device), None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            _malloc_trim()                                             # freed heap pages leave the resident set
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                                       # VmHWM := VmRSS
                self.before = _proc_status("VmRSS")
            except (OSError, KeyError):
                self.before = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.before is not None:
            self.peak = _proc_status("VmHWM")
        if self.peak is not None:
            self.delta = self.peak - self.before
        return False


# ------------------------------------------------------------------------------------------------ profile

def profile(snapshot: str, dtype: str = "float32", batch_sizes=(1,), new_tokens: int = 64, repeats: int = 3,
            warmup: int = 1, seed: int = 0) -> dict:
    """Rank function: the fixed workload of :mod:`vl2lab.perf.workload` (one 768×768 image, a 32-token prompt,
    ``new_tokens`` new tokens, EOS ignored) at each batch size, stage by stage, on this rank's device.

    Stages: preprocess (processor, CPU), vision (tower over all tiles), projector, prefill (the language model over
    the prompt embeddings), and ``generate`` of n tokens timed step by step (:func:`vl2lab.perf.workload.time_steps`):
    its first token (``generate_first``: vision, projector, prefill and the first choice), then each decode step on
    its own (``decode``: the median over every step of every timed run); e2e = preprocess + generate. Memory (:class:`PeakMemory`): each device stage's peak above what was in use before it, beside
    :func:`vl2lab.planner.layouts.layout_bytes` for the same batch and length; ``peak_total_bytes`` is
    generate(n)'s peak itself (GPU: allocated bytes, weights included; CPU: the whole process's resident set)."""
    dev = rank_device()
    model, processor = load_pretrained(snapshot, dtype=as_dtype(dtype), device=dev)
    lm, cfg = model.language, model.config
    out = {"device": str(dev), "dtype": dtype, "new_tokens": new_tokens, "environment": environment(),
           "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "runs": []}
    for i, b in enumerate(batch_sizes):
        progress.report(f"timing and measuring batch {b}", i, len(batch_sizes))
        convs = workload_requests(processor, b, seed)
        batch = processor(conversations=convs).to(dev, as_dtype(dtype))
        tiles, T = real_tiles(batch), int(batch["input_ids"].shape[1])

        def gen(mark=None):
            with step_hook(mark or (lambda tokens: None)):
                return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
        with torch.inference_mode():
            feats = model.encode_tiles(tiles)
            embeds = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                                 batch["images_spatial_crop"])
            stages = {"vision": lambda: model.encode_tiles(tiles), "projector": lambda: model.projector(feats),
                      "prefill": lambda: lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                            cache=lm.new_cache(T), num_logits_to_keep=1)}
            t = {"preprocess": timed(lambda: processor(conversations=convs), torch.device("cpu"), repeats, warmup)}
            mem = {}
            for name, fn in stages.items():
                t[name] = timed(fn, dev, repeats, warmup)
                with PeakMemory(dev) as m:
                    fn()
                mem[name] = m.delta
            steps, _ = time_steps(gen, dev, repeats, warmup)
            t.update(generate_first=steps["prefill_s"], decode=steps["decode_step_s"], generate=steps["e2e_s"])
            with PeakMemory(dev) as m:
                gen()
            mem["generate"] = m.delta
        pred = layout_bytes(cfg, dtype=dtype, batch=b, seq_len=T + new_tokens, tiles=int(tiles.shape[0]) // b)
        gen_n = t["generate"]["median"]
        out["runs"].append({
            "batch": b, "prompt_len": T, "tiles": int(tiles.shape[0]),
            "image_tokens": int(batch["images_seq_mask"][0].sum()),
            "times": t, "decode_s_per_token": t["decode"]["median"],
            "e2e_s": t["preprocess"]["median"] + gen_n, "tokens_per_s": b * new_tokens / gen_n,
            "images_per_s": b / (t["preprocess"]["median"] + gen_n), "peak_delta_bytes": mem,
            "peak_total_bytes": m.peak,
            "predicted": {k: pred[k] for k in ("weights", "kv_cache", "activations", "total")}})
    return out


# ------------------------------------------------------------------------------------ prefill in chunks

def prefill_activation_bytes(cfg, seq_len: int, chunk: int | None = None, dtype: str = "bfloat16",
                             attn: str = "sdpa", logits: str = "last", batch: int = 1) -> int:
    """Transient bytes of a language-model prefill of ``seq_len`` tokens, in one shot (``chunk=None``) or in
    chunks: :func:`sizing.activation_bytes` of one chunk, its score term widened to the chunk's c queries × T keys.
    ``logits="all"`` is the official HF forward (fp32 logits for every position of the chunk)."""
    c = min(chunk or seq_len, seq_len)
    a = sizing.activation_bytes(cfg, batch=batch, seq_len=c, tiles=0, dtype=dtype, attn=attn, logits=logits)
    scores = a["lm_scores"] * seq_len // c
    return a["lm_residual"] + max(a["lm_attention"] + scores, a["lm_mlp"], a["logits"])


MODES = {"vl2lab (SDPA, last logits)": ("sdpa", "last"), "official-like (eager scores, all logits)": ("eager", "all")}


def measure_prefill(lm, cfg, embeds, mask, chunk_size: int, dtype: str) -> dict:
    """Peak memory of one-shot and chunked prefills in each of :data:`MODES` (the static KV cache of the T
    positions included) beside the prediction (activations + that cache), and whether the chunked result equals
    the one-shot one: ``equal`` = last-position logits within 1e-3 of their scale (5e-2 in 16-bit dtypes, whose
    rounding differs with the matmul shapes), ``same_next_token`` = the same argmax."""
    dev, (B, T) = embeds.device, mask.shape
    kv = sizing.kv_cache_bytes(cfg, B * T, dtype)
    rows = []
    for mode, (attn, logits) in MODES.items():
        keep = 0 if logits == "all" else 1
        res = {}
        for how, chunk in (("one-shot", None), ("chunked", chunk_size)):
            with torch.inference_mode(), attention_kernel(attn), PeakMemory(dev) as m:
                out, cache = chunked_prefill(lm, embeds, mask, chunk or T, num_logits_to_keep=keep)
                last = out[:, -1].float().cpu()
            del out, cache
            res[how] = last
            act = prefill_activation_bytes(cfg, T, chunk, dtype, attn, logits, batch=B)
            rows.append({"mode": mode, "prefill": how, "chunk": chunk or T, "tokens": T, "measured_bytes": m.delta,
                         "predicted_bytes": act + kv, "predicted_activations": act, "kv_bytes": kv})
        diff = (res["one-shot"] - res["chunked"]).abs().max().item()
        tol = (1e-3 if dtype_bytes(dtype) >= 4 else 5e-2) * (res["one-shot"].abs().max().item() or 1.0)
        for r in rows[-2:]:
            r.update(equal=diff <= tol, max_abs_diff=diff,
                     same_next_token=bool(torch.equal(res["one-shot"].argmax(-1), res["chunked"].argmax(-1))))
    return {"rows": rows}


def long_prompt(processor, n_images: int = 2, size: int = 1152, seed: int = 0):
    """The longest kind of request the 4096-token context holds: ``n_images`` test pictures
    (:func:`vl2lab.perf.workload.workload_image`) of size×size (1152² = 3×3 tiles, 2017 tokens each) and one
    question."""
    ims = [workload_image(seed + i, (size, size)) for i in range(n_images)]
    return processor(conversation=[{"role": "<|User|>", "content": "<image>\n" * n_images + "Compare the pictures.",
                                    "images": ims}, {"role": "<|Assistant|>", "content": ""}])


def prefill_memory(snapshot: str, dtype: str = "float32", chunk_size: int = 512, n_images: int = 2,
                   image_size: int = 1152, real_presets=(), seed: int = 0) -> dict:
    """Rank function: one-shot vs chunked prefill memory (:func:`measure_prefill`) for the snapshot's model on a
    long two-image prompt; on a GPU also for each of ``real_presets`` at its real size (random weights built on
    the device, random prompt embeddings of the same length), with its measured weight bytes."""
    dev, dt = rank_device(), as_dtype(dtype)
    model, processor = load_pretrained(snapshot, dtype=dt, device=dev)
    batch = long_prompt(processor, n_images, image_size, seed).to(dev, dt)
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                             batch["images_spatial_crop"])
    out = {"device": str(dev), "model": measure_prefill(model.language, model.config, embeds, batch["attention_mask"],
                                                       chunk_size, dtype), "tokens": int(embeds.shape[1]), "real": {}}
    del model, embeds
    if dev.type != "cuda":
        return out
    T = out["tokens"]
    for name in real_presets:
        torch.cuda.empty_cache()
        try:
            before = torch.cuda.memory_allocated(dev)
            big = build_on_device(name, dtype, dev, seed)
            weights = torch.cuda.memory_allocated(dev) - before
            cfg = big.config
            e = torch.randn(1, T, cfg.language_config.hidden_size, device=dev, dtype=dt) * 0.02
            res = measure_prefill(big.language, cfg, e, torch.ones(1, T, dtype=torch.long, device=dev), chunk_size,
                                  dtype)
            out["real"][name] = {"weights_bytes": weights, **res,
                                 "weights_predicted": sizing.weight_bytes(cfg, dtype, instantiated=True)}
        except torch.cuda.OutOfMemoryError as err:
            out["real"][name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        big = e = None
    return out
