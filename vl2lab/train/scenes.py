"""A synthetic visual task whose answers can be checked by eye: coloured shapes on a plain background.

Lesson: notebook 03, section "1. The task and the model" (the task vl2-micro learns).

A *scene* is fully determined by its integer seed (``random.Random(seed)``, the same on every platform): an image
size (mostly 384×384 = one tile: 421 image tokens with 14-pixel patches, 145 with vl2-micro's 24-pixel ones;
sometimes 768×384, 384×768, 512×512 or 768×768 so that the dynamic tiling is exercised), then 1–3 shapes
(``MAX_SHAPES``) of **different kinds** drawn from square, circle, triangle and cross, each with a colour (red,
green, blue, yellow; colours may repeat), a size (28–40 % of the shorter side) and a position. Shapes never overlap and their centres are at least ``MIN_DX`` of the width apart horizontally, so "just left of" has one answer.

Four question types, each in the official chat format (``<image>\\n`` + question, the answer as the assistant turn):

=========  ==============================================  =============================================
qtype      question                                        answer
=========  ==============================================  =============================================
colour     What colour is the circle?                      ``red``
count      How many shapes are there?                      ``3``
left_of    Which shape is just left of the blue circle?    ``red square`` (nearest centre on the left)
ground     ``<|ref|>red square<|/ref|>.``                  ``<|ref|>red square<|/ref|><|det|>[[x1,y1,x2,y2]]<|/det|>``
=========  ==============================================  =============================================

Training dialogues (:func:`make_dialogue`) add two turns that eval never asks (``TRAIN_ONLY``): "Which shapes are
there?" → ``circle, cross`` and "Describe the shapes." → ``circle red, cross blue`` (each kind, then its colour).

Boxes are on the official 0–999 grid: v = round(pixel / W · 999) (x) or / H (y), the inverse of
``processor.parse_grounding``. Splits: example i of ``train`` has seed i, of ``eval`` seed ``EVAL_OFFSET + i``
(disjoint for any i < EVAL_OFFSET); its question type is ``QTYPES[i % 4]``.

Answering and scoring these questions (exact match, box IoU) is :mod:`vl2lab.train.score`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from vl2lab.inputs.tokenizer import ASSISTANT, DET, DET_END, REF, REF_END, USER

__all__ = ["COLOURS", "SHAPES", "QTYPES", "TRAIN_ONLY", "MAX_SHAPES", "IMAGE_SIZES", "EVAL_OFFSET", "MIN_DX",
           "Shape", "Scene", "Example", "make_scene", "make_example", "dataset", "SceneDataset", "Dialogue",
           "DialogueDataset", "make_dialogue", "dialogues", "task_texts"]

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 20)}
SHAPES = ("square", "circle", "triangle", "cross")
QTYPES = ("colour", "count", "left_of", "ground")
# Training-only turns: "Which shapes are there?" → "square, cross" (SHAPES order), a direct signal for the kinds;
# "Describe the shapes." → "square red, cross blue" (SHAPES order, each kind *then* its colour), so the colour is
# predicted at the position of its kind's token: the lookup "colour of the shape of this kind" is learnt there in one
# attention step, and "What colour is the cross?" can then use it (without this turn vl2-micro learns only to name
# some colour of the picture, not the asked shape's).
TRAIN_ONLY = ("shapes", "describe")
SIZE_RANGE = (0.28, 0.40)  # shape side as a fraction of the image's shorter side
MAX_SHAPES = 3             # a scene holds 1–3 shapes (of the four kinds)
# (width, height, weight): mostly one tile; the others give 2×1, 1×2 and 2×2 tilings (617, 631, 1023 tokens with
# 14-pixel patches; 209, 217, 345 with vl2-micro's 24-pixel patches).
IMAGE_SIZES = ((384, 384, 14), (768, 384, 2), (384, 768, 2), (512, 512, 1), (768, 768, 1))
EVAL_OFFSET = 1_000_000
# odds of each question type for a dialogue's first turn (eval asks single questions, mostly colour and count)
FIRST_TURN = {"colour": 4.0, "count": 3.0, "left_of": 1.5, "ground": 1.5}
MIN_DX = 0.08            # centres differ by ≥ 8 % of the width
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple            # (x1, y1, x2, y2) in pixels, inclusive-exclusive: the shape fills this square

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass
class Scene:
    seed: int
    width: int
    height: int
    shapes: list = field(default_factory=list)

    def render(self) -> Image.Image:
        im = Image.new("RGB", (self.width, self.height), BACKGROUND)
        d = ImageDraw.Draw(im)
        for s in self.shapes:
            _draw(d, s, COLOURS[s.colour])
        return im

    def shape_map(self) -> Image.Image:
        """The scene as a label image (mode "L"): 0 on the background, 1 + i on the pixels of ``shapes[i]`` — the
        dense targets of the tower's pre-training (:mod:`vl2lab.train.tower`: each cell's kind, colour and box)."""
        im = Image.new("L", (self.width, self.height), 0)
        d = ImageDraw.Draw(im)
        for i, s in enumerate(self.shapes):
            _draw(d, s, 1 + i)
        return im

    def grid_box(self, shape: Shape) -> list:
        """The box on the 0–999 grid."""
        x1, y1, x2, y2 = shape.box
        W, H = self.width, self.height
        return [round(x1 / W * 999), round(y1 / H * 999), round(x2 / W * 999), round(y2 / H * 999)]


def _draw(d: ImageDraw.ImageDraw, s: Shape, fill) -> None:
    """Fill ``s``'s silhouette with ``fill`` (an RGB colour or a label value)."""
    x1, y1, x2, y2 = s.box
    if s.kind == "square":
        d.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif s.kind == "circle":
        d.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif s.kind == "triangle":
        d.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    else:                                                           # cross: two bars of a third of the side
        t = (x2 - x1) / 3
        d.rectangle([x1 + t, y1, x2 - t - 1, y2 - 1], fill=fill)
        d.rectangle([x1, y1 + t, x2 - 1, y2 - t - 1], fill=fill)


