"""What ztunnel tells about the connections it carries: metrics, access logs, the live list.

Every connection a pod's proxy takes is a :class:`Conn` from the moment its
destination is known until both sides have closed. :class:`Telemetry` keeps
the live ones (the admin's connection list), counts them in Istio's metrics
(so existing dashboards work), and writes one access-log line per connection
when it ends, or when it is refused, with the reason.

Istio's TCP metrics, with its labels (``reporter`` is ``source`` for the
client's ztunnel and ``destination`` for the server's; unknown values are
``unknown``): ``istio_tcp_connections_opened_total``,
``istio_tcp_connections_closed_total``, ``istio_tcp_received_bytes_total``
(bytes from the client, the request side) and ``istio_tcp_sent_bytes_total``
(bytes to the client, the response side). Bytes are added when the
connection closes.

The labels are a pure function of a :class:`Conn` (:func:`traffic_labels`).
The destination fills ``destination_service*`` (and, for a source its index
does not know, ``source_*``) with help from the CONNECT's ``baggage``: only
services its own index confirms, only bounded source values
(:mod:`ztunnel.baggage`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.istio_metrics import TCP_LABELS
from mesh.model import Service, Workload
from ztunnel.baggage import DerivedSources

access_log = logging.getLogger("ztunnel.access")
# Istio exports no *_created series beside its counters. (Some prometheus-client
# releases leave this function unannotated: called through a typed name.)
_disable_created: Callable[[], None] = disable_created_metrics
_disable_created()

UNKNOWN = "unknown"
LABELS = TCP_LABELS  # Istio's TCP metrics' labels

# (bytes received from the client, bytes sent to the client), read when asked.
Counters = Callable[[], tuple[int, int]]


def _no_bytes() -> tuple[int, int]:
    return 0, 0


class _XdsConnects(Collector):
    """``ztunnel_xds_connections_total``: streams opened to the control plane, read
    from the xDS client when scraped."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "ztunnel_xds_connections",
            "xDS streams opened to the control plane",
            value=self.telemetry.xds_connects(),
        )


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """The same objects, one by one (an ``id()`` reused by a new object is not)."""
    return all(x is y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class _Series:
    """One label set's counters."""

    opened: Any
    closed: Any
    received: Any
    sent: Any


@dataclass(eq=False, slots=True)
class Conn:
    """One connection through ztunnel, as the admin, the metrics and the log see it."""

    pod: str  # "namespace/name" of the enrolled pod it belongs to
    direction: str  # "inbound" (to the pod) or "outbound" (from it)
    protocol: str  # "HBONE" or "TCP" (plain: passthrough, or inbound on 15006)
    src: str  # "ip:port" of the client
    original_dst: str  # "ip:port" the client asked for
    actual_dst: str  # "ip:port" ztunnel connected to
    src_identity: str = ""
    dst_identity: str = ""
    src_workload: Workload | None = None
    dst_workload: Workload | None = None
    dst_service: Service | None = None
    counters: Counters = _no_bytes
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)  # the admin's startedAt
    series: _Series | None = None

    @property
    def mutual_tls(self) -> bool:
        return self.protocol == "HBONE"

    def as_dict(self) -> dict[str, object]:
        received, sent = self.counters()
        return {
            "workload": self.pod,
            "direction": self.direction,
            "src": self.src,
            "originalDst": self.original_dst,
            "actualDst": self.actual_dst,
            "protocol": self.protocol,
            "srcIdentity": self.src_identity,
            "dstIdentity": self.dst_identity,
            "bytesSent": sent,
            "bytesReceived": received,
            "startedAt": datetime.fromtimestamp(self.started_wall, UTC)
            .isoformat(timespec="seconds")
            .replace("+00:00", "Z"),
        }


def _app(w: Workload | None) -> tuple[str, str]:
    """(app, version) as Istio derives them: the canonical service and revision."""
    if w is None:
        return UNKNOWN, UNKNOWN
    return w.canonical_name or w.name or UNKNOWN, w.canonical_revision or "latest"


def _side(prefix: str, w: Workload | None, principal: str) -> dict[str, str]:
    app, version = _app(w)
    return {
        f"{prefix}_workload": (w.workload_name or w.name) if w else UNKNOWN,
        f"{prefix}_canonical_service": app,
        f"{prefix}_canonical_revision": version,
        f"{prefix}_workload_namespace": w.namespace if w else UNKNOWN,
        f"{prefix}_principal": principal or UNKNOWN,
        f"{prefix}_app": app,
        f"{prefix}_version": version,
        f"{prefix}_cluster": (w.cluster_id or UNKNOWN) if w else UNKNOWN,
    }


