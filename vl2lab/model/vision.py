"""The vision side of DeepSeek-VL2: SigLIP tower, 2×2 downsample + MLP projector, and the 2-D tile layout.

Lesson: notebook 01, sections "1. Load the model" and "2. What the processor does to a picture".

1. **Tower.** Each 384×384 tile goes through a SigLIP-SO400M/14 ViT (transformers' ``SiglipVisionModel``, no pooling
   head): a 14×14 patch conv gives a 27×27 grid (729 tokens; the last 6 pixel rows/columns are never seen), learned
   absolute positions, 27 pre-LN blocks with tanh-GELU MLPs, then the final LayerNorm. All 729 tokens are kept.
   Tiles are independent, so ``encode_tiles`` may be split over ranks along N (data parallel over tiles).

2. **Projector.** The 27×27 grid is zero-padded by one row at the bottom and one column at the right (28×28), then
   folded 2×2 into channels (space-to-depth, 14×14 = 196 tokens of 4·W channels) in *channel-major* order::

       out[c·4 + 2·dy + dx] = x[2·by + dy, 2·bx + dx, c]        (what F.unfold(k=2, s=2) gives)

   — not the "concatenate the 4 neighbour vectors" order. Then Linear(4W → D), exact erf GELU, Linear(D → D).

3. **Layout** of one image with tw × th local tiles (``global_view_pos = head``, ``tile_tag = 2D``)::

       [global 14×14, a newline after each row] (210) + [separator] (1)
       + [local tiles stitched into one (14·th)×(14·tw) grid, a newline after each row of the whole grid]

   N_img = 211 + 14·th·(14·tw + 1): 421 (1×1), 1023 (2×2), 1415 (3 wide × 2 high), 2101 (1×9).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vl2lab.model.config import ProjectorConfig, VisionConfig

__all__ = ["build_vision_tower", "encode_tiles", "space_to_depth", "Projector", "layout_image_features",
           "layout_images", "image_token_count"]


def build_vision_tower(vision_config: VisionConfig) -> nn.Module:
    """A transformers ``SiglipVisionModel`` (no head) with the geometry of ``vision_config``.

    SO400M/14: hidden 1152, MLP int(1152·3.7362) = 4304, 27 layers, 16 heads, 384 px, patch 14, tanh-GELU, eps 1e-6.
    The random presets give a tiny tower with the same 27×27 grid. Attention is PyTorch SDPA (deterministic on CPU).
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = vision_config
    if v.width % v.heads:
        raise ValueError(f"vision width {v.width} is not divisible by heads {v.heads}; fix vision_config")
    cfg = SiglipVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers, num_attention_heads=v.heads,
        num_channels=3, image_size=v.image_size, patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=v.layer_norm_eps, attention_dropout=0.0, vision_use_head=False, attn_implementation="sdpa")
    tower = SiglipVisionModel(cfg)
    tower.eval()
    return tower


def encode_tiles(tower: nn.Module, pixel_tiles: torch.Tensor) -> torch.Tensor:
    """Run the tower on a batch of tiles: [N, 3, S, S] → [N, grid², W] (post-LayerNorm last hidden state)."""
    if pixel_tiles.dim() != 4 or pixel_tiles.shape[1] != 3:
        raise ValueError(f"expected pixel tiles [N, 3, H, W], got shape {tuple(pixel_tiles.shape)}")
    dtype = tower.embeddings.patch_embedding.weight.dtype
    out = tower(pixel_values=pixel_tiles.to(dtype))
    return out.last_hidden_state                                    # [N, 729, W]


def space_to_depth(x: torch.Tensor, grid: int, ratio: int = 2) -> torch.Tensor:
    """[N, grid², C] → [N, (⌈grid/r⌉)², C·r²]: zero-pad bottom/right to a multiple of r, fold r×r blocks into
    channels, channel-major (index c·r² + r·dy + dx, identical to ``F.unfold(kernel_size=r, stride=r)``)."""
    n, t, c = x.shape
    if t != grid * grid:
        raise ValueError(f"expected {grid}×{grid} = {grid * grid} tokens per tile, got {t}")
    x = x.view(n, grid, grid, c)
    pad = (-grid) % ratio
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad))                        # [N, g+pad, g+pad, C], zeros bottom/right
    h = (grid + pad) // ratio
    x = x.view(n, h, ratio, h, ratio, c)                            # [N, by, dy, bx, dx, C]
    x = x.permute(0, 1, 3, 5, 2, 4)                                 # [N, by, bx, C, dy, dx]
    return x.reshape(n, h * h, c * ratio * ratio)                   # [N, 196, 4C]


