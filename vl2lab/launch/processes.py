"""The processes of a launch: start torchrun in its own session, find what is still alive, stop all of it.

A launch is one torchrun agent (started by :class:`Launch`, in a new session) and the ranks it starts (each in
its own session too). Each records its PID *and* start time in the run dir (``launch{tag}.json``,
``rank{r}.pid.json``), so a PID the system has reused for another process is never mistaken for one of them.

Stopping is the same for every way a launch can end (an error, the timeout, Ctrl-C, the interpreter's exit):
SIGTERM to the agent and every rank with their process groups, a grace period, then SIGKILL to whatever is left
(:meth:`Launch.stop`). :func:`survivors` lists what is still alive afterwards; none should be.

Lesson: notebook 00, sections 4 ("When a rank fails") and "When ranks hang instead".
"""

from __future__ import annotations

import atexit
import codecs
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from vl2lab.launch.results import GRACE_S, read_json

__all__ = ["Launch", "LogTail", "find_process", "kill", "recorded_pids", "signal_processes", "stop_all",
           "survivors", "wait_gone"]

_ACTIVE: set = set()  # launches still running, stopped at exit


def find_process(pid: int, create_time: float | None):
    """psutil.Process if that PID is still the same, un-reaped-or-running process, else None.

    create_time: the start time recorded for it (None: any process with that PID).
    """
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.05:
            return None
        return None if p.status() == psutil.STATUS_ZOMBIE else p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def recorded_pids(run_dir: str, agent_pid: int | None = None) -> list[dict]:
    """PIDs (with start times) that a launch recorded on this host: torchrun agents and ranks.

    agent_pid: only that agent and its ranks (a run dir can be shared by several nodes).
    """
    out = []
    for name in sorted(os.listdir(run_dir)):
        info = read_json(os.path.join(run_dir, name)) if name.endswith(".json") else None
        if not info or info.get("host", socket.gethostname()) != socket.gethostname():
            continue
        if name.startswith("launch"):
            pid, ctime, agent = info["agent_pid"], info["agent_ctime"], info["agent_pid"]
        elif name.endswith(".pid.json"):
            pid, ctime, agent = info["pid"], info["create_time"], info.get("agent_pid")
        else:
            continue
        if agent_pid is None or agent == agent_pid:
            out.append({"file": name, "pid": pid, "create_time": ctime})
    return out


def survivors(run_dir: str) -> list:
    """Recorded processes of a launch that are still alive (zombies count as gone)."""
    procs = [find_process(d["pid"], d["create_time"]) for d in recorded_pids(run_dir)]
    return [p for p in procs if p is not None]


def kill(pid: int, sig: int) -> None:
    """Signal a process; a group leader (torchrun starts each rank in its own session) with its group."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_processes(procs, sig) -> None:
    """Signal psutil processes, a session leader with its whole group (never the caller's own group)."""
    mine = os.getpgrp()
    for p in procs:
        try:
            if not p.is_running():  # psutil compares start times: a reused PID is not ours
                continue
            if os.getpgid(p.pid) == p.pid != mine:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass


def wait_gone(procs, timeout: float) -> list:
    """Wait up to timeout seconds for the processes to end; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if find_process(p.pid, None) is not None]
    return alive


class Launch:
    """One running torchrun: its Popen, run dir and the PIDs it has reported so far.

    The agent's output goes to ``torchrun{node_tag}.log``; ``launch{node_tag}.json`` records its PID.
    """

    def __init__(self, cmd: list, env: dict, run_dir: str, node_tag: str = ""):
        self.run_dir, self.t0 = run_dir, time.monotonic()
        self.log = open(os.path.join(run_dir, f"torchrun{node_tag}.log"), "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self.agent_ctime = psutil.Process(self.proc.pid).create_time()
        except psutil.NoSuchProcess:
            self.agent_ctime = None
        with open(os.path.join(run_dir, f"launch{node_tag}.json"), "w") as f:
            json.dump({"agent_pid": self.proc.pid, "agent_ctime": self.agent_ctime,
                       "launcher_pid": os.getpid(), "host": socket.gethostname(),
                       "command": cmd}, f, indent=1)
        _ACTIVE.add(self)

    def processes(self) -> list:
        """The agent, its descendants and every rank it recorded, that are still alive."""
        found = {}
        agent = find_process(self.proc.pid, self.agent_ctime)
        if agent is not None:
            found[agent.pid] = agent
            try:
                found.update((c.pid, c) for c in agent.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        for d in recorded_pids(self.run_dir, self.proc.pid):
            p = find_process(d["pid"], d["create_time"])
            if p is not None:
                found[p.pid] = p
        return [p for p in found.values() if find_process(p.pid, None) is not None]

    def stop(self, grace: float = GRACE_S) -> None:
        """SIGTERM the agent and every rank (with their process groups), then SIGKILL survivors."""
        procs = self.processes()
        if procs:
            signal_processes(procs, signal.SIGTERM)
            if wait_gone(procs, grace):
                signal_processes(self.processes() + procs, signal.SIGKILL)
                wait_gone(procs, 5.0)
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        _ACTIVE.discard(self)


@atexit.register
def stop_all() -> None:
    """Stop every launch still running (registered with atexit: the interpreter's exit ends them)."""
    for launch in list(_ACTIVE):
        launch.stop(grace=2.0)


class LogTail:
    """Copies new text of a growing log file to sys.stdout (``run(..., stream=True)``)."""

    def __init__(self, path: str):
        self.path, self.pos = path, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        self.pos += len(data)
        text = self.decoder.decode(data)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
