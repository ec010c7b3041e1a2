"""Answer a question about an image with DeepSeek-VL2 sharded over N ranks (tensor + expert parallel).

    torchrun --nproc-per-node N -m vl2lab.serve.generate --model PATH_OR_PRESET --image FILE --prompt TEXT \\
        [--moe tp|ep] [--vision replicated|dp] [--dtype float32|bfloat16] [--max-new-tokens 32]
    python -m vl2lab.serve.generate --model random-tiny --prompt "Hello"          # world size 1, no torchrun

Each rank initialises the process group (NCCL when every rank has its own GPU, gloo otherwise), reads only
its shard of the snapshot (:func:`vl2lab.parallel.load.load_sharded`), and all ranks generate together; rank 0
prints the answer and every rank's memory and timings. A preset name (random-tiny, ...) makes random weights
first: the answer is then meaningless text.

Lesson: notebook 04 (full 4-GPU deployment), sections "2. Run it on 4 ranks" and "8. Beyond one machine".
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from vl2lab.parallel.groups import device
from vl2lab.serve.deploy import deploy, is_preset

__all__ = ["main", "init_distributed"]


def init_distributed(backend: str = "auto", timeout_s: float = 300.0) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR…).
    Returns True when it was started here (the caller then destroys it); False when there is no launcher
    environment (world size 1) or a group already exists."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _report(out: dict) -> str:
    m, t = out["memory"], out["timings"]
    tps = t["decode_tokens_per_s"]
    return (f"[rank {out['rank']}] params {_mib(m['param_bytes'])}, read {_mib(m['bytes_read'])} of "
            f"{_mib(m['snapshot_bytes'])} on disk, peak RSS {_mib(m['peak_rss_bytes'])}, peak CUDA "
            f"{_mib(m['peak_cuda_bytes'])}; load {t['load_s']:.2f} s, prefill {t['prefill_s']:.3f} s, "
            f"decode {'-' if tps is None else f'{tps:.1f}'} tok/s; holds {out['holds']['heads']} heads"
            + (f", experts {out['holds']['experts']}" if out["moe"] == "ep" and "experts" in out["holds"] else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vl2lab.serve.generate", description=__doc__.split("\n\n")[0],
                                epilog="On N ranks: torchrun --nproc-per-node N -m vl2lab.serve.generate ... (one "
                                       "process per GPU; without torchrun it runs as world size 1).")
    p.add_argument("--model", required=True, help="snapshot folder, 'vl2-micro' (the trained snapshot shipped "
                   "with vl2lab), or a preset name such as random-tiny (random weights)")
    p.add_argument("--image", default=None, help="picture file (omit for a text-only prompt)")
    p.add_argument("--prompt", default="Describe this image.", help="the question (default: %(default)r)")
    p.add_argument("--moe", default="tp", choices=("tp", "ep"),
                   help="tp: split every routed expert's width; ep: whole experts per rank")
    p.add_argument("--vision", default="replicated", choices=("replicated", "dp", "data_parallel", "tp"),
                   help="replicated tower (default), tiles split over the ranks (dp), or the tower's MLP split (tp)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    a = p.parse_args(argv)

    started = init_distributed(a.backend)
    try:
        dev = device()
        dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
        out = deploy(a.model, a.prompt, a.image, moe=a.moe, vision=a.vision, max_new_tokens=a.max_new_tokens,
                     dtype=dtype, seed=a.seed, device=dev)
        every = [None] * out["world_size"]
        if dist.is_initialized():
            dist.all_gather_object(every, _report(out))
        else:
            every = [_report(out)]
        if out["rank"] == 0:
            print(f"DeepSeek-VL2 on {out['world_size']} rank(s): moe={out['moe']}, vision={out['vision']}, "
                  f"dtype={dtype}, device={out['device']}" + (f", backend {dist.get_backend()}"
                                                             if dist.is_initialized() else ""))
            if is_preset(a.model):
                print(f"note: {a.model!r} is a preset: the weights are random (seed {a.seed}), so the answer is "
                      "meaningless text")
            for line in every:
                print(line)
            c = out["comm_per_token"]
            if c is not None:
                print(f"per generated token: {c['all_reduce']} all-reduces ({c['all_reduce_bytes']} B), "
                      f"{c['all_gather']} all-gather ({c['all_gather_bytes']} B)")
            print(f"answer ({out['timings']['new_tokens']} tokens): {out['answer']}")
            sys.stdout.flush()
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
