"""One dtype parser for the whole package: names such as "bfloat16" (or torch dtypes) → torch.dtype, and bytes per element.

Lesson: notebook 01, section "4. Where time and memory go".
"""
from __future__ import annotations

from typing import Union

import torch


def as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """'float32' / 'bfloat16' / 'torch.float16' / torch.float32 … → torch.dtype (one clear error otherwise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dt


def dtype_bytes(dtype: Union[str, torch.dtype]) -> int:
    """Bytes per element of ``dtype`` ("bfloat16" → 2)."""
    return as_dtype(dtype).itemsize
