"""How well a model does on the shapes task (:mod:`vl2lab.train.scenes`): greedy answers and their scores.

Lesson: notebook 03, sections "1. The task and the model" and "2. Data-parallel inference" (and notebook 01,
section "3. Ask questions").

:func:`predict` answers examples greedily (batched by question type, each with its own ``MAX_NEW_TOKENS``);
:func:`answer_text` turns one row of generated ids into the answer text. Metrics (:func:`score`): exact match per
question type (stripped text); for ``ground`` also the IoU of the first parsed box with the true box::

    iou(a, b) = |a ∩ b| / |a ∪ b|        mean_iou = mean over ground questions      iou50 = fraction with IoU ≥ 0.5

(a missing or unparsable box counts as IoU 0). :func:`evaluate` does both on the first n examples of a split.
"""
from __future__ import annotations

from typing import Sequence

import torch

from vl2lab.inputs.processor import parse_grounding
from vl2lab.train.scenes import Example, dataset

__all__ = ["MAX_NEW_TOKENS", "iou", "score", "answer_text", "predict", "evaluate"]

# the longest answer of each question type, in tokens (EOS included), with some room
MAX_NEW_TOKENS = {"colour": 4, "count": 3, "left_of": 6, "ground": 40, "shapes": 16, "describe": 24}


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    ua = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


def score(examples: Sequence[Example], predictions: Sequence[str]) -> dict:
    """Exact-match accuracy per question type, and box IoU for ``ground`` (boxes read with parse_grounding)."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    per: dict = {}
    ious = []
    for ex, pred in zip(examples, predictions):
        d = per.setdefault(ex.qtype, {"n": 0, "correct": 0})
        d["n"] += 1
        d["correct"] += int(pred.strip() == ex.answer)
        if ex.qtype == "ground":
            W, H = ex.scene.width, ex.scene.height
            true = [v for lab, v in parse_grounding(ex.answer, (W, H))][0]
            found = parse_grounding(pred, (W, H))
            ious.append(iou(found[0][1], true) if found else 0.0)
    out = {q: {**d, "accuracy": d["correct"] / d["n"]} for q, d in per.items()}
    if ious:
        out["ground"].update(mean_iou=sum(ious) / len(ious), iou50=sum(v >= 0.5 for v in ious) / len(ious))
    out["overall"] = {"n": len(examples), "accuracy": sum(d["correct"] for d in per.values()) / max(1, len(examples))}
    return out


def answer_text(processor, ids) -> str:
    """Generated ids (one row) → the answer text: cut at the first EOS, special tokens such as ``<|ref|>`` kept."""
    ids = [int(t) for t in ids]
    if processor.eos_id in ids:
        ids = ids[:ids.index(processor.eos_id)]
    ids = [t for t in ids if t != processor.pad_id]
    return processor.tokenizer.decode(ids, skip_special_tokens=False).strip()


def predict(model, processor, examples: Sequence[Example], batch_size: int = 8) -> list:
    """Greedy answers to ``examples`` in their order (batched by question type, so short answers stay short), the
    inputs moved to the model's device and dtype."""
    p = next(model.parameters())
    out: list = [None] * len(examples)
    for q in dict.fromkeys(ex.qtype for ex in examples):
        idx = [i for i, ex in enumerate(examples) if ex.qtype == q]
        for k in range(0, len(idx), batch_size):
            part = idx[k:k + batch_size]
            batch = processor(conversations=[examples[i].conversation() for i in part]).to(p.device, p.dtype)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS[q], do_sample=False)
            for i, row in zip(part, ids):
                out[i] = answer_text(processor, row)
    return out


def evaluate(model, processor, split: str = "eval", n: int = 200, batch_size: int = 8) -> dict:
    """Answer the first ``n`` examples of ``split`` greedily and :func:`score` them."""
    examples = list(dataset(split, n))
    return score(examples, predict(model, processor, examples, batch_size))
