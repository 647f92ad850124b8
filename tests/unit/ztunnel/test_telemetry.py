"""Istio's TCP metrics and the access log, from connections ztunnel reports."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from prometheus_client import generate_latest

from tests.unit.ztunnel.conftest import service, workload
from ztunnel.telemetry import LABELS, Conn, Telemetry, traffic_labels

SLEEP = replace(workload("sleep", "10.0.0.1", "client", "sleep"), canonical_name="sleep")
ECHO = replace(
    workload("echo-1", "10.0.1.1", "server", "echo"),
    canonical_name="echo",
    canonical_revision="v1",
    workload_name="echo",
)
SVC = service("echo", "10.96.0.20", "server")


def conn(
    direction: str = "outbound", protocol: str = "HBONE", counters: tuple[int, int] = (0, 0)
) -> Conn:
    return Conn(
        "client/sleep" if direction == "outbound" else "server/echo-1",
        direction,
        protocol,
        "10.0.0.1:40000",
        "10.96.0.20:80",
        "10.0.1.1:15008",
        src_identity="spiffe://cluster.local/ns/client/sa/sleep",
        dst_identity="spiffe://cluster.local/ns/server/sa/echo" if protocol == "HBONE" else "",
        src_workload=SLEEP,
        dst_workload=ECHO,
        dst_service=SVC,
        counters=lambda: counters,
    )


def test_labels_are_istios_with_both_sides_filled_in() -> None:
    labels = traffic_labels(conn())
    assert list(labels) == list(LABELS)
    assert labels["reporter"] == "source"
    assert labels["source_workload"] == "sleep" and labels["source_workload_namespace"] == "client"
    assert labels["source_principal"] == "spiffe://cluster.local/ns/client/sa/sleep"
    assert labels["destination_workload"] == "echo"  # the workload (Deployment), not the pod
    assert labels["destination_canonical_service"] == "echo"
    assert labels["destination_canonical_revision"] == "v1"
    assert labels["destination_service"] == "echo.server.svc.cluster.local"
    assert labels["destination_principal"] == "spiffe://cluster.local/ns/server/sa/echo"
    assert labels["connection_security_policy"] == "mutual_tls"
    assert traffic_labels(conn("inbound"))["reporter"] == "destination"
    plain = traffic_labels(replace(conn("outbound", "TCP"), dst_service=None, dst_workload=None))
    assert plain["connection_security_policy"] == "unknown"
    assert (
        plain["destination_workload"] == "unknown" and plain["destination_principal"] == "unknown"
    )


def test_counts_bytes_once_at_close_and_logs_each_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = Telemetry()
    caplog.set_level(logging.INFO, logger="ztunnel.access")
    first = t.open(conn(counters=(5, 17)))
    second = t.open(conn(counters=(1, 2)))
    assert t.live == {first, second}
    t.close(first)
    t.close(first)  # twice: counted once
    text = generate_latest(t.registry).decode()
    assert "istio_tcp_connections_opened_total{" in text
    assert _value(text, "istio_tcp_connections_opened_total") == 2
    assert _value(text, "istio_tcp_connections_closed_total") == 1
    assert _value(text, "istio_tcp_received_bytes_total") == 5
    assert _value(text, "istio_tcp_sent_bytes_total") == 17
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "connection complete" in lines[0]
    assert "bytes_sent=17 bytes_recv=5" in lines[0] and "dst.workload=server/echo-1" in lines[0]
    # A refusal is logged with its reason and counted, never opened.
    t.refuse(conn(), "denied by a DENY policy (server/p)", "policy")
    assert "connection refused" in caplog.records[-1].getMessage()
    assert "DENY policy" in caplog.records[-1].getMessage()
    text = generate_latest(t.registry).decode()
    assert 'ztunnel_connections_refused_total{direction="outbound",reason="policy"} 1.0' in text
    assert _value(text, "istio_tcp_connections_opened_total") == 2


def test_a_new_workload_object_gets_its_own_series() -> None:
    t = Telemetry()
    t.close(t.open(conn()))
    moved = replace(conn(), dst_workload=replace(ECHO, canonical_revision="v2"))
    t.close(t.open(moved))
    text = generate_latest(t.registry).decode()
    assert 'destination_canonical_revision="v1"' in text
    assert 'destination_canonical_revision="v2"' in text


def _value(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def test_labels_are_built_once_per_kind_of_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    import ztunnel.telemetry as telemetry

    built: list[Conn] = []
    real = telemetry.traffic_labels

    def counting(c: Conn) -> dict[str, str]:
        built.append(c)
        return real(c)

    monkeypatch.setattr(telemetry, "traffic_labels", counting)
    t = Telemetry()
    for _ in range(50):
        t.close(t.open(conn()))
    assert len(built) == 1
    t.close(t.open(conn("inbound")))
    assert len(built) == 2
