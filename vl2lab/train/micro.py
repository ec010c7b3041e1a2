"""Rebuild vl2-micro, the small DeepSeek-VL2 that ships in ``vl2lab/assets/vl2-micro``, in one command::

    python -m vl2lab.train.micro --out vl2lab/assets/vl2-micro [--world-size 2] [--tower-steps 2000] [--steps 900]
        [--tower-targets kind,...] [--weight QTYPE=W ...]

Lesson: notebook 03, sections "1. The task and the model" and "4. A short training run".

0. ``vl2lab.run("vl2lab.train.tower:pretrain_tower", world_size=W, ...)``: the SigLIP tower alone learns to
   label every patch with the kind of shape under it (2000 steps of 2×4 scenes) and, with ``--tower-targets``, the
   shape's colour, box, left neighbour and box characters (``tower.TARGETS``); ``--tower-steps 0`` skips this
   stage and trains the tower end to end from random weights, with ``ddp.VISION_LR_MULT``.
1. ``vl2lab.run("vl2lab.train.ddp:train", world_size=W, ...)``: DDP training on the shapes task (:mod:`vl2lab.train.scenes`,
   one multi-turn dialogue per scene) with that tower frozen (``--vision-lr-mult 0``), checkpoints in ``--work``
   (resumable, ``--resume``; a finished stage 0 is not run again). The recipe (defaults of
   :func:`vl2lab.train.ddp.train` and of this command): the ``vl2-micro`` preset (24-pixel patches), AdamW lr 1e-3 with
   a 50-step warm-up and a cosine to 5 %, 900 steps of 2×4 dialogues, scenes of 1 shape for the first 10 % of the
   steps, at most 2 until 25 %, then 1–3 (``ddp.CURRICULUM``), and answers weighted by question type
   (``ddp.QTYPE_WEIGHTS``: colour ×2, count ×3, left-of and grounding ×0.5; ``--weight QTYPE=W`` changes one).
2. Export: the last checkpoint, cast to ``--dtype`` (``auto``: float32 if the weights stay under 10 MiB, else
   bfloat16), saved as an official snapshot (config.json, model.safetensors, tokenizer files,
   processor_config.json) in ``--out``.
3. ``vl2lab.run("vl2lab.train.eval:shard_eval", ...)`` on the exported folder (what ``load_pretrained`` gives a
   user), scored per question type (:func:`vl2lab.train.score.score`) → ``eval.json``; a README.md with the numbers
   is written next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import vl2lab
from vl2lab.launch.options import at_least
from vl2lab.train.ddp import CURRICULUM, QTYPE_WEIGHTS, STATE, VISION_LR_MULT
from vl2lab.train.scenes import dataset
from vl2lab.train.score import score
from vl2lab.train.tower import DEFAULT_TARGETS, TARGETS, TOWER_FILE, check_targets, describe_scores
from vl2lab.weights.pretrained import load_pretrained, save_pretrained

__all__ = ["main", "parser", "export", "write_readme"]


AUTO_FP32_BYTES = 10 * 2**20     # dtype "auto": float32 below this many weight bytes, bfloat16 above


def export(checkpoint: str, out: str, dtype: str = "auto") -> dict:
    """Checkpoint folder → snapshot folder ``out`` with weights in ``dtype`` (``auto``: float32 when 4 bytes per
    parameter stay under 10 MiB, else bfloat16); returns size facts."""
    if dtype == "auto":
        model, _ = load_pretrained(checkpoint)
        dtype = "float32" if 4 * sum(p.numel() for p in model.parameters()) < AUTO_FP32_BYTES else "bfloat16"
    model, processor = load_pretrained(checkpoint, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    save_pretrained(model, out, processor=processor)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "dtype": dtype, "weights_bytes": os.path.getsize(os.path.join(out, "model.safetensors"))}


def write_readme(out: str, report: dict) -> None:
    """A short README.md: what the folder is, how it was made, how well it does."""
    ev, tr = report["eval"], report["train"]
    rows = "\n".join(f"| {q} | {ev[q]['n']} | {ev[q]['accuracy']:.1%} |" for q in ("colour", "count", "left_of", "ground"))
    g, t0 = ev["ground"], report.get("tower")
    if t0:
        what = ", ".join(t.replace("_", " ") for t in t0.get("targets", DEFAULT_TARGETS))
        if t0.get("shape_kind_weight"):
            what += f"; plus {t0['shape_kind_weight']:g} × the kind's loss over the patches on a shape"
        scores = describe_scores({TARGETS[n].score: t0[TARGETS[n].score]
                                  for n in t0.get("targets", DEFAULT_TARGETS)})
    stage0 = ("0. No pre-trained tower: the tower learns from random weights with the rest." if not t0 else
              f"0. The vision tower alone: every patch of the global view labelled with the shape under it "
              f"({what}; `vl2lab/train/tower.py`), {t0['steps']} steps of {tr['world_size']}×{t0['batch_size']} "
              f"scenes ({t0['wall_s'] / 60:.1f} min); on the eval scenes' patches that lie on a shape: {scores}.")
    vm = tr["vision_lr_mult"]
    vision = "vision tower frozen" if vm == 0 else f"×{vm:g} for the vision tower"
    text = f"""# vl2-micro

