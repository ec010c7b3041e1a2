"""Run a function on N ranks from a notebook, and get its return values back, indexed by rank.

    res = vl2lab.run("vl2lab.lessons.smoke:hello", world_size=4)   # or vl2lab.launch.run(...)
    res[0]        # rank 0's return value
    res           # deterministic per-rank table (rank, status, backend, device)
    res.timings() # durations and peak memory

Each call starts a fresh ``torchrun`` in its own session (the rank side is ``vl2lab.launch.worker``), so no
CUDA or NCCL state lives in the notebook kernel, which never touches CUDA. Ranks report through files
in a private run dir (mode 0700: ``rank{r}.status.json``, ``rank{r}.result.pt``, ``rank{r}.log``).

Safe by default: a single-node launch listens on loopback only (``vl2lab.launch.agent``: torchrun's stores on
127.0.0.1, gloo and NCCL on the loopback interface); what travels between the launcher and the ranks is plain
data read with ``torch.load(weights_only=True)`` (``vl2lab.launch.payload``), so a run folder cannot run code in
the kernel; a keyword argument that cannot travel is refused, naming it, before anything exists.

The run dir of a launch that failed or timed out is kept (its logs are the evidence; the error says where). That
of a successful launch is removed (``RankResults.run_dir`` is then None), unless ``keep_run_dir=True`` or
``run_dir=`` was given (a folder you named is yours: it is kept; a folder that existed before is never removed).
A multi-node launch keeps it too (its nodes may share it).

Failures surface as one exception naming the first failing rank: ``RankFailedError`` (a rank raised
or vanished) or ``RankTimeoutError`` (the wall-clock ``timeout`` ran out). Timeouts nest:
``init_process_group`` timeout (min(timeout, 120 s)) < launch ``timeout`` < notebook cell timeout.

No process of a launch outlives it: the wait is wrapped in try/finally (errors, timeouts and
KeyboardInterrupt all stop the agent and every rank: SIGTERM, a grace period, then SIGKILL, each
rank's own process group included); an atexit hook stops launches still running when the kernel
exits; and a watchdog thread in every rank kills the launch if the kernel is SIGKILLed. How the
processes are found and stopped is ``vl2lab.launch.processes``; the command line is ``python -m vl2lab.launch``.

Lesson: notebook 00, sections 2 ("Ranks report in"), 4 ("When a rank fails") and 5 ("What a
launch costs").
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time

import psutil

from vl2lab.launch.payload import kwargs_bytes
from vl2lab.launch.processes import Launch, LogTail
from vl2lab.launch.progress import Display
from vl2lab.launch.results import (RankFailedError, RankResults, RankTimeoutError, collect_records,
                                   failure_message, timeout_message)

__all__ = ["run", "torchrun_command", "target_name", "check_launch", "init_timeout", "loopback_ifname", "BACKENDS",
           "EXIT_GRACE_S", "PROGRESS_EVERY_S", "LOOPBACK"]

PROGRESS_EVERY_S = 10.0
EXIT_GRACE_S = 30.0         # after every rank reported: how long torchrun may take to exit
BACKENDS = ("auto", "gloo", "nccl")
LOOPBACK = "127.0.0.1"      # where a single-node launch listens
EXAMPLE_TARGET = "vl2lab.lessons.smoke:hello"  # what the errors give as an example (tests import it)


# ------------------------------------------------------------------------------------- validation
def target_name(fn) -> str:
    """'module:function' for a string or an importable function; one clear error (ValueError) otherwise."""
    fix = ("Put the function in a .py module (for example write it with %%writefile mytask.py, then "
           "`from mytask import f`) and pass the function or 'mytask:f'; or run a cell's code on N "
           "ranks with the %%torchrun cell magic (%load_ext vl2lab.launch.magic).")
    if isinstance(fn, str):
        module, sep, name = fn.partition(":")
        parts = module.split(".") + name.split(".")
        if not sep or not all(p.isidentifier() for p in parts):
            raise ValueError(f"fn={fn!r}: expected 'module:function', e.g. '{EXAMPLE_TARGET}'.")
    elif callable(fn):
        module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if module is None or "<" in name:
            raise ValueError(f"{name or fn!r} is a lambda, a nested function or has no module, so a "
                             f"fresh rank process cannot import it. {fix}")
    else:
        raise TypeError(f"fn must be a 'module:function' string or a function, got {type(fn).__name__}")
    if module == "__main__":
        raise ValueError(f"{name} is defined in __main__ (a notebook cell or a script run directly); "
                         f"each rank is a fresh Python process that cannot import it. {fix}")
    why = ""
    try:  # imports the parent packages of a dotted module (not the module itself)
        found = importlib.util.find_spec(module) is not None
    except Exception as e:  # noqa: BLE001 — ModuleNotFoundError, or a parent package that fails to import
        found, why = False, f" ({type(e).__name__}: {e})"
    if not found:
        raise ValueError(f"module {module!r} of fn={module}:{name} cannot be imported from this "
                         f"process's sys.path{why}, so the ranks could not import it either.")
    return f"{module}:{name}"


def check_launch(world_size, nnodes: int = 1, backend: str = "auto", timeout: float = 300.0,
                 rdzv_endpoint: str | None = None) -> None:
    """One clear ValueError for arguments no launch can run with (before anything starts)."""
    if not isinstance(world_size, int) or world_size < 1 or nnodes < 1 or world_size % nnodes:
        raise ValueError(f"world_size={world_size!r} must be a positive int divisible by nnodes={nnodes}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
    if (nnodes > 1 or rdzv_endpoint is not None) and not rdzv_endpoint:
        raise ValueError("a multi-node launch needs rdzv_endpoint='HOST:PORT' (reachable from all nodes)")


def _private_dir(path: str) -> str:
    """Create ``path`` (and its parents) if needed; make it mode 0700 when it is ours."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _runs_root() -> str:
    """$VL2LAB_RUNS_DIR, or $TMPDIR/vl2lab-runs (…-runs-UID when another user owns that one), mode 0700."""
    root = os.environ.get("VL2LAB_RUNS_DIR") or os.path.join(tempfile.gettempdir(), "vl2lab-runs")
    _private_dir(root)
    if not os.environ.get("VL2LAB_RUNS_DIR") and os.stat(root).st_uid != os.getuid():
        root = _private_dir(f"{root}-{os.getuid()}")
    return root


