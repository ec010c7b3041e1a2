"""Stage 0 of vl2-micro (vl2lab.train.tower): the dense patch labels and loading the pre-trained tower.

The training itself runs in the world-size-2 launch of test_ddp.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vl2lab.model import build_model
from vl2lab.model.config import VL2Config, published_config_dict
from vl2lab.train import scenes
from vl2lab.train.loop import TrainingError
from vl2lab.train.tower import (N_KINDS, TARGETS, check_targets, describe_scores, eval_batch, global_views, head_slices,
                                load_tower, patch_labels, patch_loss, patch_scores, patch_targets, shape_accuracy)
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


def test_colour_box_and_neighbour_targets_name_the_shape_under_each_cell():
    sc = scenes.Scene(0, 768, 384, [scenes.Shape("circle", "blue", (0, 0, 384, 384)),
                                    scenes.Shape("square", "yellow", (480, 96, 672, 288))])
    t = {n: v.view(16, 16, *v.shape[1:]) for n, v in patch_targets(sc, 16).items()}
    kind, colour, box = t["kind"], t["colour"], t["box"]
    assert kind[8, 4] == 1 + scenes.SHAPES.index("circle") and colour[8, 4] == 1 + list(scenes.COLOURS).index("blue")
    assert torch.allclose(box[8, 4] * 999, torch.tensor([0.0, 0, 500, 999]))      # the answer's grid, not the view's
    assert kind[8, 12] == 1 + scenes.SHAPES.index("square") and colour[8, 12] == 1 + list(scenes.COLOURS).index("yellow")
    assert torch.allclose(box[8, 12] * 999, torch.tensor([float(v) for v in sc.grid_box(sc.shapes[1])]))
    # the circle has no shape on its left (0); the square's left neighbour is the blue circle
    assert t["left_kind"][8, 4] == 0 and t["left_colour"][8, 4] == 0
    assert t["left_kind"][8, 12] == 1 + scenes.SHAPES.index("circle")
    assert t["left_colour"][8, 12] == 1 + list(scenes.COLOURS).index("blue")
    # the box as the answer spells it: [[0,0,500,999]] → "0··", "0··", "500", "999" (10: no character)
    assert t["box_chars"][8, 4].tolist() == [0, 10, 10, 0, 10, 10, 5, 0, 0, 9, 9, 9]
    off = kind == 0
    assert all(v[off].eq(0).all() for v in t.values())
    assert torch.equal(patch_labels(sc, 16), kind.reshape(-1))


def test_the_head_layout_is_the_targets_table_in_order():
    assert check_targets(["box", "kind"]) == ("kind", "box")
    assert head_slices(["kind", "box"]) == {"kind": slice(0, 5), "box": slice(5, 9)}
    assert head_slices(TARGETS)["box_chars"] == slice(24, 24 + 12 * 11)
    with pytest.raises(TrainingError, match="unknown size"):
        check_targets(["kind", "size"])
    with pytest.raises(TrainingError, match="kind is missing"):
        check_targets(["colour"])


def _oracle(targets: dict, big: float = 50.0) -> torch.Tensor:
    """The head outputs that say exactly ``targets``: one-hot logits × ``big`` per class slot, the box itself."""
    parts = []
    for n, v in targets.items():
        t = TARGETS[n]
        parts.append(v.float() if not t.classes else
                     (torch.nn.functional.one_hot(v.reshape(*v.shape[:2], t.slots), t.classes) * big).flatten(-2))
    return torch.cat(parts, -1)


def test_patch_scores_and_loss_on_exact_predictions():
    """An oracle head scores 100 % on every class target and box error 0; its loss is ~0. A box 0.1 off everywhere
    gives an error of 99.9/999 and a loss of box_weight × 0.1."""
    views, y = eval_batch(16, n=2, names=TARGETS)
    oracle = _oracle(y)
    sc = patch_scores(_Out(oracle), (views, y))
    assert sc == {TARGETS[n].score: (0.0 if n == "box" else 1.0) for n in TARGETS}
    assert float(patch_loss(oracle, y)) < 1e-6
    shifted = oracle.clone()
    shifted[..., head_slices(TARGETS)["box"]] += 0.1
    assert patch_scores(_Out(shifted), (views, y))["box_error"] == pytest.approx(99.9, abs=1e-3)
    assert float(patch_loss(shifted, y, box_weight=2.0)) == pytest.approx(0.2, abs=1e-5)
    assert describe_scores({"shape_patch_accuracy": 0.917, "box_error": 34.2}) == "kind 91.7%, box error 34/999"


class _Out(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


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
    views, y = eval_batch(16, n=3)
    lab = y["kind"]
    assert views.shape == (3, 3, 384, 384) and lab.shape == (3, 256)
    assert shape_accuracy(_Fixed(lab), (views, lab)) == 1.0
    on = lab[lab > 0]
    top = int(on.mode().values)
    share = float((on == top).float().mean())
    assert shape_accuracy(_Fixed(torch.full_like(lab, top)), (views, lab)) == pytest.approx(share)


def test_shape_kind_weight_adds_the_kind_loss_of_the_cells_on_a_shape():
    """Uniform kind logits cost ln 5 on every cell; the extra term adds ln 5 per unit weight (cells on a shape)."""
    views, y = eval_batch(16, n=2)
    flat = torch.zeros(*y["kind"].shape, N_KINDS)
    ln5 = float(torch.log(torch.tensor(5.0)))
    assert float(patch_loss(flat, y)) == pytest.approx(ln5, abs=1e-5)
    assert float(patch_loss(flat, y, shape_kind_weight=2.0)) == pytest.approx(3 * ln5, abs=1e-5)
