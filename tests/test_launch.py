"""vl2lab.launch: values by rank, one clear error per failure, no process left behind, and safe by default
(loopback-only sockets, plain data only between the launcher and the ranks, private run folders removed after
a success and kept after a failure).

Each torchrun launch costs seconds of imports on a small CI machine, so this file keeps to thirteen
launches (gloo, world sizes 1 and 2). Every test that launches checks with psutil that no recorded
process (torchrun agent, every rank) is still alive afterwards.
"""

import importlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import launch_targets as T  # noqa: E402

from vl2lab.launch import launcher as launch  # noqa: E402
from vl2lab.launch.__main__ import main, parser  # noqa: E402
from vl2lab.launch.processes import survivors  # noqa: E402
from vl2lab.launch.results import RankFailedError, RankTimeoutError, collect_records  # noqa: E402
from vl2lab.launch.worker import read_kwargs  # noqa: E402

LONG = 240.0  # launch timeout for tests that should succeed (a loaded 2-core machine is slow)


def _recorded(run_dir) -> list:
    """(pid, create_time) of the torchrun agent and every rank that started, from the run dir."""
    out = []
    for f in Path(run_dir).iterdir():
        if f.name.startswith("launch") and f.suffix == ".json":
            d = json.loads(f.read_text())
            out.append((d["agent_pid"], d["agent_ctime"]))
        elif f.name.endswith(".pid.json"):
            d = json.loads(f.read_text())
            out.append((d["pid"], d["create_time"]))
    return out


