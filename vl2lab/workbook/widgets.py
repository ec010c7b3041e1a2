"""Showing an ipywidgets panel from a notebook cell so that the saved output stays stable.

Lesson: notebook 01, section 3 (the planner) and notebook 05, section 9 (the results explorer).

A panel's own output is a widget model id that changes at every run; papermill and nbval would see a different
cell output each time. :func:`show` displays the panel in a live Jupyter kernel with a fixed ``text/plain``
stand-in beside it (what saved notebooks keep) and does nothing elsewhere (plain Python, a headless run without
a kernel): the cell's deterministic printed text above it is then the whole output.
"""
from __future__ import annotations

__all__ = ["show"]


def show(box, label: str):
    """Display ``box`` in a Jupyter kernel, with ``label`` as its saved text form; return ``box``."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return box
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:  # in a Jupyter kernel only
        display({"application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                              "model_id": box.model_id},
                 "text/plain": label}, raw=True)
    return box
