"""A chain's Telemetry as Envoy's: the connection manager's ``tracing`` and ``access_log``.

What istiod writes (``pilot/pkg/networking/core/tracing.go``,
``telemetry_logging.go``), with one difference in how the collector is
reached:

* ``tracing``: ``client_sampling`` and ``overall_sampling`` 100%,
  ``random_sampling`` the resolved percentage, ``max_path_tag_length`` the
  provider's ``maxTagLength`` (default 256), the custom tags, and the
  provider ``envoy.tracers.opentelemetry`` with ``service_name``
  ``<waypoint>.<namespace>``. istiod points the exporter at an Envoy cluster
  (``envoy_grpc``); meshd names the collector directly (``google_grpc``
  ``target_uri``): ``ipv4:IP:PORT,...`` for the ready pods of a Service it
  knows, ``dns:///HOST:PORT`` otherwise. Envoy accepts both; our waypoint's
  exporter dials that target. ``disableSpanReporting`` keeps ``tracing``
  without a provider: request ids and sampling decisions stay, no span is
  sent, the trace headers pass through as they came. A ``zipkin`` provider
  gets ``envoy.tracers.zipkin`` posting JSON v2 to ``/api/v2/spans`` of
  istiod's cluster of the collector's Service (``outbound|PORT||host``, added
  to the waypoint's clusters by :mod:`controlplane.l7.build`), with the
  provider's ``traceContextOption``.
* ``access_log``: one ``envoy.access_loggers.file`` per provider, Istio's
  text format (or the provider's ``logFormat``), or Istio's JSON fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, grpc_service_pb2, substitution_format_string_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2, zipkin_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2
from udpa.type.v1 import typed_struct_pb2

from controlplane.l7 import telemetry_metrics
from controlplane.l7.mesh_config import Provider
from controlplane.l7.telemetry_api import CustomTag, TelemetrySpec, TracingSpec
from mesh.accesslog_formats import ISTIO_JSON_FORMAT, ISTIO_TEXT_FORMAT

OPENTELEMETRY_TRACER = "envoy.tracers.opentelemetry"
ZIPKIN_TRACER = "envoy.tracers.zipkin"
FILE_ACCESS_LOG = "envoy.access_loggers.file"
DEFAULT_MAX_PATH_TAG = 256  # istiod's default maxTagLength

Target = Callable[[Provider], str]  # a provider -> its collector's gRPC target


def _any(msg: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)  # type: ignore[arg-type]
    return out


def hcm_tracing(
    spec: TelemetrySpec, service_name: str, target: Target
) -> hcm_pb2.HttpConnectionManager.Tracing | None:
    t = spec.tracing
    if t is None:
        return None
    out = hcm_pb2.HttpConnectionManager.Tracing(
        client_sampling=percent_pb2.Percent(value=100.0),
        random_sampling=percent_pb2.Percent(value=t.sampling),
        overall_sampling=percent_pb2.Percent(value=100.0),
        max_path_tag_length=wrappers_pb2.UInt32Value(
            value=t.provider.max_tag_length or DEFAULT_MAX_PATH_TAG
        ),
        custom_tags=[_custom_tag(c) for c in t.custom_tags],
    )
    if t.report and target(t.provider):  # a zipkin collector meshd cannot find: no tracer
        out.provider.CopyFrom(_provider(t, service_name, target))
    return out


def _provider(t: TracingSpec, service_name: str, target: Target) -> http_tracer_pb2.Tracing.Http:
    if t.provider.kind == "zipkin":
        zipkin = zipkin_pb2.ZipkinConfig(
            collector_cluster=target(t.provider),
            collector_endpoint="/api/v2/spans",
            collector_endpoint_version=zipkin_pb2.ZipkinConfig.HTTP_JSON,
            trace_context_option=zipkin_pb2.ZipkinConfig.TraceContextOption.Value(
                t.provider.trace_context or "USE_B3"
            ),
        )
        return http_tracer_pb2.Tracing.Http(name=ZIPKIN_TRACER, typed_config=_any(zipkin))
    config = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            google_grpc=grpc_service_pb2.GrpcService.GoogleGrpc(
                target_uri=target(t.provider), stat_prefix=t.provider.name
            )
        ),
        service_name=service_name,
    )
    return http_tracer_pb2.Tracing.Http(name=OPENTELEMETRY_TRACER, typed_config=_any(config))


def _custom_tag(c: CustomTag) -> custom_tag_pb2.CustomTag:
    if c.kind == "literal":
        return custom_tag_pb2.CustomTag(
            tag=c.name, literal=custom_tag_pb2.CustomTag.Literal(value=c.value)
        )
    if c.kind == "environment":
        return custom_tag_pb2.CustomTag(
            tag=c.name,
            environment=custom_tag_pb2.CustomTag.Environment(name=c.value, default_value=c.default),
        )
    return custom_tag_pb2.CustomTag(
        tag=c.name,
        request_header=custom_tag_pb2.CustomTag.Header(name=c.value, default_value=c.default),
    )


def access_logs(providers: Sequence[Provider]) -> list[accesslog_pb2.AccessLog]:
    return [
        accesslog_pb2.AccessLog(
            name=FILE_ACCESS_LOG,
            typed_config=_any(file_pb2.FileAccessLog(path=p.path, log_format=_format(p))),
        )
        for p in providers
    ]


def _format(p: Provider) -> substitution_format_string_pb2.SubstitutionFormatString:
    if p.json_labels is not None:
        fields = dict(p.json_labels) or dict(ISTIO_JSON_FORMAT)
        struct = struct_pb2.Struct()
        struct.update(fields)
        return substitution_format_string_pb2.SubstitutionFormatString(json_format=struct)
    text = p.text_format or ISTIO_TEXT_FORMAT
    if not text.endswith("\n"):
        text += "\n"  # istiod adds the newline to a user's format too
    return substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=text)
    )


def stats_filter(spec: TelemetrySpec) -> any_pb2.Any | None:
    """istiod's ``istio.stats`` config (``stats.PluginConfig`` as a TypedStruct), when a
    Telemetry overrides metrics; None otherwise (the standard metrics, unchanged)."""
    if not spec.metrics:
        return None
    ts = typed_struct_pb2.TypedStruct(
        type_url=telemetry_metrics.PLUGIN_CONFIG,
        value=telemetry_metrics.plugin_config(spec.metrics),
    )
    return _any(ts)
