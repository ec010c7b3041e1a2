"""Dynamic tiling: how DeepSeek-VL2 turns one picture of any size into 384×384 tiles, and how many tokens it costs.

The rule (the official processor's, step by step):

1. **Tiling switch.** Only when the whole conversation has ≤ 2 images; with ≥ 3 every image uses the 384×384
   canvas.
2. **Canvas.** For each candidate (W, H) in list order: s = min(W/w, H/h); downscaled = (⌊w·s⌋, ⌊h·s⌋);
   effective = min(downscaled area, w·h); waste = W·H − effective. Keep the largest effective area, then the
   smallest waste, then the earlier candidate. Upscaling earns no credit beyond the original pixel count, so the
   rule picks the smallest canvas that holds the image at native resolution (or the largest one, for big images).
3. **Global view.** Aspect-preserving bicubic resize into 384×384, centered on grey (127, 127, 127) = int(0.5·255).
4. **Local views.** The same pad-resize onto the chosen canvas, cut into 384×384 tiles in row-major order.
5. **Normalize.** x/255, then (x − 0.5)/0.5 → [−1, 1].

Tokens per image (h = w = ⌈(384 // 14) / 2⌉ = 14 after the 2×2 downsample of the 27×27 patch grid, padded to 28):

    N = h·(w + 1)  +  1  +  (h·th)·(w·tw + 1)
        global grid   view      local grid stitched over th rows × tw columns of tiles,
        + newlines    separator with one newline per row of the whole grid

= 421 for one tile, 1023 for 2×2, 2017 for 3×3, 2101 for the 1×9 worst case.

Lesson: notebook 01, section "2. What the processor does to a picture".
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from vl2lab.model.config import CANDIDATE_RESOLUTIONS
from vl2lab.model.vision import image_token_count as layout_tokens


class ProcessorError(ValueError):
    """Input the DeepSeek-VL2 processor cannot turn into a batch (the message says what to change)."""


def check_resolutions(candidate_resolutions) -> list[list[int]]:
    """The candidate canvases as ``[[W, H], ...]``, or one ProcessorError: they must be a non-empty list of pairs
    of positive integers, each a multiple of the first entry's width (the tile size)."""
    res = candidate_resolutions if isinstance(candidate_resolutions, (list, tuple)) else None
    ok = bool(res) and all(isinstance(r, (list, tuple)) and len(r) == 2 and all(
        type(x) is int and x > 0 for x in r) for r in res)
    if not ok or any(x % res[0][0] for r in res for x in r):
        raise ProcessorError(f"candidate_resolutions is {candidate_resolutions!r}; expected a non-empty list of "
                             "[width, height] pairs of positive integers, each a multiple of the first width (the "
                             "tile size), e.g. [[384, 384], [384, 768], [768, 384]]")
    return [list(r) for r in res]


def select_canvas(width: int, height: int, candidate_resolutions: Optional[Sequence] = None) -> tuple[int, int]:
    """Best-fit canvas (W, H) for a w×h image: largest effective area, then smallest waste, then earliest."""
    best, best_eff, best_waste = None, 0, float("inf")
    for cw, ch in candidate_resolutions or CANDIDATE_RESOLUTIONS:
        s = min(cw / width, ch / height)
        effective = min(int(width * s) * int(height * s), width * height)
        waste = cw * ch - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(cw), int(ch)), effective, waste
    return best


def image_token_count(width_tiles: int, height_tiles: int, image_size: int = 384, patch_size: int = 14,
                      downsample_ratio: int = 2) -> int:
    """Image-token positions for one image with tw × th local tiles: the model's layout
    (:func:`vl2lab.model.vision.image_token_count`) at this geometry's grid of h tokens per tile side."""

    return layout_tokens(width_tiles, height_tiles, token_grid(image_size, patch_size, downsample_ratio))


