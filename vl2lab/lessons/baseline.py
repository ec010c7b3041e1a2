"""Notebook 01's checks of one DeepSeek-VL2: which model MODEL names, whether the planner's parameter counts match the
model's own, and how the processor lays out a picture's tokens.

Lesson: notebook 01, sections "1. Load the model" and "2. What the processor does to a picture".

The measurements of that notebook (time and memory, stage by stage; chunked prefill) are the perf layer's:
:mod:`vl2lab.perf.memory`. The model built directly on a device is :func:`vl2lab.model.build.build_on_device`.
"""
from __future__ import annotations

import os
import tempfile

import torch
from PIL import Image

from vl2lab.inputs.tiling import image_layout
from vl2lab.model.config import ConfigError, preset_name
from vl2lab.model.dtypes import as_dtype
from vl2lab.model.vision import layout_image_features
from vl2lab.planner import sizing
from vl2lab.train.scenes import make_scene
from vl2lab.weights.pretrained import CheckpointError, make_random_snapshot, shipped_micro

__all__ = ["PHOTOS", "BaselineError", "resolve_model", "param_rows", "sample_images", "token_layout"]

PHOTOS = ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")  # shipped with matplotlib


class BaselineError(ValueError):
    """A model name or folder notebook 01 cannot load (the message says what to pass instead)."""


# ------------------------------------------------------------------------------------------------ the model

def resolve_model(model: str, dtype: str = "float32", seed: int = 0, cache_dir: str | None = None) -> dict:
    """MODEL → a snapshot folder: {"path", "source", "name"}.

    An existing folder is used as it is ("folder"); ``"vl2-micro"`` is the shipped ``vl2lab/assets/vl2-micro``
    (:func:`vl2lab.weights.pretrained.shipped_micro`; "shipped"); a preset name gets random weights at that preset's
    real size, written once as a snapshot in ``cache_dir`` (default: the temp folder, where
    ``python -m vl2lab.perf.bench`` writes the same) ("random")."""
    if os.path.isdir(str(model)):
        if not os.path.isfile(os.path.join(str(model), "config.json")):
            raise BaselineError(f"{model} is a folder without config.json: not a DeepSeek-VL2 snapshot")
        return {"path": os.path.abspath(str(model)), "source": "folder", "name": os.path.basename(str(model))}
    if model == "vl2-micro":
        try:
            return {"path": shipped_micro(), "source": "shipped", "name": "vl2-micro"}
        except CheckpointError as err:
            raise BaselineError(f"{err}; or set MODEL to a snapshot folder or a preset such as 'random-tiny' "
                                "(random weights)") from None
    try:
        name = preset_name(model)
    except ConfigError:
        raise BaselineError(f"MODEL={model!r} is neither a snapshot folder nor 'vl2-micro' nor a preset "
                            f"(random-tiny, deepseek-vl2-tiny, ...)") from None
    path = os.path.join(cache_dir or tempfile.gettempdir(), f"vl2lab-bench-{name}-{dtype}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_random_snapshot(path, preset=name, seed=seed, dtype=as_dtype(dtype))
    return {"path": path, "source": "random", "name": name}


_LM = "language.model.layers."
_PARTS = (  # sizing.param_counts key → which parameters (by name) hold it
    ("vision_no_pool", lambda n: n.startswith("vision.")),
    ("projector", lambda n: n.startswith("projector.")),
    ("special_vectors", lambda n: n in ("image_newline", "view_seperator")),
    ("embedding", lambda n: n.startswith("language.model.embed_tokens")),
    ("attention", lambda n: n.startswith(_LM) and ".self_attn." in n),
    ("dense_mlp", lambda n: n.startswith(_LM) and n.split(".mlp.")[-1].split(".")[0] in ("gate_proj", "up_proj",
                                                                                           "down_proj")),
    ("shared_experts", lambda n: n.startswith(_LM) and ".mlp.shared_experts." in n),
    ("routed_experts", lambda n: n.startswith(_LM) and ".mlp.experts." in n),
    ("router", lambda n: n.startswith(_LM) and ".mlp.gate." in n),
    ("norms", lambda n: n.startswith(_LM) and n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))
     or n == "language.model.norm.weight"),
    ("lm_head", lambda n: n.startswith("language.lm_head")),
)


def param_rows(model) -> list[dict]:
    """Per component: the count from :func:`sizing.param_counts` beside ``numel`` summed over the model."""
    c = sizing.param_counts(model.config)
    named = list(model.named_parameters())
    rows = [{"part": k, "sizing": c[k], "counted": sum(p.numel() for n, p in named if f(n))} for k, f in _PARTS]
    rows.append({"part": "total", "sizing": c["total_instantiated"], "counted": sum(p.numel() for _, p in named)})
    return rows


# --------------------------------------------------------------------------------------- pictures and tokens

def sample_images(scene_seeds=(3,)) -> dict:
    """Real photos shipped with matplotlib (they exist offline) and rendered shape scenes: {name: RGB image}."""
    import matplotlib.cbook as cbook

    out = {}
    for name in PHOTOS:
        with cbook.get_sample_data(name) as f:
            out[name] = Image.open(f).convert("RGB")
    for s in scene_seeds:
        out[f"scene {s}"] = make_scene(s).render()
    return out


def token_layout(width: int, height: int, n_images: int = 1, patch_size: int = 14, downsample_ratio: int = 2) -> dict:
    """Everything the tiling decides for a width×height image, and where its image tokens go, counted by running
    the model's own layout (``layout_image_features``) on marker vectors: cells 0, newline 1, separator 2.
    ``patch_size``/``downsample_ratio``: the model's geometry (DeepSeek-VL2: 14 and 2, 14×14 tokens per tile)."""
    lay = image_layout(width, height, n_images, patch_size=patch_size, downsample_ratio=downsample_ratio)
    tw, th = lay["tiles"]
    h = lay["grid"]
    seq = layout_image_features(torch.zeros(1 + tw * th, h, h, 1), tw, th, torch.ones(1), torch.full((1,), 2.0))
    kind = seq[:, 0]                                                   # [N_img]: 0 cell, 1 newline, 2 separator
    sep = int((kind == 2).nonzero()[0])
    return {**lay, "global_cells": int((kind[:sep] == 0).sum()), "global_newlines": int((kind[:sep] == 1).sum()),
            "separator_at": sep, "local_cells": int((kind[sep + 1:] == 0).sum()),
            "local_newlines": int((kind[sep + 1:] == 1).sum()), "counted": int(kind.numel()), "kinds": kind.tolist()}
