"""The connection manager's ``tracing``, converted: sampling, custom tags, the tracer.

Supported: ``client_sampling``, ``random_sampling``, ``overall_sampling``
(percentages), ``max_path_tag_length``, ``custom_tags`` (``literal``,
``environment``, ``request_header``), and the provider
``envoy.tracers.opentelemetry`` with ``service_name`` and a ``grpc_service``
that names its collector: ``google_grpc.target_uri`` (what meshd sends) or
``envoy_grpc.cluster_name`` of a cluster whose endpoints are plain addresses
(what istiod sends), resolved when spans are exported. No provider: request
ids and sampling decisions only, the trace headers pass as they came.
The provider ``envoy.tracers.zipkin`` with ``collector_cluster``,
``collector_endpoint`` (JSON v2), ``shared_span_context`` and
``trace_context_option``. Everything else (other tracers, ``verbose``, ``spawn_upstream_span``,
``operation``, OTLP over HTTP, samplers, resource detectors) is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2, zipkin_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from waypoint.config.checks import Unsupported, only, unpack

OPENTELEMETRY = "envoy.tracers.opentelemetry"
ZIPKIN = "envoy.tracers.zipkin"
MILLION = 1_000_000
DEFAULT_MAX_PATH_TAG = 256  # Envoy's


@dataclass(frozen=True, slots=True, kw_only=True)
class Collector:
    """Where spans go: a gRPC target, or an Envoy cluster whose first endpoint is it.
    ``zipkin``: Envoy's zipkin tracer (B3 headers, Zipkin v2 JSON posted to ``path``)."""

    service_name: str
    target: str = ""
    cluster: str = ""
    zipkin: bool = False
    path: str = ""
    shared_span_context: bool = True  # Envoy's default
    w3c: bool = False  # trace_context_option USE_B3_WITH_W3C_PROPAGATION


@dataclass(frozen=True, slots=True, kw_only=True)
class Tracing:
    client_ppm: int = MILLION
    random_ppm: int = MILLION
    overall_ppm: int = MILLION
    max_path_tag_length: int = DEFAULT_MAX_PATH_TAG
    # (tag, value) fixed at config time (literal, environment), and (tag, header, default)
    literal_tags: tuple[tuple[str, str], ...] = ()
    header_tags: tuple[tuple[str, str, str], ...] = ()
    collector: Collector | None = None  # None: no tracer (no spans, headers untouched)


def _ppm(value: float) -> int:
    return max(0, min(MILLION, round(value * 10_000)))


def tracing(t: hcm_pb2.HttpConnectionManager.Tracing, where: str) -> Tracing:
    only(
        t,
        {
            "client_sampling",
            "random_sampling",
            "overall_sampling",
            "max_path_tag_length",
            "custom_tags",
            "provider",
        },
        where,
    )
    literal: list[tuple[str, str]] = []
    header: list[tuple[str, str, str]] = []
    for i, c in enumerate(t.custom_tags):
        cw = f"{where}.custom_tags[{i}]"
        only(c, {"tag", "literal", "environment", "request_header"}, cw)
        kind = c.WhichOneof("type")
        if kind == "literal":
            literal.append((c.tag, c.literal.value))
        elif kind == "environment":
            literal.append((c.tag, os.environ.get(c.environment.name, c.environment.default_value)))
        elif kind == "request_header":
            header.append((c.tag, c.request_header.name.lower(), c.request_header.default_value))
        else:
            raise Unsupported(f"{cw}: a custom tag needs literal, environment or request_header")
    collector = None
    if t.HasField("provider"):
        collector = _provider(t.provider, f"{where}.provider")
    return Tracing(
        client_ppm=_ppm(t.client_sampling.value) if t.HasField("client_sampling") else MILLION,
        random_ppm=_ppm(t.random_sampling.value) if t.HasField("random_sampling") else MILLION,
        overall_ppm=_ppm(t.overall_sampling.value) if t.HasField("overall_sampling") else MILLION,
        max_path_tag_length=t.max_path_tag_length.value
        if t.HasField("max_path_tag_length")
        else DEFAULT_MAX_PATH_TAG,
        literal_tags=tuple(literal),
        header_tags=tuple(header),
        collector=collector,
    )


def _zipkin(p: http_tracer_pb2.Tracing.Http, where: str) -> Collector:
    z = unpack(p.typed_config, zipkin_pb2.ZipkinConfig, where)
    cw = f"{where}.typed_config"
    only(
        z,
        {"collector_cluster", "collector_endpoint", "collector_endpoint_version",
         "shared_span_context", "trace_context_option"},
        cw,
    )  # fmt: skip
    if z.collector_endpoint_version != zipkin_pb2.ZipkinConfig.HTTP_JSON:
        raise Unsupported(f"{cw}.collector_endpoint_version: only HTTP_JSON")
    if not z.collector_cluster or not z.collector_endpoint:
        raise Unsupported(f"{cw}: collector_cluster and collector_endpoint are required")
    return Collector(
        service_name="",
        cluster=z.collector_cluster,
        zipkin=True,
        path=z.collector_endpoint,
        shared_span_context=z.shared_span_context.value
        if z.HasField("shared_span_context")
        else True,
        w3c=z.trace_context_option == zipkin_pb2.ZipkinConfig.USE_B3_WITH_W3C_PROPAGATION,
    )


def _provider(p: http_tracer_pb2.Tracing.Http, where: str) -> Collector:
    only(p, {"name", "typed_config"}, where)
    if p.name == ZIPKIN:
        return _zipkin(p, where)
    if p.name != OPENTELEMETRY:
        raise Unsupported(f"{where}.name: tracer {p.name} is not supported (only {OPENTELEMETRY})")
    config = unpack(p.typed_config, opentelemetry_pb2.OpenTelemetryConfig, where)
    cw = f"{where}.typed_config"
    only(config, {"grpc_service", "service_name"}, cw)
    if not config.HasField("grpc_service"):
        raise Unsupported(f"{cw}.grpc_service: is required (spans are exported over OTLP/gRPC)")
    g = config.grpc_service
    only(g, {"google_grpc", "envoy_grpc", "timeout"}, f"{cw}.grpc_service")
    if g.HasField("google_grpc"):
        only(g.google_grpc, {"target_uri", "stat_prefix"}, f"{cw}.grpc_service.google_grpc")
        if not g.google_grpc.target_uri:
            raise Unsupported(f"{cw}.grpc_service.google_grpc.target_uri: is required")
        return Collector(service_name=config.service_name, target=g.google_grpc.target_uri)
    only(g.envoy_grpc, {"cluster_name", "authority"}, f"{cw}.grpc_service.envoy_grpc")
    if not g.envoy_grpc.cluster_name:
        raise Unsupported(f"{cw}.grpc_service: names no collector")
    return Collector(service_name=config.service_name, cluster=g.envoy_grpc.cluster_name)
