"""Launching: ``launcher.run(fn, world_size=N)`` starts N ranks under torchrun and brings their return values
back (``vl2lab.run``); ``worker`` is each rank's side, ``results`` the per-rank records and errors, ``magic`` the
``%%torchrun`` cell magic (``%load_ext vl2lab``), ``python -m vl2lab.launch`` the command line.

Lesson: notebook 00 (starting ranks, a failing rank, what a launch costs).
"""
from vl2lab.launch.launcher import run, torchrun_command
from vl2lab.launch.results import RankFailedError, RankResults, RankTimeoutError

__all__ = ["run", "torchrun_command", "RankResults", "RankFailedError", "RankTimeoutError"]
