"""Load and save whole DeepSeek-VL2 snapshot folders in the official layout (``config.json`` + safetensors shards).

Lesson: notebook 01, section "1. Load the model", and notebook 04, section "9. Bad input and faults" (a checkpoint
that does not match its config).

Loading is lazy: the model is built with its parameters on the meta device (:func:`skeleton`), the snapshot is
checked against it before any data is read (:func:`check_snapshot`), then each tensor is read from the
memory-mapped file and assigned (:func:`materialise`), so peak memory is the model plus one tensor.

Bad input fails once, before any weight is read, with one :class:`CheckpointError` that names the file and what to
do: a missing folder, a config.json field of the wrong type, a corrupt tokenizer or processor config
(:func:`read_config` parses them first), weights of another variant than config.json describes. A weights-only
folder (no ``tokenizer.json``) loads with processor ``None`` and a :class:`SnapshotWarning`; weights holding NaN/Inf
load with a :class:`SnapshotWarning` naming them (:class:`~vl2lab.weights.reader.SnapshotReader`).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import warnings
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from vl2lab.inputs.processor import ProcessorError, VL2Processor, check_processor_config
from vl2lab.inputs.tokenizer import TokenizerError, build_tokenizer, check_tokenizer_files
from vl2lab.model.config import PRESETS, ConfigError, ConfigFieldError, VL2Config, get_config, preset_name
from vl2lab.model.dtypes import as_dtype
from vl2lab.model.vl2 import DeepseekVL2ForCausalLM, build_model
from vl2lab.weights.keys import (IGNORED_PREFIXES, CheckpointError, SnapshotWarning, official_entries,
                                 official_sources, state_tensors)
from vl2lab.weights.reader import INDEX, SnapshotReader, check_source, module_tensor_from_official, weight_sizes

__all__ = ["CheckpointError", "SnapshotWarning", "save_pretrained", "load_pretrained", "make_random_snapshot",
           "project_processor", "shipped_micro", "MICRO_DIR", "read_config", "skeleton", "check_snapshot",
           "materialise", "finish_load", "load_processor", "check_processor_files", "PROCESSOR_FILES"]

# The files of a snapshot's processor (tokenizer + image settings), as the official snapshots ship them.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")


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
    tensors = {k: t for k, _, _, t, _ in state_tensors(model)}
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

    entries = list(official_entries(model))
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
def parameters_on_meta():
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


def _not_a_folder(p: str) -> str:
    """Why ``p`` cannot be read as a snapshot folder, and what to pass instead."""
    want = "load_pretrained reads a snapshot folder (config.json + *.safetensors)"
    if os.path.exists(p):
        return f"{p!r} is a file, not a folder: {want}; pass the folder that holds it ({os.path.dirname(p) or '.'!r})"
    hub_id = p.count("/") == 1 and not p.startswith(("/", ".", "~")) and not os.path.isdir(p.split("/")[0])
    a_path = os.sep in p or "/" in p or p.startswith((".", "~"))
    if a_path and not hub_id:                                       # a path (not "name" or "owner/name")
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(p)))
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        return f"the folder {p!r} does not exist (the deepest existing folder on that path is {parent!r}): {want}"
    try:
        name = preset_name(p)
    except ConfigError:
        return (f"there is no folder {p!r} in {os.getcwd()}, and {p!r} is not a known variant name either; known "
                f"presets: {', '.join(PRESETS)}. Pass the path of a downloaded snapshot folder: {want}")
    return (f"{p!r} names the preset {name!r} but is not a folder: {want}. Pass the local folder of the "
            f"downloaded snapshot, or make random weights with make_random_snapshot(path, {name!r})")


def _no_tokenizer(path: str) -> str:
    present = [f for f in PROCESSOR_FILES[1:] if os.path.isfile(os.path.join(path, f))]
    why = (f"the download is incomplete ({', '.join(present)} came, tokenizer.json did not)" if present else
           "a weights-only folder")
    return (f"{path} has no tokenizer.json ({why}), so it has no processor to turn text and images into tokens. "
            f"Copy {', '.join(PROCESSOR_FILES)} from the official snapshot of this variant into the folder (or save "
            "the model with save_pretrained(model, path, processor=...))")


def check_processor_files(path: str, required: bool = False) -> bool:
    """True when ``path`` has a readable processor (tokenizer.json, processor_config.json); False when it has no
    tokenizer.json (a weights-only folder; with ``required``, a CheckpointError). One CheckpointError naming the file
    for a corrupt one. Cheap enough to run before any weight is read."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        if required:
            raise CheckpointError(_no_tokenizer(path))
        return False
    try:
        check_tokenizer_files(path)
        check_processor_config(path)
    except (TokenizerError, ProcessorError) as e:
        raise CheckpointError(str(e)) from None
    return True


