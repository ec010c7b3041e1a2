"""Lazy reading of a snapshot's safetensors files: whole tensors, or only the slice a rank needs.

Lesson: notebook 04, section "1. What each rank holds".

Files are memory-mapped by ``safe_open``; ``get_slice`` reads only the requested region, so peak memory is one
tensor (or one slice) at a time. :func:`module_tensor_from_official` builds a module tensor from its official
source(s) (:mod:`vl2lab.weights.keys`), with ``slices`` in module coordinates — what a per-rank loader needs.

Every floating-point tensor read is checked for NaN/Inf (the sum of the tensor just read; the exact
``torch.isfinite`` test only when that sum is not finite): about 1–2 ms per load of random-tiny or vl2-micro, some
15 GB/s on bf16. Leaving the ``with`` block warns once (:class:`SnapshotWarning`) if any held them.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import warnings
from typing import Optional

import torch
from safetensors import safe_open

from vl2lab.weights.keys import CheckpointError, SnapshotWarning, Source, official_sources

__all__ = ["SnapshotReader", "INDEX", "check_source", "module_tensor_from_official", "snapshot_bytes", "weight_sizes"]

INDEX = "model.safetensors.index.json"


def _slices(slices, shape) -> list[tuple[int, int]]:
    """Leading-dim slices (step 1) → [(start, stop)] for every dim of ``shape``."""
    slices = tuple(slices or ())
    if len(slices) > len(shape):
        raise ValueError(f"{len(slices)} slices for a {len(shape)}-d tensor")
    out = []
    for i, n in enumerate(shape):
        s = slices[i] if i < len(slices) else slice(None)
        a, b, step = s.indices(n)
        if step != 1:
            raise ValueError("only contiguous slices (step 1) can be read")
        out.append((a, b))
    return out


class SnapshotReader:
    """Lazy, read-only access to a snapshot's tensors by official key (files memory-mapped by ``safe_open``).

    ``bytes_read`` counts the bytes of the tensors (or slices) handed out so far; ``nonfinite`` the keys of those
    that held NaN or Inf (checked when ``check_finite``), reported by one warning when the ``with`` block ends.
    """

    def __init__(self, path: str, check_finite: bool = True):
        self.path, self.bytes_read, self._files, self._where = str(path), 0, {}, {}
        self.check_finite, self.nonfinite = check_finite, {}           # dict: the keys, in reading order
        index = os.path.join(self.path, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); re-download or "
                                      "re-save the snapshot") from None
            names = sorted(set(weight_map.values()))
            lost = [n for n in names if not os.path.isfile(os.path.join(self.path, n))]
            if lost:
                raise CheckpointError(f"{self.path}: shard(s) {lost} named in {INDEX} are missing; the download "
                                      "is incomplete: fetch the missing files into the folder")
        elif os.path.isfile(os.path.join(self.path, "model.safetensors")):
            names, weight_map = ["model.safetensors"], None
        else:
            names, weight_map = sorted(os.path.basename(f) for f in
                                       glob.glob(os.path.join(self.path, "*.safetensors"))), None
            if not names:
                raise CheckpointError(f"{self.path} has a config.json but no *.safetensors weights; download the "
                                      "weight files too (or save the model with save_pretrained)")
        for n in names:
            try:
                self._files[n] = safe_open(os.path.join(self.path, n), framework="pt")
            except Exception as e:  # safetensors raises its own error type for bad headers/truncated files
                self.close()
                raise CheckpointError(f"{os.path.join(self.path, n)} is not a readable safetensors file ({e}); it "
                                      "is truncated or corrupt: download it again") from None
            for k in self._files[n].keys():
                self._where[k] = n
        if weight_map:
            wrong = [k for k, n in weight_map.items() if self._where.get(k) != n]
            if wrong:
                raise CheckpointError(f"{INDEX} places {wrong[:3]} in files that do not hold them; the index and "
                                      "the shards are from different snapshots: download them again")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def _slice(self, key: str):
        if key not in self._where:
            raise CheckpointError(f"tensor {key!r} is not in the snapshot at {self.path}")
        return self._files[self._where[key]].get_slice(key)

    def shape(self, key: str) -> list[int]:
        return list(self._slice(key).get_shape())

    def get(self, key: str, dtype: Optional[torch.dtype] = None, slices=None) -> torch.Tensor:
        """The tensor (or the part ``slices`` selects, read with ``get_slice``), optionally cast to ``dtype``."""
        sl = self._slice(key)
        t = sl[tuple(slice(a, b) for a, b in _slices(slices, sl.get_shape()))]
        self.bytes_read += t.numel() * t.element_size()
        # NaN/Inf anywhere makes the sum non-finite (one reduction, ~3 µs on a small tensor); only then, or when
        # the sum overflows, does the exact elementwise test run
        if self.check_finite and t.is_floating_point() and not (math.isfinite(t.sum().item())
                                                                or bool(torch.isfinite(t).all())):
            self.nonfinite[key] = None
        return t if dtype is None else t.to(dtype)

    def warn_nonfinite(self, stacklevel: int = 2) -> None:
        """One SnapshotWarning naming the tensors read so far that hold NaN or Inf (none: nothing)."""
        if self.nonfinite:
            keys = list(self.nonfinite)
            warnings.warn(f"{len(keys)} tensor(s) read from {self.path} hold NaN or Inf, e.g. {keys[:3]}: the model "
                          "will compute NaN/Inf. The weight files are damaged (download them again) or were saved from a "
                          "training run that diverged (take an earlier checkpoint)", SnapshotWarning,
                          stacklevel=stacklevel + 1)
            self.nonfinite = {}

    def close(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(Exception):
                f.__exit__(None, None, None)
        self._files = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:                                        # an error already says what went wrong
            self.warn_nonfinite(stacklevel=3)
        self.close()


def check_source(reader: SnapshotReader, module_key: str, src: Source, shape: list[int]) -> Optional[str]:
    """None if ``src`` can produce a tensor of ``shape``, else a sentence naming the key, expected vs found."""
    want = {"copy": shape, "unsqueeze": [1] + shape, "qkv": [3 * shape[0]] + shape[1:] if shape else shape,
            "stack": shape[1:]}[src.kind]
    if src.kind == "stack" and shape and len(src.keys) != shape[0]:
        return f"{module_key}: {shape[0]} experts expected, {len(src.keys)} sources"
    for k in src.keys:
        found = reader.shape(k)
        if found != want:
            return f"{k}: expected shape {want}, found {found}"
    return None


def module_tensor_from_official(reader: SnapshotReader, module_key: str, shape, dtype: Optional[torch.dtype] = None,
                                slices=None, device=None) -> torch.Tensor:
    """Build module tensor ``module_key`` (full shape ``shape``) from the official tensors, reading only the part
    ``slices`` (leading-dim slices in module coordinates) selects."""
    shape = list(shape)
    src = official_sources(module_key, n_experts=shape[0] if shape else 0)
    bad = check_source(reader, module_key, src, shape)
    if bad:
        raise CheckpointError(f"wrong tensor shape in {reader.path}: {bad}; the snapshot does not match its "
                              "config.json")
    rng = _slices(slices, shape)
    if src.kind == "stack":
        (a, b), rest = rng[0], [slice(x, y) for x, y in rng[1:]]
        out = None
        for i, e in enumerate(range(a, b)):
            part = reader.get(src.keys[e], slices=rest)             # one expert at a time: [I, H] or its slice
            if out is None:
                out = torch.empty([b - a] + list(part.shape), dtype=dtype or part.dtype, device=device)
            out[i].copy_(part)
        return out if out is not None else torch.empty([0] + shape[1:], dtype=dtype, device=device)
    sl = [slice(x, y) for x, y in rng]
    if src.kind == "unsqueeze":
        t = reader.get(src.keys[0], slices=[slice(0, 1)] + sl)[0]
    elif src.kind == "qkv":
        off = src.part * shape[0]
        t = reader.get(src.keys[0], slices=[slice(off + rng[0][0], off + rng[0][1])] + sl[1:])
    else:
        t = reader.get(src.keys[0], slices=sl)
    return t.to(device=device, dtype=dtype or t.dtype)


def _count(keys, pattern: str) -> Optional[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else None


def weight_sizes(reader: SnapshotReader) -> dict:
    """The config.json sizes the weights themselves show, read from key names and shapes only (no data):
    vocab_size, hidden_size, num_hidden_layers, n_routed_experts, moe_intermediate_size and vision_config.width,
    .patch_size, .layers; None where the weights do not tell (e.g. no routed experts)."""
    keys, out = reader.keys(), dict.fromkeys(("vocab_size", "hidden_size", "vision_config.width",
                                              "vision_config.patch_size"))
    embed, patch = (reader.shape(k) if k in reader else [] for k in ("language.model.embed_tokens.weight",
                                                                      "vision.patch_embed.proj.weight"))
    if len(embed) == 2:
        out["vocab_size"], out["hidden_size"] = embed
    if len(patch) == 4:
        out["vision_config.width"], out["vision_config.patch_size"] = patch[0], patch[2]
    gate = re.compile(r"language\.model\.layers\.\d+\.mlp\.experts\.0\.gate_proj\.weight")
    gate = next((k for k in keys if gate.fullmatch(k)), None)
    return {**out, "num_hidden_layers": _count(keys, r"language\.model\.layers\.(\d+)\."),
            "n_routed_experts": _count(keys, r"language\.model\.layers\.\d+\.mlp\.experts\.(\d+)\."),
            "moe_intermediate_size": reader.shape(gate)[0] if gate else None,
            "vision_config.layers": _count(keys, r"vision\.blocks\.(\d+)\.")}


def snapshot_bytes(path: str) -> int:
    """Total size of a snapshot's ``*.safetensors`` files."""
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(os.fspath(path), "*.safetensors")))
