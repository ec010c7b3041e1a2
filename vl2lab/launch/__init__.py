"""Launching: ``vl2lab.launch.run(fn, world_size=N)`` (also ``vl2lab.run``) starts N ranks under torchrun and brings
their return values back. ``launcher`` is ``run`` itself (arguments, run dir, the torchrun command and environment,
the wait); ``processes`` starts, finds and stops the processes of a launch (so none outlives it); ``worker`` is each
rank's side; ``results`` the per-rank records and errors; ``magic`` the ``%%torchrun`` cell magic
(``%load_ext vl2lab``); ``options`` the option types the package's command lines share; ``__main__`` the command
line, ``python -m vl2lab.launch MODULE:FUNCTION [-n N]``.

Lesson: notebook 00 (starting ranks, a failing rank, what a launch costs).
"""
from vl2lab.launch.launcher import run, torchrun_command
from vl2lab.launch.results import RankFailedError, RankResults, RankTimeoutError

__all__ = ["run", "torchrun_command", "RankResults", "RankFailedError", "RankTimeoutError"]
