"""The torchrun agent of a single-node launch, with every socket it listens on bound to loopback (127.0.0.1).

    python -m vl2lab.launch.agent ARGS...      # the same as python -m torch.distributed.run ARGS...
    python -m vl2lab.launch.agent --standalone --nproc-per-node 4 -m vl2lab.serve.generate ...   # one node, loopback

Why not plain torchrun: torch's ``TCPStore`` server listens on every interface (``::``) whatever host it is given,
and torchrun's agent runs two of them, the c10d rendezvous store and the store its ranks share (even
``--standalone`` does). The rendezvous reads its state from that store with ``pickle.loads``, so anyone who could
reach the port could make the agent run code. A single-node launch needs no other machine to reach it: here each
store whose host is a loopback address is handed a socket already bound to that address and listening
(TCPStore's ``master_listen_fd``). The launcher pairs this with ``--rdzv-endpoint 127.0.0.1:0 --local-addr
127.0.0.1`` (the rendezvous store and the ranks' ``MASTER_ADDR``) and gloo's and NCCL's sockets on the loopback
interface (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``); ``tests/test_launch.py`` lists every listening socket
of a running launch. A multi-node launch (an explicit opt-in: ``nnodes``/``rdzv_endpoint``) runs plain torchrun.

Lesson: notebook 00, section 2 ("Ranks report in").
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.distributed import run as torchrun
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous

__all__ = ["LoopbackTCPStore", "is_loopback", "install", "standalone_args", "main"]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = "127.0.0.1" if host == "localhost" else host.strip("[]")
    return socket.create_server((address, port), family=family, backlog=socket.SOMAXCONN)


class LoopbackTCPStore(dist.TCPStore):
    """A TCPStore whose server, for a loopback host, listens on that address only (not on every interface)."""

    def __init__(self, host_name, port, world_size=None, is_master=False, *args, **kwargs):
        fd = None
        if is_master and kwargs.get("master_listen_fd") is None and is_loopback(host_name):
            sock = _listening_socket(host_name, port)
            port = sock.getsockname()[1]  # port 0 asks for a free one: the store must know which
            fd = kwargs["master_listen_fd"] = sock.detach()  # the store owns (and closes) it from here
        try:
            super().__init__(host_name, port, world_size, is_master, *args, **kwargs)
        except BaseException:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise


def _create_tcp_store_server(self, master_addr, master_port):
    """``DynamicRendezvousHandler._create_tcp_store_server``: the store the ranks share, on loopback."""
    return LoopbackTCPStore(host_name=master_addr, port=master_port, is_master=True, multi_tenant=True)


def install() -> None:
    """Make this process's torchrun create its stores as :class:`LoopbackTCPStore` (fails if torch changed)."""
    handler = dynamic_rendezvous.DynamicRendezvousHandler
    if not hasattr(c10d_rendezvous_backend, "TCPStore") or not hasattr(handler, "_create_tcp_store_server"):
        raise RuntimeError(f"vl2lab.launch.agent: torch {torch.__version__} creates its stores "
                           "differently from the torch this was written for, so they cannot be kept on loopback; "
                           "update vl2lab.launch.agent")
    c10d_rendezvous_backend.TCPStore = LoopbackTCPStore
    handler._create_tcp_store_server = _create_tcp_store_server


def standalone_args(argv: list[str]) -> list[str]:
    """``--standalone`` (one node) made loopback-only: the ranks' ``MASTER_ADDR`` is 127.0.0.1 (``--local-addr``),
    and gloo's and NCCL's own sockets use the loopback interface unless the environment already names one."""
    own = argv[: argv.index("-m")] if "-m" in argv else argv   # torchrun's options, before the program's
    if "--standalone" not in own:
        return argv
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")
    if not any(a == "--local-addr" or a.startswith("--local-addr=") for a in argv):
        argv = ["--local-addr", "127.0.0.1"] + argv
    return argv


def main(argv=None) -> None:
    """``python -m vl2lab.launch.agent ARGS`` = torchrun ARGS with loopback stores (and, with ``--standalone``,
    every socket on loopback: :func:`standalone_args`)."""
    install()
    torchrun.main(standalone_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
