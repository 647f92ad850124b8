"""``Connection``: what the HTTP/1.1 and HTTP/2 shells share, and ``address`` formatting."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from meshlab.apps.echo.responder import Reply, Request

if TYPE_CHECKING:
    from meshlab.apps.echo.server import EchoServer


def address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Connection(asyncio.Protocol):
    """What both HTTP shells share: the transport, the peer, backpressure, the drain."""

    transport: asyncio.Transport

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.respond = server.responder
        self.client = ""
        self._paused_by_writes = False
        self._paused_by_queue = False
        self._timers: set[asyncio.TimerHandle] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, but they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = address(peer[0], peer[1]) if peer else ""
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.server.forget(self)

    def pause_writing(self) -> None:
        self._paused_by_writes = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_by_writes = False
        if not self._paused_by_queue:
            self.transport.resume_reading()

    def later(self, delay_s: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``delay_s``; cancelled if the connection goes first."""
        timer: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(timer)
            callback()

        timer = asyncio.get_running_loop().call_later(delay_s, fire)
        self._timers.add(timer)

    def log(self, request: Request, reply: Reply) -> None:
        print(
            f"echo: src.addr={request.client} method={request.method} path={request.target!r}"
            f" proto={request.proto} status={reply.status} bytes_sent={len(reply.body)}",
            file=sys.stderr,
        )

    def drain(self) -> None:
        """Finish what was asked, then close."""
        raise NotImplementedError

    def abort(self) -> None:
        self.transport.abort()
