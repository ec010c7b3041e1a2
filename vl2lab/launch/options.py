"""Option types shared by the package's command lines (``vl2lab plan``, ``python -m vl2lab.serve.generate``,
``python -m vl2lab.train.micro``, the benchmark and the ladder).

Lesson: notebook 00 (a command line answers a mistake with one line, before anything starts).

An argparse ``type`` that refuses a value turns into ``prog: error: argument --opt: <message>`` and exit status 2,
before any rank or stage runs; the message says what the option needs and what it got.
"""
from __future__ import annotations

import argparse

__all__ = ["at_least"]


def at_least(low: int):
    """An argparse type: a whole number ≥ ``low``, else ``must be an integer >= low, got 'text'``."""
    def whole_number(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return n
    whole_number.__name__ = f"integer >= {low}"        # what argparse names in its own messages
    return whole_number
