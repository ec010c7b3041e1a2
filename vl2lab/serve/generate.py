"""Answer a question about an image with DeepSeek-VL2 sharded over N ranks (tensor + expert parallel).

    python -m vl2lab.launch.agent --standalone --nproc-per-node N -m vl2lab.serve.generate \\
        --model PATH_OR_NAME --image FILE --prompt TEXT [--moe tp|ep] [--vision replicated|dp|tp] \\
        [--dtype auto|float32|bfloat16|float16] [--max-new-tokens 32]
    python -m vl2lab.serve.generate --model random-tiny --prompt "Hello"          # world size 1, no torchrun
    python -m vl2lab generate ...                                                 # the same command

Each rank initialises the process group (NCCL when every rank has its own GPU, gloo otherwise), reads only
its shard of the snapshot (:func:`vl2lab.parallel.load.load_sharded`), and all ranks generate together; rank 0
prints the answer and every rank's memory and timings. A preset name (random-tiny, ...) makes random weights
first: the answer is then meaningless text.

Bad input (an unknown model name, a picture that cannot be read, a model that cannot be split over the world
size, too many tokens for the context) is checked before any process group starts or any weight is read, and
gives one line on rank 0 (``--debug``: the traceback too); every rank exits with the same code (1; 2 for a bad
command line). Under torchrun, torchrun then adds its own failure report (and stops ranks that have not exited
yet with SIGTERM, so the report may list them as -15): the ranks cannot prevent it short of claiming success.

Teardown: a barrier, then ``destroy_process_group``, which joins gloo's worker threads. That only works when
nothing else holds the default group (:mod:`vl2lab.parallel.groups` imports ``torch.distributed.nn`` first for
that reason): ``torch.distributed.nn`` (imported by transformers' model code) captures
``group.WORLD`` in its functions' default arguments when it is first imported after ``init_process_group``, which
kept the group, and its threads, alive into interpreter shutdown, where a thread still releasing a finished
all-gather's tensors needs the GIL and is killed (``terminate called without an active exception``, SIGABRT).

Lesson: notebook 04 (full 4-GPU deployment), sections "2. Run it on 4 ranks" and "8. Beyond one machine".
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from vl2lab.inputs.tiling import ProcessorError
from vl2lab.launch.options import at_least
from vl2lab.model.config import ConfigError
from vl2lab.model.generation import GenerationError
from vl2lab.parallel.groups import barrier, device, rank, world_size
from vl2lab.parallel.plan import ShardingError
from vl2lab.serve.deploy import DeployError, check_request, deploy, random_note
from vl2lab.weights.keys import CheckpointError

__all__ = ["main", "init_distributed", "shutdown_distributed", "build_parser", "REQUEST_ERRORS"]

# Errors of the request itself: every rank meets the same one, so rank 0 alone reports it.
REQUEST_ERRORS = (DeployError, GenerationError, ProcessorError, ShardingError, CheckpointError, ConfigError)

USAGE = """\
Answer a question about an image with DeepSeek-VL2, the model sharded over the ranks (tensor + expert parallel).

  one process:         python -m vl2lab.serve.generate --model vl2-micro --image scene.png --prompt "..."
  on N ranks:          python -m vl2lab.launch.agent --standalone --nproc-per-node N \\
                                -m vl2lab.serve.generate --model DIR --image F --prompt T
                       (torchrun listening on 127.0.0.1 only; one process per GPU, NCCL; on a CPU-only
                       machine N processes over gloo)
  several machines:    torchrun --nnodes M --node-rank R --master-addr HOST --master-port 29500 \\
                                --nproc-per-node N -m vl2lab.serve.generate ...   (on each machine R = 0..M-1)
  also:                python -m vl2lab generate ...

Rank 0 prints the answer, every rank's memory and timings, and the collectives of one decode step."""