def traffic_labels(conn: Conn) -> dict[str, str]:
    """Istio's label set for one connection, from the side of the ztunnel reporting it."""
    service = conn.dst_service
    labels = {
        "reporter": "destination" if conn.direction == "inbound" else "source",
        **_side("source", conn.src_workload, conn.src_identity),
        "destination_service": service.hostname if service else UNKNOWN,
        "destination_service_namespace": service.namespace if service else UNKNOWN,
        "destination_service_name": service.name if service else UNKNOWN,
        **_side("destination", conn.dst_workload, conn.dst_identity),
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls" if conn.mutual_tls else UNKNOWN,
    }
    return {name: labels[name] for name in LABELS}


def _fields(conn: Conn) -> str:
    def who(w: Workload | None) -> str:
        return f"{w.namespace}/{w.name}" if w else "-"

    parts = [
        f"direction={conn.direction}",
        f"protocol={conn.protocol}",
        f"src.addr={conn.src}",
        f"src.workload={who(conn.src_workload)}",
        f'src.identity="{conn.src_identity or "-"}"',
        f"dst.addr={conn.actual_dst}",
        f"dst.original={conn.original_dst}",
        f"dst.service={conn.dst_service.hostname if conn.dst_service else '-'}",
        f"dst.workload={who(conn.dst_workload)}",
        f'dst.identity="{conn.dst_identity or "-"}"',
    ]
    return " ".join(parts)


class Telemetry:
    """The node's connection registry, its Prometheus metrics and its access log."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", LABELS, registry=r
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", LABELS, registry=r
        )
        self.received = Counter(
            "istio_tcp_received_bytes", "Bytes received from the client", LABELS, registry=r
        )
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent to the client", LABELS, registry=r)
        self.refused = Counter(
            "ztunnel_connections_refused",
            "Connections ztunnel refused (no route, policy, no peer, ...)",
            ["direction", "reason"],
            registry=r,
        )
        self.xds_connected = Gauge(
            "ztunnel_xds_connected", "1 while the xDS stream to the control plane is up", registry=r
        )
        self.xds_connects: Callable[[], int] = lambda: 0
        r.register(_XdsConnects(self))
        self.pods = Gauge("ztunnel_enrolled_pods", "Pods this ztunnel serves", registry=r)
        self.certificate_expiry = Gauge(
            "ztunnel_certificate_expiration_timestamp_seconds",
            "When each workload certificate expires (Unix time)",
            ["identity"],
            registry=r,
        )
        ProcessCollector(registry=r)
        self.live: set[Conn] = set()
        # Sources only peers' baggage describes: bounded, as every label value is.
        self.derived_sources = DerivedSources()
        self._children: dict[tuple[object, ...], tuple[tuple[object, ...], _Series]] = {}

    def _series(self, conn: Conn) -> _Series:
        """The four counters of ``conn``'s label set, looked up once per distinct set
        (building the labels and finding a child costs more than the connection's
        other bookkeeping)."""
        key = (
            conn.direction,
            conn.protocol == "HBONE",
            conn.src_identity,
            conn.dst_identity,
            id(conn.src_workload),
            id(conn.dst_workload),
            id(conn.dst_service),
        )
        found = self._children.get(key)
        if found is None or not _same(
            found[0], (conn.src_workload, conn.dst_workload, conn.dst_service)
        ):
            labels = traffic_labels(conn)
            series = _Series(
                self.opened.labels(**labels),
                self.closed.labels(**labels),
                self.received.labels(**labels),
                self.sent.labels(**labels),
            )
            if len(self._children) > 10_000:
                self._children.clear()
            # The objects are kept with the key so an id() reused by a new object
            # cannot be taken for the old one.
            found = self._children[key] = (
                (conn.src_workload, conn.dst_workload, conn.dst_service),
                series,
            )
        return found[1]

    def open(self, conn: Conn) -> Conn:
        self.live.add(conn)
        conn.series = self._series(conn)
        conn.series.opened.inc()
        return conn

    def close(self, conn: Conn, error: str | None = None) -> None:
        """The connection ended (both sides closed); count its bytes and log it once."""
        if conn not in self.live:
            return
        self.live.discard(conn)
        series = conn.series or self._series(conn)
        received, sent = conn.counters()
        series.closed.inc()
        series.received.inc(received)
        series.sent.inc(sent)
        duration_ms = (time.monotonic() - conn.started) * 1000
        line = (
            f"connection complete {_fields(conn)} bytes_sent={sent} bytes_recv={received} "
            f"duration={duration_ms:.0f}ms"
        )
        if error:
            access_log.warning("%s error=%r", line, error)
        else:
            access_log.info("%s", line)

    def refuse(self, conn: Conn, reason: str, kind: str) -> None:
        """A connection ztunnel would not carry: logged with why, never opened."""
        self.live.discard(conn)
        self.refused.labels(direction=conn.direction, reason=kind).inc()
        access_log.warning("connection refused %s error=%r", _fields(conn), reason)
