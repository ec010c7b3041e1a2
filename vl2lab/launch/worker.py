"""One rank of a vl2lab launch: set up the process group, call the function, report through files.

torchrun starts this module once per rank (the command is built in ``vl2lab.launch.launcher``)::

    python -m torch.distributed.run ... -m vl2lab.launch.worker --run-dir DIR --target module:function

What each rank does, in order (Lesson: notebook 00, sections 2 and 4):

1. Send its own stdout and stderr to ``DIR/rank{r}.log`` and write ``DIR/rank{r}.pid.json``.
2. Start a watchdog thread. Once a second it checks that the launching process (the notebook kernel,
   identified by PID *and* start time, so a reused PID is not mistaken for it) and the torchrun agent
   still exist. If either has gone, it kills the agent, every rank, and its own process group, so a
   killed kernel leaves nothing behind.
3. Import torch and resolve the backend: ``auto`` gives NCCL when CUDA is available and every local
   rank gets its own GPU (``torch.cuda.set_device(local_rank)``), otherwise gloo. Then
   ``init_process_group`` runs with a short timeout, so a missing peer fails quickly.
4. Call ``fn(**kwargs)`` (the keyword arguments read as plain data: ``vl2lab.launch.payload``), move tensors
   in the result to the CPU, and write ``rank{r}.result.pt`` and ``rank{r}.status.json``. Both are written
   atomically (temp file, then rename), even on failure. A result the launcher would refuse to load (not plain
   data) is this rank's error instead.
   A failing rank then re-raises, so torchrun stops the other ranks and names the root cause.

Only torch, psutil and the launch package's own modules are imported here (torch before step 1, so what its
import prints goes to ``torchrun.log``); the rank never imports transformers unless ``fn`` does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import linecache
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from vl2lab.launch.payload import loads, refusal, result_bytes
from vl2lab.launch.processes import find_process, kill
from vl2lab.parallel import groups as vdist

__all__ = ["main", "read_kwargs", "run_source", "WATCHDOG_INTERVAL_S"]

WATCHDOG_INTERVAL_S = 1.0


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _write_json(path: str, obj: dict) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode()))


def _redirect_output(log_path: str) -> None:
    """Point file descriptors 1 and 2 (and so print, warnings, C++ logs) at the rank's log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# ----------------------------------------------------------------------------------------- watchdog
def _same_process(pid: int, create_time: float | None) -> bool:
    return find_process(pid, create_time) is not None


def _kill_launch(agent_pid: int, agent_ctime: float) -> None:
    """SIGKILL the torchrun agent, every rank it started, then this rank's own process group."""
    me = os.getpid()
    try:
        agent = find_process(agent_pid, agent_ctime)
        if agent is not None:
            for child in agent.children(recursive=True):
                if child.pid != me:
                    kill(child.pid, signal.SIGKILL)
            kill(agent_pid, signal.SIGKILL)
    finally:
        kill(me, signal.SIGKILL)


def _watchdog(agent_pid: int, agent_ctime: float) -> None:
    launcher = os.environ.get("VL2LAB_LAUNCHER_PID")
    ctime = os.environ.get("VL2LAB_LAUNCHER_CTIME")
    launcher_ctime = float(ctime) if ctime else None
    while True:
        time.sleep(WATCHDOG_INTERVAL_S)
        launcher_gone = launcher is not None and not _same_process(int(launcher), launcher_ctime)
        if launcher_gone or not _same_process(agent_pid, agent_ctime):
            print(f"[vl2lab] {'launcher' if launcher_gone else 'torchrun agent'} is gone: "
                  "stopping every process of this launch", file=sys.stderr, flush=True)
            _kill_launch(agent_pid, agent_ctime)


def _start_watchdog() -> None:
    agent = psutil.Process().parent()
    threading.Thread(target=_watchdog, args=(agent.pid, agent.create_time()),
                     name="vl2lab-watchdog", daemon=True).start()


# ------------------------------------------------------------------------------------- rank helpers
def _to_cpu(x):
    """Tensors (also inside dicts, lists and tuples) → detached CPU tensors; a ``str`` subclass (``torch.__version__``
    is a TorchVersion) → a plain ``str``, which the launcher's plain-data loader reads; everything else as is."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, str) and type(x) is not str:
        return str(x)
    if isinstance(x, dict):
        out = {k: _to_cpu(v) for k, v in x.items()}
        try:
            return out if type(x) is dict else type(x)(out)
        except TypeError:  # e.g. defaultdict: keep the values, drop the subclass
            return out
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    if isinstance(x, tuple):
        items = [_to_cpu(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def read_kwargs(path: str) -> dict:
    """The keyword arguments in ``path``, read as plain data only (nothing named in the file is run)."""
    try:
        kwargs = loads(path)
    except Exception as e:  # noqa: BLE001 — a foreign or planted file: one clear error, no unsafe advice
        raise ValueError(f"the keyword arguments in {path} were not loaded: {refusal(path, e)}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"the keyword arguments in {path} were not loaded: it holds a {type(kwargs).__name__}, "
                         "not a dict")
    return kwargs


def _init_backend(requested: str, timeout_s: float):
    """Returns (backend, device) after init_process_group; "auto" → nccl iff each local rank has a GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = requested
    if requested == "auto":
        fits = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
        backend = "nccl" if fits else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"backend 'nccl' needs one GPU per local rank: local rank {local_rank} "
                               f"sees {torch.cuda.device_count()} GPU(s). Use backend='gloo' on CPU.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend, timeout=timeout)
    # Every rank has finished connecting before any returns: without this, a rank that ends fast
    # and destroys the group can break a slower peer's gloo connectFullMesh.
    if backend == "nccl":
        dist.barrier(device_ids=[local_rank])
    else:
        dist.barrier()
    return backend, device


