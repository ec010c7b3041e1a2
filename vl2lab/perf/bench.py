"""The fixed workload, timed: ``python -m vl2lab.perf.bench``.

Workload (:mod:`vl2lab.perf.workload`, the same everywhere in the workbook): one 768×768 image (a 2×2 tiling: 5 ViT
passes, 1023 image tokens), a 32-token text prompt, 64 new tokens with EOS ignored, at a given batch size. Reported
per batch size:

- ``load_s``        snapshot folder → model on the device (``load_pretrained``), when a snapshot is used;
- ``preprocess_s``  the processor (tiling, normalisation, tokenisation), on the CPU;
- ``vision_s``      the SigLIP tower over all tiles of the batch;
- ``prefill_s``     vision + projector + the language model over the prompt, up to the first token;
- ``decode_step_s``  one decode step of the whole batch, each step timed on its own
                     (:func:`vl2lab.perf.workload.time_steps`: median, p10, p90 over the 63 steps of every run);
- ``e2e_s``          ``generate(max_new_tokens=64)``; ``images_per_s`` = batch / e2e;
- ``peak_bytes``     peak device memory of the end-to-end run beside ``predicted_bytes`` from
                     :mod:`vl2lab.planner.layouts`.

Each time is the median of ``repeats`` runs after ``warmup`` runs (p10/p90 kept), with CUDA events on GPUs; prefill,
decode steps and end to end come from the same timed generations. The JSON names the hardware, driver and versions. Timings come from here, never from unit tests.

Lesson: notebook 01, section "Where time and memory go" (and notebook 05).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from vl2lab.launch.options import at_least
from vl2lab.model.dtypes import as_dtype
from vl2lab.perf import roofline
from vl2lab.perf.rungs import Rung, apply
from vl2lab.perf.workload import (IMAGE_SIZE, NEW_TOKENS, PROMPT_TOKENS, environment, measure_generate, pick_device,
                                  timed, workload_requests)
from vl2lab.planner.layouts import layout_bytes
from vl2lab.weights.pretrained import load_pretrained, make_random_snapshot
from vl2lab.workbook.tuning_plots import plot_bench_floor

__all__ = ["run", "parser", "main", "save_roofline_plot"]


def run(model: str = "random-tiny", snapshot: str | None = None, dtype: str = "bfloat16", device: str = "auto",
        batch_sizes=(1,), repeats: int = 3, warmup: int = 1, seed: int = 0, decode: str = "eager") -> dict:
    """Run the workload; ``model`` is a preset name (random weights) or, with ``snapshot``, a folder to load
    (created there with random weights of ``model`` if it does not exist). ``decode``: eager, graph or compile
    (:mod:`vl2lab.model.graph_decode`; compile also compiles the vision blocks). The device's ceilings and the
    workload's floor (:mod:`vl2lab.perf.roofline`) are measured and computed in the same run."""
    dt = as_dtype(dtype)
    dev = pick_device(device)
    result = {"workload": {"image": list(IMAGE_SIZE), "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                           "ignore_eos": True}, "model": model, "dtype": dtype, "device": str(dev),
              "environment": environment(), "repeats": repeats, "warmup": warmup, "decode": decode, "runs": []}
    result["ceilings"] = roofline.measure_device(dev)
    if snapshot is None:
        snapshot = os.path.join(tempfile.gettempdir(), f"vl2lab-bench-{model}-{dtype}")
    if not os.path.isfile(os.path.join(snapshot, "config.json")):
        t0 = time.perf_counter()
        make_random_snapshot(snapshot, preset=model, seed=seed, dtype=dt)
        result["snapshot_create_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    vl2, processor = load_pretrained(snapshot, dtype=dt, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result["load_s"] = time.perf_counter() - t0
    result["weights_bytes_measured"] = sum(p.numel() * p.element_size() for p in vl2.parameters())
    cfg = vl2.config
    if decode == "compile":
        apply(vl2, Rung("compile", dtype=dtype, decode=decode, vision="compile"))
    for b in batch_sizes:
        convs = workload_requests(processor, b, seed)
        pre = timed(lambda: processor(conversations=convs), torch.device("cpu"), repeats, warmup)
        m = measure_generate(vl2, processor, convs, decode, repeats, warmup, NEW_TOKENS)
        batch, tiles, out = m["batch"], m["tiles"], m["tokens"]
        e2e = m["e2e_s"]
        seq = int(batch["input_ids"].shape[1])
        pred = layout_bytes(cfg, tp=1, dtype=dtype, batch=b, seq_len=seq + NEW_TOKENS,
                            tiles=int(tiles.shape[0]) // b)
        run_ = {"batch": b, "prompt_len": seq, "image_tokens": int(batch["images_seq_mask"][0].sum()),
                "tiles_per_image": int(tiles.shape[0]) // b, "new_tokens": int(out.shape[1]),
                "preprocess_s": pre, "vision_s": m["vision_s"], "prefill_s": m["prefill_s"],
                "decode_step_s": m.get("decode_step_s"), "e2e_s": e2e, "images_per_s": b / e2e["median"],
                "predicted_bytes": {k: v for k, v in pred.items() if isinstance(v, (int, float))},
                "floor": roofline.workload_floor(cfg, b, seq, NEW_TOKENS, int(tiles.shape[0]) // b,
                                                 result["ceilings"], dtype)}
        if "peak_bytes" in m:
            run_["peak_bytes"] = m["peak_bytes"]
        result["runs"].append(run_)
    return result


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m vl2lab.perf.bench``."""
    ap = argparse.ArgumentParser(prog="python -m vl2lab.perf.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random-tiny",
                    help="preset name: random weights at that preset's size (default: %(default)s)")
    ap.add_argument("--snapshot", default=None,
                    help="snapshot folder to load; created there with random weights of --model if missing "
                         "(default: a folder in the temp directory)")
    ap.add_argument("--dtype", default="bfloat16", help="weights and activations: float32, bfloat16 or float16 "
                                                        "(default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto (the first GPU if any, else the CPU), cpu, cuda, cuda:N "
                                                     "(default: %(default)s)")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes (default: %(default)s)")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="timed runs per measurement; the median is reported "
                                                           "(default: %(default)s)")
    ap.add_argument("--warmup", type=at_least(0), default=1, help="untimed runs before them (default: %(default)s)")
    ap.add_argument("--seed", type=at_least(0), default=0, help="seed of the random weights and of the test picture "
                                                        "(default: %(default)s)")
    ap.add_argument("--decode", default="eager", choices=("eager", "graph", "compile"),
                    help="eager loop, CUDA-graph replay of a static step, or that compiled (default: %(default)s)")
    ap.add_argument("--out", default=None, help="write the JSON here too, and the roofline plot next to it "
                                                "(FILE_roofline.png; needs matplotlib)")
    return ap


def main(argv=None) -> int:
    """``python -m vl2lab.perf.bench --model deepseek-vl2-tiny --dtype bfloat16 --batch 1,8 --out FILE``"""
    a = parser().parse_args(argv)
    res = run(a.model, a.snapshot, a.dtype, a.device, [int(x) for x in a.batch.split(",")], a.repeats, a.warmup,
              seed=a.seed, decode=a.decode)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        save_roofline_plot(res, os.path.splitext(a.out)[0] + "_roofline.png")
    return 0


def save_roofline_plot(result: dict, path: str) -> None:
    """The benchmark beside its floor (:func:`vl2lab.workbook.tuning_plots.plot_bench_floor`), as a PNG file."""
    import matplotlib
    matplotlib.use("Agg")                                 # a file, no display
    plot_bench_floor(result).savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
