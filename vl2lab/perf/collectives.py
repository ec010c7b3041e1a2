"""What tensor parallelism pays in communication: timing all-reduce / all-gather, and bytes per token.

Lesson: notebook 02, sections "4. What the collectives cost per token" and
"6. Collective time against message size".

Ring algorithms, S bytes over n ranks (each rank sends as much as it receives):

* all-reduce = reduce-scatter + all-gather: each rank sends 2(n−1)/n · S bytes.
* all-gather of an S-byte result (S/n contributed by each rank): each rank sends (n−1)/n · S.

Measured bandwidths follow the nccl-tests convention: algbw = S / t, and the bus bandwidth
busbw = algbw · 2(n−1)/n (all-reduce) or algbw · (n−1)/n (all-gather) — the rate each link really
carries, comparable with the hardware's link bandwidth whatever n is. For all-gather, S is the size
of the gathered result. At n = 1 nothing moves and busbw is 0.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from vl2lab.launch.launcher import run as launch_run
from vl2lab.model.dtypes import as_dtype
from vl2lab.parallel.groups import barrier, device as rank_device

__all__ = ["bench_collectives", "comm_bytes_per_token", "decode_collectives", "bus_factor", "nccl_settings_sweep", "NCCL_SETTINGS"]

_OPS = ("all_reduce", "all_gather")


def bus_factor(op: str, world_size: int) -> float:
    """busbw / algbw: 2(n−1)/n for all-reduce, (n−1)/n for all-gather."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    n = world_size
    return (2 if op == "all_reduce" else 1) * (n - 1) / n


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def bench_collectives(sizes_bytes=(1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22), repeats: int = 20,
                      warmup: int = 3, ops=_OPS, dtype: str = "float32") -> dict:
    """Rank function: time ``ops`` at each message size on the active backend and device.

    Each repeat: barrier, (CUDA sync), start clock, one collective, (CUDA sync), stop clock. Reports per
    op the sizes actually used (rounded down to whole elements, a multiple of n for all-gather),
    median_s, p10 and p90 of the repeats, and algbw / busbw in GB/s (1e9 bytes/s). Rank 0's numbers are
    the ones to show. CUDA is touched only when the backend put this rank on a GPU (NCCL).
    """
    unknown = [op for op in ops if op not in _OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {_OPS}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dt = as_dtype(dtype)
    dev, n = rank_device(), dist.get_world_size()
    cuda = dev.type == "cuda"
    into_tensor = dist.get_backend() == "nccl"  # gloo takes the list form
    el = dt.itemsize

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    out = {"rank": dist.get_rank(), "world_size": n, "backend": dist.get_backend(), "device": str(dev),
           "dtype": str(dt), "repeats": repeats, "warmup": warmup, "bandwidth_unit": "GB/s (1e9 B/s)", "ops": {}}
    for op in ops:
        rows = {"sizes": [], "median_s": [], "p10": [], "p90": [], "algbw": [], "busbw": []}
        for size in sizes_bytes:
            numel = max(n, int(size) // el // n * n)  # whole elements, divisible by n
            if op == "all_reduce":
                buf = torch.zeros(numel, dtype=dt, device=dev)  # zeros: repeated sums never overflow

                def step():
                    dist.all_reduce(buf)
            else:
                mine = torch.zeros(numel // n, dtype=dt, device=dev)
                result = torch.empty(numel, dtype=dt, device=dev)
                pieces = list(result.chunk(n))  # views into result: no concatenation afterwards

                def step():
                    if into_tensor:
                        dist.all_gather_into_tensor(result, mine)
                    else:
                        dist.all_gather(pieces, mine)
            times = []
            for i in range(warmup + repeats):
                barrier()
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            p10, med, p90 = _quantiles(times)
            nbytes = numel * el
            algbw = nbytes / med / 1e9
            for key, val in zip(rows, (nbytes, med, p10, p90, algbw, algbw * bus_factor(op, n))):
                rows[key].append(val)
        out["ops"][op] = rows
    return out


def comm_bytes_per_token(hidden: int, dtype_bytes: int, world_size: int, intermediate: int | None = None) -> dict:
    """Bytes each rank sends per token, forward pass, ring algorithms (pure maths, no torch.distributed).

    S = hidden · dtype_bytes is one token's activation. Column layer + all-gather of its hidden-wide
    output: (n−1)/n · S. Row layer's all-reduce: 2(n−1)/n · S. Column→row MLP: the split output of the
    column layers is exactly the row layer's split input, so only the row all-reduce remains:
    2(n−1)/n · S. With ``intermediate`` given, also the alternative of gathering the MLP's intermediate
    activation (I-wide) and running the down projection replicated: (n−1)/n · I · dtype_bytes.
    """
    if hidden < 1 or dtype_bytes < 1 or world_size < 1:
        raise ValueError(f"need hidden, dtype_bytes, world_size >= 1; got {hidden}, {dtype_bytes}, {world_size}")
    n, s = world_size, hidden * dtype_bytes
    out = {
        "world_size": n, "token_bytes": s,
        "column_gather": (n - 1) / n * s,
        "row_all_reduce": 2 * (n - 1) / n * s,
        "mlp_column_row": 2 * (n - 1) / n * s,
        "formulas": {"column_gather": "(n-1)/n * S", "row_all_reduce": "2(n-1)/n * S",
                     "mlp_column_row": "2(n-1)/n * S (one all-reduce)"},
    }
    if intermediate is not None:
        out["mlp_gather_intermediate"] = (n - 1) / n * intermediate * dtype_bytes
        out["formulas"]["mlp_gather_intermediate"] = "(n-1)/n * I * dtype_bytes"
    return out


# NCCL's own knobs (environment variables read when a communicator is created): the algorithm, the protocol and
# the buffer size. Ring/Tree × Simple/LL/LL128; NCCL picks per message size by default.
NCCL_SETTINGS = ({}, {"NCCL_ALGO": "Ring"}, {"NCCL_ALGO": "Tree"}, {"NCCL_PROTO": "LL"}, {"NCCL_PROTO": "LL128"},
                 {"NCCL_PROTO": "Simple"}, {"NCCL_BUFFSIZE": str(1 << 23)})


def decode_collectives(language_config, world_size: int, dtype_bytes: int, batch: int = 1) -> dict:
    """The collectives of one tensor-parallel decode step of vl2lab's language model, counted from its config.

    With L decoder layers, hidden size H, vocabulary V, N ranks and batch B (pure maths, no torch.distributed):

    - **2L + 1 all-reduces** of B·H values: each layer's attention ends in a row-parallel ``o_proj`` and its
      feed-forward (dense MLP or MoE) in a row-parallel ``down_proj`` — 2 per layer — and the vocabulary-split
      embedding adds 1 (each rank looks up only its rows; the others contribute zeros). A model whose embedding is
      replicated has 2L: that is the count of the column→row blocks alone (notebook 02).
    - **1 all-gather** of the vocabulary-split ``lm_head``'s logits: B·⌈V/N⌉·N values (uneven shares padded).
    - What a ring all-reduce moves per rank for one message of S bytes: 2(N−1)/N · S.
    """
    n, layers, h = world_size, language_config.num_hidden_layers, language_config.hidden_size
    if n < 1 or batch < 1 or dtype_bytes < 1:
        raise ValueError(f"need world_size, batch, dtype_bytes >= 1; got {n}, {batch}, {dtype_bytes}")
    tp = n > 1
    message = batch * h * dtype_bytes
    count = 2 * layers + 1 if tp else 0
    gather = batch * -(-language_config.vocab_size // n) * n * dtype_bytes if tp else 0
    return {"world_size": n, "batch": batch, "layers": layers, "hidden": h,
            "all_reduces": count, "all_reduce_message_bytes": message if tp else 0,
            "all_reduce_bytes": count * message, "ring_bytes_per_rank": count * 2 * (n - 1) / n * message,
            "all_gathers": 1 if tp else 0, "all_gather_bytes": gather,
            "formula": "2L + 1 all-reduces of B·H values; 1 all-gather of B·ceil(V/N)·N logits"}


def nccl_settings_sweep(world_size: int, settings=NCCL_SETTINGS, sizes_bytes=(1 << 12, 1 << 16, 1 << 20),
                        repeats: int = 50, timeout: float = 300.0) -> list:
    """One launch per NCCL setting (``settings``: dicts of environment variables, ``{}`` = NCCL's defaults),
    each timing bf16 all-reduces at ``sizes_bytes`` (a decode step of small moves 2·L all-reduces of
    batch × hidden × 2 bytes: 4 KiB at batch 1, 128 KiB at batch 32). Needs ``world_size`` ≥ 2 GPUs (the caller
    checks that this machine has them: the workbook's ``settings.resolve`` refuses NCCL with more ranks than GPUs).

    Lesson: notebook 05, section "NCCL settings"."""
    if world_size < 2:
        raise ValueError(f"an NCCL settings sweep needs at least 2 GPUs (world_size={world_size}): nothing moves "
                         "between GPUs otherwise (run it on a multi-GPU machine)")
    rows = []
    for env in settings:
        res = launch_run("vl2lab.perf.collectives:bench_collectives", world_size=world_size, backend="nccl",
                         timeout=timeout, env=env, sizes_bytes=sizes_bytes, repeats=repeats, ops=("all_reduce",),
                         dtype="bfloat16")
        ar = res[0]["ops"]["all_reduce"]
        rows.append({"setting": " ".join(f"{k}={v}" for k, v in env.items()) or "NCCL defaults",
                     **{f"{s // 1024} KiB (µs)": t * 1e6 for s, t in zip(ar["sizes"], ar["median_s"])}})
    return rows