def _make_run_dir(run_dir, target: str, node_tag: str) -> tuple:
    """(absolute run dir, whether this call created it)."""
    if run_dir is None:
        short = "".join(c if c.isalnum() else "_" for c in target.split(":")[-1])[:40]
        return tempfile.mkdtemp(prefix=f"{time.strftime('%Y%m%d-%H%M%S')}-{short}-", dir=_runs_root()), True
    run_dir = os.path.abspath(run_dir)
    if os.path.exists(os.path.join(run_dir, f"launch{node_tag}.json")):
        raise ValueError(f"run_dir={run_dir} already holds a launch; pass a new folder (or None).")
    created = not os.path.exists(run_dir)
    return _private_dir(run_dir), created


# ---------------------------------------------------------------------------- command and environment
def _pythonpath() -> str:
    """The parent's sys.path minus the interpreter's own folders ('' → the current folder)."""
    paths = sysconfig.get_paths()
    stdlib = [os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")]
    skip = {os.path.realpath(p) for p in paths.values()}
    skip |= {os.path.realpath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
    out: list[str] = []
    for p in sys.path:
        p = os.path.abspath(p or os.getcwd())
        real = os.path.realpath(p)
        if (not os.path.exists(p) or real in skip or p in out
                or any(real.startswith(s + os.sep) for s in stdlib)):
            continue
        out.append(p)
    return os.pathsep.join(out)


def _rdzv_id(target: str, rdzv_endpoint: str, nnodes: int, nproc: int) -> str:
    """Same on every node (each node computes it alone), so the nodes meet in one rendezvous."""
    key = f"{target}|{rdzv_endpoint}|{nnodes}|{nproc}".encode()
    return "vl2lab-" + hashlib.sha1(key).hexdigest()[:12]


def init_timeout(timeout: float) -> float:
    """``init_process_group``'s timeout for a launch of ``timeout`` seconds: min(timeout, 120 s), at least 10 s."""
    return max(10.0, min(timeout, 120.0))


def torchrun_command(target: str, nproc_per_node: int, run_dir: str, backend: str = "auto",
                     init_timeout: float = 120.0, *, nnodes: int = 1, node_rank="0",
                     rdzv_endpoint: str | None = None, kwargs_path: str | None = None,
                     python: str = sys.executable) -> list[str]:
    """The torchrun command line of one node.

    One node (no ``rdzv_endpoint``): ``vl2lab.launch.agent`` (torchrun whose stores listen on loopback only), a
    c10d rendezvous on 127.0.0.1, port 0 (a free one per launch), the ranks' store on 127.0.0.1. Several nodes:
    plain torchrun, rendezvous at ``rdzv_endpoint`` (reachable from every node: it listens on all interfaces).
    """
    if nnodes == 1 and rdzv_endpoint is None:
        cmd = [python, "-m", "vl2lab.launch.agent", "--nnodes", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"{LOOPBACK}:0", "--rdzv-id", _rdzv_id(target, run_dir, 1, nproc_per_node),
               "--local-addr", LOOPBACK]
    else:
        cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
               "--rdzv-id", _rdzv_id(target, rdzv_endpoint, nnodes, nproc_per_node)]
    cmd += ["--nproc-per-node", str(nproc_per_node), "--max-restarts", "0",
            "--monitor-interval", "0.1", "-m", "vl2lab.launch.worker", "--run-dir", run_dir,
            "--target", target, "--backend", backend, "--init-timeout", f"{init_timeout:g}"]
    return cmd + (["--kwargs", kwargs_path] if kwargs_path else [])


def loopback_ifname() -> str | None:
    """The name of the network interface that holds 127.0.0.1 ('lo' on Linux, 'lo0' on macOS), if any."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == LOOPBACK for a in addrs):
            return name
    return "lo" if os.path.exists("/sys/class/net/lo") else None


def _rank_env(nproc: int, run_dir: str, single_node: bool, omp_threads, extra) -> dict:
    env = dict(os.environ)  # keeps NCCL_NVLS_ENABLE, TORCH_SYMM_MEM_DISABLE_MULTICAST, ...
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tmp = os.path.join(run_dir, "tmp")  # torchrun leaves torchelastic_* folders in TMPDIR
    os.makedirs(tmp, exist_ok=True)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TMPDIR=tmp, PYTHONPATH=_pythonpath(),
               OMP_NUM_THREADS=str(omp_threads or max(1, (cpus or 1) // nproc)),
               VL2LAB_LAUNCHER_PID=str(os.getpid()), VL2LAB_RUN_DIR=run_dir,
               VL2LAB_LAUNCHER_CTIME=repr(psutil.Process().create_time()))
    if single_node:  # every socket on loopback (``env=`` can still say otherwise)
        env.update(MASTER_ADDR=LOOPBACK, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")  # 1: rank 0 would listen on ::
        lo = loopback_ifname()
        if lo:
            env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _exit_grace() -> float:
    return float(os.environ.get("VL2LAB_EXIT_GRACE_S", EXIT_GRACE_S))


def _reported(run_dir: str) -> int:
    return sum(n.endswith(".status.json") for n in os.listdir(run_dir))


def _wait(launch: Launch, timeout, stream, progress: Display, expected: int):
    """Exit code of torchrun; None when the wall-clock timeout ran out; ``"stuck"`` when every rank of this node
    has reported but torchrun is still running :data:`EXIT_GRACE_S` (env ``VL2LAB_EXIT_GRACE_S``) later (a process hanging in its teardown,
    e.g. a communicator that does not shut down: the results are in, so the launch is stopped and returned)."""
    tail = LogTail(os.path.join(launch.run_dir, "rank0.log")) if stream else None
    all_in = None
    while True:
        try:
            rc = launch.proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            rc = None
        if tail is not None:
            tail.pump()
        if rc is not None:
            return rc
        now = time.monotonic()
        elapsed = now - launch.t0
        if elapsed > timeout:
            return None
        if all_in is None and _reported(launch.run_dir) >= expected:
            all_in = now
        if all_in is not None and now - all_in > _exit_grace():
            return "stuck"
        progress.update(_reported(launch.run_dir))


# ----------------------------------------------------------------------------------------------- run
def run(fn, world_size: int = 1, backend: str = "auto", timeout: float = 300.0, *,
        stream: bool = False, progress_after: float | None = 15.0, run_dir: str | None = None,
        keep_run_dir: bool | None = None, nnodes: int = 1, node_rank: int = 0,
        rdzv_endpoint: str | None = None, env: dict | None = None, omp_threads: int | None = None,
        **kwargs) -> RankResults:
    """Call ``fn(**kwargs)`` in every rank of a fresh torchrun launch; return the values by rank.

    ``fn``: ``"module:function"`` or a function whose module the ranks can import (not __main__).
    ``world_size``: ranks in total (``world_size // nnodes`` per node). ``backend``: auto|gloo|nccl.
    ``timeout``: wall-clock seconds for the whole launch. ``stream``: copy rank 0's output here.
    ``progress_after``: seconds before a progress line appears on stderr (None: never).
    ``run_dir``: the folder for logs and results (default: a new one under $VL2LAB_RUNS_DIR or
    $TMPDIR/vl2lab-runs). ``keep_run_dir``: keep it after a success too (default: only when ``run_dir`` was
    given or the launch is multi-node); a failed launch's is always kept, and a folder that existed before is
    never removed.
    ``nnodes``/``node_rank``/``rdzv_endpoint``: multi-node (opt-in; its rendezvous listens on every interface);
    run the same call on every node. Without them every socket of the launch is on 127.0.0.1.
    ``env``: extra environment variables for the ranks. ``omp_threads``: OMP_NUM_THREADS per rank.
    ``**kwargs`` go to ``fn`` in every rank as plain data (numbers, strings, lists, dicts, tensors, numpy
    arrays: anything else is refused here, naming it); names that run() itself takes (``timeout``, ``env``,
    ...) cannot be forwarded this way: pass them inside a dict.
    """
    target = target_name(fn)
    check_launch(world_size, nnodes, backend, timeout, rdzv_endpoint)
    payload = kwargs_bytes(kwargs) if kwargs else None  # before any folder or process exists
    multi = nnodes > 1 or rdzv_endpoint is not None
    keep = keep_run_dir if keep_run_dir is not None else (run_dir is not None or multi)
    nproc = world_size // nnodes
    node_tag = f".node{node_rank}" if multi else ""
    run_dir, created = _make_run_dir(run_dir, target, node_tag)
    kwargs_path = None
    if payload is not None:
        kwargs_path = os.path.join(run_dir, f"kwargs{node_tag}.pt")
        with open(kwargs_path, "wb") as f:
            f.write(payload)
    cmd = torchrun_command(target, nproc, run_dir, backend, init_timeout(timeout),
                           nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                           kwargs_path=kwargs_path)
    launch = Launch(cmd, _rank_env(nproc, run_dir, not multi, omp_threads, env), run_dir, node_tag)
    try:
        progress = Display(target, run_dir, nproc, progress_after, PROGRESS_EVERY_S)
        rc = _wait(launch, timeout, stream, progress, nproc)
        progress.close(_reported(run_dir))
    finally:  # also on KeyboardInterrupt: nothing of the launch may outlive this call
        launch.stop()
    wall = time.monotonic() - launch.t0
    records = collect_records(run_dir, world_size, multi, timed_out=rc is None, node_tag=node_tag)
    if rc is None:
        msg = timeout_message(records, timeout, run_dir)
        raise RankTimeoutError(msg, records, run_dir, launch.proc.pid)
    res = RankResults(records, world_size, run_dir, wall, launch.proc.pid)
    if rc != 0 and all(r.status == "ok" for r in records):
        # every rank returned its value; only the processes' exit went wrong (a teardown that hangs or fails)
        how = (f"did not exit within {_exit_grace():.0f} s and was stopped" if rc == "stuck"
               else f"exited with code {rc}")
        print(f"[vl2lab] warning: every rank reported ok, but torchrun {how}; the results are kept "
              f"(logs in {run_dir}, kept)", file=sys.stderr, flush=True)
        return res
    if rc != 0 or any(r.status in ("error", "missing") for r in records):
        msg, first = failure_message(records, rc, run_dir, node_tag)
        raise RankFailedError(msg, records, run_dir, launch.proc.pid, first)
    if created and not keep:
        _remove_run_dir(res)
    return res


def _remove_run_dir(res: RankResults) -> None:
    """Delete a successful launch's run dir (its values are in ``res``); ``res.run_dir`` and log paths → None."""
    shutil.rmtree(res.run_dir, ignore_errors=True)
    res.run_dir = None
    for rec in res.ranks:
        rec.log_path = None
