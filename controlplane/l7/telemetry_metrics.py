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

from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2

from controlplane.l7.reader import Reader
from mesh.istio_metrics import ATTRIBUTES, HEADER, LITERAL, METRICS, STANDARD_LABELS

ISTIO_STATS = "istio.stats"
PLUGIN_CONFIG = "type.googleapis.com/stats.PluginConfig"
TAGS = frozenset(STANDARD_LABELS)
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
    if v in ATTRIBUTES or LITERAL.match(v) or HEADER.match(v):
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
