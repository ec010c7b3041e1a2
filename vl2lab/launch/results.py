"""What a launch brings back: one record per rank, the results by rank, and the one error that names the first
failing rank (what it raised, its traceback and log tail, what the others were doing).

Each rank reports through files in the launch's run dir: ``rank{r}.status.json`` (status, timings, peak memory,
pid; an error's type, message and traceback), ``rank{r}.result.pt`` (its return value), ``rank{r}.log``.
:func:`collect_records` reads them after the launch; a rank without a status file vanished (killed, out of
memory, ``os._exit``) or never finished (the timeout). A result file is read as plain data only
(``vl2lab.launch.payload``: ``torch.load(weights_only=True)``): one that names any other class or function is
refused, as that rank's error, and nothing in it runs.

Lesson: notebook 00, sections 2 ("Ranks report in") and 4 ("When a rank fails").
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any

from vl2lab.launch.payload import loads, refusal

__all__ = ["RankRecord", "RankResults", "RankFailedError", "RankTimeoutError", "collect_records",
           "failure_message", "timeout_message", "read_json", "GRACE_S"]

GRACE_S = 5.0  # between SIGTERM and SIGKILL when a launch is stopped


@dataclass
class RankRecord:
    """What one rank reported, or what is known about it when it did not report."""

    rank: int
    status: str = "missing"  # "ok" | "error" | "missing" | "remote" (on another node)
    value: Any = field(default=None, repr=False)
    duration_s: float | None = None  # fn(**kwargs) itself, with moving the result to the CPU
    startup_s: float | None = None  # rank start → fn start: interpreter, imports, process group
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None  # None on CPU
    pid: int | None = None
    log_path: str | None = None
    backend: str | None = None
    device: str | None = None
    exc_type: str | None = None
    message: str | None = None
    traceback: str | None = field(default=None, repr=False)
    start_time: float | None = None
    end_time: float | None = None
    exitcode: int | None = None  # from torchrun's failure summary, when it printed one
    log_bytes: int | None = None  # size of the log when the rank wrote its status
    state: str = ""  # one line: what the rank was doing


class _Text(str):
    """A string shown as itself (no quotes) when it ends a notebook cell."""

    def __repr__(self):
        return str(self)

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))


def _table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])


class RankResults:
    """Return values of a launch indexed by global rank (``res[0]``), plus one RankRecord per rank.

    ``run_dir``: the launch's folder, or None once it was removed (a successful launch without keep_run_dir)."""

    def __init__(self, ranks: list, world_size: int, run_dir: str | None, wall_s: float, agent_pid=None):
        self.ranks, self.world_size, self.run_dir = ranks, world_size, run_dir
        self.wall_s, self.agent_pid = wall_s, agent_pid
        used = sorted({r.backend for r in ranks if r.backend})
        self.backend = "/".join(used) or None

    @property
    def values(self) -> list:
        return [r.value for r in self.ranks]

    @property
    def pids(self) -> list:
        return [r.pid for r in self.ranks]

    def __getitem__(self, rank):
        return self.values[rank]

    def __len__(self) -> int:
        return len(self.ranks)

    def __iter__(self):
        return iter(self.values)

    def summary(self) -> _Text:
        """Deterministic table (no times, PIDs or paths), safe for nbval-checked cells."""
        rows = [(r.rank, r.status, r.backend or "-", r.device or "-") for r in self.ranks]
        return _Text(f"RankResults: world_size={self.world_size}, backend={self.backend}\n"
                     + _table(("rank", "status", "backend", "device"), rows))

    def timings(self) -> _Text:
        """Durations of fn in each rank and peak memory; varies run to run."""
        def mib(b):
            return "-" if b is None else f"{b / 2**20:.1f}"

        def sec(s):
            return "-" if s is None else f"{s:.3f}"

        rows = [(r.rank, sec(r.startup_s), sec(r.duration_s), mib(r.peak_rss_bytes),
                 mib(r.peak_cuda_bytes), r.pid or "-") for r in self.ranks]
        head = ("rank", "startup_s", "duration_s", "peak_rss_MiB", "peak_cuda_MiB", "pid")
        where = (f"run dir {self.run_dir}" if self.run_dir else
                 "run dir removed after the launch succeeded (keep_run_dir=True keeps it)")
        return _Text(_table(head, rows) + f"\nlaunch wall time {self.wall_s:.1f} s (torchrun, "
                     f"imports, init and fn); {where}")

    def __repr__(self) -> str:
        return str(self.summary())

    def _repr_pretty_(self, p, cycle):
        p.text(str(self.summary()))


