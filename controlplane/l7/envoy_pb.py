"""Names and small protobuf helpers the Envoy translators share (``envoy``, ``envoy_clusters``)."""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_URLS = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)

LISTENER_NAME = "waypoint"
FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TUNNEL_MATCH = "envoy.transport_socket_match"  # Istio's marker of an HBONE endpoint
UINT32_MAX = 2**32 - 1
UNKNOWN_SERVICE = "UnknownService"  # Istio's cluster name for a backend that is no service
SERVER_NAME = "istio-envoy"  # Istio's waypoint HCM


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _percent(value: float) -> percent_pb2.FractionalPercent:
    """Istio's form: a percentage as parts per million."""
    return percent_pb2.FractionalPercent(
        numerator=round(value * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _quote_meta(text: str) -> str:
    """Go's regexp.QuoteMeta (what Istio uses): escape RE2's special characters."""
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$" else c for c in text)
