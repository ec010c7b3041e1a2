"""A model built where it will run: modules allocated on the device, in the dtype, from a seed (no fp32 CPU copy first).

Lesson: notebook 01, section "4. Where time and memory go" (real-size memory); notebook 05, section "2. The ladder,
run here" (every rung starts from a model built this way).

:func:`vl2lab.model.build_model` draws the weights on the CPU in fp32 and then moves them, so that the same seed gives
the same weights on every device. At real size (3B–27B parameters) that first copy is what does not fit:
:func:`build_on_device` constructs the modules directly on the device in the target dtype instead (the weights are
the modules' own random initialisation, drawn there).
"""
from __future__ import annotations

import contextlib
from typing import Union

import torch

from vl2lab.model.config import get_config
from vl2lab.model.dtypes import as_dtype
from vl2lab.model.vl2 import DeepseekVL2ForCausalLM

__all__ = ["constructed_on", "build_on_device"]


@contextlib.contextmanager
def constructed_on(device, dtype: Union[str, torch.dtype], seed: int = 0):
    """Modules constructed inside are allocated on ``device`` in ``dtype`` and initialised from ``seed`` (no fp32
    copy on the CPU first); the default dtype and the global random state are restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(as_dtype(dtype))
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_default_dtype(old)


def build_on_device(preset: str, dtype: Union[str, torch.dtype] = "bfloat16", device="cpu",
                    seed: int = 0) -> DeepseekVL2ForCausalLM:
    """A random DeepSeek-VL2 of ``preset`` built directly on ``device`` in ``dtype`` (no fp32 copy, no snapshot),
    in eval mode: what the real-size memory measurement and the tuning ladder need."""
    with constructed_on(device, dtype, seed):
        model = DeepseekVL2ForCausalLM(get_config(preset))
    return model.eval()
