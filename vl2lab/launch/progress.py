"""What each rank is doing, shown while a launch runs: a bar per rank in a notebook, a line in a terminal.

Rank side: a rank function calls :func:`report` at the start of each stage and as it goes::

    from vl2lab.launch import progress
    progress.report("loading weights")
    for n in range(steps):
        ...
        progress.report("training step", n + 1, steps)

Each call (at most a few per second reach the disk) rewrites ``rank{r}.progress.json`` in the launch's run folder
(atomically: temp file, then rename). Outside a launch it does nothing, so the same function runs in a plain
process too.

Launcher side: :class:`Display` reads those files while it waits. In a notebook it shows one updating text block
(``IPython.display`` with a ``display_id``): per rank, the stage, a bar of done/total and an estimate of the time
left from the rate so far. In a terminal it prints a line to stderr every few seconds. When the launch ends the
block is replaced by one line naming how many ranks finished; nbval does not compare this output
(``notebooks/conftest.py`` drops outputs tagged ``vl2lab-progress``), as it never compares stderr.

Lesson: notebook 00, section "Ranks report in" (what the ranks are doing while you wait).
"""
from __future__ import annotations

import html
import json
import os
import sys
import time

from vl2lab.workbook.kernel import in_kernel

__all__ = ["report", "read", "bar", "describe", "Display"]

_ENV = "VL2LAB_RUN_DIR"
_MIN_INTERVAL_S = 0.25
_last = {"t": 0.0, "stage": None}


def report(stage: str, done: int | None = None, total: int | None = None) -> None:
    """Say what this rank is doing: a stage name, and how far through it (``done`` of ``total``) when it counts."""
    run_dir = os.environ.get(_ENV)
    if not run_dir:
        return
    now = time.time()
    finished = done is not None and total is not None and done >= total
    if stage == _last["stage"] and not finished and now - _last["t"] < _MIN_INTERVAL_S:
        return
    if stage != _last["stage"]:
        _last["stage_t0"] = now
    _last.update(t=now, stage=stage)
    rank = int(os.environ.get("RANK", 0))
    rec = {"rank": rank, "stage": stage, "done": done, "total": total, "time": now,
           "stage_start": _last.get("stage_t0", now)}
    path = os.path.join(run_dir, f"rank{rank}.progress.json")
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, path)
    except OSError:  # progress is a courtesy: never fail a rank over it
        pass


def read(run_dir: str) -> dict[int, dict]:
    """The latest progress record of every rank that wrote one: {rank: record}."""
    out = {}
    try:
        names = os.listdir(run_dir)
    except OSError:
        return out
    for name in names:
        if name.endswith(".progress.json"):
            try:
                with open(os.path.join(run_dir, name)) as f:
                    rec = json.load(f)
                out[int(rec["rank"])] = rec
            except (OSError, ValueError, KeyError):
                continue  # being replaced right now: read it next time
    return out


def bar(done: int, total: int, width: int = 20) -> str:
    """``██████░░░░░░ 12/40`` — a text bar that renders the same in a terminal and in a notebook."""
    fill = 0 if total <= 0 else round(width * min(done, total) / total)
    return "█" * fill + "░" * (width - fill) + f" {done}/{total}"


def describe(rec: dict | None, now: float) -> str:
    """One rank's line: its stage, its bar, and the time left at the rate of the stage so far."""
    if rec is None:
        return "starting (interpreter, torch, process group)"
    line = rec["stage"]
    done, total = rec.get("done"), rec.get("total")
    if done is not None and total:
        line += "  " + bar(done, total)
        spent = rec["time"] - rec.get("stage_start", rec["time"])
        if 0 < done < total and spent > 0:
            line += f"  about {spent / done * (total - done):.0f} s left"
    return line


class Display:
    """The launcher's view of its ranks' progress (a notebook block, or stderr lines every ``every_s`` seconds)."""

    def __init__(self, target: str, run_dir: str, world_size: int, after_s: float | None, every_s: float = 10.0):
        self.target, self.run_dir, self.world_size = target, run_dir, world_size
        self.after_s, self.every_s = after_s, every_s
        self.notebook = in_kernel()
        self.handle = None
        self.next_line = after_s
        self.t0 = time.monotonic()

    def _text(self, finished: int) -> str:
        recs, now = read(self.run_dir), time.time()
        head = f"[vl2lab] {self.target}: {time.monotonic() - self.t0:.0f} s, {finished}/{self.world_size} ranks finished"
        return "\n".join([head] + [f"  rank {r}: {describe(recs.get(r), now)}" for r in range(self.world_size)])

    def _show(self, text: str) -> None:
        from IPython.display import display

        bundle = {"text/plain": text, "text/html": f"<pre>{html.escape(text)}</pre>"}
        meta = {"vl2lab-progress": True}
        if self.handle is None:
            self.handle = display(bundle, raw=True, metadata=meta, display_id=True)
        else:
            self.handle.update(bundle, raw=True, metadata=meta)

    def update(self, finished: int) -> None:
        """Called about four times a second while the launch runs."""
        elapsed = time.monotonic() - self.t0
        if self.after_s is None or elapsed < self.after_s:
            return
        if self.notebook:
            self._show(self._text(finished))
        elif elapsed >= self.next_line:
            print(self._text(finished), file=sys.stderr, flush=True)
            self.next_line = elapsed + self.every_s

    def close(self, finished: int) -> None:
        """The launch ended: the notebook block becomes one line (nothing is printed in a terminal)."""
        if self.handle is not None:
            self._show(f"[vl2lab] {self.target}: {finished}/{self.world_size} ranks finished "
                       f"in {time.monotonic() - self.t0:.0f} s")