def _peak_rss_bytes() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return int(kib) * (1 if sys.platform == "darwin" else 1024)


def run_source(source: str, push: dict | None = None, pull: tuple = ()) -> dict:
    """Rank side of ``%%torchrun``: exec the cell's text, return the pulled variables.

    The namespace starts with ``rank``, ``world_size``, ``local_rank``, ``torch``, ``dist``
    (torch.distributed), ``device`` and the pushed variables.
    """
    filename = "<%%torchrun cell>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns = {"__name__": "__torchrun__", "rank": vdist.rank(), "world_size": vdist.world_size(),
          "local_rank": vdist.local_rank(), "torch": torch, "dist": dist, "device": vdist.device()}
    ns.update(push or {})
    exec(compile(source, filename, "exec"), ns)
    missing = [name for name in pull if name not in ns]
    if missing:
        raise NameError(f"--pull names {missing}, but the cell did not define them in rank {ns['rank']}")
    return {name: ns[name] for name in pull}


# --------------------------------------------------------------------------------------------- main
def _run_rank(args, status: dict) -> None:
    rank = status["rank"]
    result_path = os.path.join(args.run_dir, f"rank{rank}.result.pt")
    value, error, tb = None, None, None
    try:
        backend, device = _init_backend(args.backend, args.init_timeout)
        status.update(backend=backend, device=str(device))
        fn = _resolve(args.target)
        kwargs = read_kwargs(args.kwargs) if args.kwargs else {}
        status["fn_start_time"] = time.time()
        value = _to_cpu(fn(**kwargs))
    except BaseException as e:  # noqa: BLE001 — SystemExit and KeyboardInterrupt are rank failures too
        error, tb = e, traceback.format_exc()
    data, unsendable = result_bytes(value, args.target)  # what the launcher will load, checked here
    if unsendable is not None and error is None:
        error, tb = unsendable, f"TypeError: {unsendable}\n"
    _write_atomic(result_path, lambda f: f.write(data))
    end = time.time()
    cuda_peak = None
    if (status.get("device") or "cpu").startswith("cuda"):
        cuda_peak = int(torch.cuda.max_memory_allocated())
    fn_start = status.get("fn_start_time", end)  # startup: interpreter, torch import, init
    status.update(status="ok" if error is None else "error", end_time=end, duration_s=end - fn_start,
                  startup_s=fn_start - status["start_time"], peak_rss_bytes=_peak_rss_bytes(),
                  peak_cuda_bytes=cuda_peak)
    if error is not None:
        status.update(exc_type=type(error).__name__, message=str(error), traceback=tb)
    sys.stdout.flush()
    sys.stderr.flush()
    status["log_bytes"] = os.path.getsize(status["log_path"])
    _write_json(os.path.join(args.run_dir, f"rank{rank}.status.json"), status)
    if error is not None:
        raise error
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vl2lab.launch.worker", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="the launch's run dir (required)")
    p.add_argument("--target", required=True, help="module:function to call (required)")
    p.add_argument("--backend", default="auto", help="auto, gloo or nccl (default: %(default)s)")
    p.add_argument("--init-timeout", type=float, default=120.0,
                   help="init_process_group's timeout in seconds (default: %(default)g)")
    p.add_argument("--kwargs", default=None,
                   help="torch.save file holding the keyword arguments (default: none)")
    args = p.parse_args(argv)
    args.run_dir = os.path.abspath(args.run_dir)
    os.makedirs(args.run_dir, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    log_path = os.path.join(args.run_dir, f"rank{rank}.log")
    start = psutil.Process().create_time()  # the process's start: startup_s counts the interpreter and imports
    _redirect_output(log_path)
    _write_json(os.path.join(args.run_dir, f"rank{rank}.pid.json"),
                {"rank": rank, "pid": os.getpid(), "create_time": start,
                 "agent_pid": os.getppid(), "host": socket.gethostname()})
    _start_watchdog()
    status = {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
              "world_size": int(os.environ.get("WORLD_SIZE", 1)), "status": "running",
              "target": args.target, "pid": os.getpid(), "host": socket.gethostname(),
              "backend": None, "device": None, "log_path": log_path, "start_time": start}
    record(_run_rank)(args, status)


if __name__ == "__main__":
    main()