A DeepSeek-VL2 (the `vl2-micro` preset of `vl2lab/model/config.py`: same modules and checkpoint layout as
deepseek-vl2-tiny — SigLIP tower, 2×2 downsample + MLP projector, MHA + DeepSeekMoE language model — at a size that
trains on two CPU cores) trained by this project from random weights on the synthetic shapes task of
`vl2lab/train/scenes.py`. Load it like any snapshot: `model, processor = vl2lab.load_pretrained(path)`.

Made by `{report['command']}` on {report['machine']}, in {tr['wall_s'] / 60:.1f} min of wall time and two stages:

{stage0}
1. The whole VL2 on the task, {tr['world_size']} ranks (DDP), {tr['steps']} steps of {tr['world_size']}×{tr['batch_size']} dialogues (one
   scene of 1–3 shapes each; its count, which shapes, every shape's colour, a description — each kind then its
   colour —, one left-of and one grounding question as a multi-turn chat), AdamW lr {tr['lr']} ({vision}; warm-up, cosine), curriculum (fraction of steps, most
   shapes) {tr['curriculum']}, answer weights per question type {tr['qtype_weights']}, seed {tr['seed']}
   ({tr['stage1_wall_s'] / 60:.1f} min).

{report['params']:,} parameters, weights stored as {report['dtype']} ({report['weights_bytes'] / 2**20:.1f} MiB).

Eval split ({ev['overall']['n']} questions, seeds disjoint from training, greedy decoding, exact match):

| question type | n | accuracy |
|---|---|---|
{rows}