def make_scene(seed: int, min_shapes: int = 1, max_shapes: int = MAX_SHAPES) -> Scene:
    """The scene of ``seed`` with ``min_shapes``..``max_shapes`` shapes (``min_shapes`` = 2 for left-of questions;
    fewer ``max_shapes`` for an easy start of training). Deterministic."""
    if not 1 <= min_shapes <= max_shapes <= len(SHAPES):
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {len(SHAPES)}, got {min_shapes}, {max_shapes}")
    rng = random.Random((int(seed) * 7919 + min_shapes) * 5 + max_shapes)
    sizes = [(w, h) for w, h, k in IMAGE_SIZES for _ in range(k)]
    W, H = rng.choice(sizes)
    n = rng.randint(min_shapes, max_shapes)
    kinds = rng.sample(SHAPES, n)
    side = min(W, H)
    while True:                                                    # rejection sampling; shrink when crowded
        shapes: list = []
        for attempt in range(400):
            if len(shapes) == n:
                break
            s = round(rng.uniform(*SIZE_RANGE) * side)
            x, y = rng.randint(4, W - s - 4), rng.randint(4, H - s - 4)
            box = (x, y, x + s, y + s)
            pad = 6
            clash = any(box[0] < o.box[2] + pad and o.box[0] < box[2] + pad and box[1] < o.box[3] + pad
                        and o.box[1] < box[3] + pad for o in shapes)
            close = any(abs((box[0] + box[2]) / 2 - o.cx) < MIN_DX * W for o in shapes)
            if not (clash or close):
                shapes.append(Shape(kinds[len(shapes)], rng.choice(list(COLOURS)), box))
        if len(shapes) == n:
            return Scene(int(seed), W, H, shapes)


