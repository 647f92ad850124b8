"""Our waypoint assembled in-process from a :class:`SourceState`, for tests.

meshd's translation gives the Envoy resources; they reach the waypoint
through the same xDS applier its feed uses (every resource converted and
checked), and the router serves plain HTTP on a loopback port in front of
one destination's filter chain, as an HBONE stream to that destination
would be served. Backends are small HTTP servers on loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.ads.cache import pack
from controlplane.l7 import envoy
from controlplane.l7.build import build
from controlplane.state import SourceState
from waypoint.config.snapshot import WaypointConfig, apply_response
from waypoint.proxy import WaypointProxy, serve_http
from waypoint.records import RequestRecord
from waypoint.router import Router
from waypoint.tracing import Tracer
from waypoint.upstream.pool import TcpConnector, Upstreams


def config_for(state: SourceState, waypoint: str = "shop/waypoint") -> WaypointConfig:
    """The waypoint's config snapshot for ``state``, through the xDS applier."""
    share = build(state).shares[waypoint]
    resources = envoy.translate(share).by_type()
    config = WaypointConfig()
    for type_url, items in resources.items():
        entries = [(n, pack(m, type_url)) for n, m in items.items()]
        applied = apply_response(
            config, type_url, [(n, e.version, e.resource) for n, e in entries], ()
        )
        assert not applied.refused, applied.refused
        config = applied.state
    return config


@dataclass
class Backend:
    """A loopback HTTP/1.1 server that says who it is; ``behaviour`` shapes its answers."""

    name: str
    host: str
    port: int = 0
    status: int = 200
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: asyncio.Server | None = None
    fail_first: int = 0  # answer 503 to this many requests first

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers: list[tuple[str, str]] = []
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers.append((k.strip().lower(), v.strip()))
                length = int(next((v for k, v in headers if k == "content-length"), "0"))
                body = await reader.readexactly(length) if length else b""
                if any(k == "transfer-encoding" for k, _ in headers):
                    body = await _read_chunked(reader)
                self.requests.append(
                    {"method": method, "path": target, "headers": headers, "body": body}
                )
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                status = self.status
                if self.fail_first > 0:
                    self.fail_first -= 1
                    status = 503
                payload = json.dumps(
                    {
                        "backend": self.name,
                        "path": target,
                        "method": method,
                        "headers": headers,
                        "body": body.decode("latin-1"),
                    }
                ).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode()
                    + (payload if method != "HEAD" else b"")
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return out
        out += await reader.readexactly(size)
        await reader.readline()


async def reviews_backends() -> dict[str, Backend]:
    """The world's three reviews pods (tests.support.l7world) as backends on loopback."""
    first = await Backend("v1-a", "127.0.0.11").start()
    return {
        "reviews-v1-a": first,
        "reviews-v1-b": await Backend("v1-b", "127.0.0.12", first.port).start(),
        "reviews-v2-a": await Backend("v2-a", "127.0.0.21", first.port).start(),
    }


def with_backends(state: SourceState, backends: Mapping[str, Backend]) -> SourceState:
    """``state`` with each named pod at its backend's address (outside the mesh: plain TCP)
    and every service's target port the backends' port."""
    ports = {b.port for b in backends.values()}
    assert len(ports) == 1, "all backends of one world listen on one port"
    (port,) = ports
    pods = tuple(
        replace(p, ip=backends[p.name].host) if p.name in backends else p for p in state.pods
    )
    services = tuple(
        replace(s, ports=tuple(replace(sp, target_port=port) for sp in s.ports))
        for s in state.services
    )
    namespaces = tuple(
        replace(
            ns,
            labels={k: v for k, v in ns.labels.items() if k != "istio.io/dataplane-mode"},
        )
        for ns in state.namespaces
    )
    return replace(state, pods=pods, services=services, namespaces=namespaces)


@dataclass
class Waypoint:
    config: WaypointConfig
    router: Router
    upstreams: Upstreams
    proxy: WaypointProxy
    address: tuple[str, int]
    records: list[RequestRecord]

    def update(self, config: WaypointConfig) -> None:
        self.config = config
        self.upstreams.update(config.clusters, config.endpoints)


@contextlib.asynccontextmanager
async def waypoint(
    config: WaypointConfig,
    authority: str,
    *,
    seed: int = 1,
    peer_identity: str = "",
    tracer: Tracer | None = None,
) -> AsyncIterator[Waypoint]:
    """Our waypoint serving ``authority``'s chain on a loopback port, to a client whose
    HBONE identity is ``peer_identity`` (none when "")."""
    rng = random.Random(seed)
    upstreams = Upstreams(TcpConnector(), rng)
    upstreams.update(config.clusters, config.endpoints)
    records: list[RequestRecord] = []
    holder: list[WaypointConfig] = [config]
    router = Router(lambda: holder[0], upstreams, rng=rng, on_record=records.append, tracer=tracer)
    proxy = WaypointProxy(lambda: holder[0], upstreams, router)
    server = await serve_http(proxy, "127.0.0.1", 0, authority, peer_identity=peer_identity)
    address = server.sockets[0].getsockname()[:2]
    wp = Waypoint(config, router, upstreams, proxy, address, records)

    def current() -> WaypointConfig:
        return wp.config

    router.config = current
    proxy.config = current
    try:
        yield wp
    finally:
        server.close()
        upstreams.close()
        for task in list(router.tasks):
            task.cancel()
        await asyncio.gather(*router.tasks, return_exceptions=True)
        holder.clear()


async def request(
    address: tuple[str, int],
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    host: str = "reviews.shop.svc.cluster.local:9080",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a new connection: status, headers (last value), body."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"content-length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        parsed[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), parsed, rest


Pick = Callable[[bytes], str]


def backend_of(body: bytes) -> str:
    return str(json.loads(body)["backend"])
