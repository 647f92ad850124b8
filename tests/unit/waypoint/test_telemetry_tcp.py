"""Istio's TCP metrics of the connections a waypoint relays (a TCP port of a service):
``istio_tcp_connections_opened_total`` / ``closed``, ``sent_bytes`` / ``received_bytes``,
reporter ``waypoint``, the client from its HBONE identity, the service of the chain."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.state import ServicePortInfo
from mesh.hbone.local import LocalSocket
from mesh.hbone.server import ConnectRequest
from mesh.identity import SpiffeId
from tests.support.l7world import service, world
from tests.support.waypoint_harness import config_for, reviews_backends, waypoint, with_backends
from tests.unit.hbone.conftest import run
from tests.unit.waypoint.test_rbac import _Channel
from waypoint.telemetry import Telemetry

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
REQUEST = b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n"


def test_a_relayed_tcp_connection_is_counted_with_its_bytes() -> None:
    tcp_reviews = service(
        "reviews",
        {"app": "reviews"},
        ports=[ServicePortInfo(port=9080, target_port=8080, name="tcp")],
    )

    async def body() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        bs = await reviews_backends()
        state = with_backends(world(services=(tcp_reviews,)), bs)
        telemetry = Telemetry()
        try:
            async with waypoint(config_for(state), "10.96.0.20:9080") as wp:
                wp.proxy.telemetry = telemetry
                sock = await wp.proxy.connect(
                    ConnectRequest(
                        peer_identity=SpiffeId.parse(FRONTEND),
                        peer_address="10.244.1.5:40000",
                        authority="10.96.0.20:9080",
                        host="10.96.0.20",
                        port=9080,
                    )
                )
                assert isinstance(sock, LocalSocket)
                channel = _Channel()
                sock.attach(channel)  # type: ignore[arg-type]
                sock.from_peer(REQUEST)
                for _ in range(100):
                    if b"".join(channel.data).endswith(b"}"):
                        break
                    await asyncio.sleep(0.02)
                sock.peer_closed(None)
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if (
                        "istio_tcp_connections_closed_total"
                        in generate_latest(telemetry.registry).decode()
                    ):
                        break
                answer = len(b"".join(channel.data))
        finally:
            for b in bs.values():
                await b.stop()
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(generate_latest(telemetry.registry).decode()):
            for sample in family.samples:
                if sample.name.startswith("istio_tcp_"):
                    out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = (
                        sample.value
                    )
        out["answer"] = {(): float(answer)}
        return out

    got = run(body)
    answer = got.pop("answer")[()]
    assert set(got) == {
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    }
    for name, series in got.items():
        ((labels, value),) = series.items()
        labels_d = dict(labels)
        assert labels_d["reporter"] == "waypoint"
        assert labels_d["source_principal"] == FRONTEND
        assert labels_d["source_workload_namespace"] == "shop"
        assert labels_d["destination_service"] == "reviews.shop.svc.cluster.local"
        assert labels_d["request_protocol"] == "tcp"
        assert "response_code" not in labels_d
        if name == "istio_tcp_received_bytes_total":
            assert value == len(REQUEST)
        elif name == "istio_tcp_sent_bytes_total":
            assert value == answer > 0
        else:
            assert value == 1
