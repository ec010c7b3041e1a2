"""Stage 0 of vl2-micro (vl2lab.train.tower): the dense patch labels and loading the pre-trained tower.

The training itself runs in the world-size-2 launch of test_ddp.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vl2lab.model import build_model
from vl2lab.model.config import VL2Config, published_config_dict
from vl2lab.train import scenes
from vl2lab.train.tower import eval_batch, global_views, load_tower, patch_labels, shape_accuracy
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


class _Fixed(torch.nn.Module):
    """A "tower + head" that answers the given patch predictions [N, cells] as one-hot logits, whatever the input."""

    def __init__(self, pred: torch.Tensor):
        super().__init__()
        self.pred = pred

    def forward(self, x):
        assert x.shape[0] == self.pred.shape[0]
        return torch.nn.functional.one_hot(self.pred, 1 + len(scenes.SHAPES)).float()


def test_shape_accuracy_counts_the_cells_on_shapes_only():
    """On hand-made predictions: 4 of the 5 cells on a shape right → 0.8, whatever is said about the background
    (a score over every cell would give 0.5 here, 0.375 for an all-background answer)."""
    y = torch.tensor([[0, 1, 2, 3], [4, 0, 1, 0]])
    pred = torch.tensor([[1, 1, 2, 0], [4, 3, 1, 2]])             # background wrong everywhere, cell (0, 3) wrong
    x = torch.zeros(2, 3, 8, 8)
    assert shape_accuracy(_Fixed(pred), (x, y)) == pytest.approx(0.8)
    assert shape_accuracy(_Fixed(y), (x, y)) == 1.0
    assert shape_accuracy(_Fixed(torch.zeros_like(y)), (x, y)) == 0.0
    # on the real eval batch: the oracle scores 1, and "the most common kind everywhere" scores that kind's share
    views, lab = eval_batch(16, n=3)
    assert views.shape == (3, 3, 384, 384) and lab.shape == (3, 256)
    assert shape_accuracy(_Fixed(lab), (views, lab)) == 1.0
    on = lab[lab > 0]
    top = int(on.mode().values)
    share = float((on == top).float().mean())
    assert shape_accuracy(_Fixed(torch.full_like(lab, top)), (views, lab)) == pytest.approx(share)
