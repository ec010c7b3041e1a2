"""The fixed workload, timed: ``python -m vl2lab.perf.bench``.

Workload (the same everywhere in the workbook): one 768×768 image (a 2×2 tiling: 5 ViT passes, 1023 image
tokens), a 32-token text prompt, 64 new tokens with EOS ignored, at a given batch size. Reported per batch size:

- ``load_s``        snapshot folder → model on the device (``load_pretrained``), when a snapshot is used;
- ``preprocess_s``  the processor (tiling, normalisation, tokenisation), on the CPU;
- ``vision_s``      the SigLIP tower over all tiles of the batch;
- ``prefill_s``     ``generate(max_new_tokens=1)``: vision + projector + the language model over the prompt;
- ``decode_ms_per_token``  (t(64 tokens) − t(1 token)) / 63, the steady per-step cost of the whole batch;
- ``e2e_s``          ``generate(max_new_tokens=64)``; ``images_per_s`` = batch / e2e;
- ``peak_bytes``     peak device memory of the end-to-end run beside ``predicted_bytes`` from :mod:`vl2lab.planner.sizing`.

Each time is the median of ``repeats`` runs after ``warmup`` runs (p10/p90 kept), with CUDA synchronisation on
GPUs. The JSON names the hardware, driver and versions. Timings come from here, never from unit tests.

Lesson: notebook 01, section "Where time and memory go" (and notebook 05).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

IMAGE_SIZE = (768, 768)
PROMPT_TOKENS = 32
NEW_TOKENS = 64


def environment() -> dict:
    """Hardware and software this run used."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            info["driver"] = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: the first GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def workload_image(seed: int = 0):
    """A deterministic 768×768 RGB test picture (smooth colour ramps plus noise)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype("uint8")
    return Image.fromarray(img, "RGB")


def workload_conversation(processor, image, prompt_tokens: int = PROMPT_TOKENS) -> list:
    """One user turn with the image and a question whose text (template included) is ``prompt_tokens`` tokens."""
    def conv(q):
        return [{"role": "<|User|>", "content": "<image>\n" + q, "images": [image]},
                {"role": "<|Assistant|>", "content": ""}]

    def text_tokens(q):
        b = processor(conversation=conv(q))
        return int(b["input_ids"].shape[1] - b["images_seq_mask"].sum())

    q = "Describe the picture"
    n = text_tokens(q)
    while n < prompt_tokens:
        for piece in (" 7", "7"):
            m = text_tokens(q + piece)
            if m <= prompt_tokens:
                q, n = q + piece, m
                break
        else:
            break
    return conv(q)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> dict:
    """Median, p10, p90 (seconds) of ``repeats`` calls of ``fn`` after ``warmup`` calls; CUDA events on GPUs."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median": statistics.median(times), "p10": q[0], "p90": q[-1], "n": len(times)}


