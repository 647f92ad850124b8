"""A real Envoy and our waypoint, fed the same config by meshd, side by side on loopback.

meshd (in-process, its real ADS server) serves a :class:`SourceState`; Envoy
1.40 subscribes as the waypoint and serves one destination's chain on a
loopback listener (the HTTP connection manager meshd sends in the feed's
listener, copied onto a plain address); our waypoint is built from the same
resources through its own xDS applier. Both forward to the same loopback
backends. Everything runs on one event loop in a background thread, so
tests (Hypothesis ones included) can send requests with a plain blocking
client.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2
from envoy.extensions.filters.http.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, json_format

from bench.envoy import Envoy, free_port, waypoint_config
from controlplane.l7 import envoy as l7envoy
from controlplane.l7 import envoy_rbac
from controlplane.l7.build import build
from controlplane.meshd import Meshd, grpc_server_options
from controlplane.state import SourceState
from tests.support.waypoint_harness import Backend, Waypoint, config_for, waypoint
from waypoint.tracing import Tracer

T = TypeVar("T")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def backend(self) -> str | None:
        try:
            return str(self.json.get("backend"))
        except ValueError:
            return None


def send(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str],
    authority: str,
    body: bytes = b"",
    timeout_s: float = 10.0,
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("host", authority)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def _front_listener(
    resources: l7envoy.EnvoyResources, destination: str, port: int, peer_identity: str = ""
) -> dict[str, Any]:
    """Envoy's listener for one destination: the feed's filter chain on a loopback address.

    With ``peer_identity``, the HTTP connection manager first sets the filter
    state ``io.istio.peer_principal`` to it, as the HBONE connection of a
    peer with that identity would (what Istio's authorization policies match).
    """
    host, _, dport = destination.rpartition(":")
    (waypoint_listener,) = resources.listeners.values()
    for chain in waypoint_listener.filter_chains:
        match = chain.filter_chain_match
        ranges = {r.address_prefix for r in match.prefix_ranges}
        if match.destination_port.value == int(dport) and host in ranges:
            front = listener_pb2.Listener(
                name="front", traffic_direction=waypoint_listener.traffic_direction
            )
            front.address.socket_address.address = "127.0.0.1"
            front.address.socket_address.port_value = port
            filters = front.filter_chains.add().filters
            filters.extend(chain.filters)
            if peer_identity:
                _set_peer(filters, peer_identity)
            doc: dict[str, Any] = json_format.MessageToDict(front, preserving_proto_field_name=True)
            return doc
    raise KeyError(f"no filter chain for {destination}")


def _set_peer(filters: Any, identity: str) -> None:
    for f in filters:
        if f.name != "envoy.filters.network.http_connection_manager":
            continue
        hcm = hcm_pb2.HttpConnectionManager()
        f.typed_config.Unpack(hcm)
        state = set_filter_state_pb2.Config(
            on_request_headers=[
                value_pb2.FilterStateValue(
                    object_key=envoy_rbac.PEER_PRINCIPAL,
                    factory_key="envoy.string",
                    format_string=substitution_format_string_pb2.SubstitutionFormatString(
                        text_format_source=base_pb2.DataSource(inline_string=identity)
                    ),
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(state)
        hcm.http_filters.insert(
            0, hcm_pb2.HttpFilter(name="envoy.filters.http.set_filter_state", typed_config=packed)
        )
        f.typed_config.Pack(hcm)


class Oracle:
    """Both proxies; not a dataclass, so that Hypothesis prints it short."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        meshd: Meshd,
        envoy: Envoy,
        ours: Waypoint,
        envoy_port: int,
        backends: dict[str, Backend],
        authority: str,
        state: SourceState,
        admin_port: int,
    ) -> None:
        self.loop = loop
        self.meshd = meshd
        self.envoy = envoy
        self.ours = ours
        self.envoy_port = envoy_port
        self.backends = backends
        self.authority = authority
        self.state = state
        self.admin_port = admin_port

    def __repr__(self) -> str:
        return f"<Oracle envoy :{self.envoy_port} ours :{self.ours.address[1]}>"

    def call(self, fn: Callable[[], Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(_wrap(fn), self.loop)
        return future.result(60)

    def both(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[Reply, Reply]:
        theirs = send(self.envoy_port, method, path, headers, self.authority, body)
        ours = send(self.ours.address[1], method, path, headers, self.authority, body)
        return theirs, ours

    def update(self, state: SourceState, wait_s: float = 10.0) -> None:
        """A new world for both: meshd pushes it to Envoy, ours takes it directly."""

        async def apply() -> None:
            self.meshd.on_source(state)
            self.ours.update(config_for(state))

        self.call(apply)
        self.state = state
        self.wait_synced(wait_s)

    def wait_synced(self, timeout_s: float = 20.0) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            subs = list(self.meshd.ads.subscriptions)
            if (
                subs
                and self.meshd.ads.subscriptions
                and all(s.in_sync(self.meshd.cache.snapshot) for s in subs)
            ):
                stats = self.envoy.stats()
                if stats.get("listener_manager.total_listeners_active", 0) >= 1:
                    # Envoy ACKs once its main thread took the resources; the workers
                    # get them posted after that (a request at once can still see the
                    # old route: a 503 the new retry policy would have retried).
                    time.sleep(0.2)
                    return
            time.sleep(0.1)
        raise AssertionError("Envoy did not take the feed in time")

    def envoy_stats(self) -> dict[str, int]:
        return self.envoy.stats()

    def envoy_clusters(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/clusters", timeout=5) as r:
            return str(r.read().decode())


async def _wrap(fn: Callable[[], Any]) -> Any:
    result = fn()
    if asyncio.iscoroutine(result):
        return await result
    return result


@contextlib.contextmanager
def oracle(
    state_for: Callable[[dict[str, Backend]], SourceState],
    backends: Callable[[], Any],
    authority: str,
    workdir: Path,
    peer_identity: str = "",
    tracer: Tracer | None = None,
    front: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    static_clusters: list[dict[str, Any]] | None = None,
) -> Iterator[Oracle]:
    """Start backends, meshd, Envoy and ours; ``state_for(backends)`` is the world; both
    see every client as ``peer_identity`` (the HBONE peer's SPIFFE ID) when one is given.
    ``front`` may change Envoy's front listener (as a dict), ``static_clusters`` are added
    to its bootstrap (what a static listener needs at start, before CDS)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = contextlib.ExitStack()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    started_backends: dict[str, Backend] = run(backends())
    try:
        state = state_for(started_backends)

        async def start_meshd() -> tuple[Meshd, grpc.aio.Server, int]:
            m = Meshd()
            server = grpc.aio.server(options=grpc_server_options())
            m.ads.add_to(server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            m.on_source(state)
            return m, server, port

        meshd, grpc_server, xds_port = run(start_meshd())
        share = build(state).shares["shop/waypoint"]
        resources = l7envoy.translate(share)
        envoy_port, admin_port = free_port(), free_port()
        config = waypoint_config(
            xds_port=xds_port,
            admin_port=admin_port,
            namespace="shop",
            gateway="waypoint",
            static_listeners=[
                (front or (lambda doc: doc))(
                    _front_listener(resources, authority, envoy_port, peer_identity)
                )
            ],
            static_clusters=static_clusters,
        )
        envoy = Envoy(config, workdir, "oracle")
        envoy.start()
        stack.callback(envoy.stop)
        ours_cm = waypoint(config_for(state), authority, peer_identity=peer_identity, tracer=tracer)
        ours = run(ours_cm.__aenter__())
        stack.callback(lambda: run(ours_cm.__aexit__(None, None, None)))
        o = Oracle(
            loop, meshd, envoy, ours, envoy_port, started_backends, authority, state, admin_port
        )
        o.wait_synced()
        yield o
    finally:
        stack.close()
        with contextlib.suppress(Exception):
            run(grpc_server.stop(0.2))
        for b in started_backends.values():
            with contextlib.suppress(Exception):
                run(b.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def call_in(loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> T:
    return asyncio.run_coroutine_threadsafe(_wrap(fn), loop).result(60)  # type: ignore[no-any-return]
