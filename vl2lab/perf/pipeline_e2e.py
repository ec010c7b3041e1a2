"""Images/s from files to answers: the input pipeline (file read, PIL decode, processor) in worker processes,
overlapped with the model, and its measurement.

Lesson: notebook 05, section "End to end: the input pipeline" (issue 17: on the CPU, preprocessing a batch of 32
takes about as long as the vision tower on an H200).

The ladder's images/s (:func:`vl2lab.perf.workload.measure_generate`) starts from a batch already on the device.
A server starts from files. Let p be the time one process takes to read, decode and process a batch of B files, g
the model's time for that batch (vision, prefill, decode, answers on the host) and K the number of batches::

    in the main process (0 workers):   T ≈ K · (p + g)                      images/s = B / (p + g)
    N worker processes:                T ≈ s + p + K · max(g, p / N)        images/s → B / max(g, p / N)

s + p is the pipeline's fill (the workers' start, then the first batch: nothing can hide it; ``fill_s``). After
that N workers deliver a batch every p / N seconds while the model needs one every g: the model never waits once
N ≥ p / g. A worker's p is single-threaded (the DataLoader sets ``torch.set_num_threads(1)`` in each), so the fill
is longer than a batch prepared in the main process; on a CPU the workers and the model share the same cores.
What the model does wait is measured, not inferred: ``wait_s`` is the time blocked in ``next(batches)`` before
each batch.

Why :class:`torch.utils.data.DataLoader` rather than :mod:`multiprocessing` by hand: it keeps the batches in file
order across workers, bounds what runs ahead (``prefetch_factor`` batches per worker: memory stays bounded where
``Pool.imap`` would read ahead without limit), sends tensors back through shared memory (a batch of 32 workload
images is 283 MB of fp32 tiles: too much to pickle through a pipe), pins them in a thread of the main process for
the copy to the GPU (``pin_memory``), stops its workers when the iterator is dropped, and with ``num_workers=0``
runs the same collate function in the main process: the not-overlapped baseline, and the reference the tests
compare the workers' batches with.

What crosses into a worker: the dataset is the list of paths (strings) and the collate function holds the processor
and the conversation's text. Where the platform has ``fork`` (Linux) the workers inherit both and receive only
lists of indices through their queues; nothing a user gave is ever unpickled there (elsewhere the DataLoader
pickles the dataset and the collate function, this process's own objects). Workers never touch CUDA, so a fork
after CUDA is initialised is safe. A file that cannot be read fails the batch with one
:class:`~vl2lab.inputs.processor.ProcessorError` naming the file: the worker returns the error as its batch and the
main process raises it (an exception raised inside a worker would come back wrapped in the worker's traceback).
The tensors come back through ``/dev/shm``: a container with a small one fails with "bus error" in a worker.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from vl2lab.inputs.processor import ProcessorError
from vl2lab.inputs.tiling import open_image
from vl2lab.perf.workload import (NEW_TOKENS, answer_tokens, conversation, stats, workload_conversation,
                                  workload_image)

__all__ = ["Collate", "batches", "measure_end_to_end", "workload_files", "end_to_end_runs"]

QUESTION = "Describe the picture."


class Collate:
    """A list of image paths → one processor batch (the DataLoader's ``collate_fn``; it runs in the worker): each
    file read and decoded (:func:`~vl2lab.inputs.tiling.open_image`), then the processor on the conversation with
    that image. ``question``: the user's text, or the turns of a conversation with one ``<image>`` tag and no
    images. A file or batch the processor refuses is returned as its ProcessorError, not raised."""

    def __init__(self, processor, question=QUESTION):
        self.processor = processor
        self.conversation = (conversation(question) if isinstance(question, str) else
                             [{k: v for k, v in turn.items() if k != "images"} for turn in question])

    def __call__(self, paths):
        try:
            images = [[open_image(p)] for p in paths]
            return self.processor(conversations=[self.conversation] * len(paths), images=images)
        except ProcessorError as e:
            return e


def batches(processor, paths, batch_size: int, num_workers: int = 0, question=QUESTION, pin_memory: bool = False,
            prefetch_factor: int = 2):
    """Processed batches of ``batch_size`` files (the last one may be smaller), in file order; the files of later
    batches are prepared by ``num_workers`` processes while the caller works on the current one (0: each batch
    prepared in this process when asked for). ``pin_memory``: batches in page-locked memory (for a GPU)."""
    workers = num_workers > 0
    fork = "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None
    loader = DataLoader([os.fspath(p) for p in paths], batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=Collate(processor, question), pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if workers else None, multiprocessing_context=fork)
    for batch in loader:
        if isinstance(batch, ProcessorError):
            break                      # out of the loop first: the loader and its workers are let go, then raise
        yield batch
    else:
        return
    raise batch


def measure_end_to_end(vl2, processor, paths, batch_size: int, num_workers: int, new_tokens: int = NEW_TOKENS,
                       device=None, question=QUESTION, decode: str = "eager", prefetch_factor: int = 2,
                       warmup: bool = True, ignore_eos: bool = True) -> dict:
    """Answer every file of ``paths`` (in batches of ``batch_size``, preprocessing in ``num_workers`` processes)
    and time it from the files to the answer tokens on the host.

    The wall clock covers the workers' start and the whole loop (CUDA-synchronised at the end); per batch, the time
    from asking for it to its answers on the host (``batch_s``) and the part of it spent blocked in ``next()``
    waiting for preprocessing (``wait_s``; the first is the pipeline's fill). ``warmup``: one untimed generation of
    the first batch first (prepared in this process), so that a CUDA graph capture or a compilation for this batch
    size is not timed: use a number of files that is a multiple of ``batch_size`` for the same reason. ``device``:
    the model's by default. → images, batches, wall_s, images_per_s, batch_s, wait_s (lists), waited_s,
    wait_fraction, fill_s (the first wait: the workers' start and the first batch), the stats (median, p10, p90) of
    both lists, and ``tokens`` [images, new_tokens] in file order."""
    dev = torch.device(device) if device is not None else next(vl2.parameters()).device
    dt = next(vl2.parameters()).dtype
    cuda = dev.type == "cuda"
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("measure_end_to_end needs at least one image file")
    with torch.inference_mode():
        if warmup:
            first = Collate(processor, question)(paths[:batch_size])
            if isinstance(first, ProcessorError):
                raise first
            answer_tokens(vl2, first.to(dev, dt), new_tokens, decode, ignore_eos)
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        it = batches(processor, paths, batch_size, num_workers, question, cuda, prefetch_factor)
        waits, times, tokens = [], [], []
        try:
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it)                    # the workers start at the first next()
                except StopIteration:
                    break
                waits.append(time.perf_counter() - t)
                tokens.append(answer_tokens(vl2, batch.to(dev, dt), new_tokens, decode, ignore_eos).cpu())
                times.append(time.perf_counter() - t)
        finally:
            it.close()                                  # on an error too: the workers stop now
        if cuda:
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
    return {"batch": batch_size, "num_workers": num_workers, "images": len(paths), "batches": len(times),
            "new_tokens": new_tokens, "wall_s": wall, "images_per_s": len(paths) / wall,
            "batch_s": times, "wait_s": waits,
            "waited_s": sum(waits), "wait_fraction": sum(waits) / wall, "fill_s": waits[0],
            "batch_stats_s": stats(times), "wait_stats_s": stats(waits), "tokens": torch.cat(tokens)}


def workload_files(folder: str, copies: int, seed: int = 0) -> list[str]:
    """``copies`` PNG files of the workload picture (:func:`~vl2lab.perf.workload.workload_image`; lossless, so
    each file decodes to the workload's exact pixels) in ``folder`` → their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"workload_{i:04d}.png") for i in range(copies)]
    workload_image(seed).save(paths[0])
    for p in paths[1:]:
        shutil.copyfile(paths[0], p)
    return paths


def end_to_end_runs(vl2, processor, batch_size: int, workers=(0, 4), images: int | None = None,
                    new_tokens: int = NEW_TOKENS, decode: str = "eager", seed: int = 0, folder: str | None = None,
                    device=None) -> dict:
    """The ladder's end-to-end part: ``images`` (default 8 batches) copies of the workload picture written to a
    temporary folder (or ``folder``), answered with each number of ``workers``, the workload's question.
    → {"batch", "images", "runs": [measure_end_to_end without the tokens, + "tokens" of the first image's first 8],
    "same_tokens": every run gave the same answers}."""
    images = images or 8 * batch_size
    conv = workload_conversation(processor, workload_image(seed))
    with tempfile.TemporaryDirectory() as tmp:
        paths = workload_files(folder or tmp, images, seed)
        runs = [measure_end_to_end(vl2, processor, paths, batch_size, n, new_tokens, device, conv, decode)
                for n in workers]
    same = all(torch.equal(r["tokens"], runs[0]["tokens"]) for r in runs)
    for r in runs:
        r["tokens"] = r["tokens"][0, :8].tolist()
    return {"batch": batch_size, "images": images, "new_tokens": new_tokens, "runs": runs, "same_tokens": same}
