"""mesh.netio.connect: what loop.sock_connect did, minus the resolver's thread pool."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from mesh import netio
from tests.unit.hbone.conftest import run


def _listener(backlog: int = 16) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def test_a_connect_reaches_the_listener() -> None:
    async def body() -> None:
        with _listener() as listener:
            sock = socket.socket()
            sock.setblocking(False)
            with sock:
                await netio.connect(sock, listener.getsockname())
                accepted, peer = listener.accept()
                with accepted:
                    assert peer == sock.getsockname()
                    sock.send(b"ping")
                    assert accepted.recv(4) == b"ping"

    run(body)


def test_a_refused_connect_raises_naming_the_address() -> None:
    async def body() -> None:
        with _listener() as listener:
            address = listener.getsockname()
        sock = socket.socket()  # nobody listens there any more
        sock.setblocking(False)
        with sock, pytest.raises(OSError) as raised:
            await netio.connect(sock, address)
        assert raised.value.errno == errno.ECONNREFUSED
        assert f"127.0.0.1:{address[1]}" in str(raised.value)

    run(body)


def test_a_connect_that_gets_no_answer_ends_at_the_callers_deadline() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        # A listener that never accepts, its queue full: further SYNs go unanswered.
        with _listener(backlog=0) as listener:
            address = listener.getsockname()
            fillers = []
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(address)
                fillers.append(filler)
            await asyncio.sleep(0.2)
            sock = socket.socket()
            sock.setblocking(False)
            started = loop.time()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await netio.connect(sock, address)
            assert loop.time() - started < 1.5
            sock.close()
            for filler in fillers:
                filler.close()

    run(body)
