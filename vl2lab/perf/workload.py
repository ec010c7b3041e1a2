"""The fixed workload every measurement of the workbook runs, and how it is timed.

Lesson: notebook 01, section "4. Where time and memory go"; notebook 05, section "2. The ladder, run here".

Workload: one 768×768 image (a 2×2 tiling: 5 ViT passes, 1023 image tokens), a 32-token text prompt, 64 new tokens
with EOS ignored, at a given batch size. A batch is that many distinct requests (:func:`workload_requests`: the same
question about pictures of the same size drawn from different seeds), so its rows can route to different experts as
independent users' requests do; a batch of one request repeated would route every row alike and read a fraction of
the expert weights that the decode floor (:func:`vl2lab.perf.roofline.decode_bytes`) counts. :func:`timed` gives
the median of ``repeats`` runs after ``warmup`` runs (p10/p90 kept), with CUDA events on GPUs; :func:`time_steps`
times a generation step by step from marks set inside its loop (the prefill, then each decode step on its own: never
a difference of two totals); :func:`measure_generate` is the one measurement of that workload that the benchmark
(:mod:`vl2lab.perf.bench`), the tuning ladder (:mod:`vl2lab.perf.rungs`) and, through :func:`time_steps`,
transformers' peer (:mod:`vl2lab.perf.peer`) share. :func:`environment` names the hardware and versions a result
was measured with.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import numpy as np
import torch
from PIL import Image

from vl2lab.inputs.tokenizer import ASSISTANT, USER
from vl2lab.model.generation import step_hook

__all__ = ["IMAGE_SIZE", "PROMPT_TOKENS", "NEW_TOKENS", "environment", "pick_device", "workload_image", "conversation",
           "answer_tokens", "workload_conversation", "workload_question", "workload_requests", "workload_batch",
           "real_tiles", "stats", "timed", "time_steps", "measure_generate"]

IMAGE_SIZE = (768, 768)
PROMPT_TOKENS = 32
NEW_TOKENS = 64


def environment() -> dict:
    """Hardware and software this run used."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            info["driver"] = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: the first GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def workload_image(seed: int = 0, size: tuple = IMAGE_SIZE) -> Image.Image:
    """A deterministic RGB test picture of ``size`` (width, height; the workload's 768×768 by default): smooth
    colour ramps plus noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype("uint8")
    return Image.fromarray(img, "RGB")


def conversation(question: str, image=None) -> list:
    """One user turn asking ``question`` about one picture (``image``; None: the turns alone, for a processor that
    is given the images beside them), then the assistant's empty turn."""
    user = {"role": USER, "content": "<image>\n" + question}
    if image is not None:
        user["images"] = [image]
    return [user, {"role": ASSISTANT, "content": ""}]


def workload_question(processor, prompt_tokens: int = PROMPT_TOKENS) -> str:
    """The workload's question: "Describe the picture" padded with digits until its turn (template included, the
    image tokens not) is ``prompt_tokens`` tokens of ``processor``'s tokenizer."""
    image = workload_image()                          # drawn once: only its token count matters here

    def text_tokens(q):
        b = processor(conversation=conversation(q, image))
        return int(b["input_ids"].shape[1] - b["images_seq_mask"].sum())

    q = "Describe the picture"
    n = text_tokens(q)
    while n < prompt_tokens:
        for piece in (" 7", "7"):
            m = text_tokens(q + piece)
            if m <= prompt_tokens:
                q, n = q + piece, m
                break
        else:
            break
    return q


def workload_conversation(processor, image, prompt_tokens: int = PROMPT_TOKENS) -> list:
    """One user turn with ``image`` and the workload's question (:func:`workload_question`)."""
    return conversation(workload_question(processor, prompt_tokens), image)


def workload_requests(processor, batch_size: int, seed: int = 0, prompt_tokens: int = PROMPT_TOKENS) -> list:
    """``batch_size`` distinct requests of the workload: row i asks the workload's question about
    ``workload_image(seed + i)`` (same size, so the same tiling and length; row 0 is the batch-1 request)."""
    q = workload_question(processor, prompt_tokens)
    return [conversation(q, workload_image(seed + i)) for i in range(batch_size)]


def workload_batch(processor, batch_size: int, device, dtype, seed: int = 0, prompt_tokens: int = PROMPT_TOKENS):
    """The processor batch of :func:`workload_requests` (``batch_size`` rows from ``seed``), on ``device``,
    its images in ``dtype`` (``VL2Batch.to``): the batch the routing count and the step profile run."""
    return processor(conversations=workload_requests(processor, batch_size, seed, prompt_tokens)).to(device, dtype)


