"""The whole DeepSeek-VL2: vision tower → projector → 2-D layout → scatter into the text embeddings → MoE LM.

Lesson: notebook 01, sections "1. Load the model" (the three parts in a row) and "4. Where time and memory go"
(stage by stage).

For a batch of prompts (left-padded), with T positions and D = LM hidden::

    E = embed_tokens(input_ids)                                   # [B, T, D]
    tiles = all real images' tiles, [global, locals...] each      # [N, 3, 384, 384], ONE vision call
    F = layout(projector(vision(tiles)))                          # [Σ N_img, D], images in prompt order
    E[images_seq_mask] = F                                        # masked_scatter, row-major over (b, t)
    logits = LM(inputs_embeds=E, attention_mask, positions = cumsum(mask) − 1)

Every image position carries the same ``<image>`` token id; what makes them differ is the vector written there
(grid cells, ``image_newline`` at the right edge of each row, ``view_seperator`` between the views).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from vl2lab.model.config import VL2Config, get_config
from vl2lab.model.generation import check_context, check_new_tokens, check_sampling, generate
from vl2lab.model.graph_decode import decoder_for
from vl2lab.model.language import DeepseekLanguageModel
from vl2lab.model.vision import Projector, build_vision_tower, encode_tiles, image_token_count, layout_images

__all__ = ["DeepseekVL2ForCausalLM", "VL2Output", "build_model", "GENERATE_ARGS", "DECODE_MODES"]

DECODE_MODES = ("eager", "graph", "compile")
# What DeepseekVL2ForCausalLM.generate takes: the processor's batch (VL2Batch keys), then the settings.
GENERATE_ARGS = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop", "labels",
                 "max_new_tokens", "do_sample", "temperature", "top_p", "eos_token_id", "pad_token_id", "generator",
                 "ignore_eos", "decode")


@dataclass
class VL2Output:
    """``logits`` [B, T', V] (fp32) and the LM ``cache`` to continue from."""
    logits: torch.Tensor
    cache: Any = None


class DeepseekVL2ForCausalLM(nn.Module):
    """Submodules named as the official checkpoint: ``vision``, ``projector``, ``image_newline``,
    ``view_seperator`` (sic), ``language``."""

    def __init__(self, config: VL2Config):
        super().__init__()

        config.validate()
        self.config = config
        v, p = config.vision_config, config.projector_config
        self.vision = build_vision_tower(v)
        self.projector = Projector(p, grid=v.grid)
        d = p.n_embed
        std = 1.0 / math.sqrt(d)                                    # N(0, 1/D): unit-norm-ish learned vectors
        self.image_newline = nn.Parameter(torch.randn(d) * std)
        self.view_seperator = nn.Parameter(torch.randn(d) * std)
        self.language = DeepseekLanguageModel(config.language_config)

    # ------------------------------------------------------------------------------------------- vision side
    def encode_tiles(self, pixel_tiles: torch.Tensor) -> torch.Tensor:
        """[N, 3, 384, 384] → [N, 729, W]. Tiles are independent: N may be split across ranks."""
        return encode_tiles(self.vision, pixel_tiles)

    def image_features(self, pixel_tiles: torch.Tensor, crops: list[tuple[int, int]]) -> torch.Tensor:
        """Tiles of several images (each [global, locals...]) and their (width, height) tile counts →
        [Σ N_img, D], the images' token sequences one after another."""
        feats = self.projector(self.encode_tiles(pixel_tiles))      # [N, 196, D]
        h = self.projector.out_grid
        feats = feats.view(feats.shape[0], h, h, -1)                # [N, 14, 14, D]
        return layout_images(feats, crops, self.image_newline, self.view_seperator)

    def prepare_inputs_embeds(self, input_ids: torch.Tensor, images: Optional[torch.Tensor] = None,
                              images_seq_mask: Optional[torch.Tensor] = None,
                              images_spatial_crop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text embeddings with the image positions overwritten by the image features → [B, T, D]."""
        embeds = self.language.embed(input_ids)                     # [B, T, D]
        if images is None or images_seq_mask is None or not bool(images_seq_mask.any()):
            return embeds
        if images_spatial_crop is None:
            raise ValueError("images were given without images_spatial_crop; pass the processor's whole output "
                             "(images, images_seq_mask, images_spatial_crop)")
        if images_seq_mask.shape != input_ids.shape:
            raise ValueError(f"images_seq_mask shape {tuple(images_seq_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if images.dim() == 4:                                       # a single sample without the batch dim
            images = images.unsqueeze(0)
        crops_b = images_spatial_crop.reshape(input_ids.shape[0], -1, 2).tolist()
        tiles, crops = [], []
        for b, rows in enumerate(crops_b):
            real = [(int(w), int(h)) for w, h in rows if (w, h) != (0, 0)]
            n_tiles = sum(1 + w * h for w, h in real)
            if n_tiles > images.shape[1]:
                raise ValueError(f"sample {b}: images_spatial_crop {real} needs {n_tiles} tiles but images holds "
                                 f"only {images.shape[1]}; pass the processor's output unchanged")
            expected = sum(image_token_count(w, h, self.projector.out_grid) for w, h in real)
            found = int(images_seq_mask[b].sum())
            if expected != found:
                raise ValueError(f"sample {b}: images_seq_mask marks {found} image positions but its images "
                                 f"{real} (width×height tiles) need {expected} tokens; the prompt and the images "
                                 "do not match: build both with the same processor call")
            if n_tiles:
                tiles.append(images[b, :n_tiles])
                crops += real
        if not tiles:
            return embeds
        feats = self.image_features(torch.cat(tiles, dim=0), crops)  # one vision call for the whole batch
        mask = images_seq_mask.to(embeds.device).unsqueeze(-1)      # [B, T, 1]
        return embeds.masked_scatter(mask, feats.to(embeds.dtype))

    # ------------------------------------------------------------------------------------------- LM side
    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None, images_seq_mask: Optional[torch.Tensor] = None,
                images_spatial_crop: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                cache: Any = None, num_logits_to_keep: int = 0, inputs_embeds: Optional[torch.Tensor] = None,
                **ignored) -> VL2Output:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with the processor's image fields) or inputs_embeds")
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        logits, cache = self.language(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache,
                                      num_logits_to_keep=num_logits_to_keep)
        return VL2Output(logits=logits, cache=cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 images: Optional[torch.Tensor] = None, images_seq_mask: Optional[torch.Tensor] = None,
                 images_spatial_crop: Optional[torch.Tensor] = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, ignore_eos: bool = False, decode: str = "eager",
                 labels: Optional[torch.Tensor] = None, **unknown) -> torch.Tensor:
        """New token ids [B, max_new_tokens] (pad after EOS). EOS defaults to the config's, pad to the processor's
        pad id when the model was loaded with one, else to EOS.

        Takes the processor's batch as ``**batch`` (``labels``, present in a training batch, is not used) and the
        settings below; any other keyword is a TypeError. Before any work (the vision pass included) it checks
        ``max_new_tokens`` (a whole number ≥ 1) and that prompt + new tokens fit the context
        (``language_config.max_position_embeddings``): :class:`~vl2lab.model.generation.GenerationError`.

        ``decode``: ``"eager"`` (a Python loop of forwards), or greedy through a static step replayed as a CUDA graph
        (``"graph"``; ``"compile"`` adds torch.compile): same tokens, see :mod:`vl2lab.model.graph_decode`."""
        if unknown:
            raise TypeError(f"generate() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; it "
                            f"takes {', '.join(GENERATE_ARGS)}")
        del labels                                                  # a training batch's: not used here
        lm_cfg = self.config.language_config
        max_new_tokens = check_new_tokens(max_new_tokens)
        check_sampling(do_sample, temperature, top_p)
        if decode not in DECODE_MODES:
            raise ValueError(f"decode={decode!r}: choose {', '.join(map(repr, DECODE_MODES))}")
        if decode != "eager" and do_sample:
            raise ValueError(f"decode={decode!r} is greedy only; use decode='eager' for sampling")
        check_context(int(input_ids.shape[-1]), max_new_tokens, lm_cfg.max_position_embeddings)
        eos = lm_cfg.eos_token_id if eos_token_id is None else eos_token_id
        pad = pad_token_id
        if pad is None:
            pad = getattr(self, "pad_token_id", None)
        if pad is None:
            pad = lm_cfg.pad_token_id if lm_cfg.pad_token_id is not None else eos
        embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if decode != "eager":
            B, T = input_ids.shape
            dec = decoder_for(self.language, B, T + max_new_tokens, embeds.device, decode, eos, pad, ignore_eos)
            return dec.generate(embeds, attention_mask, max_new_tokens)
        return generate(self.language, embeds, attention_mask, max_new_tokens, do_sample, temperature, top_p,
                        eos, pad, generator=generator, ignore_eos=ignore_eos)


def build_model(config_or_preset_name: Union[VL2Config, str], dtype: torch.dtype = torch.float32,
                device: Union[str, torch.device] = "cpu", seed: Optional[int] = None) -> DeepseekVL2ForCausalLM:
    """A randomly initialised model (deterministic: the same seed gives the same weights; ``None`` means 0).

    On ``device="meta"`` nothing is allocated: the real presets (3B–27B) can be inspected and counted. Otherwise the
    weights are drawn on the CPU (so they do not depend on the device) and then moved. Parameters take ``dtype``;
    buffers keep the dtype the modules chose (e.g. the fp32 router correction bias).
    """
    cfg = config_or_preset_name if isinstance(config_or_preset_name, VL2Config) else get_config(config_or_preset_name)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = DeepseekVL2ForCausalLM(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            model = DeepseekVL2ForCausalLM(cfg)
    for p in model.parameters():
        p.data = p.data.to(device=device, dtype=dtype)
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    return model.eval()
