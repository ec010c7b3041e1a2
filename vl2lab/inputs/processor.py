"""The DeepSeek-VL2 processor: a conversation with images → the batch the model consumes.

Per conversation (the official ``DeepseekVLV2Processor`` order of operations):

* the token sequence starts with one BOS, added by hand; all text is encoded with ``add_special_tokens=False``;
* a system prompt (empty by default) is followed by ``"\\n\\n"``;
* a user turn is ``<|User|>: {content}\\n\\n<|Assistant|>:``, encoded as one piece split at each ``<image>``;
  every ``<image>`` becomes N copies of the image-token id (N from ``tiling.image_token_count``), and
  ``images_seq_mask`` is True exactly there;
* an assistant turn is its content, encoded **without** a leading space, then EOS (the display string
  ``format_prompt`` shows ``<|Assistant|>: {content}``, with the space, like the official ``sft_format``);
* an empty final assistant turn (or a conversation that ends with a user turn) asks for generation: the ids end
  with ``<|Assistant|>:``. With ``inference_mode=True`` (the default) a final EOS is dropped, as the official does.

Batches are left-padded (pad id from the tokenizer, attention 0 there). ``images`` is [B, max_tiles, 3, 384, 384]
with zero tiles for padding, ``images_spatial_crop`` [B, max_images, 2] = (width tiles, height tiles) with (0, 0)
rows for missing images. A batch without any image gets ``images`` [B, 0, 3, 384, 384] and ``images_spatial_crop``
[B, 0, 2] (the official code makes one dummy zero tile instead; an empty tensor means "no vision work" without a
special case, and ``images_spatial_crop.sum() == 0`` still holds).

Lesson: notebook 01, section "2. What the processor does to a picture" (tiling, the chat template, the batch).
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from PIL import Image

from vl2lab.model.config import CANDIDATE_RESOLUTIONS
from vl2lab.inputs.jsonfile import read_json_object
from vl2lab.inputs.tiling import (ProcessorError, check_resolutions, image_tiles, image_token_count, select_canvas,
                                  to_rgb)
from vl2lab.inputs.tokenizer import ASSISTANT, DET, DET_END, EOS, IMAGE, PAD, REF, REF_END, USER, load_tokenizer, save_tokenizer

__all__ = ["VL2Processor", "VL2Batch", "ProcessorError", "parse_grounding", "image_token_count", "select_canvas",
           "check_processor_config"]

_ROLES = {USER: "user", "user": "user", ASSISTANT: "assistant", "assistant": "assistant", "system": "system"}


class VL2Batch(dict):
    """The batch: a dict (so ``model(**batch)`` works) with attribute access. ``.to(device, dtype)`` moves every
    tensor and casts only ``images``. Non-tensor extras (``sft_format``, ``num_image_tokens``) are attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "VL2Batch":
        for k, v in self.items():
            if torch.is_tensor(v):
                self[k] = v.to(device=device, dtype=dtype) if (k == "images" and dtype) else v.to(device=device)
        return self


def parse_grounding(text: str, image_size) -> list[tuple[str, list[float]]]:
    """``<|ref|>label<|/ref|><|det|>[[x1,y1,x2,y2],...]<|/det|>`` → [(label, [x1, y1, x2, y2] in pixels), ...].

    Coordinates live on a 0–999 grid: pixel = value / 999 × W (x) or H (y). ``image_size`` is (W, H) or a PIL
    image. One entry per box; malformed boxes (not four numbers) are skipped, since model output can be noisy.
    """
    W, H = image_size.size if isinstance(image_size, Image.Image) else image_size
    out = []
    pat = re.escape(REF) + r"(.*?)" + re.escape(REF_END) + r"\s*" + re.escape(DET) + r"(.*?)" + re.escape(DET_END)
    num = r"\s*(-?\d+(?:\.\d+)?)\s*"
    for label, boxes in re.findall(pat, text, flags=re.S):
        for b in re.findall(r"\[" + ",".join([num] * 4) + r"\]", boxes):
            x1, y1, x2, y2 = (float(v) for v in b)
            out.append((label.strip(), [x1 / 999 * W, y1 / 999 * H, x2 / 999 * W, y2 / 999 * H]))
    return out