class Projector(nn.Module):
    """``downsample_mlp_gelu``: space-to-depth, then Linear → GELU(erf) → … → Linear.

    Keys ``layers.0`` (4W → D·mlp_ratio) and ``layers.2`` (→ D) for the published depth 2, mlp_ratio 1.
    """

    def __init__(self, projector_config: ProjectorConfig, grid: int):
        super().__init__()
        p = projector_config
        if p.projector_type != "downsample_mlp_gelu" or p.token_pooling:
            raise ValueError(f"projector_type {p.projector_type!r} (token_pooling={p.token_pooling}) is not "
                             "supported; DeepSeek-VL2 uses 'downsample_mlp_gelu' without token pooling")
        if p.depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {p.depth}")
        self.grid, self.ratio = grid, p.downsample_ratio
        hidden = p.n_embed * p.mlp_ratio
        dims = [p.input_dim * p.downsample_ratio ** 2] + [hidden] * (p.depth - 1) + [p.n_embed]
        mods: list[nn.Module] = []
        for i in range(p.depth):
            if i:
                mods.append(nn.GELU())                              # exact (erf) GELU
            mods.append(nn.Linear(dims[i], dims[i + 1]))
        self.layers = nn.Sequential(*mods)

    @property
    def out_grid(self) -> int:
        """Tokens per side after the downsample: ⌈27/2⌉ = 14."""
        return math.ceil(self.grid / self.ratio)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, 729, W] → [N, 196, D]."""
        x = space_to_depth(feats, self.grid, self.ratio)
        return self.layers(x.to(self.layers[0].weight.dtype))


def image_token_count(width_tiles: int, height_tiles: int, h: int = 14) -> int:
    """N_img = h·(h+1) + 1 + (h·th)·(h·tw + 1)."""
    return h * (h + 1) + 1 + (h * height_tiles) * (h * width_tiles + 1)


def layout_image_features(tile_features: torch.Tensor, width_tiles: int, height_tiles: int,
                          image_newline: torch.Tensor, view_seperator: torch.Tensor) -> torch.Tensor:
    """One image's token sequence from its projected tiles.

    tile_features: [1 + th·tw, h, h, D], the global view first, then the local tiles in row-major order.
    Returns [N_img, D]: global rows each followed by a newline, the separator, then the stitched local grid with a
    newline after each of its 14·th rows.
    """
    n, h, w, d = tile_features.shape
    tw, th = int(width_tiles), int(height_tiles)
    if tw < 1 or th < 1 or n != 1 + tw * th or h != w:
        raise ValueError(f"image with {tw}×{th} tiles needs 1 + {tw}·{th} square tile grids, "
                         f"got features of shape {tuple(tile_features.shape)}")
    nl = image_newline.to(tile_features.dtype)
    glob = tile_features[0]                                         # [h, h, D]
    glob = torch.cat([glob, nl.expand(h, 1, d)], dim=1)             # [h, h+1, D]
    local = tile_features[1:].view(th, tw, h, h, d)                 # [r, c, y, x, D]
    local = local.permute(0, 2, 1, 3, 4).reshape(th * h, tw * h, d)  # [(r,y), (c,x), D]
    local = torch.cat([local, nl.expand(th * h, 1, d)], dim=1)      # [h·th, h·tw + 1, D]
    return torch.cat([glob.reshape(-1, d), view_seperator.to(tile_features.dtype).view(1, d),
                      local.reshape(-1, d)], dim=0)                 # [N_img, D]


def layout_images(feats: torch.Tensor, crops, image_newline: torch.Tensor, view_seperator: torch.Tensor) -> torch.Tensor:
    """Projected tiles of several images, one after another ([N, h, h, D]: each image's global tile then its
    locals), and their (width, height) tile counts → [Σ N_img, D], the images' token sequences concatenated."""
    out, i = [], 0
    for tw, th in crops:
        n = 1 + tw * th
        out.append(layout_image_features(feats[i:i + n], tw, th, image_newline, view_seperator))
        i += n
    return torch.cat(out, dim=0)
