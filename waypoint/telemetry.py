"""What the waypoint tells about the requests it serves: Istio's request metrics, access log.

Metrics with Istio's names and labels (``reporter="waypoint"``), so existing
dashboards work: ``istio_requests_total``,
``istio_request_duration_milliseconds`` (Istio's buckets),
``istio_request_bytes`` and ``istio_response_bytes``. The source is the HBONE
peer (the client's identity, as the source ztunnel presents it); the
destination is the endpoint that answered (its workload from EDS metadata)
and the service of the cluster. Unknown values are ``unknown``. Label sets
are computed once per (source, endpoint, cluster, code, flags) and cached.

One access-log line per request (logger ``waypoint.access``) in Istio's text
format, Envoy's fields first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from waypoint.records import RequestRecord

access_log = logging.getLogger("waypoint.access")
UNKNOWN = "unknown"
DURATION_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)
LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

ServiceOf = Callable[[str], Mapping[str, Any]]  # cluster name -> its istio.services[0]


@lru_cache(maxsize=8192)
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
        UNKNOWN,
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
        grpc or "-",
        flags,
        "mutual_tls" if principal else "none",
    )


class Telemetry:
    def __init__(self, service_of: ServiceOf | None = None) -> None:
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
            "Request bytes",
            LABELS,
            buckets=BYTES_BUCKETS,
            registry=self.registry,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response bytes",
            LABELS,
            buckets=BYTES_BUCKETS,
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
        self.identity_by_workload: dict[str, str] = {}

    def record(self, rec: RequestRecord) -> None:
        service = self.service_of(rec.cluster)
        protocol = "grpc" if rec.grpc_status else "http"
        labels = _labels(
            str(rec.info.get("peer_identity") or ""),
            rec.upstream_workload,
            rec.info.get("endpoint_identity", "") or "",
            str(service.get("host", "")),
            str(service.get("name", "")),
            str(service.get("namespace", "")),
            protocol,
            str(rec.status),
            rec.grpc_status,
            rec.flags,
        )
        self.requests.labels(*labels).inc()
        self.duration.labels(*labels).observe(rec.duration_ms)
        self.request_bytes.labels(*labels).observe(rec.bytes_received)
        self.response_bytes.labels(*labels).observe(rec.bytes_sent)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(format_access_log(rec))


def format_access_log(rec: RequestRecord) -> str:
    """Istio's default text format (Envoy's, plus Istio's trailing fields)."""
    start = datetime.fromtimestamp(rec.start, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def q(value: str) -> str:
        return value or "-"

    return (
        f'[{start}] "{rec.method} {rec.path} {rec.protocol}" {rec.status} {rec.flags} '
        f'{q(rec.details)} - "-" {rec.bytes_received} {rec.bytes_sent} '
        f"{round(rec.duration_ms)} "
        f"{round(rec.upstream_service_ms) if rec.upstream_service_ms is not None else '-'} "
        f'"{q(rec.forwarded_for)}" "{q(rec.user_agent)}" "{q(rec.request_id)}" '
        f'"{q(rec.authority)}" "{q(rec.upstream_host)}" {q(rec.cluster)} - '
        f"{q(str(rec.info.get('authority', '')))} {q(str(rec.info.get('peer', '')))} - "
        f"{q(rec.route)}"
    )