# processor_config.json fields the processor reads, with their JSON types (bool is not an int here).
_FIELDS = {"candidate_resolutions": list, "patch_size": int, "downsample_ratio": int, "image_mean": list,
           "image_std": list, "normalize": bool, "image_token": str, "pad_token": str, "add_special_token": bool,
           "sft_format": str, "mask_prompt": bool, "ignore_id": int, "max_length": int}


def check_processor_config(path: str) -> dict:
    """A snapshot folder's ``processor_config.json`` as keyword arguments of :class:`VL2Processor` ({} when the
    file is absent: the official defaults), checked: a JSON object, each field's type, positive sizes, three-value
    mean/std, the resolutions. One ProcessorError naming the file, the field and what to do."""
    fn = os.path.join(str(path), "processor_config.json")
    if not os.path.isfile(fn):
        return {}
    fix = ("correct it, or copy processor_config.json from the snapshot it came from (for a published model, the "
           "official deepseek-ai/deepseek-vl2* repository of that variant)")
    cfg = read_json_object(fn, ProcessorError, f"it is truncated or corrupt; {fix}")
    for k, kind in ((k, kind) for k, kind in _FIELDS.items() if k in cfg):
        v = cfg[k]
        if not (isinstance(v, kind) and (kind is bool) == isinstance(v, bool)):
            want = {list: "an array", int: "an integer", bool: "a boolean (true/false)", str: "a string"}[kind]
        elif kind is int and k != "ignore_id" and v <= 0:
            want = "a positive integer"
        elif k in ("image_mean", "image_std") and (len(v) != 3 or not all(
                type(x) in (int, float) and (x or k == "image_mean") for x in v)):
            want = "3 numbers" + (", none of them 0" if k == "image_std" else "")
        else:
            continue
        raise ProcessorError(f"{fn}: field {k} is {json.dumps(v)}; expected {want}; {fix}")
    try:
        check_resolutions(cfg.get("candidate_resolutions", CANDIDATE_RESOLUTIONS))
    except ProcessorError as e:
        raise ProcessorError(f"{fn}: {e}; {fix}") from None
    return {k: v for k, v in cfg.items() if k != "processor_class"}