Grounding boxes: mean IoU {g['mean_iou']:.2f}, IoU ≥ 0.5 for {g['iou50']:.1%}. All numbers are in `eval.json`.
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def _machine(world: int) -> str:
    """Where the ranks ran, in words ("one NVIDIA H200", "2 CPU cores (shared)")."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"one {name}" if world == 1 else f"{world} × {name}"
    return f"{os.cpu_count()} CPU cores (shared)"


def _weight(text: str) -> tuple:
    """``QTYPE=W`` → (qtype, float), or an argparse error that names the question types."""
    name, _, value = text.partition("=")
    try:
        if name not in QTYPE_WEIGHTS:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not QTYPE=WEIGHT with QTYPE one of "
                                         f"{', '.join(QTYPE_WEIGHTS)} and WEIGHT a number, e.g. ground=4") from None


def _targets(text: str) -> tuple:
    """``kind,colour,box`` or ``all`` → the target names of stage 0, or an argparse error that lists them."""
    names = tuple(TARGETS) if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    try:
        return check_targets(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m vl2lab.train.micro`` (every option says what it sets and its default)."""
    p = argparse.ArgumentParser(
        prog="python -m vl2lab.train.micro",
        description="Rebuild vl2-micro, the small DeepSeek-VL2 that ships in vl2lab/assets/vl2-micro: train it from "
                    "random weights on the shapes task, export it as a snapshot folder and score it.",
        epilog="Stages: 0 tower pre-training (vl2lab.train.tower), 1 DDP training (vl2lab.train.ddp), 2 export to "
               "--out, 3 sharded eval (vl2lab.train.eval) → eval.json and README.md in --out. "
               "Example: python -m vl2lab.train.micro --out vl2lab/assets/vl2-micro")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="snapshot folder to write: config.json, model.safetensors, tokenizer, eval.json, README.md "
                        "(required; the shipped one is vl2lab/assets/vl2-micro)")
    p.add_argument("--world-size", type=at_least(1), default=2, metavar="W",
                   help="ranks (DDP processes) of every stage (default: %(default)s)")
    p.add_argument("--tower-steps", type=at_least(0), default=2000, metavar="N",
                   help="stage 0 steps: the vision tower alone learns the kind of shape under each patch; 0 skips "
                        "stage 0 and trains the tower from random weights in stage 1 (default: %(default)s)")
    p.add_argument("--tower-targets", type=_targets, default=DEFAULT_TARGETS, metavar="T,T,...",
                   help="what every patch learns in stage 0, comma-separated from "
                        f"{', '.join(TARGETS)}, or all (kind is always among them; default: "
                        f"{','.join(DEFAULT_TARGETS)})")
    p.add_argument("--tower-kind-weight", type=float, default=0.0, metavar="W",
                   help="stage 0: weight of an extra kind cross-entropy over the patches on a shape alone (the "
                        "background is most of the patches and easy; default: %(default)g)")
    p.add_argument("--tower-batch-size", type=at_least(1), default=4, metavar="B",
                   help="scenes per rank per stage-0 step (default: %(default)s)")
    p.add_argument("--steps", type=at_least(1), default=900, metavar="N",
                   help="stage 1 steps, each of W × --batch-size dialogues (default: %(default)s)")
    p.add_argument("--batch-size", type=at_least(1), default=4, metavar="B",
                   help="dialogues per rank per stage-1 step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="stage 1 peak learning rate, AdamW with a 50-step warm-up and a cosine to 5%% "
                        "(default: %(default)g)")
    p.add_argument("--vision-lr-mult", type=float, default=None, metavar="M",
                   help="the vision tower's learning rate as a multiple of --lr in stage 1 (default: 0, a frozen "
                        f"tower, after stage 0; {VISION_LR_MULT:g} with --tower-steps 0)")
    p.add_argument("--weight", action="append", default=[], metavar="QTYPE=W", type=_weight,
                   help="stage 1 loss weight of one question type's answers, e.g. --weight ground=4 (repeatable; "
                        f"defaults: {', '.join(f'{k}={v:g}' for k, v in QTYPE_WEIGHTS.items())})")
    p.add_argument("--workers", type=at_least(0), default=0, metavar="N",
                   help="worker processes per rank that prepare the next steps' scenes and batches while this one "
                        "trains (vl2lab.train.prefetch; the same batches, so the same run; worth it on a GPU, where "
                        "the input side is most of a step; default: %(default)s, each rank prepares its own)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights and of the data order (default: %(default)s)")
    p.add_argument("--eval-n", type=at_least(4), default=400, metavar="N",
                   help="eval-split questions to score, a quarter of each question type (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights of the exported snapshot; auto: float32 if they stay under 10 MiB, else bfloat16 "
                        "(default: %(default)s)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="folder of the checkpoints and the stage-0 tower (default: "
                        f"{os.path.join(tempfile.gettempdir(), 'vl2-micro-work-seed<SEED>')})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --work from its last checkpoint, and skip a finished stage 0 "
                        "(default: start afresh)")
    p.add_argument("--timeout", type=float, default=3 * 3600, metavar="S",
                   help="wall-clock limit of each launch, in seconds (default: %(default)g)")
    return p


def _same_stage0(facts: str, asked: dict) -> bool:
    """Whether the stage 0 recorded in ``facts`` (tower.json) was run with the settings ``asked`` now."""
    if not os.path.isfile(facts):
        return False
    with open(facts) as f:
        done = json.load(f)
    before = {"targets": list(DEFAULT_TARGETS), "shape_kind_weight": 0.0}     # what a tower.json without them ran
    return all(done.get(k, before.get(k)) == v for k, v in asked.items())


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)

    work = a.work or os.path.join(tempfile.gettempdir(), f"vl2-micro-work-seed{a.seed}")
    command = "python -m vl2lab.train.micro " + " ".join(argv if argv is not None else sys.argv[1:])
    vmult = a.vision_lr_mult if a.vision_lr_mult is not None else (0.0 if a.tower_steps else VISION_LR_MULT)
    tower, stage0 = "", None
    t0 = time.time()
    if a.tower_steps:
        tower, facts = os.path.join(work, TOWER_FILE), os.path.join(work, "tower.json")
        asked = {"steps": a.tower_steps, "batch_size": a.tower_batch_size, "targets": list(a.tower_targets),
                 "shape_kind_weight": a.tower_kind_weight}     # pretrain_tower's arguments, kept in tower.json
        if not (a.resume and os.path.isfile(tower) and _same_stage0(facts, asked)):
            r0 = vl2lab.run("vl2lab.train.tower:pretrain_tower", world_size=a.world_size, timeout=a.timeout,
                            stream=True, out=work, seed=a.seed, workers=a.workers, **asked)[0]
            with open(facts, "w") as f:
                json.dump({**asked, "wall_s": time.time() - t0, **r0["evals"][-1], "evals": r0["evals"]}, f)
        with open(facts) as f:
            stage0 = json.load(f)
    t_vl = time.time()
    weights = {**QTYPE_WEIGHTS, **dict(a.weight)}
    resume = a.resume and os.path.isfile(os.path.join(work, "checkpoint", STATE))   # else stage 1 starts afresh
    res = vl2lab.run("vl2lab.train.ddp:train", world_size=a.world_size, timeout=a.timeout, stream=True, out=work,
                     steps=a.steps, batch_size=a.batch_size, lr=a.lr, vision_lr_mult=vmult, seed=a.seed,
                     resume=resume, tower=tower, qtype_weights=weights, workers=a.workers)
    train_wall, vl_wall = time.time() - t0, time.time() - t_vl
    info = export(os.path.join(work, "checkpoint"), a.out, a.dtype)
    t1 = time.time()
    ev = vl2lab.run("vl2lab.train.eval:shard_eval", world_size=a.world_size, timeout=a.timeout,
                    model_path=os.path.abspath(a.out), split="eval", n=a.eval_n)[0]
    eval_wall = time.time() - t1
    metrics = score(list(dataset("eval", a.eval_n)), ev["answers"])
    hist = res[0]["history"]
    report = {"command": command, "machine": _machine(a.world_size), **info, "eval": metrics,
              "eval_wall_s": eval_wall,
              "tower": stage0,
              "train": {"world_size": a.world_size, "steps": a.steps, "stage1_wall_s": vl_wall,
                        "batch_size": a.batch_size, "lr": a.lr, "vision_lr_mult": vmult, "seed": a.seed,
                        "wall_s": train_wall, "final_loss": hist[-1]["loss"],
                        "curriculum": [list(c) for c in CURRICULUM], "qtype_weights": weights,
                        "resumed": resume, "allreduce_bytes_per_step": res[0]["allreduce_bytes_per_step"]}}
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    write_readme(a.out, report)
    print(json.dumps({k: v.get("accuracy") for k, v in metrics.items()}, indent=1))
    print(f"train {train_wall:.0f} s, eval {eval_wall:.0f} s; snapshot in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