@dataclass
class Example:
    seed: int
    qtype: str
    scene: Scene
    question: str          # user content, starting with "<image>\n"
    answer: str            # the assistant's reply
    target: Optional[Shape] = None   # the shape a left_of/ground answer names

    @property
    def image(self) -> Image.Image:
        return self.scene.render()

    def conversation(self, with_answer: bool = False, image: Optional[Image.Image] = None) -> list:
        """Official conversation dicts; ``with_answer`` fills the assistant turn (training), else it is empty."""
        return [{"role": USER, "content": self.question, "images": [image or self.image]},
                {"role": ASSISTANT, "content": self.answer if with_answer else ""}]


def _qa(scene: Scene, qtype: str, shape: Optional[Shape] = None) -> tuple:
    """(question, answer, target) of one question about ``scene`` (the question without the image tag)."""
    if qtype == "colour":
        return f"What colour is the {shape.kind}?", shape.colour, shape
    if qtype == "count":
        return "How many shapes are there?", str(len(scene.shapes)), None
    if qtype == "shapes":
        kinds = {s.kind for s in scene.shapes}
        return "Which shapes are there?", ", ".join(k for k in SHAPES if k in kinds), None
    if qtype == "describe":
        by_kind = sorted(scene.shapes, key=lambda s: SHAPES.index(s.kind))
        return "Describe the shapes.", ", ".join(f"{s.kind} {s.colour}" for s in by_kind), None
    if qtype == "left_of":
        by_x = sorted(scene.shapes, key=lambda s: s.cx)
        left = by_x[by_x.index(shape) - 1]
        return f"Which shape is just left of the {shape.name}?", left.name, left
    box = ",".join(str(v) for v in scene.grid_box(shape))
    return f"{REF}{shape.name}{REF_END}.", f"{REF}{shape.name}{REF_END}{DET}[[{box}]]{DET_END}", shape


def _subjects(scene: Scene, qtype: str) -> list:
    """The shapes a question of ``qtype`` can be about (left_of: every shape with a neighbour on its left)."""
    if qtype in ("count", "shapes", "describe"):
        return [None]
    if qtype == "left_of":
        return sorted(scene.shapes, key=lambda s: s.cx)[1:]
    return list(scene.shapes)


def _example(seed: int, qtype: str) -> Example:
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}; choose one of {QTYPES}")
    scene = make_scene(seed, min_shapes=2 if qtype == "left_of" else 1)
    rng = random.Random(int(seed) * 104729 + QTYPES.index(qtype))
    q, a, target = _qa(scene, qtype, rng.choice(_subjects(scene, qtype)))
    return Example(seed, qtype, scene, "<image>\n" + q, a, target)


def make_example(seed: int, qtype: str) -> Example:
    """One question about the scene of ``seed`` (``qtype`` in :data:`QTYPES`)."""
    return _example(seed, qtype)


@dataclass
class Dialogue:
    """Questions about one scene (see :func:`make_dialogue`) as one multi-turn conversation (training: one pass
    over the image's tokens then supervises up to 8 answers instead of one)."""
    seed: int
    scene: Scene
    turns: list            # [(qtype, question, answer)], the image tag on the first question

    def conversation(self, with_answer: bool = True, image: Optional[Image.Image] = None) -> list:
        conv = []
        for i, (_, q, a) in enumerate(self.turns):
            user = {"role": USER, "content": q}
            if i == 0:
                user["images"] = [image or self.scene.render()]
            conv += [user, {"role": ASSISTANT, "content": a if with_answer else ""}]
        return conv


