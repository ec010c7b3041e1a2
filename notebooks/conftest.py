"""nbval hooks: stderr (warnings, progress lines) is never compared; checked cells compare stdout only.

A launch's progress block (``vl2lab.launch.progress``: a display tagged ``vl2lab-progress`` in its metadata, updated
while the ranks run) is dropped from both sides before nbval compares a cell: nbval does not apply display updates,
and whether the block appears at all depends on how fast the machine is.
"""
import nbval.plugin


def pytest_collectstart(collector):
    path = str(getattr(collector, "path", getattr(collector, "fspath", "")))
    if path.endswith(".ipynb") and hasattr(collector, "skip_compare"):
        collector.skip_compare = tuple(collector.skip_compare) + ("stderr",)


def _without_progress(outputs):
    return [o for o in outputs if not (o.get("metadata") or {}).get("vl2lab-progress")]


_compare = nbval.plugin.IPyNbCell.compare_outputs


def _compare_without_progress(self, test, ref, skip_compare=None):
    return _compare(self, _without_progress(test), _without_progress(ref), skip_compare)


nbval.plugin.IPyNbCell.compare_outputs = _compare_without_progress