def real_tiles(batch) -> torch.Tensor:
    """The real tiles of a processor batch, in order (per sequence: its images' global view, then their local
    tiles), without the padding tiles (nor the (0, 0) rows of missing images): [N, 3, 384, 384]."""
    per = [sum(1 + w * h for w, h in rows.tolist() if (w, h) != (0, 0)) for rows in batch["images_spatial_crop"]]
    return torch.cat([batch["images"][b, :n] for b, n in enumerate(per)], dim=0)


def stats(times: list) -> dict:
    """Median, p10, p90 and count of ``times`` (seconds)."""
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median": statistics.median(times), "p10": q[0], "p90": q[-1], "n": len(times)}


def timed(fn, device: torch.device, repeats: int, warmup: int) -> dict:
    """Median, p10, p90 (seconds) of ``repeats`` calls of ``fn`` after ``warmup`` calls; CUDA events on GPUs."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return stats(times)


def time_steps(run, device, repeats: int, warmup: int, clock=time.perf_counter) -> tuple:
    """Time the phases of a generation from marks it sets itself.

    ``run(mark)`` generates once and calls ``mark(tokens)`` when it has chosen its first token (the end of the
    prefill) and again after every decode step. With m₀ set just before the call and m₁, m₂, … at the marks::

        prefill = m₁ − m₀        decode step k = m₍ₖ₊₁₎ − mₖ  (k ≥ 1)        end to end = m_last − m₀

    On a GPU a mark is a CUDA event recorded on the current stream (the device's own clock, no synchronisation
    inside the loop); elsewhere it is ``clock()`` read once the step's tokens are on the CPU. ``warmup`` untimed
    runs come first. → ({"prefill_s", "decode_step_s", "e2e_s": median/p10/p90/n}, what the last run returned);
    ``decode_step_s`` pools every step of every timed run, so it is a per-step time, positive by construction.
    """
    cuda = torch.device(device).type == "cuda"

    def stamp(tokens=None):
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        if tokens is not None:
            tokens.to("cpu")                                        # the step's result exists on the host
        return clock()

    prefill, steps, total, result = [], [], [], None
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(device)
        marks = [stamp()]
        result = run(lambda tokens=None: marks.append(stamp(tokens)))
        if cuda:
            torch.cuda.synchronize(device)
            gaps = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        else:
            gaps = [b - a for a, b in zip(marks, marks[1:])]
        if not gaps:
            raise RuntimeError("time_steps: the run set no mark (does it call mark() after each step?)")
        if i >= warmup:
            prefill.append(gaps[0])
            steps += gaps[1:]
            total.append(sum(gaps))
    out = {"prefill_s": stats(prefill), "e2e_s": stats(total)}
    if steps:
        out["decode_step_s"] = stats(steps)
    return out, result


def answer_tokens(vl2, batch, new_tokens: int = NEW_TOKENS, decode: str = "eager", ignore_eos: bool = True):
    """The greedy answer tokens of a batch already on the model's device, as the workload asks for them: the
    model's own ``generate`` with EOS ignored (every batch does the same work) → [B, new_tokens]."""
    return vl2.generate(**batch, max_new_tokens=new_tokens, do_sample=False, ignore_eos=ignore_eos, decode=decode)


def measure_generate(vl2, processor, convs: list, decode: str = "eager", repeats: int = 3, warmup: int = 1,
                     new_tokens: int = NEW_TOKENS) -> dict:
    """The workload on the batch of requests ``convs`` (:func:`workload_requests`): the vision tower on the batch's
    tiles (:func:`timed`), then ``generate`` of ``new_tokens`` (EOS ignored) timed phase by phase
    (:func:`time_steps`, through :func:`vl2lab.model.generation.step_hook`): prefill (vision + projector + the
    language model over the prompt, up to the first token), every decode step, end to end; peak device memory of the
    generations on GPUs.
    Returns the batch (on the model's device), its real tiles, the timings, the last run's tokens and the peak."""
    dev = next(vl2.parameters()).device
    dt = next(vl2.parameters()).dtype
    batch = processor(conversations=convs).to(dev, dt)
    tiles = real_tiles(batch)                                        # [N real tiles, 3, 384, 384]

    def gen(mark):
        with step_hook(mark):
            return answer_tokens(vl2, batch, new_tokens, decode)

    out = {"batch": batch, "tiles": tiles}
    with torch.inference_mode():
        out["vision_s"] = timed(lambda: vl2.encode_tiles(tiles), dev, repeats, warmup)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        times, out["tokens"] = time_steps(gen, dev, repeats, warmup)
        out.update(times)
    if dev.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out
