"""The shapes task (vl2lab.train.scenes): deterministic scenes, disjoint splits, answers right by construction;
and its metrics (vl2lab.train.score)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vl2lab.inputs.processor import parse_grounding
from vl2lab.train import scenes, score


def _digest(im) -> str:
    return hashlib.sha1(np.asarray(im).tobytes()).hexdigest()


def test_same_seed_same_scene_and_pixels():
    for seed in (0, 7, 123456):
        a, b = scenes.make_scene(seed), scenes.make_scene(seed)
        assert a == b
        assert _digest(a.render()) == _digest(b.render())
        for q in scenes.QTYPES:
            ea, eb = scenes.make_example(seed, q), scenes.make_example(seed, q)
            assert (ea.question, ea.answer) == (eb.question, eb.answer)
    assert scenes.make_dialogue(5).turns == scenes.make_dialogue(5).turns


def test_splits_are_disjoint_and_cycle_question_types():
    train, ev = scenes.dataset("train", 40), scenes.dataset("eval", 40)
    assert not {e.seed for e in train} & {e.seed for e in ev}
    assert not {_digest(e.image) for e in train} & {_digest(e.image) for e in ev}
    assert [e.qtype for e in ev[:8]] == list(scenes.QTYPES) * 2
    with pytest.raises(ValueError, match="split"):
        scenes.dataset("test", 3)
    with pytest.raises(ValueError, match="question type"):
        scenes.make_example(0, "size")


def _mask(scene, shape):
    """Pixels of ``shape``'s colour inside its box."""
    a = np.asarray(scene.render()).astype(int)
    x1, y1, x2, y2 = shape.box
    return (np.abs(a[y1:y2, x1:x2] - scenes.COLOURS[shape.colour]).sum(-1) == 0)


def test_scenes_follow_their_rules():
    sizes = set()
    for seed in range(60):
        sc = scenes.make_scene(seed)
        sizes.add((sc.width, sc.height))
        assert 1 <= len(sc.shapes) <= scenes.MAX_SHAPES
        assert len({s.kind for s in sc.shapes}) == len(sc.shapes)            # kinds are distinct
        for i, s in enumerate(sc.shapes):
            x1, y1, x2, y2 = s.box
            assert 0 <= x1 < x2 <= sc.width and 0 <= y1 < y2 <= sc.height
            m = _mask(sc, s)
            assert m.any(axis=0).all() and m.any(axis=1).all()             # the shape fills its box's width/height
            for o in sc.shapes[i + 1:]:
                assert score.iou(s.box, o.box) == 0.0
                assert abs(s.cx - o.cx) >= scenes.MIN_DX * sc.width
    assert (384, 384) in sizes and len(sizes) >= 3                          # several tilings occur


def test_answers_are_right_by_construction():
    for seed in range(40):
        by_q = {q: scenes.make_example(seed, q) for q in scenes.QTYPES}
        ex = by_q["colour"]
        assert ex.answer == next(s.colour for s in ex.scene.shapes if f"the {s.kind}?" in ex.question)
        assert by_q["count"].answer == str(len(by_q["count"].scene.shapes))
        ex = by_q["left_of"]
        ref = next(s for s in ex.scene.shapes if ex.question.endswith(f"the {s.name}?"))
        left = [s for s in ex.scene.shapes if s.cx < ref.cx]
        assert ex.answer == max(left, key=lambda s: s.cx).name
        ex = by_q["ground"]
        (label, box), = parse_grounding(ex.answer, ex.image)
        assert label == ex.target.name and ex.question == f"<image>\n<|ref|>{label}<|/ref|>."
        grid = ex.scene.grid_box(ex.target)
        assert all(0 <= v <= 999 for v in grid)
        assert max(abs(a - b) for a, b in zip(box, ex.target.box)) <= max(ex.scene.width, ex.scene.height) / 999
        assert score.iou(box, ex.target.box) > 0.97


def test_dialogue_asks_about_each_shape_once_with_one_image():
    for seed in range(12):
        d = scenes.make_dialogue(seed)
        conv = d.conversation()
        n = len(d.scene.shapes)
        qtypes = [q for q, _, _ in d.turns]
        assert len(d.turns) == n + 4 + (n >= 2)     # count, shapes, a colour per shape, describe, left_of?, ground
        assert qtypes.count("colour") == n
        assert qtypes.count("ground") == 1 and qtypes.count("left_of") == (n >= 2)
        assert sum("<image>" in t["content"] for t in conv) == 1 and conv[0]["content"].startswith("<image>\n")
        assert [t["role"] for t in conv] == ["<|User|>", "<|Assistant|>"] * len(d.turns)
        order = qtypes[1:]
        firsts = [i for i, q in enumerate(order) if q in ("count", "colour")]
        later = [i for i, q in enumerate(order) if q in ("describe", "left_of", "ground")]
        assert all(i > j for i in later for j in firsts)                 # no colour can be copied
        describe = next(a for q, _, a in d.turns if q == "describe")    # each kind, then its colour, SHAPES order
        by_kind = sorted(d.scene.shapes, key=lambda s: scenes.SHAPES.index(s.kind))
        assert describe == ", ".join(f"{s.kind} {s.colour}" for s in by_kind)
    kinds = {d.turns[0][0] for d in map(scenes.make_dialogue, range(40))}
    assert {"colour", "count"} <= kinds                                   # eval-like first turns


def test_score_on_perfect_and_wrong_predictions():
    ex = list(scenes.dataset("eval", 16))
    perfect = score.score(ex, [e.answer for e in ex])
    assert all(perfect[q]["accuracy"] == 1.0 for q in scenes.QTYPES)
    assert perfect["ground"]["mean_iou"] == pytest.approx(1.0) and perfect["ground"]["iou50"] == 1.0
    wrong = score.score(ex, ["purple" for _ in ex])
    assert wrong["overall"]["accuracy"] == 0.0 and wrong["ground"]["mean_iou"] == 0.0
    # a box shifted by half its width: IoU 1/3, so below 0.5 but not zero
    g = [e for e in ex if e.qtype == "ground"]
    shifted = []
    for e in g:
        x1, y1, x2, y2 = e.scene.grid_box(e.target)
        dx = (x2 - x1) // 2
        shifted.append(f"<|ref|>{e.target.name}<|/ref|><|det|>[[{x1 + dx},{y1},{x2 + dx},{y2}]]<|/det|>")
    s = score.score(g, shifted)["ground"]
    assert s["accuracy"] == 0.0 and s["iou50"] == 0.0 and 0.25 < s["mean_iou"] < 0.4
    with pytest.raises(ValueError, match="predictions"):
        score.score(ex, [])


def test_iou():
    assert score.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert score.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert score.iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert score.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_answer_text_keeps_grounding_tokens(tiny_model):
    _, processor = tiny_model
    ex = scenes.make_example(3, "ground")
    ids = processor.tokenizer.encode(ex.answer, add_special_tokens=False) + [processor.eos_id, processor.pad_id]
    assert score.answer_text(processor, ids) == ex.answer