class VL2Processor:
    """Images + conversation → ``input_ids``, ``attention_mask``, ``images``, ``images_seq_mask``,
    ``images_spatial_crop`` (the official field names and layouts)."""

    def __init__(self, tokenizer, candidate_resolutions=None, patch_size: int = 14, downsample_ratio: int = 2,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), normalize: bool = True,
                 image_token: str = IMAGE, pad_token: str = PAD, add_special_token: bool = False,
                 sft_format: str = "deepseek", mask_prompt: bool = False, ignore_id: int = -100,
                 max_length: int = 4096, **_ignored):
        self.tokenizer = tokenizer
        self.candidate_resolutions = check_resolutions(candidate_resolutions or CANDIDATE_RESOLUTIONS)
        self.image_size = self.candidate_resolutions[0][0]
        self.patch_size, self.downsample_ratio = patch_size, downsample_ratio
        self.image_mean, self.image_std, self.normalize = tuple(image_mean), tuple(image_std), normalize
        self.image_token, self.pad_token, self.add_special_token = image_token, pad_token, add_special_token
        self.sft_format, self.mask_prompt, self.ignore_id = sft_format, mask_prompt, ignore_id
        self.max_length = max_length
        if sft_format != "deepseek":
            raise ProcessorError(f"sft_format {sft_format!r} is not supported; DeepSeek-VL2 uses 'deepseek'")
        vocab = tokenizer.get_vocab()
        missing = [t for t in (image_token, USER, ASSISTANT) if t not in vocab]
        if missing or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ProcessorError(f"the tokenizer lacks {missing or 'BOS/EOS'}: not a DeepSeek-VL2 tokenizer")
        self.image_token_id = vocab[image_token]  # looked up, never assumed (tiny 128815, small 100003)
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else vocab.get(pad_token, self.eos_id))
        tokenizer.padding_side = "left"

    # -- snapshot files ---------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        """The official ``processor_config.json`` contents."""
        return {"add_special_token": self.add_special_token, "candidate_resolutions": self.candidate_resolutions,
                "downsample_ratio": self.downsample_ratio, "ignore_id": self.ignore_id,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "image_token": self.image_token, "mask_prompt": self.mask_prompt, "normalize": self.normalize,
                "pad_token": self.pad_token, "patch_size": self.patch_size,
                "processor_class": "DeepseekVLV2Processor", "sft_format": self.sft_format}

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "VL2Processor":
        """Tokenizer + ``processor_config.json`` of a snapshot folder (official defaults if the file is absent)."""
        cfg = check_processor_config(path)
        return cls(load_tokenizer(path), **{**cfg, **overrides})

    def save_pretrained(self, path: str) -> None:
        save_tokenizer(self.tokenizer, path)
        with open(os.path.join(path, "processor_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")

    # -- conversation ----------------------------------------------------------------------------------------
    def _turns(self, conversation, system_prompt: str = ""):
        """Check a conversation → (system, [(role, content)], images found in the turns); one error per problem."""
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ProcessorError("a conversation is a non-empty list of turns like {'role': '<|User|>', "
                                 "'content': '<image>\\nWhat is in the picture?', 'images': [img]}")
        system, turns, found = system_prompt.strip(), [], []
        for i, turn in enumerate(conversation):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise ProcessorError(f"turn {i} must be a dict with 'role' and 'content', got {turn!r:.80}")
            role = _ROLES.get(turn["role"])
            if role is None:
                raise ProcessorError(f"turn {i} has role {turn['role']!r}; use '<|User|>', '<|Assistant|>' or "
                                     "'system'")
            content = str(turn["content"]).strip()
            found += list(turn.get("images") or [])
            if role == "system":
                if i != 0:
                    raise ProcessorError(f"turn {i} is a system turn; a system prompt may only open the conversation")
                system = content
                continue
            expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
            if role != expected:
                raise ProcessorError(f"turn {i} is a {role} turn but a {expected} turn was expected: turns alternate "
                                     "user/assistant, starting with the user")
            if role == "assistant" and self.image_token in content:
                raise ProcessorError(f"turn {i} (assistant) contains {self.image_token}; images go in user turns")
            turns.append((role, content))
        if not turns:
            raise ProcessorError("the conversation has no user turn")
        return system, turns, found

    def format_prompt(self, conversation, system_prompt: str = "", bos: bool = False) -> str:
        """The conversation as a string (the official ``sft_format``; one ``<image>`` tag per image)."""
        system, turns, _ = self._turns(conversation, system_prompt)
        s = system + "\n\n" if system else ""
        for role, content in turns:
            s += f"{USER}: {content}\n\n" if role == "user" else (f"{ASSISTANT}: {content}{EOS}" if content
                                                                  else f"{ASSISTANT}:")
        if turns[-1][0] == "user":
            s += f"{ASSISTANT}:"
        return (self.tokenizer.bos_token if bos else "") + s.strip()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _one(self, conversation, images, system_prompt, inference_mode, max_length):
        """One conversation → (ids, image mask, is-answer mask, tiles [n,3,S,S] list, crops, tokens per image)."""
        system, turns, found = self._turns(conversation, system_prompt)
        if images is not None and found:
            raise ProcessorError("images were given both in the turns and as images=; give them one way only")
        images = list(images) if images is not None else found
        n_tags = sum(c.count(self.image_token) for _, c in turns)
        if n_tags != len(images):
            raise ProcessorError(f"the conversation has {n_tags} {self.image_token} tag(s) but {len(images)} "
                                 f"image(s); put exactly one {self.image_token} in the text for each image")
        images = [to_rgb(im) for im in images]
        cropping = len(images) <= 2  # the tiling switch: ≥ 3 images → every image on the 384×384 canvas
        layouts = [select_canvas(im.width, im.height, self.candidate_resolutions) if cropping
                   else (self.image_size, self.image_size) for im in images]
        n_img = [image_token_count(w // self.image_size, h // self.image_size, self.image_size, self.patch_size,
                                   self.downsample_ratio) for w, h in layouts]
        ids, img_mask, ans_mask = [self.bos_id], [False], [False]
        k, prefix = 0, (system + "\n\n" if system else "")
        for role, content in turns:
            if role == "user":
                pieces = f"{prefix}{USER}: {content}\n\n{ASSISTANT}:".split(self.image_token)
                prefix = ""
                for j, piece in enumerate(pieces):
                    t = self._encode(piece)
                    ids += t
                    img_mask += [False] * len(t)
                    ans_mask += [False] * len(t)
                    if j < len(pieces) - 1:
                        ids += [self.image_token_id] * n_img[k]
                        img_mask += [True] * n_img[k]
                        ans_mask += [False] * n_img[k]
                        k += 1
            else:
                t = self._encode(content) + [self.eos_id]
                ids += t
                img_mask += [False] * len(t)
                ans_mask += [True] * len(t)
        if inference_mode and ids[-1] == self.eos_id and len(ids) > 1:
            ids, img_mask, ans_mask = ids[:-1], img_mask[:-1], ans_mask[:-1]
        limit = max_length or self.max_length
        if len(ids) > limit:
            raise ProcessorError(
                f"the prompt needs {len(ids)} tokens ({sum(n_img)} for {len(images)} image(s), {len(ids) - sum(n_img)} "
                f"for text) but the context holds {limit}; use fewer or smaller images (one 384×384 image costs "
                f"{image_token_count(1, 1)} tokens, a 1152×1152 one {image_token_count(3, 3)}) or a shorter text")
        tiles, crops = [], []
        for im in images:
            t, (tw, th) = image_tiles(im, cropping, self.candidate_resolutions, self.image_size,
                                      self.image_mean if self.normalize else (0.0, 0.0, 0.0),
                                      self.image_std if self.normalize else (1.0, 1.0, 1.0))
            tiles.append(t)
            crops.append([tw, th])
        return ids, img_mask, ans_mask, tiles, crops, n_img, self.format_prompt(conversation, system_prompt)

    def __call__(self, conversation=None, images=None, conversations=None, system_prompt: str = "",
                 inference_mode: bool = True, max_length: Optional[int] = None,
                 return_labels: bool = False) -> VL2Batch:
        """One ``conversation`` (optionally with ``images=`` for all its tags) or a batch ``conversations=[...]``
        (optionally ``images=[[...], [...]]``) → a left-padded ``VL2Batch``."""
        if (conversation is None) == (conversations is None):
            raise ProcessorError("pass exactly one of conversation=[turns] or conversations=[[turns], [turns]]")
        convs = [conversation] if conversation is not None else list(conversations)
        imgs = [images] if conversation is not None else (list(images) if images is not None else [None] * len(convs))
        if not convs or len(imgs) != len(convs):
            raise ProcessorError(f"{len(convs)} conversation(s) but {len(imgs)} image list(s); give one list per "
                                 "conversation (or none)")
        samples = [self._one(c, im, system_prompt, inference_mode, max_length) for c, im in zip(convs, imgs)]
        B, T = len(samples), max(len(s[0]) for s in samples)
        n_tiles = max(sum(t.shape[0] for t in s[3]) for s in samples)
        n_images = max(len(s[4]) for s in samples)
        S = self.image_size
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        images_seq_mask = torch.zeros((B, T), dtype=torch.bool)
        labels = torch.full((B, T), self.ignore_id, dtype=torch.long)
        pixel = torch.zeros((B, n_tiles, 3, S, S), dtype=torch.float32)
        crop = torch.zeros((B, n_images, 2), dtype=torch.long)
        for b, (ids, img_mask, ans_mask, tiles, crops, _, _) in enumerate(samples):
            n = len(ids)  # left padding: the real tokens occupy the last n positions
            input_ids[b, T - n:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, T - n:] = 1
            images_seq_mask[b, T - n:] = torch.tensor(img_mask, dtype=torch.bool)
            keep = ~torch.tensor(img_mask, dtype=torch.bool)
            if self.mask_prompt:
                keep &= torch.tensor(ans_mask, dtype=torch.bool)
            labels[b, T - n:] = torch.where(keep, input_ids[b, T - n:], torch.tensor(self.ignore_id))
            if tiles:
                t = torch.cat(tiles, dim=0)
                pixel[b, :t.shape[0]] = t
                crop[b, :len(crops)] = torch.tensor(crops, dtype=torch.long)
        batch = VL2Batch(input_ids=input_ids, attention_mask=attention_mask, images=pixel,
                         images_seq_mask=images_seq_mask, images_spatial_crop=crop)
        if return_labels:
            batch["labels"] = labels
        batch.sft_format = [s[6] for s in samples]
        batch.num_image_tokens = [s[5] for s in samples]
        return batch

    # -- output side -----------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = True):
        """Token ids (list, 1-D or 2-D tensor) → text (a list of texts for 2-D input)."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.tokenizer.decode(r, skip_special_tokens=skip_special_tokens) for r in ids]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    parse_grounding = staticmethod(parse_grounding)
