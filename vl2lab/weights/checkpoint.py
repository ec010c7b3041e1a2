"""Read and write DeepSeek-VL2 snapshot folders in the official layout (``config.json`` + safetensors shards).

Lesson: notebook 01, section "1. Load the model", and notebook 04, section "9. Bad input and faults" (a checkpoint
that does not match its config).

The official checkpoint names the vision tower the timm way and stores each routed expert separately; vl2lab's
modules use transformers' SigLIP names and fused 3-D expert tensors. Every module tensor is *one recipe* over
official tensors:

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

``vision.attn_pool.*`` (the unused pooling head) is ignored. Loading is lazy: the model is built with its parameters
on the meta device, then each tensor is read from the memory-mapped file with ``safe_open`` (``get_slice`` when only
part is needed) and assigned, so peak memory is the model plus one tensor. ``module_tensor_from_official`` takes
``slices`` in module coordinates, which is what a per-rank loader needs to read only its shard.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from vl2lab.model.config import ConfigError, VL2Config, preset_name

__all__ = ["CheckpointError", "SnapshotReader", "Source", "official_sources", "official_to_module",
           "module_tensor_from_official", "official_shapes", "save_pretrained", "load_pretrained",
           "make_random_snapshot", "project_processor", "IGNORED_PREFIXES", "shipped_micro", "MICRO_DIR"]

IGNORED_PREFIXES = ("vision.attn_pool.",)
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A snapshot folder vl2lab cannot load (the message says what is wrong and what to do)."""


# ----------------------------------------------------------------------------------------- the key mapping
# (module template, official template, kind); {n} layer, {p} weight|bias, {w} expert matrix, {e} expert index.
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