def measure_generate(vl2, processor, conv, batch_size: int, decode: str = "eager", repeats: int = 3,
                     warmup: int = 1, new_tokens: int = NEW_TOKENS) -> dict:
    """Time the vision tower on the batch's tiles, ``generate`` of 1 token (prefill) and of ``new_tokens``
    (EOS ignored) for ``batch_size`` copies of ``conv``; peak device memory of the full generation on GPUs.
    Returns the batch (on the model's device), its real tiles, the three timings, the tokens and the peak."""
    dev = next(vl2.parameters()).device
    dt = next(vl2.parameters()).dtype
    batch = processor(conversations=[conv] * batch_size).to(dev, dt)
    tiles = batch["images"].flatten(0, 1)
    tiles = tiles[tiles.abs().flatten(1).sum(1) > 0]                 # [N real tiles, 3, 384, 384]

    def gen(n):
        return vl2.generate(**batch, max_new_tokens=n, do_sample=False, ignore_eos=True, decode=decode)

    out = {"batch": batch, "tiles": tiles}
    with torch.inference_mode():
        out["vision_s"] = timed(lambda: vl2.encode_tiles(tiles), dev, repeats, warmup)
        out["prefill_s"] = timed(lambda: gen(1), dev, repeats, warmup)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        out["e2e_s"] = timed(lambda: gen(new_tokens), dev, repeats, warmup)
        out["tokens"] = gen(new_tokens)
    if dev.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def run(model: str = "random-tiny", snapshot: str | None = None, dtype: str = "bfloat16", device: str = "auto",
        batch_sizes=(1,), repeats: int = 3, warmup: int = 1, seed: int = 0, decode: str = "eager") -> dict:
    """Run the workload; ``model`` is a preset name (random weights) or, with ``snapshot``, a folder to load
    (created there with random weights of ``model`` if it does not exist). ``decode``: eager, graph or compile
    (:mod:`vl2lab.model.graph_decode`; compile also compiles the vision blocks). The device's ceilings and the
    workload's floor (:mod:`vl2lab.perf.roofline`) are measured and computed in the same run."""
    from vl2lab.perf import roofline
    from vl2lab.planner import sizing
    from vl2lab.weights.checkpoint import load_pretrained, make_random_snapshot
    from vl2lab.model.config import get_config

    dt = getattr(torch, dtype)
    dev = pick_device(device)
    result = {"workload": {"image": list(IMAGE_SIZE), "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                           "ignore_eos": True}, "model": model, "dtype": dtype, "device": str(dev),
              "environment": environment(), "repeats": repeats, "warmup": warmup, "decode": decode, "runs": []}
    result["ceilings"] = roofline.measure_device(dev)
    if snapshot is None:
        import tempfile
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
        from vl2lab.perf.ladder import Rung, apply
        apply(vl2, Rung("compile", dtype=dtype, decode=decode, vision="compile"))
    image = workload_image(seed)
    conv = workload_conversation(processor, image)
    for b in batch_sizes:
        pre = timed(lambda: processor(conversations=[conv] * b), torch.device("cpu"), repeats, warmup)
        m = measure_generate(vl2, processor, conv, b, decode, repeats, warmup, NEW_TOKENS)
        batch, tiles, vis, pre1, e2e, out = m["batch"], m["tiles"], m["vision_s"], m["prefill_s"], m["e2e_s"], m["tokens"]
        seq = int(batch["input_ids"].shape[1])
        pred = sizing.layout_bytes(cfg, tp=1, dtype=dtype, batch=b, seq_len=seq + NEW_TOKENS,
                                   tiles=int(tiles.shape[0]) // b)
        run_ = {"batch": b, "prompt_len": seq, "image_tokens": int(batch["images_seq_mask"][0].sum()),
                "tiles_per_image": int(tiles.shape[0]) // b, "new_tokens": int(out.shape[1]),
                "preprocess_s": pre, "vision_s": vis, "prefill_s": pre1, "e2e_s": e2e,
                "decode_ms_per_token": (e2e["median"] - pre1["median"]) / (NEW_TOKENS - 1) * 1e3,
                "images_per_s": b / e2e["median"],
                "predicted_bytes": {k: v for k, v in pred.items() if isinstance(v, (int, float))},
                "floor": roofline.workload_floor(cfg, b, seq, NEW_TOKENS, int(tiles.shape[0]) // b,
                                                 result["ceilings"], dtype)}
        if "peak_bytes" in m:
            run_["peak_bytes"] = m["peak_bytes"]
        result["runs"].append(run_)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2lab.perf.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random-tiny", help="preset name (random weights at that size)")
    ap.add_argument("--snapshot", default=None, help="snapshot folder to load (created if missing)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--decode", default="eager", choices=("eager", "graph", "compile"),
                    help="eager loop, CUDA-graph replay of a static step, or that compiled")
    ap.add_argument("--out", default=None, help="write the JSON here too (and the roofline plot next to it)")
    a = ap.parse_args(argv)
    res = run(a.model, a.snapshot, a.dtype, a.device, [int(x) for x in a.batch.split(",")], a.repeats, a.warmup,
              decode=a.decode)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        import matplotlib
        matplotlib.use("Agg")
        from vl2lab.workbook.plots import plot_bench_floor
        plot_bench_floor(res).savefig(os.path.splitext(a.out)[0] + "_roofline.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
