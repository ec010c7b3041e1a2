"""Stage 0 of vl2-micro (vl2lab.train.tower): the dense patch labels and loading the pre-trained tower.

The training itself runs in the world-size-2 launch of test_ddp.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vl2lab.model import build_model
from vl2lab.model.config import VL2Config, published_config_dict
from vl2lab.train import scenes
from vl2lab.train.tower import global_views, load_tower, patch_labels
from vl2lab.weights.pretrained import CheckpointError


def _scene(w, h, kind, box):
    return scenes.Scene(0, w, h, [scenes.Shape(kind, "red", box)])


def test_labels_follow_the_global_views_geometry():
    # a 192-pixel square in the top-left quarter of a 384×384 image: the top-left 8×8 cells of a 16×16 grid
    lab = patch_labels(_scene(384, 384, "square", (0, 0, 192, 192)), 16).view(16, 16)
    assert (lab[:8, :8] == 1 + scenes.SHAPES.index("square")).all() and lab[8:].eq(0).all() and lab[:, 8:].eq(0).all()
    # a wide image is centred on a square: the top and bottom quarters of the global view are padding
    lab = patch_labels(_scene(768, 384, "cross", (192, 0, 576, 384)), 16).view(16, 16)
    assert lab[:4].eq(0).all() and lab[12:].eq(0).all()
    assert lab[8, 8] == 1 + scenes.SHAPES.index("cross")             # the centre of a full-size cross is filled


def test_labels_line_up_with_the_pixels_the_tower_sees():
    sc = scenes.make_scene(3)
    x = global_views([sc])[0]                                          # [3, 384, 384], background ≈ 0.92
    lab = patch_labels(sc, 16).view(16, 16)
    centres = (torch.arange(16) * 24 + 12)
    on = x[:, centres][:, :, centres].sub(x[:, 0, 0, None, None]).abs().sum(0) > 0.1   # [16, 16] not background
    assert torch.equal(on, lab > 0)


def test_a_tower_of_another_config_or_a_missing_file_is_one_clear_error(tmp_path):
    model = build_model("vl2-micro", seed=0)
    with pytest.raises(CheckpointError, match="no pre-trained tower"):
        load_tower(model, str(tmp_path / "tower.safetensors"))
    other = published_config_dict("vl2-micro")
    other["vision_config"]["width"] = other["projector_config"]["input_dim"] = 96
    small = build_model(VL2Config.from_dict(other), seed=0)
    save_file({k: v.contiguous() for k, v in small.vision.state_dict().items()}, str(tmp_path / "tower.safetensors"))
    before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit"):
        load_tower(model, str(tmp_path / "tower.safetensors"))
    assert all(torch.equal(before[k], v) for k, v in model.vision.state_dict().items())   # nothing half-loaded