# ----------------------------------------------------------------------------------------- the reader
class SnapshotReader:
    """Lazy, read-only access to a snapshot's tensors by official key (files memory-mapped by ``safe_open``).

    ``bytes_read`` counts the bytes of the tensors (or slices) handed out so far.
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path, self.bytes_read, self._files, self._where = str(path), 0, {}, {}
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
        return t if dtype is None else t.to(dtype)

    def close(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(Exception):
                f.__exit__(None, None, None)
        self._files = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_source(reader: SnapshotReader, module_key: str, src: Source, shape: list[int]) -> Optional[str]:
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
    bad = _check_source(reader, module_key, src, shape)
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


# ----------------------------------------------------------------------------------------- module side
def _state_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """(key, owner module, attribute, tensor, is_parameter) for every parameter and persistent buffer."""
    for mname, mod in model.named_modules():
        pre = mname + "." if mname else ""
        for n, p in mod._parameters.items():
            if p is not None:
                yield pre + n, mod, n, p, True
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                yield pre + n, mod, n, b, False


def _official_entries(model: nn.Module):
    """(official key, module key, Source, index within the source, official shape, tensor) in module order."""
    for key, _, _, t, _ in _state_tensors(model):
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
    return {k: shape for k, _, _, _, shape, _ in _official_entries(model)}


# ----------------------------------------------------------------------------------------- save
def _official_tensor(entry, tensors: dict) -> torch.Tensor:
    _, mkey, src, idx, _, t = entry
    if src.kind == "stack":
        out = t[idx].clone()                                        # own storage: safetensors refuses shared views
    elif src.kind == "qkv":
        out = torch.cat([tensors[mkey.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"], dim=0)
    elif src.kind == "unsqueeze":
        out = t.unsqueeze(0)
    else:
        out = t
    return out.detach().to("cpu").contiguous()


def save_pretrained(model: nn.Module, path: str, max_shard_bytes: Optional[int] = None, processor=None) -> None:
    """Write ``config.json`` and the weights under their official names: ``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` when ``max_shard_bytes`` splits them.
    Old weight files in ``path`` are removed first. With ``processor``, its files are written too."""
    from safetensors.torch import save_file

    tensors = {k: t for k, _, _, t, _ in _state_tensors(model)}
    if any(t.is_meta for t in tensors.values()):
        raise CheckpointError("this model is on the meta device and holds no weights to save; build it on a real "
                              "device (build_model(..., device='cpu')) or load a snapshot first")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for old in glob.glob(os.path.join(path, "model*.safetensors")) + [os.path.join(path, INDEX)]:
        if os.path.isfile(old):
            os.remove(old)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    entries = list(_official_entries(model))
    shards, size = [[]], 0
    for e in entries:
        nbytes = e[5].element_size() * int(torch.Size(e[4]).numel())
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        out = {e[0]: _official_tensor(e, tensors) for e in shard}
        total += sum(t.numel() * t.element_size() for t in out.values())
        save_file(out, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in out})
    if n > 1:
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if processor is not None:
        processor.save_pretrained(path)


# ----------------------------------------------------------------------------------------- load
@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with every parameter moved to the meta device as it is registered (buffers stay real, so
    non-persistent ones such as position ids keep their computed values); initialisers then run on meta."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _read_config(path) -> VL2Config:
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load_pretrained needs a snapshot folder path, got {type(path).__name__}")
    p = os.fspath(path)
    if not os.path.isdir(p):
        try:
            name = preset_name(p)
        except ConfigError as e:
            raise CheckpointError(f"{p!r} is not a folder, and not a known variant either: {e}") from None
        raise CheckpointError(f"{p!r} names the preset {name!r} but is not a folder: load_pretrained reads a "
                              "snapshot folder (config.json + *.safetensors). Pass the local folder of the downloaded "
                              f"snapshot, or make random weights with make_random_snapshot(path, {name!r})")
    try:
        return VL2Config.from_pretrained(p)
    except ConfigError as e:
        raise CheckpointError(f"{p!r} is not a DeepSeek-VL2 snapshot: {e}") from None


def _plan(model: nn.Module, reader: SnapshotReader) -> list:
    """Check the snapshot against the model (missing, unexpected, shapes) before any data is read."""
    plan, needed = [], {}                                           # dict: the official keys, in order
    for key, mod, attr, t, is_param in _state_tensors(model):
        needed.update(dict.fromkeys(official_sources(key, n_experts=t.shape[0] if t.dim() else 0).keys))
        plan.append((key, mod, attr, t, is_param))
    missing = [k for k in needed if k not in reader]
    if missing:
        raise CheckpointError(f"{reader.path}: {len(missing)} tensor(s) missing, e.g. {missing[:5]}; the snapshot is "
                              "incomplete or is another variant than its config.json says: download it again")
    unexpected = [k for k in reader.keys() if k not in needed and not k.startswith(IGNORED_PREFIXES)]
    if unexpected:
        raise CheckpointError(f"{reader.path}: {len(unexpected)} tensor(s) this model has no place for, e.g. "
                              f"{unexpected[:5]}; the config.json does not describe these weights (wrong config or "
                              "another model's files in the folder)")
    for key, _, _, t, _ in plan:
        bad = _check_source(reader, key, official_sources(key, t.shape[0] if t.dim() else 0), list(t.shape))
        if bad:
            raise CheckpointError(f"wrong tensor shape in {reader.path}: {bad}; the weights do not match "
                                  "config.json (another variant's config?)")
    return plan


def materialise(reader: SnapshotReader, entries, dtype: torch.dtype, device) -> None:
    """Read each ``(module key, module, attribute, meta tensor, is_param)`` entry from the snapshot and put it in
    place: parameters take ``dtype``, buffers keep their own dtype. One tensor in memory at a time."""
    for key, mod, attr, t, is_param in entries:
        val = module_tensor_from_official(reader, key, t.shape, dtype=dtype if is_param else t.dtype, device=device)
        if is_param:
            mod._parameters[attr] = nn.Parameter(val, requires_grad=t.requires_grad)
        else:
            mod._buffers[attr] = val


MICRO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "vl2-micro")
MICRO_REBUILD = "python -m vl2lab.train.micro --out vl2lab/assets/vl2-micro"


def shipped_micro() -> str:
    """The folder of the shipped vl2-micro snapshot (trained by :mod:`vl2lab.train.micro`), or one clear error."""
    if not os.path.isfile(os.path.join(MICRO_DIR, "model.safetensors")):
        raise CheckpointError(f"the shipped vl2-micro snapshot is missing ({MICRO_DIR}); rebuild it with "
                              f"`{MICRO_REBUILD}` (about 10 minutes on two CPU cores) or reinstall vl2lab")
    return MICRO_DIR


def load_pretrained(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """A snapshot folder → ``(model, processor)``. Parameters take ``dtype``; buffers keep their own dtype.
    ``"vl2-micro"`` (when no such folder exists here) is the trained snapshot shipped in vl2lab/assets."""
    from vl2lab.model.vl2 import DeepseekVL2ForCausalLM

    if isinstance(path, str) and path == "vl2-micro" and not os.path.isdir(path):
        path = shipped_micro()
    cfg = _read_config(path)
    with SnapshotReader(os.fspath(path)) as reader:
        with _parameters_on_meta(), torch.random.fork_rng(devices=[]):
            model = DeepseekVL2ForCausalLM(cfg)
        materialise(reader, _plan(model, reader), dtype, device)
    for mod in model.modules():
        for n in mod._non_persistent_buffers_set:
            if mod._buffers.get(n) is not None:
                mod._buffers[n] = mod._buffers[n].to(device)
    model.eval()
    processor = _load_processor(os.fspath(path))
    pad = getattr(processor, "pad_id", None)
    if pad is not None:
        model.pad_token_id = int(pad)
    return model, processor


def _load_processor(path: str):
    """The snapshot's processor, or None for a weights-only folder (no ``tokenizer.json``)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    from vl2lab.inputs.processor import VL2Processor
    return VL2Processor.from_pretrained(path)


def make_random_snapshot(path: str, preset: str = "random-tiny", seed: int = 0,
                         max_shard_bytes: Optional[int] = None, dtype: torch.dtype = torch.float32) -> str:
    """Build a random model of ``preset`` with the project tokenizer and processor, save the whole snapshot
    folder (config, weights in ``dtype`` — the published snapshots are bfloat16 —, tokenizer, processor config)
    at ``path`` and return ``path``."""
    from vl2lab.model.vl2 import build_model

    model = build_model(preset, seed=seed, dtype=dtype)
    processor = project_processor(model.config, path)
    save_pretrained(model, path, max_shard_bytes=max_shard_bytes, processor=processor)
    return os.fspath(path)


def project_processor(cfg, path: Optional[str] = None):
    """The processor of a random model of ``cfg``: the project tokenizer (its files written to ``path``, or to a
    temporary folder removed afterwards) and the config's tiling geometry."""
    import tempfile

    from vl2lab.inputs.processor import VL2Processor
    from vl2lab.inputs.tokenizer import build_tokenizer

    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            return project_processor(cfg, tmp)
    tokenizer = build_tokenizer(vocab_size=cfg.language_config.vocab_size, path=path)
    return VL2Processor(tokenizer, candidate_resolutions=cfg.candidate_resolutions,
                        patch_size=cfg.vision_config.patch_size,
                        downsample_ratio=cfg.projector_config.downsample_ratio)