def token_grid(image_size: int = 384, patch_size: int = 14, downsample_ratio: int = 2) -> int:
    """Image tokens per side of one tile: ceil(floor(S / p) / r) (27 patches → 14 for DeepSeek-VL2)."""
    return math.ceil((image_size // patch_size) / downsample_ratio)


def image_layout(width: int, height: int, n_images: int = 1, candidate_resolutions: Optional[Sequence] = None,
                 image_size: int = 384, patch_size: int = 14, downsample_ratio: int = 2) -> dict:
    """Everything the tiling decides for one w×h image in a conversation of ``n_images`` images."""
    canvas = (select_canvas(width, height, candidate_resolutions) if n_images <= 2
              else (image_size, image_size))
    tw, th = canvas[0] // image_size, canvas[1] // image_size
    return {"canvas": canvas, "tiles": (tw, th), "vit_passes": 1 + tw * th,
            "grid": token_grid(image_size, patch_size, downsample_ratio),
            "tokens": image_token_count(tw, th, image_size, patch_size, downsample_ratio)}


def pad_resize(image: Image.Image, size: tuple[int, int], color=(127, 127, 127)) -> Image.Image:
    """Aspect-preserving bicubic resize into ``size`` = (W, H), centered on ``color`` (PIL ``ImageOps.pad``).

    The long side (relative to the target) fills the target; the other is round(short·W/long) (round half to
    even, Python's ``round``); the offset of the paste is round((W − new)/2). A side that would round to 0 px is
    kept at 1 px (a very thin image stays visible instead of vanishing or failing).
    """
    W, H = size
    w, h = image.size
    im_ratio, dest_ratio = w / h, W / H
    new = (W, H)
    if im_ratio != dest_ratio:
        new = (W, max(1, round(h / w * W))) if im_ratio > dest_ratio else (max(1, round(w / h * H)), H)
    resized = image.resize(new, resample=Image.Resampling.BICUBIC)
    if new == (W, H):
        return resized
    out = Image.new(image.mode, (W, H), color)
    out.paste(resized, (round((W - new[0]) * 0.5), 0) if new[0] != W else (0, round((H - new[1]) * 0.5)))
    return out


def open_image(path) -> Image.Image:
    """A picture file → 8-bit RGB through :func:`to_rgb` (16-bit PNGs keep their contrast), or one ProcessorError
    naming the file when it is missing, not a picture, truncated or corrupt."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im.copy() if im.mode == "RGB" else im)
    except FileNotFoundError:
        raise ProcessorError(f"image file {str(path)!r} does not exist; check the path") from None
    except (OSError, SyntaxError, ValueError) as e:          # PIL: UnidentifiedImageError, truncated data, …
        if isinstance(e, ProcessorError):
            raise
        raise ProcessorError(f"image file {str(path)!r} cannot be read as a picture ({type(e).__name__}: {e}); "
                             "it is truncated, corrupt or not an image: use a PNG or JPEG file") from None


def to_rgb(image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, the way the official pipeline (``.convert("RGB")``) would, made sensible for
    high-bit-depth images: PIL's own conversion clips 16-bit values at 255 (a white picture), so

    * ``I;16*`` (16-bit greyscale): value / 257 (65535 → 255);
    * ``I`` (32-bit int, how older Pillow opens 16-bit PNGs): value / 257 if the maximum exceeds 255, else as is;
    * ``F`` (float): × 255 if the values lie in [0, 1], else clipped to [0, 255].

    Only PIL images are accepted (numpy arrays: ``Image.fromarray`` first).
    """
    if not isinstance(image, Image.Image):
        raise ProcessorError(f"images must be PIL images, got {type(image).__name__}; convert arrays with "
                             "PIL.Image.fromarray(...) and files with PIL.Image.open(path)")
    if image.width == 0 or image.height == 0:
        raise ProcessorError(f"an image has {image.width}×{image.height} pixels (empty); every image needs at "
                             "least 1×1 pixel")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        a = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and a.size and a.max() > 255):
            a = a / 257.0
        elif image.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ProcessorError(f"cannot convert an image of mode {image.mode!r} to RGB ({e}); convert it to RGB "
                             "before passing it") from None


def normalize(image: Image.Image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """RGB PIL image → float tensor [3, H, W]: x/255 then (x − mean)/std (the same float ops as torchvision)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)  # [3,H,W]
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return x.sub(m).div(s)


def global_view(image: Image.Image, image_size: int = 384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """An RGB image → its normalized global view [3, S, S] (tile 0 of :func:`image_tiles`): pad-resized onto
    grey = int(mean · 255)."""
    color = tuple(int(m * 255) for m in mean)  # (127, 127, 127)
    return normalize(pad_resize(image, (image_size, image_size), color), mean, std)


def image_tiles(image: Image.Image, cropping: bool = True, candidate_resolutions: Optional[Sequence] = None,
                image_size: int = 384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """One image → (tiles [1 + tw·th, 3, 384, 384] ordered [global, row-major locals], (tw, th))."""
    image = to_rgb(image)
    color = tuple(int(m * 255) for m in mean)  # (127, 127, 127)
    cw, ch = (select_canvas(image.width, image.height, candidate_resolutions) if cropping
              else (image_size, image_size))
    tw, th = cw // image_size, ch // image_size
    glob = global_view(image, image_size, mean, std)                                          # [3, 384, 384]
    local = glob if (cw, ch) == (image_size, image_size) else \
        normalize(pad_resize(image, (cw, ch), color), mean, std)                             # [3, ch, cw]
    local = (local.reshape(3, th, image_size, tw, image_size)                                # [3, th, S, tw, S]
             .permute(1, 3, 0, 2, 4).reshape(th * tw, 3, image_size, image_size))            # [th·tw, 3, S, S]
    return torch.cat([glob[None], local], dim=0), (tw, th)
