"""HTTP/2 through the waypoint: h2c clients, gRPC with its trailers, to an HTTP/2 backend.

The backend is the echo app (``meshlab app echo``, h2c and gRPC) on a
loopback address; the client is grpcio, or ``h2`` over a plain socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from controlplane.state import ServicePortInfo
from tests.support.l7world import service, world
from tests.support.waypoint_harness import config_for, waypoint
from tests.unit.hbone.conftest import run

GRPC_SERVICE = "gateway_api_conformance.echo_basic.grpcecho.GrpcEcho"
BACKEND_IP = "127.0.0.31"
AUTHORITY = "10.96.0.20:9080"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[int, int]]:
    """The echo app: (HTTP port, gRPC port) on BACKEND_IP."""
    http_port, grpc_port = _free_port(BACKEND_IP), _free_port(BACKEND_IP)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshlab.cli",
            "app",
            "echo",
            "--address",
            BACKEND_IP,
            "--port",
            str(http_port),
            "--grpc",
            str(grpc_port),
            "--version",
            "v2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"POD_NAME": "reviews-v2-a", "POD_NAMESPACE": "shop", "PATH": "/usr/bin:/bin"},
    )
    try:
        deadline = time.monotonic() + 15
        for port in (http_port, grpc_port):
            while True:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((BACKEND_IP, port), 0.2),
                ):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the echo app did not start")
                time.sleep(0.05)
        yield http_port, grpc_port
    finally:
        proc.terminate()
        proc.wait(10)


def grpc_world(grpc_port: int, routes: str = "") -> Any:
    """reviews:9080 is gRPC (port name grpc), its one pod the echo app's gRPC port."""
    base = world(routes)
    pods = tuple(replace(p, ip=BACKEND_IP) for p in base.pods if p.name == "reviews-v2-a")
    reviews = service(
        "reviews",
        {"app": "reviews"},
        ports=(ServicePortInfo(port=9080, target_port=grpc_port, name="grpc"),),
    )
    namespaces = tuple(
        replace(ns, labels={k: v for k, v in ns.labels.items() if k != "istio.io/dataplane-mode"})
        for ns in base.namespaces
    )
    return replace(base, pods=pods, services=(reviews,), namespaces=namespaces)


def call_grpc(port: int, method: str = "Echo", metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    from meshlab.apps import echo as echo_app

    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.default_authority", AUTHORITY)]
    ) as channel:
        call = channel.unary_unary(f"/{GRPC_SERVICE}/{method}")
        raw = call(b"", metadata=metadata, timeout=5)
    return echo_app.decode_echo_response(raw)


def test_grpc_through_the_waypoint_keeps_its_trailers(echo: tuple[int, int]) -> None:
    _, grpc_port = echo
    config = config_for(grpc_world(grpc_port))
    assert config.clusters[next(iter(config.clusters))].http2

    async def body() -> tuple[Any, grpc.StatusCode]:
        async with waypoint(config, AUTHORITY) as wp:
            import asyncio

            answer = await asyncio.to_thread(call_grpc, wp.address[1], "Echo", (("x-test", "1"),))
            try:
                await asyncio.to_thread(call_grpc, wp.address[1], "EchoThree")
            except grpc.RpcError as e:
                return answer, e.code()
            return answer, grpc.StatusCode.OK

    answer, missing = run(body)
    assert answer["fullyQualifiedMethod"] == f"/{GRPC_SERVICE}/Echo"
    assert ["x-test", "1"] in answer["headers"]
    assert answer["context"]["pod"] == "reviews-v2-a"
    # The backend's grpc-status trailer (UNIMPLEMENTED) reaches the client intact.
    assert missing == grpc.StatusCode.UNIMPLEMENTED


def test_a_grpcroute_matches_the_method(echo: tuple[int, int]) -> None:
    _, grpc_port = echo
    route = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: g, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews, port: 9080}}]
  rules:
  - matches: [{{method: {{service: {GRPC_SERVICE}, method: EchoTwo}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{add: [{{name: x-matched, value: two}}]}}
    backendRefs: [{{name: reviews, port: 9080}}]
"""
    config = config_for(grpc_world(grpc_port, route))

    async def body() -> tuple[Any, grpc.StatusCode]:
        import asyncio

        async with waypoint(config, AUTHORITY) as wp:
            two = await asyncio.to_thread(call_grpc, wp.address[1], "EchoTwo")
            try:
                await asyncio.to_thread(call_grpc, wp.address[1], "Echo")
            except grpc.RpcError as e:
                return two, e.code()
            return two, grpc.StatusCode.OK

    two, unmatched = run(body)
    assert ["x-matched", "two"] in two["headers"]
    # No rule for Echo: the waypoint's 404 reaches a gRPC client as UNIMPLEMENTED.
    assert unmatched == grpc.StatusCode.UNIMPLEMENTED


def h2c_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET over HTTP/2 with prior knowledge, with the ``h2`` library."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        conn.initiate_connection()
        conn.send_headers(
            1,
            [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", AUTHORITY)],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        status, headers, body, done = 0, {}, b"", False
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    for k, v in event.headers:
                        key = k.decode() if isinstance(k, bytes) else k
                        value = v.decode() if isinstance(v, bytes) else v
                        if key == ":status":
                            status = int(value)
                        else:
                            headers[key] = value
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
            sock.sendall(conn.data_to_send())
    return status, headers, body


def test_an_h2c_client_reaches_an_http1_backend(echo: tuple[int, int]) -> None:
    http_port, _ = echo
    base = world()
    pods = tuple(replace(p, ip=BACKEND_IP) for p in base.pods if p.name == "reviews-v2-a")
    reviews = service(
        "reviews",
        {"app": "reviews"},
        ports=(ServicePortInfo(port=9080, target_port=http_port, name="http"),),
    )
    namespaces = tuple(
        replace(ns, labels={k: v for k, v in ns.labels.items() if k != "istio.io/dataplane-mode"})
        for ns in base.namespaces
    )
    config = config_for(replace(base, pods=pods, services=(reviews,), namespaces=namespaces))

    async def body() -> tuple[int, dict[str, str], bytes]:
        import asyncio

        async with waypoint(config, AUTHORITY) as wp:
            return await asyncio.to_thread(h2c_get, wp.address[1], "/hello?x=1")

    status, headers, data = run(body)
    assert status == 200 and headers["server"] == "istio-envoy"
    seen = json.loads(data)
    assert seen["path"] == "/hello?x=1" and seen["proto"] == "HTTP/1.1"
    assert seen["host"] == AUTHORITY