def read_config(path) -> VL2Config:
    """The snapshot's config. Also checks that its processor files parse, so that a corrupt tokenizer.json or
    processor_config.json fails here, before any weight is read."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load_pretrained needs a snapshot folder path, got {type(path).__name__}")
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise CheckpointError(_not_a_folder(p))
    try:
        cfg = VL2Config.from_pretrained(p)
    except ConfigFieldError as e:
        raise CheckpointError(str(e)) from None
    except ConfigError as e:
        raise CheckpointError(f"{p!r} is not a DeepSeek-VL2 snapshot: {e}") from None
    check_processor_files(p)
    return cfg


def _config_sizes(cfg: VL2Config) -> dict:
    lm, v = cfg.language_config, cfg.vision_config
    return {"hidden_size": lm.hidden_size, "num_hidden_layers": lm.num_hidden_layers, "vocab_size": lm.vocab_size,
            "n_routed_experts": lm.n_routed_experts if lm.is_moe else None,
            "moe_intermediate_size": lm.moe_intermediate_size if lm.is_moe else None, "vision_config.width": v.width,
            "vision_config.patch_size": v.patch_size, "vision_config.layers": v.layers}


def _variant_clash(cfg: VL2Config, reader: SnapshotReader, symptom: str) -> Optional[str]:
    """One error message when the weights are another variant than config.json describes, else None: a width
    differs, or the weights have exactly a preset's sizes. (Counts alone — fewer layers — may be lost files.)"""
    have, says = weight_sizes(reader), _config_sizes(cfg)
    diff = [k for k in says if have[k] != says[k] and (have[k] is not None or k == "n_routed_experts")
            and not (k == "moe_intermediate_size" and says[k] is None)]
    like = [n for n in PRESETS if all(_config_sizes(get_config(n))[k] == have[k] for k in says)]
    if not diff or not (like or set(diff) - {"num_hidden_layers", "n_routed_experts", "vision_config.layers"}):
        return None
    said, found = (", ".join(f"{k} {d[k] if d[k] is not None else 'none'}" for k in diff) for d in (says, have))
    preset = f" (the sizes of the {like[0]} preset)" if like else ""
    fix = f" (for {like[0]}: vl2lab.model.config.get_config({like[0]!r}).save(folder) writes it)" if like else ""
    return (f"{reader.path}: the weights and config.json describe different variants: config.json says {said}; the "
            f"weights have {found}{preset}, hence {symptom}. Put the config.json that came with these weights into the "
            f"folder{fix}, or move the weights next to their own config.json; downloading again will not help")


def check_snapshot(model: nn.Module, reader: SnapshotReader) -> list:
    """Check the snapshot against the model (missing, unexpected, shapes) before any data is read."""
    plan, needed = [], {}                                           # dict: the official keys, in order
    for key, mod, attr, t, is_param in state_tensors(model):
        needed.update(dict.fromkeys(official_sources(key, n_experts=t.shape[0] if t.dim() else 0).keys))
        plan.append((key, mod, attr, t, is_param))
    missing = [k for k in needed if k not in reader]
    unexpected = [k for k in reader.keys() if k not in needed and not k.startswith(IGNORED_PREFIXES)]
    bad = None if missing or unexpected else next((b for key, _, _, t, _ in plan if (b := check_source(
        reader, key, official_sources(key, t.shape[0] if t.dim() else 0), list(t.shape)))), None)
    symptom = (f"{len(missing)} tensor(s) missing, e.g. {missing[:2]}" if missing else f"{len(unexpected)} tensor(s) "
               f"with no place in the model, e.g. {unexpected[:2]}" if unexpected else f"a wrong tensor shape: {bad}")
    clash = (missing or unexpected or bad) and _variant_clash(model.config, reader, symptom)
    if clash:
        raise CheckpointError(clash)
    if missing:
        raise CheckpointError(f"{reader.path}: {len(missing)} tensor(s) missing, e.g. {missing[:5]}; the snapshot is "
                              "incomplete: download its weight files again")
    if unexpected:
        raise CheckpointError(f"{reader.path}: {len(unexpected)} tensor(s) this model has no place for, e.g. "
                              f"{unexpected[:5]}; the config.json does not describe these weights (wrong config or "
                              "another model's files in the folder)")
    if bad:
        raise CheckpointError(f"wrong tensor shape in {reader.path}: {bad}; the other tensors fit config.json, so "
                              "the file is damaged or was edited: download it again")
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


