"""``EchoServer``, the asyncio shell: listeners, connections, a graceful stop; ``main``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import sys
from typing import Any

from meshlab.apps.echo.connection import Connection, address
from meshlab.apps.echo.grpc import start_grpc_server
from meshlab.apps.echo.http1 import Http1
from meshlab.apps.echo.responder import Responder
from meshlab.apps.echo.settings import Settings


class EchoServer:
    """The listeners and their connections, with a graceful stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.responder = Responder(settings)
        self.connections: set[Connection] = set()
        self.ports: list[int] = []  # bound HTTP ports, in the order of settings.ports
        self.grpc_port: int | None = None
        self._listeners: list[asyncio.Server] = []
        self._grpc: Any = None
        self._all_closed = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.settings.ports:
            listener = await loop.create_server(
                lambda: Http1(self), self.settings.address, port, backlog=1024
            )
            self._listeners.append(listener)
            self.ports.append(listener.sockets[0].getsockname()[1])
        if self.settings.grpc_port is not None:
            self._grpc, self.grpc_port = await start_grpc_server(
                self.settings, self.settings.grpc_port
            )

    def addresses(self) -> str:
        """``0.0.0.0:8080 (http, h2c), 0.0.0.0:9000 (grpc)``."""
        host = self.settings.address
        out = [f"{address(host, port)} (http, h2c)" for port in self.ports]
        if self.grpc_port is not None:
            out.append(f"{address(host, self.grpc_port)} (grpc)")
        return ", ".join(out)

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        if self._stopping and not self.connections:
            self._all_closed.set()

    async def stop(self) -> None:
        """Stop accepting, let every connection finish within the drain deadline, then cut."""
        self._stopping = True
        for listener in self._listeners:
            listener.close()
        grpc_stopped = self._grpc.stop(self.settings.drain_timeout_s) if self._grpc else None
        for connection in list(self.connections):
            connection.drain()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), self.settings.drain_timeout_s)
        for connection in list(self.connections):
            connection.abort()
        if grpc_stopped is not None:
            await grpc_stopped
        for listener in self._listeners:
            await listener.wait_closed()


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Listen, say so on stderr, serve until ``stop`` is set, then drain."""
    server = EchoServer(settings)
    try:
        await server.start()
    except (OSError, RuntimeError) as exc:  # grpcio says RuntimeError for a busy port
        print(f"echo: cannot listen on {settings.address}: {exc}", file=sys.stderr)
        await server.stop()
        return 1
    print(f"echo: listening on {server.addresses()}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``meshlab app echo ARGV``: serve until SIGTERM or SIGINT, drain, return the exit code."""
    settings = Settings.from_argv(argv)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await serve(settings, stop)

    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(run())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())