class RankFailedError(RuntimeError):
    """A rank raised or vanished, or torchrun failed. ``.ranks``: every rank's RankRecord."""

    def __init__(self, message, ranks, run_dir, agent_pid=None, first_rank=None):
        super().__init__(message)
        self.ranks, self.run_dir, self.agent_pid, self.first_rank = ranks, run_dir, agent_pid, first_rank


class RankTimeoutError(RankFailedError):
    """The wall-clock timeout ran out; ``.never_reported`` lists the ranks that did not finish."""

    @property
    def never_reported(self) -> list:
        return [r.rank for r in self.ranks if r.status == "missing"]


def read_json(path: str):
    """The JSON object in a file; None if it is missing or half-written."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _tail(path, n: int = 20, upto: int | None = None) -> str:
    """Last n lines of a log; upto: only its first bytes (what a rank wrote before it failed)."""
    try:
        with open(path, "rb") as f:
            lines = f.read(upto if upto is not None else -1).decode(errors="replace").splitlines()[-n:]
    except (FileNotFoundError, TypeError):
        return "  (no log)"
    return "\n".join("  " + line for line in lines) or "  (empty log)"


def _torchrun_summary(path: str):
    """(exit code by global rank, root-cause rank) from torchrun's failure summary, if any."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return {}, None
    pat = r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
    codes = {int(r): int(c) for r, c in re.findall(pat, text)}
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", text, re.S)
    return codes, (int(root.group(1)) if root else None)


def _state(rec: RankRecord, timed_out: bool) -> str:
    if rec.status == "ok":
        return "ok"
    if rec.status == "error":
        first_line = ((rec.message or "").strip().splitlines() or [""])[0]
        return f"error: {rec.exc_type}: {first_line[:200]}"
    if rec.status == "remote":
        return "on another node (its files are in that node's run dir)"
    if rec.pid is None:
        return "never reported (it did not start)"
    if timed_out:
        return "never reported (still running at the timeout; stopped)"
    ec = rec.exitcode
    if ec is None:
        return "never reported (terminated before it finished)"
    if ec == -signal.SIGTERM:
        return "terminated by torchrun (SIGTERM) before it finished"
    if ec < 0:
        try:
            return f"vanished: killed by {signal.Signals(-ec).name}"
        except ValueError:
            return f"vanished: killed by signal {-ec}"
    return f"vanished without reporting (exit code {ec})"


def collect_records(run_dir: str, world_size: int, multi: bool, timed_out: bool,
                    node_tag: str = "") -> list:
    """One RankRecord per global rank, from the files the ranks and torchrun left in run_dir."""
    codes, _ = _torchrun_summary(os.path.join(run_dir, f"torchrun{node_tag}.log"))
    records = []
    for r in range(world_size):
        path = os.path.join(run_dir, f"rank{r}")
        rec = RankRecord(rank=r, exitcode=codes.get(r),
                         log_path=path + ".log" if os.path.exists(path + ".log") else None)
        rec.pid = (read_json(path + ".pid.json") or {}).get("pid")
        st = read_json(path + ".status.json") or {}
        for key in ("status", "duration_s", "startup_s", "peak_rss_bytes", "peak_cuda_bytes",
                    "backend", "device", "exc_type", "message", "traceback", "start_time",
                    "end_time", "pid", "log_bytes"):
            if key in st:
                setattr(rec, key, st[key])
        if rec.status == "ok":
            try:
                # map_location: a CUDA tensor hidden in an odd container must not wake CUDA here
                rec.value = loads(path + ".result.pt", map_location="cpu")
            except Exception as e:  # noqa: BLE001 — not plain data (a planted or foreign file), or no file at all
                rec.status, rec.exc_type, rec.traceback = "error", type(e).__name__, ""
                rec.message = (f"rank {r}'s result file {path}.result.pt was not loaded: "
                               f"{refusal(path + '.result.pt', e)}")
                rec.end_time = float("inf")
        elif rec.status == "missing" and multi and rec.pid is None:
            rec.status = "remote"
        rec.state = _state(rec, timed_out)
        records.append(rec)
    return records


