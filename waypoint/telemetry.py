"""What the waypoint tells about the requests it serves: Istio's request metrics, access log.

Metrics with Istio's names and labels (``reporter="waypoint"``), so existing
dashboards work: ``istio_requests_total``,
``istio_request_duration_milliseconds`` (Istio's buckets),
``istio_request_bytes`` and ``istio_response_bytes`` (downstream wire bytes,
as Istio's ``istio_stats`` observes them: the body plus the head, trailers and
HTTP/1.1 chunk framing; for HTTP/2 the heads count at their HPACK size, see
:func:`waypoint.http.h2server.hpack_size`), and for gRPC requests
``istio_request_messages_total`` / ``istio_response_messages_total`` (the
messages of each direction, counted as Envoy's ``grpc_stats`` does). The source
is the HBONE peer (the client's identity, as the source ztunnel presents it);
the destination is the endpoint that answered (its workload from EDS
metadata) and the service of the cluster. Unknown values are ``unknown``.

Label sets are bounded: the values that come from outside (``response_code``,
``grpc_response_status``, which any upstream may set) are checked, and once
:data:`MAX_SERIES` distinct label sets exist, the requests of any new one are
folded into an overflow series per protocol and response-code class whose
other labels say ``unknown`` (counted by ``waypoint_metric_series_overflow_total``,
and warned about once). Every ``istio_*`` family takes its label sets from
that one table, so none holds more than :data:`MAX_SERIES` (plus the overflow
series); the table also serves as the cache of computed label sets.

With ``--access-log``, one line per request (logger ``waypoint.access``) in
Istio's text format (or its JSON fields, ``--log-format json``), besides the
access logs the connection manager's config asks for (:mod:`waypoint.accesslog`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from mesh.istio_metrics import STANDARD_LABELS, TCP_LABELS
from waypoint.accesslog import AccessLogEntry, Formatter, istio_formatter
from waypoint.config.stats import StatsConfig
from waypoint.grpc_messages import grpc_status_label
from waypoint.metric_overrides import Context, Overrides
from waypoint.records import RequestRecord

# Istio exports no *_created series beside its counters and histograms (as ztunnel.telemetry).
_disable_created: Callable[[], None] = disable_created_metrics
_disable_created()

access_log = logging.getLogger("waypoint.access")
log = logging.getLogger("waypoint.telemetry")
UNKNOWN = "unknown"
MAX_SERIES = 10000  # distinct label sets per metric family, beyond which they are folded
DURATION_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)
LABELS = STANDARD_LABELS
_PROTOCOL = LABELS.index("request_protocol")
_CODE = LABELS.index("response_code")
_GRPC = LABELS.index("grpc_response_status")

ServiceOf = Callable[[str], Mapping[str, Any]]  # cluster name -> its istio.services[0]
LabelKey = tuple[str, ...]  # what a label set is computed from (see Telemetry.labels)


def response_code(status: int) -> str:
    """The ``response_code`` label: the status sent, 0 when none was; else ``unknown``."""
    return str(status) if status == 0 or 100 <= status <= 999 else UNKNOWN


def _labels(
    principal: str,
    workload: str,
    identity: str,
    service_host: str,
    service_name: str,
    service_namespace: str,
    protocol: str,
    code: str,
    grpc: str,
    flags: str,
) -> tuple[str, ...]:
    ns = UNKNOWN
    if "/ns/" in principal:
        ns = principal.split("/ns/", 1)[1].split("/", 1)[0]
    parts = workload.split(";") if workload else []
    dest = (parts + [UNKNOWN] * 5)[:5] if parts else [UNKNOWN] * 5
    name, namespace, canonical, revision, cluster = (p or UNKNOWN for p in dest)
    return (
        "waypoint",
        UNKNOWN,
        UNKNOWN,
        "latest",  # istio_stats: the peer's canonical revision, else "latest"
        ns,
        principal or UNKNOWN,
        UNKNOWN,
        UNKNOWN,
        UNKNOWN,
        service_host or UNKNOWN,
        service_namespace or UNKNOWN,
        service_name or UNKNOWN,
        name,
        canonical,
        revision,
        namespace,
        identity or UNKNOWN,
        canonical,
        revision,
        cluster,
        protocol,
        code,
        grpc,
        flags,
        "mutual_tls" if principal else "none",
    )


def overflow_labels(protocol: str, code: str) -> tuple[str, ...]:
    """The series a label set beyond the cap is folded into: everything ``unknown`` but
    the reporter, the protocol and the class of the response code (``5xx``), so that
    request rates and error ratios stay right."""
    labels = ["waypoint"] + [UNKNOWN] * (len(LABELS) - 1)
    labels[_PROTOCOL] = protocol
    labels[_CODE] = f"{code[0]}xx" if len(code) == 3 else code
    labels[_GRPC] = UNKNOWN if protocol == "grpc" else ""
    return tuple(labels)


class Telemetry:
    def __init__(
        self, service_of: ServiceOf | None = None, access_format: Formatter | None = None
    ) -> None:
        """``access_format``: the ``waypoint.access`` line (``--access-log``; Istio's text
        format unless given, e.g. its JSON fields with ``--log-format json``)."""
        self.access_format = access_format or istio_formatter()
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.service_of = service_of or (lambda _: {})
        self.requests = Counter("istio_requests", "Requests served", LABELS, registry=self.registry)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Request bytes on the downstream wire, headers included",
            LABELS,
            buckets=BYTES_BUCKETS,
            registry=self.registry,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response bytes on the downstream wire, headers included",
            LABELS,
            buckets=BYTES_BUCKETS,
            registry=self.registry,
        )
        self.request_messages = Counter(
            "istio_request_messages",
            "gRPC messages received from the client",
            LABELS,
            registry=self.registry,
        )
        self.response_messages = Counter(
            "istio_response_messages",
            "gRPC messages sent to the client",
            LABELS,
            registry=self.registry,
        )
        self.active = Gauge(
            "waypoint_requests_active", "Requests in flight", registry=self.registry
        )
        self.config_refused = Counter(
            "waypoint_xds_resources_refused",
            "xDS resources refused (NACKed)",
            ["type"],
            registry=self.registry,
        )
        self.series_overflow = Counter(
            "waypoint_metric_series_overflow",
            "Requests whose label set was folded into an overflow series (too many label sets)",
            registry=self.registry,
        )
        self.tcp_opened = self._tcp_counter("connections_opened", "TCP connections opened")
        self.tcp_closed = self._tcp_counter("connections_closed", "TCP connections closed")
        self.tcp_sent = self._tcp_counter("sent_bytes", "Bytes sent downstream (TCP)")
        self.tcp_received = self._tcp_counter("received_bytes", "Bytes received from downstream")
        self.overrides = Overrides(lambda: MAX_SERIES)  # a Telemetry's metrics overrides
        self.identity_by_workload: dict[str, str] = {}
        # Every label set admitted, by what it was computed from: at most MAX_SERIES.
        self._series: dict[LabelKey, tuple[str, ...]] = {}
        self._warned = False

    def _record_overridden(
        self, rec: RequestRecord, labels: tuple[str, ...], stats: StatsConfig
    ) -> None:
        """What a Telemetry's metrics overrides leave of the standard observations."""
        protocol, code = ("grpc" if rec.grpc else "http"), response_code(rec.status)

        def context() -> Context:
            return _http_context(rec)

        def overflow() -> tuple[str, ...]:
            return overflow_labels(protocol, code)

        def values(metric: str) -> tuple[str, ...] | None:
            return self.overrides.apply(stats, metric, LABELS, labels, context, overflow)

        if (v := values("requests_total")) is not None:
            self.requests.labels(*v).inc()
        if (v := values("request_duration_milliseconds")) is not None:
            self.duration.labels(*v).observe(rec.duration_ms)
        if (v := values("request_bytes")) is not None:
            self.request_bytes.labels(*v).observe(rec.bytes_received + rec.head_bytes_received)
        if (v := values("response_bytes")) is not None:
            self.response_bytes.labels(*v).observe(rec.bytes_sent + rec.head_bytes_sent)
        if rec.request_messages is not None and (v := values("request_messages_total")):
            self.request_messages.labels(*v).inc(rec.request_messages.count)
        if rec.response_messages is not None and (v := values("response_messages_total")):
            self.response_messages.labels(*v).inc(rec.response_messages.count)

    def tcp_values(
        self,
        stats: StatsConfig | None,
        metric: str,
        labels: tuple[str, ...],
        peer_identity: str,
        chain: str,
    ) -> tuple[str, ...] | None:
        """A TCP metric's label values under the chain's overrides (None: dropped)."""
        if stats is None:
            return labels
        strip = tuple(
            v for i, v in enumerate(overflow_labels("tcp", "0")) if i not in (_CODE, _GRPC)
        )
        return self.overrides.apply(
            stats, metric, TCP_LABELS, labels, lambda: _tcp_context(peer_identity, chain),
            lambda: strip,
        )  # fmt: skip

    def _tcp_counter(self, name: str, help: str) -> Counter:
        return Counter(f"istio_tcp_{name}", help, TCP_LABELS, registry=self.registry)

    def tcp_labels(
        self, peer_identity: str, chain: str, cluster: str, workload: str, identity: str
    ) -> tuple[str, ...]:
        """The label set of a relayed TCP connection (a TCP chain's, or a workload's)."""
        service = self.service_of(cluster) or _chain_service(chain)
        key = (
            peer_identity,
            workload,
            identity,
            str(service.get("host", "")),
            str(service.get("name", "")),
            str(service.get("namespace", "")),
            "tcp",
            "",
            "",
            "-",
        )
        full = self._admit(key, "tcp", "")
        return tuple(v for i, v in enumerate(full) if i not in (_CODE, _GRPC))

    def tcp_opened_with(
        self, labels: tuple[str, ...], stats: StatsConfig | None, peer: str, chain: str
    ) -> None:
        v = self.tcp_values(stats, "tcp_connections_opened_total", labels, peer, chain)
        if v is not None:
            self.tcp_opened.labels(*v).inc()

    def tcp_closed_with(
        self,
        labels: tuple[str, ...],
        sent: int,
        received: int,
        stats: StatsConfig | None = None,
        peer: str = "",
        chain: str = "",
    ) -> None:
        for metric, family, amount in (
            ("tcp_connections_closed_total", self.tcp_closed, 1),
            ("tcp_sent_bytes_total", self.tcp_sent, sent),
            ("tcp_received_bytes_total", self.tcp_received, received),
        ):
            v = self.tcp_values(stats, metric, labels, peer, chain)
            if v is not None:
                family.labels(*v).inc(amount)

    def labels(self, rec: RequestRecord) -> tuple[str, ...]:
        """The label set of ``rec``'s request: its own, or an overflow series' past the cap."""
        service = self.service_of(rec.cluster) if rec.cluster else {}
        if not service:
            # Answered here (RBAC, JWT, rate limit, no route): the service of the chain
            # that took the stream, where Istio falls back to the Host header (unbounded).
            service = _chain_service(str(rec.info.get("chain", "")))
        protocol = "grpc" if rec.grpc else "http"
        code = response_code(rec.status)
        key = (
            str(rec.info.get("peer_identity") or ""),
            rec.upstream_workload,
            rec.upstream_identity,
            str(service.get("host", "")),
            str(service.get("name", "")),
            str(service.get("namespace", "")),
            protocol,
            code,
            grpc_status_label(rec.grpc_status, rec.status) if rec.grpc else "",
            rec.flags,
        )
        return self._admit(key, protocol, code)

    def _admit(self, key: LabelKey, protocol: str, code: str) -> tuple[str, ...]:
        labels = self._series.get(key)
        if labels is not None:
            return labels
        if len(self._series) < MAX_SERIES:
            labels = self._series[key] = _labels(*key)
            return labels
        self.series_overflow.inc()
        if not self._warned:
            self._warned = True
            log.warning(
                "waypoint: more than %d distinct metric label sets; new ones are folded into "
                "overflow series (labels 'unknown'), see waypoint_metric_series_overflow_total",
                MAX_SERIES,
            )
        return overflow_labels(protocol, code)

    def record(self, rec: RequestRecord) -> None:
        labels = self.labels(rec)
        if rec.stats is not None:
            self._record_overridden(rec, labels, rec.stats)
        else:
            self.requests.labels(*labels).inc()
            self.duration.labels(*labels).observe(rec.duration_ms)
            self.request_bytes.labels(*labels).observe(rec.bytes_received + rec.head_bytes_received)
            self.response_bytes.labels(*labels).observe(rec.bytes_sent + rec.head_bytes_sent)
            if rec.request_messages is not None:
                self.request_messages.labels(*labels).inc(rec.request_messages.count)
            if rec.response_messages is not None:
                self.response_messages.labels(*labels).inc(rec.response_messages.count)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(self.access_format.format(AccessLogEntry(rec)).rstrip("\n"))


def _http_context(rec: RequestRecord) -> Context:
    peer = str(rec.info.get("peer_identity") or "")
    return Context(
        {
            "request.host": rec.authority,
            "request.method": rec.method,
            "request.path": rec.path,
            "request.url_path": rec.path.split("?", 1)[0],
            "request.scheme": "http",
            "request.protocol": rec.protocol,
            "request.useragent": rec.user_agent,
            "response.code": str(rec.status),
            "source.principal": peer.removeprefix("spiffe://"),
            "destination.port": str(rec.info.get("chain", "")).rpartition(":")[2],
        },
        rec.request_headers,
    )


def _tcp_context(peer_identity: str, chain: str) -> Context:
    return Context(
        {
            "source.principal": peer_identity.removeprefix("spiffe://"),
            "destination.port": chain.rpartition(":")[2],
        }
    )


def _chain_service(chain: str) -> Mapping[str, str]:
    """A service chain's name is ``<name>.<namespace>.svc.<domain>:<port>`` (meshd's)."""
    host = chain.rpartition(":")[0]
    parts = host.split(".")
    if len(parts) < 3 or parts[2] != "svc":
        return {}
    return {"host": host, "name": parts[0], "namespace": parts[1]}
