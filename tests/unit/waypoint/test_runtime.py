"""The waypoint process end to end without root: its certificate from a CA, its config
from meshd's real ADS server, HBONE in (mTLS, CONNECT to a service VIP), HTTP routed
to loopback backends, readiness, and refusals."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from controlplane.meshd import Meshd, grpc_server_options
from mesh.hbone import HboneClientPool, LocalSocket, PoolKey, StatusError
from mesh.identity import SpiffeId, generate_key_and_csr
from mesh.identity.store import WorkloadCertificate
from tests.support.l7world import CANARY, world
from tests.support.waypoint_harness import Backend, with_backends
from tests.unit.hbone.conftest import Pki, run
from waypoint.runtime import WaypointRuntime

WAYPOINT = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/waypoint")
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/client/sa/client")


class Collect(asyncio.Protocol):
    """Writes one request on the HBONE stream and keeps the answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.done.done():
            head, _, body = self.data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is not None and len(body) >= length:
                self.done.set_result(self.data)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(self.data)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.data)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running(
    pki: Pki, delay_s: float = 0.0
) -> AsyncIterator[tuple[WaypointRuntime, int, HboneClientPool]]:
    first = await Backend("v1-a", "127.0.0.11", delay_s=delay_s).start()
    backends = {
        "reviews-v1-a": first,
        "reviews-v1-b": await Backend("v1-b", "127.0.0.12", first.port, delay_s=delay_s).start(),
        "reviews-v2-a": await Backend("v2-a", "127.0.0.21", first.port, delay_s=delay_s).start(),
    }
    meshd = Meshd()
    server = grpc.aio.server(options=grpc_server_options())
    meshd.ads.add_to(server)
    xds_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    meshd.on_source(with_backends(world(CANARY), backends))

    async def fetch(identity: SpiffeId) -> WorkloadCertificate:
        key, csr = generate_key_and_csr(identity)
        issued = pki.ca.sign_csr(csr, identity, timedelta(hours=1), now=datetime.now(UTC))
        return WorkloadCertificate.from_issued(issued, key)

    runtime = WaypointRuntime(
        namespace="shop",
        gateway="waypoint",
        pod="waypoint",
        pod_ip="127.0.0.1",
        identity=WAYPOINT,
        fetch_certificate=fetch,
        xds_target=f"127.0.0.1:{xds_port}",
    )
    port = _port()
    task = asyncio.create_task(runtime.run("127.0.0.1", port))
    client = HboneClientPool(identities=pki.client)
    try:
        async with asyncio.timeout(15):
            while not runtime.ready()[0]:  # noqa: ASYNC110 - the runtime's own readiness
                await asyncio.sleep(0.05)
        yield runtime, port, client
    finally:
        await client.close()
        await runtime.drain(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await server.stop(0.2)
        for b in backends.values():
            await b.stop()


async def ask(client: HboneClientPool, port: int, authority: str, agent: str = "curl") -> bytes:
    collect = Collect(
        f"GET / HTTP/1.1\r\nhost: reviews:9080\r\nuser-agent: {agent}\r\n\r\n".encode()
    )
    key = PoolKey(
        source=CLIENT, destination=("127.0.0.1", port), destination_identities=(WAYPOINT,)
    )
    await client.connect(key, authority, (), plain=LocalSocket(collect))
    async with asyncio.timeout(5):
        return await collect.done


def test_hbone_in_http_routed_out(pki: Pki) -> None:
    async def body() -> tuple[list[bytes], bytes]:
        async with running(pki) as (_runtime, port, client):
            answers = [await ask(client, port, "10.96.0.20:9080", "iPhone") for _ in range(3)]
            plain = await ask(client, port, "10.96.0.20:9080")
            return answers, plain

    answers, plain = run(body)
    for a in answers:
        assert a.startswith(b"HTTP/1.1 200") and b'"backend": "v2-a"' in a
    assert plain.startswith(b"HTTP/1.1 200") and b"server: istio-envoy" in plain


def test_a_destination_it_does_not_serve_is_refused_before_any_byte(pki: Pki) -> None:
    async def body() -> int:
        async with running(pki) as (_runtime, port, client):
            with pytest.raises(StatusError) as refused:
                await ask(client, port, "10.96.9.9:80")
            return refused.value.status

    assert run(body) == 503


def test_metrics_count_the_requests_with_istio_labels(pki: Pki) -> None:
    async def body() -> str:
        async with running(pki) as (runtime, port, client):
            await ask(client, port, "10.96.0.20:9080", "iPhone")
            from prometheus_client import generate_latest

            return generate_latest(runtime.telemetry.registry).decode()

    text = run(body)
    line = next(li for li in text.splitlines() if li.startswith("istio_requests_total{"))
    assert 'reporter="waypoint"' in line and 'response_code="200"' in line
    assert f'source_principal="{CLIENT}"' in line
    assert 'destination_workload="reviews-v2-a"' in line and 'destination_version="v2"' in line
    assert 'destination_service="reviews-v2.shop.svc.cluster.local"' in line


def test_sigterms_drain_finishes_the_request_in_flight_and_takes_no_new_one(pki: Pki) -> None:
    # What the waypoint does on SIGTERM (cli: runtime.drain): GOAWAY on every HBONE
    # connection, stop accepting, let the streams in flight finish within the deadline.
    async def body() -> tuple[bytes, float, BaseException | None]:
        async with running(pki, delay_s=0.5) as (runtime, port, client):
            loop = asyncio.get_running_loop()
            in_flight = asyncio.ensure_future(ask(client, port, "10.96.0.20:9080"))
            await asyncio.sleep(0.2)  # at the backend, which answers after 0.5 s
            started = loop.time()
            draining = asyncio.ensure_future(runtime.drain(0.8))
            answer = await in_flight
            await draining
            took = loop.time() - started
            late = HboneClientPool(identities=pki.client)
            try:
                await ask(late, port, "10.96.0.20:9080")
                refused = None
            except Exception as e:  # any refusal will do; a 200 will not
                refused = e
            finally:
                await late.close()
            return answer, took, refused

    answer, took, refused = run(body)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert took < 2.0  # the deadline (0.8 s, the stream kept open by the client) held
    assert refused is not None  # drained: nothing listens any more