def make_dialogue(seed: int, max_shapes: int = MAX_SHAPES) -> Dialogue:
    """The questions about the scene of ``seed``: count, which shapes, the colour of every shape, a description
    (each kind and its colour), one left_of and one ground question (the long box answers would otherwise fill most
    of the sequence). Order (seeded): first one question drawn with ``FIRST_TURN`` odds (the turn that looks exactly
    like an eval prompt: image, then the question), then count, shapes, the colours, the description, then left_of
    and ground shuffled — so no colour answer can be read off an earlier turn (a colour named by the description, a
    left_of or a ground turn, the number of colour questions)."""
    scene = make_scene(seed, max_shapes=max_shapes)
    rng = random.Random(int(seed) * 15485863 + 7)
    blocks = [[(q, *_qa(scene, q, s)[:2]) for q in qs for s in _subjects(scene, q)]
              for qs in (("count",), ("shapes",), ("colour",), ("describe",), ("left_of", "ground"))]
    for b in blocks:
        rng.shuffle(b)
    kinds = [q for q in FIRST_TURN if _subjects(scene, q)]
    qtype = rng.choices(kinds, weights=[FIRST_TURN[q] for q in kinds])[0]
    first = next(t for b in blocks for t in b if t[0] == qtype)
    blocks[4] = [t for i, t in enumerate(blocks[4])                 # at most one of each (none if it came first)
                 if t[0] != first[0] and all(u[0] != t[0] for u in blocks[4][:i])]
    turns = [first] + [t for b in blocks for t in b if t is not first]
    turns[0] = (first[0], "<image>\n" + first[1], first[2])
    return Dialogue(int(seed), scene, turns)


class DialogueDataset(Sequence):
    """``n`` training dialogues of a split (seed i, or ``EVAL_OFFSET + i`` for eval), made on demand."""

    def __init__(self, split: str, n: int, max_shapes: int = MAX_SHAPES):
        _check_split(split, n)
        self.n, self.offset, self.max_shapes = n, (0 if split == "train" else EVAL_OFFSET), max_shapes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} dialogues")
        return make_dialogue(self.offset + i % self.n, self.max_shapes)


def dialogues(split: str, n: int, max_shapes: int = MAX_SHAPES) -> DialogueDataset:
    """The first ``n`` multi-turn dialogues of ``split`` (what vl2-micro is trained on), scenes of at most
    ``max_shapes`` shapes."""
    return DialogueDataset(split, n, max_shapes)


def _check_split(split: str, n: int) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0 <= n <= EVAL_OFFSET:
        raise ValueError(f"n={n} must be in [0, {EVAL_OFFSET}] (train and eval seeds must stay disjoint)")


class SceneDataset(Sequence):
    """``n`` examples of a split, made on demand (images are rendered when asked for, never stored)."""

    def __init__(self, split: str, n: int, qtypes: Sequence[str] = QTYPES):
        _check_split(split, n)
        bad = [q for q in qtypes if q not in QTYPES]
        if bad or not qtypes:
            raise ValueError(f"unknown question type(s) {bad}; choose from {QTYPES}")
        self.split, self.n, self.qtypes = split, n, tuple(qtypes)
        self.offset = 0 if split == "train" else EVAL_OFFSET

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} examples")
        i %= self.n
        return _example(self.offset + i, self.qtypes[i % len(self.qtypes)])


def dataset(split: str, n: int, qtypes: Sequence[str] = QTYPES) -> SceneDataset:
    """The first ``n`` examples of ``split`` ('train' or 'eval'), question types in turn."""
    return SceneDataset(split, n, qtypes)


def task_texts() -> list:
    """Every question and answer the task can produce, in the chat layout (for the tokenizer's corpus)."""
    out = []
    names = [f"{c} {k}" for c in COLOURS for k in SHAPES]
    for k in SHAPES:
        out.append(f"{USER}: What colour is the {k}?\n\n{ASSISTANT}:")
    out += list(COLOURS) + [str(i) for i in range(1, len(SHAPES) + 1)]
    out.append(f"{USER}: How many shapes are there?\n\n{ASSISTANT}:")
    out += [f"{USER}: Which shapes are there?\n\n{ASSISTANT}:", ", ".join(SHAPES)]
    for nm in names:
        out += [f"{USER}: Which shape is just left of the {nm}?\n\n{ASSISTANT}:", nm,
                f"{USER}: {REF}{nm}{REF_END}.\n\n{ASSISTANT}:", f"{REF}{nm}{REF_END}{DET}[[0,0,999,999]]{DET_END}"]
    return out * 20