def _alive(pid, ctime) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - ctime) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_all_gone(run_dir, n_ranks, within=15.0):
    procs = _recorded(run_dir)
    assert len(procs) == 1 + n_ranks, f"expected the agent and {n_ranks} ranks, recorded {procs}"
    deadline = time.monotonic() + within
    while any(_alive(*p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in procs if _alive(*p)], "processes of the launch survived"
    assert survivors(str(run_dir)) == []


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _assert_pids_gone(res, within=15.0):
    """The ranks of a launch whose run dir was removed (so only ``res`` knows them) are gone, and its agent."""
    ranks = [(r.pid, r.start_time) for r in res.ranks]
    deadline = time.monotonic() + within
    while any(_alive(*p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in ranks if _alive(*p)], "ranks of the launch survived"
    try:
        agent = psutil.Process(res.agent_pid)
        assert agent.status() == psutil.STATUS_ZOMBIE or agent.create_time() > ranks[0][1], "the agent survived"
    except psutil.NoSuchProcess:
        pass


def _wait_for_ranks(run_dir, n, within=180.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if len(list(Path(run_dir).glob("rank*.pid.json"))) == n and list(Path(run_dir).glob("launch*.json")):
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------------------------ success paths
def test_two_ranks_give_values_by_rank(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VL2LAB_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # must reach the ranks untouched
    names = ("OMP_NUM_THREADS", "TMPDIR", "PYTHONPATH", "GLOO_SOCKET_IFNAME", "HF_HUB_OFFLINE",
             "PYTHONUNBUFFERED", "NCCL_NVLS_ENABLE", "NCCL_SOCKET_IFNAME", "MASTER_ADDR")
    res = launch.run(T.rank_info, world_size=2, backend="auto", timeout=LONG, stream=True,
                     progress_after=0, keep_run_dir=True, scale=2.0, tensor=torch.arange(3.0),
                     array=np.arange(4), env_names=names)
    assert len(res) == 2 and res.world_size == 2 and res.backend == "gloo"
    assert str(res) == ("RankResults: world_size=2, backend=gloo\n"
                        "rank  status  backend  device\n"
                        "0     ok      gloo     cpu\n"
                        "1     ok      gloo     cpu")
    cpus = len(os.sched_getaffinity(0))
    for r in range(2):
        v = res[r]
        assert (v["rank"], v["world_size"], v["backend"], v["device"]) == (r, 2, "gloo", "cpu")
        assert torch.equal(v["rank_sum"], torch.tensor([2.0]))  # (0 + 1) * scale
        assert torch.equal(v["tensor_twice"], torch.arange(3.0) * 2)
        np.testing.assert_array_equal(v["array"], np.arange(4))
        env = v["env"]
        assert env["OMP_NUM_THREADS"] == str(max(1, cpus // 2))
        assert env["TMPDIR"].startswith(res.run_dir)
        assert str(TESTS) in env["PYTHONPATH"].split(os.pathsep)
        assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"], env["MASTER_ADDR"], env["HF_HUB_OFFLINE"],
                env["PYTHONUNBUFFERED"], env["NCCL_NVLS_ENABLE"]) == ("lo", "lo", "127.0.0.1", "1", "1", "0")
        assert v["transformers_imported"] is False
        rec = res.ranks[r]
        assert rec.status == "ok" and rec.peak_cuda_bytes is None and rec.peak_rss_bytes > 0
        status = json.loads(Path(res.run_dir, f"rank{r}.status.json").read_text())
        assert status["status"] == "ok" and status["duration_s"] >= 0
        assert Path(res.run_dir, f"rank{r}.result.pt").exists()
        assert "hello from rank_info" in Path(rec.log_path).read_text()
    assert len(set(res.pids)) == 2 and Path(res.run_dir).parent == tmp_path  # keep_run_dir=True: kept
    assert _mode(res.run_dir) == _mode(tmp_path) == 0o700  # private: run folders and their root
    assert "duration_s" in res.timings() and "peak_rss_MiB" in res.timings()
    out, err = capsys.readouterr()
    assert "[rank 0] hello from rank_info" in out and "[rank 1]" not in out  # stream: rank 0 only
    assert "[vl2lab]" in err and "ranks finished" in err  # progress line
    assert Path(res.run_dir, "rank1.progress.json").exists()  # the ranks said what they were doing
    _assert_all_gone(res.run_dir, 2)


def test_command_line_runs_and_prints_summary(tmp_path, capsys):
    run_dir = tmp_path / "cli"
    assert main(["-n", "1", "--backend", "gloo", "--timeout", str(LONG),
                 "--run-dir", str(run_dir), "launch_targets:noop"]) == 0
    out = capsys.readouterr().out
    assert "RankResults: world_size=1, backend=gloo\nrank  status  backend  device\n0     ok" in out
    _assert_all_gone(run_dir, 1)


def test_print_command_for_several_nodes(capsys):
    argv = ["--print-command", "--nnodes", "2", "--nproc-per-node", "4",
            "--rdzv-endpoint", "node0:29500", "launch_targets:noop"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for part in ("--nnodes 2", "--node-rank $NODE_RANK", "--rdzv-backend c10d",
                 "--rdzv-endpoint node0:29500", "--rdzv-id vl2lab-", "--nproc-per-node 4",
                 "--max-restarts 0", "-m vl2lab.launch.worker", "--target launch_targets:noop"):
        assert part in out
    assert "--standalone" not in out
    single = " ".join(launch.torchrun_command("m:f", 2, "/tmp/x"))
    assert "-m vl2lab.launch.agent --nnodes 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0" in single
    assert "--local-addr 127.0.0.1" in single and "--standalone" not in single
    a = launch.torchrun_command("m:f", 4, "/d", nnodes=2, node_rank=0, rdzv_endpoint="h:1")
    b = launch.torchrun_command("m:f", 4, "/d", nnodes=2, node_rank=1, rdzv_endpoint="h:1")
    assert a[a.index("--rdzv-id") + 1] == b[b.index("--rdzv-id") + 1]  # nodes meet in one rendezvous


@pytest.mark.parametrize("argv", [["nosuchmodule:f"], ["no colon"], ["launch_targets:noop", "-n", "0"],
                                  ["launch_targets:noop", "--nnodes", "2", "--print-command"]],
                         ids=["no-module", "no-colon", "no-ranks", "no-endpoint"])
def test_command_line_bad_arguments_give_one_line_and_exit_2(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VL2LAB_RUNS_DIR", str(tmp_path))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("python -m vl2lab.launch: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not any(tmp_path.iterdir())  # nothing was launched


def test_python_dash_m_vl2lab_launch(tmp_path):
    """The package runs as a program; every option's help says its default."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    bad = subprocess.run([sys.executable, "-m", "vl2lab.launch", "nosuchmodule:f"], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "", bad
    assert bad.stderr.splitlines() == ["python -m vl2lab.launch: error: module 'nosuchmodule' of "
                                       "fn=nosuchmodule:f cannot be imported from this process's sys.path, so "
                                       "the ranks could not import it either."], bad.stderr
    for action in parser()._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in (action.help or ""), f"{action.option_strings}: help does not say its default"
    cmd = subprocess.run([sys.executable, "-m", "vl2lab.launch", "vl2lab.lessons.smoke:hello", "-n", "2",
                          "--print-command"], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert cmd.returncode == 0 and "--nproc-per-node 2" in cmd.stdout
    assert "-m vl2lab.launch.agent" in cmd.stdout and "--rdzv-endpoint 127.0.0.1:0" in cmd.stdout
    assert "GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo" in cmd.stdout and "--standalone" not in cmd.stdout
    assert "--target vl2lab.lessons.smoke:hello" in cmd.stdout


def test_functions_ranks_cannot_import_are_refused_before_launch(tmp_path):
    def local():
        pass

    main_fn = lambda: None  # noqa: E731
    main_fn.__module__, main_fn.__qualname__ = "__main__", "main_fn"
    with pytest.raises(ValueError, match="__main__.*%%torchrun"):
        launch.run(main_fn, run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="nested function"):
        launch.run(local, run_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="module:function") as info:
        launch.run("launch_targets.noop")
    example = re.search(r"e\.g\. '([^']+)'", str(info.value)).group(1)  # the example names a real function
    assert launch.target_name(example) == example
    module, _, name = example.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    with pytest.raises(ValueError, match="cannot be imported"):
        launch.run("no_such_module_anywhere:f")
    with pytest.raises(ValueError, match="backend"):
        launch.run(T.noop, backend="mpi")
    assert not any(tmp_path.iterdir())  # nothing was launched


# ------------------------------------------------------------------------------------- safe by default
def _listening(pids) -> set:
    """(pid, ip, port) of every TCP socket the processes listen on."""
    out = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out |= {(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def test_a_single_node_launch_listens_on_loopback_only(tmp_path, monkeypatch):
    """While a 2-rank launch runs, every socket its processes (the torchrun agent and the ranks) listen on is on
    127.0.0.1 / ::1: torchrun's stores are read with pickle, so nobody on the network may reach them. After the
    success its run folder is gone (no keep_run_dir, no run_dir=)."""
    monkeypatch.setenv("VL2LAB_RUNS_DIR", str(tmp_path))
    seen, done, agents = set(), threading.Event(), set()

    def watch():
        while not done.is_set():
            for f in tmp_path.glob("*/launch.json"):
                try:
                    agents.add(json.loads(f.read_text())["agent_pid"])
                except (OSError, ValueError):
                    continue
            tree = set(agents)
            for pid in agents:
                try:
                    tree |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
                except psutil.NoSuchProcess:
                    pass
            seen.update(_listening(tree))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = launch.run(T.sleep_then_rank, world_size=2, backend="gloo", timeout=LONG, seconds=3.0)
    finally:
        done.set()
        watcher.join(10)
    assert res.values == [0, 1]
    assert {pid for pid, _, _ in seen} >= {res.agent_pid, *res.pids}, f"not every process was seen listening: {seen}"
    exposed = sorted((pid, ip, port) for pid, ip, port in seen if ip not in ("127.0.0.1", "::1"))
    assert not exposed, f"listening beyond loopback (pid, address, port): {exposed}"
    assert res.run_dir is None and not any(tmp_path.iterdir())  # success: the run folder was removed
    assert "run dir removed after the launch succeeded (keep_run_dir=True keeps it)" in res.timings()
    _assert_pids_gone(res)


def test_unsendable_keyword_arguments_are_refused_before_anything_exists(tmp_path, monkeypatch, capsys):
    """A keyword argument that could not travel as plain data: one ValueError naming it, and neither a run
    folder nor a process exists."""
    monkeypatch.setenv("VL2LAB_RUNS_DIR", str(tmp_path / "runs"))
    tail = "cannot be sent to the ranks: pass plain data — numbers, strings, lists, dicts, tensors — or a module:function name"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with open(tmp_path / "f.txt", "w") as fh:
        cases = {"x": (lambda: 1, "a function"), "log": (fh, "an open file"), "cwd": (os.getcwd, "a function"),
                 "cfg": ({"a": 1, "f": [2, print]}, "a dict holding a function at ['f'][1]"),
                 "path": (Path("/x"), f"a {type(Path('/x')).__module__}.{type(Path('/x')).__qualname__}"),
                 "planted": (T.Planted(str(tmp_path / "ran")), "a launch_targets.Planted")}
        for name, (value, what) in cases.items():
            with pytest.raises(ValueError) as info:
                launch.run(T.noop, world_size=2, backend="gloo", ok=[1, 2.0, "s", None, torch.zeros(2)],
                           **{name: value})
            assert str(info.value) == f"keyword argument {name!r} ({what}) {tail}"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "ran").exists()
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    # the command line: errors are one line, no traceback (an unwritable run dir included)
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["launch_targets:noop", "--run-dir", str(blocked / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m vl2lab.launch: error: NotADirectoryError: ") and err.count("\n") == 1, err


def test_files_that_would_run_code_are_never_unpickled(tmp_path):
    """A result file (and a kwargs file) crafted to run code when unpickled, in a run folder: the launcher's reader
    refuses it with one clear error and the planted code never runs."""
    marker = tmp_path / "ran.txt"
    run_dir = tmp_path / "copied-run"
    run_dir.mkdir()
    (run_dir / "rank0.status.json").write_text(json.dumps({"status": "ok", "pid": 1}))
    torch.save({"loss": [1.0, T.Planted(str(marker))]}, run_dir / "rank0.result.pt")
    (rec,) = collect_records(str(run_dir), 1, multi=False, timed_out=False)
    assert not marker.exists(), "reading the result file ran the code planted in it"
    assert rec.status == "error" and rec.value is None
    assert rec.message == (f"rank 0's result file {run_dir}/rank0.result.pt was not loaded: it refers to "
                           "builtins.exec, which is not plain data; nothing in it was run"), rec.message
    assert "weights_only" not in rec.message  # no advice to load it the unsafe way
    torch.save({"n": T.Planted(str(marker))}, run_dir / "kwargs.pt")
    with pytest.raises(ValueError, match=r"kwargs.pt were not loaded: it refers to builtins.exec, which is not"):
        read_kwargs(str(run_dir / "kwargs.pt"))
    assert not marker.exists()
    plain = {"a": torch.arange(3), "b": np.arange(2), "c": {1, 2}, "d": (np.float64(0.5), None, "s")}
    torch.save(plain, run_dir / "kwargs.pt")
    back = read_kwargs(str(run_dir / "kwargs.pt"))
    assert back["c"] == {1, 2} and back["d"] == (0.5, None, "s") and torch.equal(back["a"], torch.arange(3))


def test_a_return_value_that_is_not_plain_data_fails_its_rank(tmp_path):
    marker = tmp_path / "ran.txt"
    with pytest.raises(RankFailedError) as info:
        launch.run(T.return_planted, world_size=1, backend="gloo", timeout=LONG, run_dir=tmp_path / "p",
                   marker=str(marker))
    assert not marker.exists(), "the planted code ran"
    assert str(info.value).startswith(
        "rank 0 of 1 failed first: TypeError: the return value of launch_targets:return_planted cannot be sent back "
        "to the launcher: value['x'][1] is a launch_targets.Planted, which the launcher does not unpickle"), info.value
    _assert_all_gone(info.value.run_dir, 1)


# ------------------------------------------------------------------------------------------- faults
def test_a_raising_rank_is_named_first(tmp_path, monkeypatch):
    """... and a failed launch keeps its (private) run folder, which the error names: its logs are the evidence."""
    monkeypatch.setenv("VL2LAB_RUNS_DIR", str(tmp_path))
    with pytest.raises(RankFailedError) as info:
        launch.run(T.fail_on, world_size=2, backend="gloo", timeout=LONG)
    e = info.value
    msg = str(e)
    assert Path(e.run_dir).parent == tmp_path and _mode(e.run_dir) == 0o700
    assert msg.endswith(f"logs and status files in {e.run_dir}") and Path(e.run_dir, "rank1.log").exists()
    assert isinstance(e, RuntimeError) and not isinstance(e, RankTimeoutError)
    assert e.first_rank == 1 and msg.startswith("rank 1 of 2 failed first: ValueError: boom in rank 1")
    assert "Traceback" in msg and "launch_targets.py" in msg and "about to fail" in msg
    assert "Other ranks:\n  rank 0: " in msg
    assert [r.status for r in e.ranks][1] == "error" and e.ranks[1].exc_type == "ValueError"
    assert json.loads(Path(e.run_dir, "rank1.status.json").read_text())["exc_type"] == "ValueError"
    _assert_all_gone(e.run_dir, 2)


def test_a_vanishing_rank_is_named(tmp_path):
    with pytest.raises(RankFailedError) as info:
        launch.run(T.vanish_on, world_size=2, backend="gloo", timeout=LONG, run_dir=tmp_path / "v")
    e = info.value
    assert e.first_rank == 1 and e.ranks[1].status == "missing"
    assert str(e).startswith("rank 1 of 2 vanished without reporting (exit code 3)")
    _assert_all_gone(e.run_dir, 2)


def test_a_hang_ends_at_the_timeout(tmp_path):
    with pytest.raises(RankTimeoutError) as info:
        launch.run(T.hang, world_size=2, backend="gloo", timeout=20, run_dir=tmp_path / "h")
    e = info.value
    assert isinstance(e, RankFailedError) and e.never_reported == [0, 1]
    assert "rank(s) 0, 1 never reported" in str(e)
    _assert_all_gone(e.run_dir, 2)


def test_keyboard_interrupt_stops_the_launch(tmp_path):
    run_dir = tmp_path / "k"

    def interrupt_when_started():
        if _wait_for_ranks(run_dir, 2):
            os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C as in a terminal or a kernel: a process started in the background by a shell without job control
    # (a CI runner's `cmd &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            launch.run(T.hang, world_size=2, backend="gloo", timeout=LONG, run_dir=run_dir)
    finally:
        signal.signal(signal.SIGINT, old)
    _assert_all_gone(run_dir, 2)


_LAUNCHER = """
import sys, threading, time
sys.path[:0] = [{tests!r}, {repo!r}]
from vl2lab.launch import launcher as launch
args = dict(world_size=2, backend="gloo", timeout=600, run_dir={run_dir!r})
if {in_thread}:  # main thread ends at once: only the atexit hook stops the launch
    threading.Thread(target=launch.run, args=("launch_targets:hang",), kwargs=args, daemon=True).start()
    while len(__import__("glob").glob({run_dir!r} + "/rank*.pid.json")) < 2:
        time.sleep(0.2)
else:
    launch.run("launch_targets:hang", **args)
"""


@pytest.mark.parametrize("how", ["sigkill", "atexit"])
def test_launcher_death_leaves_no_process(tmp_path, how):
    """SIGKILL of the launching process: the ranks' watchdog kills the launch; normal exit: atexit."""
    run_dir = tmp_path / how
    code = textwrap.dedent(_LAUNCHER).format(tests=str(TESTS), repo=str(TESTS.parent),
                                             run_dir=str(run_dir), in_thread=how == "atexit")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(TESTS))
    try:
        assert _wait_for_ranks(run_dir, 2), "the ranks did not start"
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        _assert_all_gone(run_dir, 2, within=15.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -------------------------------------------------------------------------------------------- magic
def test_torchrun_cell_magic_pushes_and_pulls(tmp_path, monkeypatch, capsys):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("VL2LAB_RUNS_DIR", str(tmp_path / "runs"))
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "vl2lab")  # the package's own extension hook registers the same magic
    assert "torchrun" in shell.magics_manager.magics["cell"]
    shell.run_line_magic("load_ext", "vl2lab.launch.magic")
    shell.user_ns["x"] = torch.tensor([10.0])
    cell = "a = torch.tensor([float(rank)]) + x\nb = (world_size, str(device), dist.get_rank())\n"
    shell.run_cell_magic("torchrun", f"-n 2 --backend gloo --timeout {LONG:g} --push x --pull a,b -o res",
                         cell)
    ns = shell.user_ns
    assert [t.item() for t in ns["a"]] == [10.0, 11.0]
    assert ns["b"] == [(2, "cpu", 0), (2, "cpu", 1)]
    assert "rank  status  backend  device\n0     ok      gloo     cpu\n1     ok" in capsys.readouterr().out
    assert ns["res"].run_dir is None and not any((tmp_path / "runs").iterdir())  # success: folder removed
    _assert_pids_gone(ns["res"])
    with pytest.raises(UsageError, match="not defined"):
        shell.run_cell_magic("torchrun", "-n 2 --push nope", "pass")
    shell.user_ns["f"] = lambda: 1
    with pytest.raises(UsageError) as info:  # refused before anything starts, naming the variable
        shell.run_cell_magic("torchrun", "-n 2 --push f", "pass")
    assert str(info.value).startswith("--push variable 'f' (a function) cannot be sent to the ranks: pass plain")
    assert not any((tmp_path / "runs").iterdir())


def test_ranks_that_reported_but_cannot_exit_keep_their_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VL2LAB_EXIT_GRACE_S", "3")
    res = launch.run(T.hang_at_exit, world_size=2, backend="gloo", timeout=LONG, run_dir=tmp_path / "x")
    assert res.values == [10, 11]
    assert "every rank reported ok, but torchrun did not exit within 3 s" in capsys.readouterr().err
    _assert_all_gone(res.run_dir, 2)


def test_a_str_subclass_comes_back_as_a_plain_str():
    """torch.__version__ is a TorchVersion (a str subclass): the ranks send it as a plain str, which the
    launcher's plain-data loader reads, instead of failing the rank."""
    res = launch.run(T.torch_version, world_size=1, backend="gloo", timeout=LONG)
    assert res[0]["torch"] == str(torch.__version__) and type(res[0]["torch"]) is str


def test_the_planners_one_node_command_listens_on_loopback_only(tmp_path):
    """``python -m vl2lab.launch.agent --standalone`` — the command the planner and generate's --help print — keeps
    every listening socket of its agent and ranks on loopback, as ``vl2lab.run`` does."""
    from vl2lab.planner.commands import ONE_NODE

    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS)])
    cmd = [sys.executable, *ONE_NODE.split()[1:], "--nproc-per-node", "2", "-m", "launch_targets", "serve", "3"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, t0 = set(), time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < 60:
            tree = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            seen.update(_listening(tree))
            time.sleep(0.1)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "rank 1 of 2 done" in out and seen, (out, seen)
    exposed = sorted((pid, ip, port) for pid, ip, port in seen if ip not in ("127.0.0.1", "::1"))
    assert not exposed, f"listening beyond loopback (pid, address, port): {exposed}"


def test_count_options_refuse_what_they_cannot_use():
    """One option type serves every command line: a whole number at or above its minimum, else one message that
    says both; the benchmark's and the ladder's counts refuse 0 repeats before building anything."""
    import argparse

    from vl2lab.launch.options import at_least
    assert at_least(0)("0") == 0 and at_least(1)("12") == 12
    for low, text in ((1, "0"), (0, "-1"), (1, "2.5"), (1, "x")):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^must be an integer >= {low}, got '{re.escape(text)}'$"):
            at_least(low)(text)
    for module in ("vl2lab.perf.ladder", "vl2lab.perf.bench"):
        p = subprocess.run([sys.executable, "-m", module, "--repeats", "0"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2 and "argument --repeats: must be an integer >= 1, got '0'" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