def skeleton(cfg: VL2Config) -> DeepseekVL2ForCausalLM:
    """The model of ``cfg`` with every parameter on the meta device: no memory, no reads, no random draws."""
    with parameters_on_meta(), torch.random.fork_rng(devices=[]):
        return DeepseekVL2ForCausalLM(cfg)


def finish_load(model: nn.Module, path, device):
    """After the weights are in place: non-persistent buffers (position ids) to ``device``, eval mode, the
    snapshot's processor and its pad id → ``(model, processor)`` (processor None, with a SnapshotWarning, for a
    weights-only folder)."""
    for mod in model.modules():
        for n in mod._non_persistent_buffers_set:
            if mod._buffers.get(n) is not None:
                mod._buffers[n] = mod._buffers[n].to(device)
    model.eval()
    processor = load_processor(os.fspath(path), stacklevel=3)          # the warning points at the loader's caller
    pad = getattr(processor, "pad_id", None)
    if pad is not None:
        model.pad_token_id = int(pad)
    return model, processor


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """A snapshot folder → ``(model, processor)``. Parameters take ``dtype``; buffers keep their own dtype.
    ``"vl2-micro"`` (when no such folder exists here) is the trained snapshot shipped in vl2lab/assets."""
    if isinstance(path, str) and path == "vl2-micro" and not os.path.isdir(path):
        path = shipped_micro()
    cfg = read_config(path)
    with SnapshotReader(os.fspath(path)) as reader:
        model = skeleton(cfg)
        materialise(reader, check_snapshot(model, reader), as_dtype(dtype), device)
    return finish_load(model, path, device)


def load_processor(path: str, required: bool = False, stacklevel: int = 2):
    """The snapshot's processor. A weights-only folder (no ``tokenizer.json``) gives None and a SnapshotWarning that
    says what to copy in (``stacklevel`` as for ``warnings.warn``), or with ``required`` a CheckpointError; a corrupt
    processor file, a CheckpointError."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        if required:
            raise CheckpointError(_no_tokenizer(path))
        warnings.warn(_no_tokenizer(path) + "; the processor is None", SnapshotWarning, stacklevel=stacklevel + 1)
        return None
    try:
        return VL2Processor.from_pretrained(path)
    except (TokenizerError, ProcessorError) as e:
        raise CheckpointError(str(e)) from None


def make_random_snapshot(path: str, preset: str = "random-tiny", seed: int = 0,
                         max_shard_bytes: Optional[int] = None, dtype: torch.dtype = torch.float32) -> str:
    """Build a random model of ``preset`` with the project tokenizer and processor, save the whole snapshot
    folder (config, weights in ``dtype`` — the published snapshots are bfloat16 —, tokenizer, processor config)
    at ``path`` and return ``path``."""
    model = build_model(preset, seed=seed, dtype=dtype)
    processor = project_processor(model.config, path)
    save_pretrained(model, path, max_shard_bytes=max_shard_bytes, processor=processor)
    return os.fspath(path)


def project_processor(cfg, path: Optional[str] = None):
    """The processor of a random model of ``cfg``: the project tokenizer (its files written to ``path``, or to a
    temporary folder removed afterwards) and the config's tiling geometry."""
    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            return project_processor(cfg, tmp)
    tokenizer = build_tokenizer(vocab_size=cfg.language_config.vocab_size, path=path)
    return VL2Processor(tokenizer, candidate_resolutions=cfg.candidate_resolutions,
                        patch_size=cfg.vision_config.patch_size,
                        downsample_ratio=cfg.projector_config.downsample_ratio)