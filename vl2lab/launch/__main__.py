"""The command line: ``python -m vl2lab.launch MODULE:FUNCTION [-n N] [--print-command] ...``.

Runs ``MODULE:FUNCTION`` on N ranks with :func:`vl2lab.launch.launcher.run` and prints the per-rank summary, or,
with ``--print-command``, prints the torchrun line to run on each node of a multi-node launch instead::

    python -m vl2lab.launch vl2lab.lessons.smoke:hello -n 2 --backend gloo
    python -m vl2lab.launch vl2lab.lessons.smoke:hello -n 4 --nnodes 2 --rdzv-endpoint HEAD:29500 --print-command

Exit codes: 0 success, 1 a rank failed or the launch timed out (the error report on stderr; the run dir is kept)
or the run dir could not be made (one line), 2 bad arguments (one line on stderr: a target that is not
``module:function`` or cannot be imported, a world size that does not split over the nodes, ...), 130 interrupted.
No error prints a traceback of this process.

Lesson: notebook 04, section 8 ("Beyond one machine").
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from vl2lab.launch.launcher import (BACKENDS, check_launch, init_timeout, loopback_ifname, run, target_name,
                                    torchrun_command)
from vl2lab.launch.results import RankFailedError

__all__ = ["main", "parser", "print_command"]

PROG = "python -m vl2lab.launch"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run MODULE:FUNCTION on N ranks (torchrun) and print "
                                                       "the per-rank summary, or print the command per node.")
    p.add_argument("target", metavar="MODULE:FUNCTION",
                   help="the function every rank calls, e.g. vl2lab.lessons.smoke:hello (required)")
    p.add_argument("-n", "--nproc-per-node", type=int, default=1, metavar="N",
                   help="ranks per node (default: %(default)s)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (default: %(default)s)")
    p.add_argument("--node-rank", type=int, default=0,
                   help="this node's index, 0..NNODES-1 (default: %(default)s)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="rendezvous address reachable from every node (it listens on every interface); needed "
                        "with --nnodes > 1 (default: none: a single-node launch listening on 127.0.0.1 only)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: NCCL when every local rank has its own GPU, else gloo (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="wall-clock seconds for the whole launch (default: %(default)g)")
    p.add_argument("--run-dir", default=None,
                   help="folder for the ranks' logs and status files; must not hold a launch yet (default: a "
                        "new folder under $VL2LAB_RUNS_DIR, or $TMPDIR/vl2lab-runs; with --print-command: "
                        "vl2lab-runs/MODULE-FUNCTION)")
    p.add_argument("--keep-run-dir", action="store_true",
                   help="keep the run dir after a success too (default: off: removed, unless --run-dir was given; "
                        "a failed launch's is always kept)")
    p.add_argument("--stream", action="store_true", help="show rank 0's output live (default: off)")
    p.add_argument("--print-command", action="store_true",
                   help="print the torchrun command to run on each node instead of running (default: off)")
    return p


def print_command(a: argparse.Namespace) -> None:
    """The torchrun line of every node (``$NODE_RANK`` left for the node to fill in)."""
    target = target_name(a.target)
    multi = a.nnodes > 1 or a.rdzv_endpoint is not None
    run_dir = a.run_dir or os.path.join("vl2lab-runs", target.replace(":", "-"))
    cmd = torchrun_command(target, a.nproc_per_node, run_dir, a.backend, init_timeout(a.timeout),
                           nnodes=a.nnodes, node_rank="NODE_RANK", rdzv_endpoint=a.rdzv_endpoint,
                           python="python")
    line = " ".join("$NODE_RANK" if c == "NODE_RANK" else shlex.quote(c) for c in cmd)
    if multi:
        print(f"# on each of the {a.nnodes} nodes, with NODE_RANK set to 0..{a.nnodes - 1}:")
        print("PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 " + line)
    else:  # the ranks' sockets on loopback too, as vl2lab.run does
        lo = loopback_ifname() or "lo"
        print(f"PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GLOO_SOCKET_IFNAME={lo} NCCL_SOCKET_IFNAME={lo} " + line)


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """The command line; returns the exit code (argparse itself exits with 2 on an unknown option)."""
    a = parser().parse_args(argv)
    try:
        check_launch(a.nproc_per_node * a.nnodes, a.nnodes, a.backend, a.timeout, a.rdzv_endpoint)
        if a.print_command:
            print_command(a)
            return 0
        res = run(a.target, a.nproc_per_node * a.nnodes, a.backend, a.timeout, stream=a.stream,
                  run_dir=a.run_dir, keep_run_dir=True if a.keep_run_dir else None, nnodes=a.nnodes,
                  node_rank=a.node_rank, rdzv_endpoint=a.rdzv_endpoint)
    except (ValueError, TypeError) as e:  # bad arguments, found before anything started
        return _error(e, 2)
    except OSError as e:  # e.g. a run dir that cannot be made
        return _error(f"{type(e).__name__}: {e}", 1)
    except RankFailedError as e:  # RankTimeoutError too: the full report, no traceback of this process
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _error("interrupted; every process of the launch was stopped", 130)
    print(res.summary())
    print(f"run dir: {res.run_dir}" if res.run_dir else "run dir: removed after the launch succeeded "
          "(--keep-run-dir keeps it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
