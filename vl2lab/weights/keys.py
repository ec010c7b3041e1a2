"""Official tensor names ↔ vl2lab's module names: every module tensor is *one recipe* over official tensors.

Lesson: notebook 01, section "1. Load the model".

The official checkpoint names the vision tower the timm way and stores each routed expert separately; vl2lab's
modules use transformers' SigLIP names and fused 3-D expert tensors:

=================================================  ==========================================================
module key                                         official source
=================================================  ==========================================================
``vision.embeddings.patch_embedding.*``            ``vision.patch_embed.proj.*``
``vision.embeddings.position_embedding.weight``    ``vision.pos_embed`` [1, 729, W] (drop the leading 1)
``vision.encoder.layers.N.layer_norm{1,2}.*``      ``vision.blocks.N.norm{1,2}.*``
``vision.encoder.layers.N.self_attn.{q,k,v}_proj``  row block 0/1/2 of ``vision.blocks.N.attn.qkv`` [3W, W]
``vision.encoder.layers.N.self_attn.out_proj.*``   ``vision.blocks.N.attn.proj.*``
``vision.encoder.layers.N.mlp.fc{1,2}.*``          ``vision.blocks.N.mlp.fc{1,2}.*``
``vision.post_layernorm.*``                        ``vision.norm.*``
``language.model.layers.N.mlp.experts.X``          stack over e of ``…experts.{e}.X.weight`` → [E, …]
everything else                                    the same name
=================================================  ==========================================================

``vision.attn_pool.*`` (the unused pooling head) is ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

__all__ = ["CheckpointError", "SnapshotWarning", "Source", "official_sources", "official_to_module", "state_tensors",
           "official_entries", "official_shapes", "IGNORED_PREFIXES"]

IGNORED_PREFIXES = ("vision.attn_pool.",)


class CheckpointError(ValueError):
    """A snapshot folder vl2lab cannot load (the message says what is wrong and what to do)."""


class SnapshotWarning(UserWarning):
    """A snapshot that loads but is not whole or not sound: no processor files, or weights holding NaN/Inf."""


_RULES = [
    ("vision.embeddings.patch_embedding.{p}", "vision.patch_embed.proj.{p}", "copy"),
    ("vision.embeddings.position_embedding.weight", "vision.pos_embed", "unsqueeze"),
    ("vision.encoder.layers.{n}.layer_norm1.{p}", "vision.blocks.{n}.norm1.{p}", "copy"),
    ("vision.encoder.layers.{n}.layer_norm2.{p}", "vision.blocks.{n}.norm2.{p}", "copy"),
    ("vision.encoder.layers.{n}.self_attn.q_proj.{p}", "vision.blocks.{n}.attn.qkv.{p}", "qkv0"),
    ("vision.encoder.layers.{n}.self_attn.k_proj.{p}", "vision.blocks.{n}.attn.qkv.{p}", "qkv1"),
    ("vision.encoder.layers.{n}.self_attn.v_proj.{p}", "vision.blocks.{n}.attn.qkv.{p}", "qkv2"),
    ("vision.encoder.layers.{n}.self_attn.out_proj.{p}", "vision.blocks.{n}.attn.proj.{p}", "copy"),
    ("vision.encoder.layers.{n}.mlp.fc1.{p}", "vision.blocks.{n}.mlp.fc1.{p}", "copy"),
    ("vision.encoder.layers.{n}.mlp.fc2.{p}", "vision.blocks.{n}.mlp.fc2.{p}", "copy"),
    ("vision.post_layernorm.{p}", "vision.norm.{p}", "copy"),
    ("language.model.layers.{n}.mlp.experts.{w}", "language.model.layers.{n}.mlp.experts.{e}.{w}.weight", "stack"),
]
_FIELDS = {"n": r"\d+", "e": r"\d+", "p": "weight|bias", "w": "gate_proj|up_proj|down_proj"}


def _regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for k, v in _FIELDS.items():
        out = out.replace(re.escape("{" + k + "}"), f"(?P<{k}>{v})")
    return re.compile(out + "$")


_COMPILED = [(_regex(m), m, _regex(o), o, kind) for m, o, kind in _RULES]


@dataclass(frozen=True)
class Source:
    """How one module tensor is made: ``kind`` ∈ copy | unsqueeze (official has a leading 1) | qkv (row block
    ``part`` of 3) | stack (official ``keys`` are the experts, in order)."""
    keys: tuple
    kind: str
    part: int = 0


def official_sources(module_key: str, n_experts: int = 0) -> Source:
    """The official tensor(s) a module tensor comes from (``n_experts`` is needed for fused expert tensors)."""
    for mre, _, _, otpl, kind in _COMPILED:
        m = mre.match(module_key)
        if m:
            g = m.groupdict()
            if kind == "stack":
                return Source(tuple(otpl.format(e=e, **g) for e in range(n_experts)), "stack")
            if kind.startswith("qkv"):
                return Source((otpl.format(**g),), "qkv", int(kind[3]))
            return Source((otpl.format(**g),), kind)
    if module_key.startswith("vision."):
        raise CheckpointError(f"vision tensor {module_key!r} has no official name; the vision tower does not "
                              "match the SigLIP layout vl2lab maps (check the transformers version)")
    return Source((module_key,), "copy")


def official_to_module(key: str) -> list[str]:
    """The module key(s) an official tensor feeds: 3 for a fused qkv, 1 otherwise, none for ignored keys."""
    if key.startswith(IGNORED_PREFIXES):
        return []
    hits = [mtpl.format(**ore.match(key).groupdict()) for _, mtpl, ore, _, _ in _COMPILED if ore.match(key)]
    return hits or [key]


def state_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """(key, owner module, attribute, tensor, is_parameter) for every parameter and persistent buffer."""
    for mname, mod in model.named_modules():
        pre = mname + "." if mname else ""
        for n, p in mod._parameters.items():
            if p is not None:
                yield pre + n, mod, n, p, True
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                yield pre + n, mod, n, b, False


def official_entries(model: nn.Module):
    """(official key, module key, Source, index within the source, official shape, tensor) in module order."""
    for key, _, _, t, _ in state_tensors(model):
        shape = list(t.shape)
        src = official_sources(key, n_experts=shape[0] if shape else 0)
        if src.kind == "stack":
            for e, k in enumerate(src.keys):
                yield k, key, src, e, shape[1:], t
        elif src.kind == "qkv":
            if src.part == 0:  # the fused tensor is emitted once, at q
                yield src.keys[0], key, src, 0, [3 * shape[0]] + shape[1:], t
        else:
            yield src.keys[0], key, src, 0, ([1] + shape if src.kind == "unsqueeze" else shape), t


def official_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Official key → shape for this model (works on the meta device; ``vision.attn_pool.*`` is not included)."""
    return {k: shape for k, _, _, _, shape, _ in official_entries(model)}
