"""The next steps' batches, prepared ahead in worker processes while the device trains on this one.

Lesson: notebook 03, section "4. A short training run" (the run, whose input side this takes off the
training process).

A training step of vl2-micro is small work for a GPU and real work for a CPU: drawing the scenes, tiling them and
running the processor. Done in the training process, that input side runs between two steps and the GPU idles.
:func:`prefetched` moves it into ``workers`` ``torch.utils.data.DataLoader`` worker processes, each preparing whole
steps (``make(step)``: every micro-batch of one rank's step, on the CPU), ``ahead`` steps each in advance::

    workers = 0:   main: make(s) → train(s) → make(s+1) → train(s+1) …
    workers = w:   worker j: make(s) for s ≡ j (mod w), queued;  main: train(s) on the batch of s, in step order

The order is the steps' order whatever the number of workers, and ``make`` is a pure function of the step
(:func:`vl2lab.train.batches.step_examples`), so a run with workers trains on exactly the batches of a run without
them (a test checks the losses are equal). Each worker runs torch on one thread (DataLoader's default), so the
workers and the training process do not fight over the cores.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from torch.utils.data import DataLoader, Dataset

__all__ = ["prefetched"]


class _Steps(Dataset):
    """Item i is ``(steps[i], make(steps[i]))``."""

    def __init__(self, make: Callable, steps: list):
        self.make, self.steps = make, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> tuple:
        return self.steps[i], self.make(self.steps[i])


def _as_is(item):
    """The collate function: the item as ``make`` returned it (no stacking, no conversion)."""
    return item


def prefetched(make: Callable, steps: Iterable[int], workers: int = 0, ahead: int = 4) -> Iterator:
    """``(step, make(step))`` for each of ``steps``, in order: in this process (``workers=0``), or prepared
    ``ahead`` steps per worker in advance by ``workers`` worker processes. ``make`` must not touch the GPU (its results are moved
    to the device by the caller)."""
    steps = list(steps)
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0 prepares each step in the training process)")
    if workers == 0 or not steps:
        return ((s, make(s)) for s in steps)
    return iter(DataLoader(_Steps(make, steps), batch_size=None, shuffle=False, num_workers=min(workers, len(steps)),
                           prefetch_factor=ahead, collate_fn=_as_is))
