"""Rank functions used by tests/test_launch.py (importable, so fresh rank processes can run them)."""

import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from vl2lab.launch import progress
from vl2lab.parallel import groups as vdist


def noop():
    return None


def rank_info(scale=1.0, tensor=None, array=None, env_names=()):
    """All-reduce the ranks' ids; return what a test needs to see about the rank's environment."""
    t = torch.tensor([float(vdist.rank())], device=vdist.device())
    dist.all_reduce(t)
    vdist.rank_print("hello from rank_info")
    progress.report("checking the environment", 1, 1)
    return {
        "rank": vdist.rank(),
        "world_size": vdist.world_size(),
        "backend": dist.get_backend(),
        "device": str(vdist.device()),
        "rank_sum": t * scale,
        "tensor_twice": None if tensor is None else tensor * 2,
        "array": array,
        "env": {name: os.environ.get(name) for name in env_names},
        "transformers_imported": "transformers" in sys.modules,
    }


def fail_on(bad_rank=1, message="boom"):
    """One rank raises; the others wait in a collective that can never complete."""
    if vdist.rank() == bad_rank:
        print("about to fail", flush=True)
        raise ValueError(f"{message} in rank {bad_rank}")
    vdist.barrier()
    return "unreachable"


def vanish_on(bad_rank=1, code=3):
    """One rank leaves without any Python cleanup (no status file); the others wait."""
    if vdist.rank() == bad_rank:
        time.sleep(0.5)
        os._exit(code)
    vdist.barrier()
    return "unreachable"


def hang():
    """Every rank sleeps forever (a deadlock stand-in)."""
    while True:
        time.sleep(0.5)


def hang_at_exit():
    """Returns its value, then the process cannot exit (a non-daemon thread that never ends), as a rank whose
    communicator teardown hangs."""
    threading.Thread(target=lambda: time.sleep(3600), daemon=False).start()
    return vdist.rank() + 10


def sleep_then_rank(seconds=3.0):
    """Every rank waits a moment (so a test can look at the launch while it runs), then returns its rank."""
    time.sleep(seconds)
    return vdist.rank()


class Planted:
    """Unpickling it runs code: it writes ``marker`` (what a file planted in a run folder could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def return_planted(marker):
    """Returns plain data with a Planted object inside: the launcher must never unpickle it."""
    return {"rank": vdist.rank(), "x": [1, Planted(marker)]}


def torch_version():
    """A value holding a str subclass (torch.__version__ is a TorchVersion): it comes back as a plain str."""
    return {"torch": torch.__version__}


if __name__ == "__main__":  # python -m launch_targets serve SECONDS: a plain torchrun program (no vl2lab worker)
    dist.init_process_group("gloo")
    time.sleep(float(sys.argv[2]))
    t = torch.ones(1)
    dist.all_reduce(t)
    print(f"rank {dist.get_rank()} of {int(t.item())} done", flush=True)
    dist.destroy_process_group()
