"""ztunnel's sockets inside a pod's namespace, made from the netns descriptor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

from pyroute2 import NetNS, netns

from tests.integration.conftest import unique_name
from ztunnel.netns import INPOD_MARK, ListenSpec, in_netns, listen_sockets

THREAD_NETNS = Path("/proc/thread-self/ns/net")


@contextlib.contextmanager
def pod_netns() -> Iterator[int]:
    name = f"{unique_name()}-pod"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        netns.remove(name)


def test_listeners_open_in_the_pod_and_the_loop_thread_stays_home() -> None:
    port = random.randint(20000, 29999)
    home = THREAD_NETNS.stat().st_ino

    async def body(fd: int) -> None:
        specs = [ListenSpec(port), ListenSpec(port + 1, socket.SOCK_DGRAM)]
        tcp, udp = await asyncio.to_thread(in_netns, fd, lambda: listen_sockets(specs))
        try:
            # Checked on the loop thread itself: it never left its namespace.
            assert THREAD_NETNS.stat().st_ino == home  # noqa: ASYNC240
            assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == INPOD_MARK
            assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            # Inside the pod, the port answers...
            client = await asyncio.to_thread(in_netns, fd, socket.socket)
            with client:
                client.settimeout(3)
                client.connect(("127.0.0.1", port))
            # ...on the host's own loopback it does not: the socket lives in the pod.
            with socket.socket() as outside:
                outside.settimeout(3)
                assert outside.connect_ex(("127.0.0.1", port)) != 0
        finally:
            tcp.close()
            udp.close()

    with pod_netns() as fd:
        asyncio.run(body(fd))
