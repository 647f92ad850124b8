"""Telemetry ``metrics`` overrides for waypoints: Istio's standard metrics dropped or re-tagged.

``metrics[].overrides[]`` with ``match.metric`` (``ALL_METRICS`` or one of
Istio's: ``REQUEST_COUNT``, ``REQUEST_DURATION``, ``REQUEST_SIZE``,
``RESPONSE_SIZE``, ``TCP_OPENED_CONNECTIONS``, ``TCP_CLOSED_CONNECTIONS``,
``TCP_SENT_BYTES``, ``TCP_RECEIVED_BYTES``, ``GRPC_REQUEST_MESSAGES``,
``GRPC_RESPONSE_MESSAGES``) and ``match.mode`` (SERVER or CLIENT_AND_SERVER
apply to a waypoint), ``disabled``, and ``tagOverrides`` of Istio's standard
tags: ``REMOVE``, or ``UPSERT`` with a ``value`` that is one of the CEL
expressions below. istiod sends them to the proxy's ``istio.stats`` filter
(``stats.PluginConfig``: ``metrics[]{name, dimensions, tags_to_remove, drop}``);
meshd sends the same, as a ``udpa.type.v1.TypedStruct``.

Supported values (CEL, as Istio's docs use them): a string literal
(``'x'``/``"x"``), ``request.host``, ``request.method``, ``request.path``,
``request.url_path``, ``request.scheme``, ``request.protocol``,
``request.useragent``, ``request.headers['name']``, ``response.code``,
``source.principal``, ``destination.port``. Refused with the Telemetry's
status: other expressions, ``customMetric``, new dimensions (an UPSERT of a
tag that is not one of Istio's), ``reportingInterval``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2

from controlplane.l7.reader import Reader

ISTIO_STATS = "istio.stats"
PLUGIN_CONFIG = "type.googleapis.com/stats.PluginConfig"
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
# Istio's standard tags (istio_stats' dimensions), all of which a waypoint reports.
TAGS = frozenset(
    {
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
    }
)
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
_LITERAL = re.compile(r"""^(?:'([^'\\]*)'|"([^"\\]*)")$""")
_HEADER = re.compile(r"""^request\.headers\[(?:'([A-Za-z0-9-]+)'|"([A-Za-z0-9-]+)")\]$""")
_MODES = ("CLIENT", "SERVER", "CLIENT_AND_SERVER")


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricOverride:
    metric: str  # istio_stats' name
    drop: bool | None = None
    remove: tuple[str, ...] = ()
    dimensions: tuple[tuple[str, str], ...] = ()  # (tag, expression)


def check_value(r: Reader, key: str, value: str) -> str:
    """An UPSERT's value, if it is an expression we evaluate; else refused naming it."""
    v = value.strip()
    if v in ATTRIBUTES or _LITERAL.match(v) or _HEADER.match(v):
        return v
    raise r.error(
        f"{value!r} is not supported: a string literal, request.headers['name'], or one of "
        + ", ".join(sorted(ATTRIBUTES)),
        key,
    )


def parse_metrics(spec: Reader) -> tuple[MetricOverride, ...]:
    """The overrides of a Telemetry's ``metrics`` entries that apply to a waypoint, in order."""
    out: list[MetricOverride] = []
    for m in spec.children("metrics"):
        m.only({"providers", "overrides"}, {"reportingInterval": "a reporting interval"})
        for o in m.children("overrides"):
            o.only({"match", "disabled", "tagOverrides"})
            match = o.child("match").only({"metric", "mode"}, {"customMetric": "custom metrics"})
            mode = match.one_of("mode", _MODES, "CLIENT_AND_SERVER")
            if mode == "CLIENT":
                continue  # the client side: a waypoint is the server
            selected = match.one_of("metric", ("ALL_METRICS", *METRICS), "ALL_METRICS")
            names = list(METRICS.values()) if selected == "ALL_METRICS" else [METRICS[selected]]
            remove: list[str] = []
            dims: list[tuple[str, str]] = []
            tags = o.child("tagOverrides")
            for tag in sorted(tags.raw):
                t = tags.child(tag).only({"operation", "value"})
                if tag not in TAGS:
                    raise tags.error(
                        "not supported: only Istio's standard tags can be changed here "
                        "(a new dimension is not)",
                        tag,
                    )
                op = t.one_of("operation", ("UPSERT", "REMOVE"), "UPSERT")
                if op == "REMOVE":
                    remove.append(tag)
                else:
                    dims.append((tag, check_value(t, "value", t.text("value"))))
            drop = o.boolean("disabled") if o.has("disabled") else None
            for name in names:
                out.append(
                    MetricOverride(
                        metric=name, drop=drop, remove=tuple(remove), dimensions=tuple(dims)
                    )
                )
    return tuple(out)


def plugin_config(overrides: tuple[MetricOverride, ...]) -> struct_pb2.Struct:
    """istio_stats' ``stats.PluginConfig`` (reporter SERVER_GATEWAY: a waypoint)."""
    metrics: list[Any] = []
    for o in overrides:
        entry: dict[str, Any] = {"name": o.metric}
        if o.dimensions:
            entry["dimensions"] = dict(o.dimensions)
        if o.remove:
            entry["tags_to_remove"] = list(o.remove)
        if o.drop is not None:
            entry["drop"] = o.drop
        metrics.append(entry)
    out = struct_pb2.Struct()
    out.update({"reporter": "SERVER_GATEWAY", "metrics": metrics})
    return out