def init_distributed(backend: str = "auto", timeout_s: float = 300.0) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR…).
    Returns True when it was started here (the caller then calls :func:`shutdown_distributed`); False when there
    is no launcher environment (world size 1) or a group already exists."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown_distributed(ok: bool = True) -> None:
    """End the process group :func:`init_distributed` started: after a run that went well, a barrier first (no
    rank tears down while another still talks to it); after an error, at once (a peer may never arrive)."""
    if ok:
        barrier()
    dist.destroy_process_group()


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is one line, printed by rank 0 only (every rank exits with 2)."""

    def error(self, message):
        if rank() == 0:
            sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m vl2lab.serve.generate", description=USAGE,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a snapshot folder (config.json + *.safetensors + tokenizer), "
                   "'vl2-micro' (the trained snapshot shipped with vl2lab), or a preset name such as random-tiny "
                   "(random weights; aliases tiny, small, base) (required, no default)")
    p.add_argument("--image", default=None, help="picture file: PNG, JPEG, ... (default: none, a text-only prompt)")
    p.add_argument("--prompt", default="Describe this image.", help="the question (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=32, metavar="N",
                   help="tokens to generate, at least 1; prompt + N must fit the model's context (default: "
                        "%(default)s)")
    p.add_argument("--moe", default="tp", choices=("tp", "ep"), help="tp: every routed expert's width split over "
                   "the ranks; ep: whole experts per rank (default: %(default)s)")
    p.add_argument("--vision", default="replicated", choices=("replicated", "dp", "data_parallel", "tp"),
                   help="the vision tower: on every rank (replicated), its tiles split over the ranks (dp), or its "
                        "MLP split (tp) (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="parameter dtype; auto: bfloat16 on GPU, float32 on CPU (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="process-group backend under torchrun; auto: nccl when every rank has a GPU, else gloo "
                        "(default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too (default: off)")
    return p


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _report(out: dict) -> str:
    m, t = out["memory"], out["timings"]
    return (f"[rank {out['rank']}] params {_mib(m['param_bytes'])}, read {_mib(m['bytes_read'])} of "
            f"{_mib(m['snapshot_bytes'])} on disk, peak RSS {_mib(m['peak_rss_bytes'])}, peak CUDA "
            f"{_mib(m['peak_cuda_bytes'])}; load {_fmt(t['load_s'], '.2f')} s, prefill {_fmt(t['prefill_s'], '.3f')} "
            f"s, decode {_fmt(t['decode_tokens_per_s'], '.1f')} tok/s; holds {out['holds']['heads']} heads"
            + (f", experts {out['holds']['experts']}" if out["moe"] == "ep" and "experts" in out["holds"] else ""))


def _print_results(out: dict, dtype: str) -> None:
    every = [None] * out["world_size"]
    if dist.is_initialized():
        dist.all_gather_object(every, _report(out))
    else:
        every = [_report(out)]
    if out["rank"] != 0:
        return
    print(f"DeepSeek-VL2 on {out['world_size']} rank(s): moe={out['moe']}, vision={out['vision']}, dtype={dtype}, "
          f"device={out['device']}" + (f", backend {dist.get_backend()}" if dist.is_initialized() else ""))
    for line in every:
        print(line)
    c = out["comm_per_token"]
    if c is not None:
        print(f"per generated token: {c['all_reduce']} all-reduces ({c['all_reduce_bytes']} B), "
              f"{c['all_gather']} all-gather ({c['all_gather_bytes']} B)")
    print(f"answer ({out['timings']['new_tokens']} tokens): {out['answer']}")


def _fail(err: BaseException, debug: bool) -> int:
    """Report ``err`` in one line (rank 0 only for a request error, every rank, marked, for anything else)."""
    sys.stdout.flush()
    r, same_everywhere = rank(), isinstance(err, REQUEST_ERRORS)
    if same_everywhere and r != 0:
        return 1
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    who = f"[rank {r}] " if not same_everywhere and world_size() > 1 else ""
    text = str(err) if same_everywhere else f"{type(err).__name__}: {err}" + ("" if debug else
                                                                          " (run with --debug for the traceback)")
    print(f"{who}error: {text}", file=sys.stderr, flush=True)
    return 1


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    started = ok = False
    try:
        # Before any process group or weight: the model name, its split over the ranks, the picture, the length.
        req = check_request(a.model, world_size(), a.moe, a.vision, a.max_new_tokens, a.image)
        if req["kind"] == "preset" and rank() == 0:
            print(random_note(a.model, req["where"], req["config"], a.seed), flush=True)
        started = init_distributed(a.backend)
        dev = device()
        dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
        out = deploy(a.model, a.prompt, a.image, moe=a.moe, vision=a.vision, max_new_tokens=a.max_new_tokens,
                     dtype=dtype, seed=a.seed, device=dev)
        _print_results(out, dtype)
        sys.stdout.flush()
        ok = True
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001  a command line prints errors, not tracebacks (--debug shows them)
        return _fail(e, a.debug)
    finally:
        if started:
            shutdown_distributed(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
