"""Istio's standard metrics: their labels, istio_stats' names, and the CEL values a
Telemetry's tag overrides may use here.

Shared by ztunnel and the waypoint (the labels they report) and by meshd (which
checks a Telemetry's metrics overrides against them before sending them to the
waypoint's ``istio.stats`` filter).
"""

from __future__ import annotations

import re

# The labels of Istio's request metrics (istio_stats' standard dimensions), in order.
STANDARD_LABELS = (
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
# Istio's TCP metrics carry no response code nor gRPC status.
TCP_LABELS = tuple(
    name for name in STANDARD_LABELS if name not in ("response_code", "grpc_response_status")
)
# Istio's MetricSelector.IstioMetric -> istio_stats' metric name.
METRICS = {
    "REQUEST_COUNT": "requests_total",
    "REQUEST_DURATION": "request_duration_milliseconds",
    "REQUEST_SIZE": "request_bytes",
    "RESPONSE_SIZE": "response_bytes",
    "TCP_OPENED_CONNECTIONS": "tcp_connections_opened_total",
    "TCP_CLOSED_CONNECTIONS": "tcp_connections_closed_total",
    "TCP_SENT_BYTES": "tcp_sent_bytes_total",
    "TCP_RECEIVED_BYTES": "tcp_received_bytes_total",
    "GRPC_REQUEST_MESSAGES": "request_messages_total",
    "GRPC_RESPONSE_MESSAGES": "response_messages_total",
}
# The CEL values a tag override may have: these attributes, a string literal
# ('x' or "x"), or request.headers['name'].
ATTRIBUTES = frozenset(
    {
        "request.host",
        "request.method",
        "request.path",
        "request.url_path",
        "request.scheme",
        "request.protocol",
        "request.useragent",
        "response.code",
        "source.principal",
        "destination.port",
    }
)
LITERAL = re.compile(r"""^(?:'([^'\\]*)'|"([^"\\]*)")$""")
HEADER = re.compile(r"""^request\.headers\[(?:'([A-Za-z0-9-]+)'|"([A-Za-z0-9-]+)")\]$""")
