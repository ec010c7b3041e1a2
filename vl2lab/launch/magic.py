"""``%%torchrun``: run a notebook cell's code on N ranks, pull variables back as per-rank lists.

    %load_ext vl2lab.launch.magic

    %%torchrun -n 4 --backend gloo --timeout 120 --pull a,b --push x
    a = torch.tensor([rank]) * x
    b = world_size

Afterwards ``a`` and ``b`` in the notebook are lists indexed by rank (like ipyparallel's pull), and
the cell prints the per-rank summary. The cell's source travels as text (nothing is pickled from
``__main__``); each rank execs it in a namespace holding ``rank``, ``world_size``, ``local_rank``,
``torch``, ``dist`` (torch.distributed), ``device`` and the pushed variables (sent with torch.save, as plain data:
numbers, strings, lists, dicts, tensors, numpy arrays; a variable that cannot travel is refused, naming it).
A failing rank raises the same ``RankFailedError`` as ``vl2lab.run`` (``vl2lab.launch.run``).

Lesson: notebook 00, section "3. The same, as a cell: `%%torchrun`".
"""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from vl2lab.launch.launcher import run
from vl2lab.launch.payload import kwargs_bytes

__all__ = ["TorchrunMagics", "load_ipython_extension"]


def _names(text: str) -> list:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not variable names: {bad}; write e.g. --pull a,b")
    return names


@magics_class
class TorchrunMagics(Magics):
    @cell_magic
    @magic_arguments()
    @argument("-n", "--nproc", type=int, default=1, help="number of ranks (world size)")
    @argument("--backend", default="auto", help="auto (NCCL if one GPU per rank, else gloo), gloo, nccl")
    @argument("--timeout", type=float, default=300.0, help="wall-clock seconds for the launch")
    @argument("--pull", default="", help="comma-separated names to bring back, as lists by rank")
    @argument("--push", default="", help="comma-separated notebook variables sent to every rank")
    @argument("--stream", action="store_true", help="show rank 0's output while it runs")
    @argument("-o", "--out", default=None, help="also store the RankResults in this variable")
    def torchrun(self, line, cell):
        """Run this cell's code on N ranks (a fresh torchrun), pull variables back by rank."""
        args = parse_argstring(self.torchrun, line)
        ns = self.shell.user_ns
        push_names, pull = _names(args.push), _names(args.pull)
        missing = [n for n in push_names if n not in ns]
        if missing:
            raise UsageError(f"--push names {missing}, which are not defined in the notebook")
        try:  # name the variable that cannot travel (run() would name only "push")
            kwargs_bytes({n: ns[n] for n in push_names}, label="--push variable")
        except ValueError as e:
            raise UsageError(str(e)) from None
        res = run("vl2lab.launch.worker:run_source", world_size=args.nproc, backend=args.backend,
                  timeout=args.timeout, stream=args.stream, source=cell,
                  push={n: ns[n] for n in push_names}, pull=tuple(pull))
        for name in pull:
            ns[name] = [value[name] for value in res.values]
        if args.out:
            ns[args.out] = res
        print(res.summary())


def load_ipython_extension(ipython) -> None:
    """``%load_ext vl2lab.launch.magic``."""
    ipython.register_magics(TorchrunMagics)