_PEER_GONE = re.compile(r"(closed|reset) by peer|broken pipe|socket closed|connection refused|"
                        r"remote process exited|communicator was aborted|peer.*(crash|exit)", re.I)


def _after_peer(rec: RankRecord) -> bool:
    """An error that only says another rank went away (a consequence, not the cause)."""
    return rec.exc_type in ("DistNetworkError", "DistBackendError") or bool(
        _PEER_GONE.search(rec.message or ""))


def failure_message(records: list, rc, run_dir: str, node_tag: str = ""):
    """(message, first failing rank).

    Order of blame: the earliest error that is not a "peer went away" error; then a rank that
    vanished (no status file, exit code other than torchrun's SIGTERM); then the earliest
    "peer went away" error; then any rank that never reported.
    """
    by_time = sorted((r for r in records if r.status == "error"), key=lambda r: r.end_time or 0.0)
    missing = [r for r in records if r.status == "missing"]
    _, root = _torchrun_summary(os.path.join(run_dir, f"torchrun{node_tag}.log"))
    vanished = sorted((r for r in missing if r.exitcode not in (None, -signal.SIGTERM)),
                      key=lambda r: r.rank != root)
    started = [r for r in missing if r.pid is not None]
    first = ([r for r in by_time if not _after_peer(r)] + vanished + by_time + started + missing
             + [None])[0]
    for r in by_time:
        if r is not first and _after_peer(r):
            r.state = "error after a peer went away: " + r.state[len("error: "):]
    n = len(records)
    agent_log = os.path.join(run_dir, f"torchrun{node_tag}.log")
    if first is None:
        lines = [f"torchrun exited with code {rc}, although every rank reported ok.",
                 "", f"Last lines of {agent_log}:", _tail(agent_log)]
    else:
        if first.status == "error":
            lines = [f"rank {first.rank} of {n} failed first: {first.exc_type}: {first.message}",
                     "", f"Traceback (rank {first.rank}):", (first.traceback or "").rstrip()]
        else:
            lines = [f"rank {first.rank} of {n} {first.state}: the process ended without writing "
                     "its status file (os._exit, a crash or the out-of-memory killer?)."]
        lines += ["", f"Last lines of rank {first.rank}'s log ({first.log_path}), before it failed:",
                  _tail(first.log_path, upto=first.log_bytes)]
        if first.pid is None and first.log_path is None:
            lines += ["", f"Last lines of {agent_log}:", _tail(agent_log)]
    others = [r for r in records if r is not first]
    if others:
        lines += ["", "Other ranks:"] + [f"  rank {r.rank}: {r.state}" for r in others]
    lines += ["", f"torchrun exit code {rc}; logs and status files in {run_dir}"]
    return "\n".join(lines), (first.rank if first is not None else None)


def timeout_message(records: list, timeout: float, run_dir: str) -> str:
    never = [r for r in records if r.status == "missing"]
    lines = [f"the launch did not finish within timeout={timeout:g} s; rank(s) "
             f"{', '.join(str(r.rank) for r in never) or '-'} never reported.",
             f"Every process of the launch was stopped (SIGTERM, then SIGKILL after {GRACE_S:g} s).",
             "A rank waiting in a collective for a peer that never joins it waits until this "
             "timeout; pass a larger timeout= for long jobs.", "", "Ranks:"]
    lines += [f"  rank {r.rank}: {r.state}" for r in records]
    if never:
        lines += ["", f"Last lines of rank {never[0].rank}'s log ({never[0].log_path}):",
                  _tail(never[0].log_path)]
    lines += ["", f"logs and status files in {run_dir}"]
    return "\n".join(lines)
