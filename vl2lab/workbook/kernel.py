"""Is this code running in a Jupyter kernel? (Widgets and live displays only make sense there.)

Lesson: notebook 01, section "5. Will it fit? The planner" (the panel shows where a kernel can run it).
"""
from __future__ import annotations

import sys

__all__ = ["in_kernel"]


def in_kernel() -> bool:
    """True in a Jupyter kernel (JupyterLab, papermill, nbval); False in plain Python and IPython terminals.

    IPython is looked up only if something already imported it: a script never pays for the import."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
