"""Envoy v3 resources -> the waypoint's model, refusing whatever we do not implement.

Each function takes one resource and returns its model value, or raises
:class:`Unsupported` naming the field: a resource that sets a field whose
behaviour the waypoint does not have is NACKed, never half-applied. Fields
left at their defaults are not set on the wire (proto3), so only what the
control plane really asked for is checked. This module (with ``routes``,
``rbac``, ``jwt``, ``ratelimit`` and ``checks``) is the only one that imports Envoy's
protobuf types.

What a listener may say: ``original_dst`` listener filters; filter chains
matched by destination port and prefix ranges, each ending in ``tcp_proxy``
or an HTTP connection manager, with ``envoy.filters.network.rbac`` filters
before it (enforced once per connection); an HCM's HTTP filters are one
``envoy.filters.http.local_ratelimit`` filter (optional: here or just before the
router), one ``envoy.filters.http.jwt_authn`` filter (optional),
``envoy.filters.http.rbac`` filters, then the fault filter (optional), then the
router, nothing else. Local rate limits (the filter's and the routes'
``typed_per_filter_config``) are converted by :mod:`waypoint.config.ratelimit`
and enforced by :mod:`waypoint.ratelimit`. JWT
authentication is converted by :mod:`waypoint.config.jwt` (local JWKS only) and
enforced by :mod:`waypoint.jwt_authn`; RBAC rules are converted by
:mod:`waypoint.config.rbac` (ALLOW and DENY; the permissions and principals it
lists) and enforced by :mod:`waypoint.authz`, both with Envoy's semantics.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.identity import IdentityError, SpiffeId
from waypoint.config import accesslog, jwt, ratelimit, rbac, stats, tracing
from waypoint.config import model as m
from waypoint.config.checks import Unsupported, only, seconds, unpack
from waypoint.config.jwt_model import JwtConfig
from waypoint.config.rbac_model import Rbac
from waypoint.config.routes import route_config
from waypoint.config.stats import StatsConfig

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_URLS = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)
MESSAGES: dict[str, type[Message]] = {
    LISTENER_TYPE: listener_pb2.Listener,
    ROUTE_TYPE: route_pb2.RouteConfiguration,
    CLUSTER_TYPE: cluster_pb2.Cluster,
    ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
}
FAULT = "envoy.filters.http.fault"
ROUTER = "envoy.filters.http.router"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TUNNEL_MATCH = "envoy.transport_socket_match"


__all__ = ["Unsupported", "cluster", "listener", "load_assignment", "route_config"]


# ------------------------------------------------------------------ listener


def listener(msg: listener_pb2.Listener) -> m.Listener:
    where = f"Listener {msg.name}"
    only(
        msg,
        {"name", "internal_listener", "listener_filters", "filter_chains", "address",
         "traffic_direction"},
        where,
    )  # fmt: skip
    if msg.traffic_direction not in (base_pb2.UNSPECIFIED, base_pb2.INBOUND):
        # Our waypoint is the server side of what it serves: its spans are SERVER spans.
        raise Unsupported(f"{where}.traffic_direction: only INBOUND (the waypoint's)")
    for i, lf in enumerate(msg.listener_filters):
        only(lf, {"name", "typed_config"}, f"{where}.listener_filters[{i}]")
        original = unpack(
            lf.typed_config, original_dst_pb2.OriginalDst, f"{where}.listener_filters[{i}]"
        )
        only(original, (), f"{where}.listener_filters[{i}]")
    chains = tuple(
        _filter_chain(c, f"{where}.filter_chains[{i}]") for i, c in enumerate(msg.filter_chains)
    )
    return m.Listener(name=msg.name, chains=chains)


def _filter_chain(chain: Any, where: str) -> m.FilterChain:
    only(chain, {"name", "filter_chain_match", "filters"}, where)
    fcm = chain.filter_chain_match
    only(fcm, {"destination_port", "prefix_ranges"}, f"{where}.filter_chain_match")
    prefixes = []
    for r in fcm.prefix_ranges:
        try:
            prefixes.append(
                ipaddress.ip_network(f"{r.address_prefix}/{r.prefix_len.value}", strict=False)
            )
        except ValueError as e:
            raise Unsupported(f"{where}.filter_chain_match.prefix_ranges: {e}") from e
    if not chain.filters:
        raise Unsupported(f"{where}.filters: a filter chain needs its network filters")
    rbacs: list[Rbac] = []
    network_stats: StatsConfig | None = None
    last = len(chain.filters) - 1
    for i, f in enumerate(chain.filters[:last]):
        fw = f"{where}.filters[{i}]"
        only(f, {"name", "typed_config"}, fw)
        if f.name == stats.ISTIO_STATS:
            network_stats = stats.stats_filter(f.typed_config, fw)
            continue
        if not f.typed_config.Is(network_rbac_pb2.RBAC.DESCRIPTOR):
            raise Unsupported(
                f"{fw}: only {rbac.NETWORK_RBAC} filters may come before the last filter "
                f"(tcp_proxy or the HTTP connection manager), not {f.typed_config.type_url}"
            )
        rules = rbac.network_filter(f.typed_config, fw)
        if rules is not None:
            rbacs.append(rules)
    f = chain.filters[last]
    fw = f"{where}.filters[{last}]"
    only(f, {"name", "typed_config"}, fw)
    handler: m.HttpManager | m.TcpProxy
    if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
        handler = _hcm(unpack(f.typed_config, hcm_pb2.HttpConnectionManager, fw), fw)
    elif f.typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
        proxy = unpack(f.typed_config, tcp_proxy_pb2.TcpProxy, fw)
        only(proxy, {"stat_prefix", "cluster"}, fw)
        handler = m.TcpProxy(
            cluster=proxy.cluster, stat_prefix=proxy.stat_prefix, stats=network_stats
        )
    else:
        raise Unsupported(f"{fw}: filter {f.typed_config.type_url} is not supported")
    port = fcm.destination_port.value if fcm.HasField("destination_port") else None
    return m.FilterChain(
        name=chain.name, prefixes=tuple(prefixes), port=port, handler=handler, rbac=tuple(rbacs)
    )


def _hcm(h: hcm_pb2.HttpConnectionManager, where: str) -> m.HttpManager:
    only(
        h,
        {
            "stat_prefix",
            "codec_type",
            "rds",
            "http_filters",
            "server_name",
            "server_header_transformation",
            "use_remote_address",
            "normalize_path",
            "upgrade_configs",
            "stream_idle_timeout",
            "tracing",
            "access_log",
        },
        where,
    )
    if h.codec_type not in (hcm_pb2.HttpConnectionManager.AUTO,):
        raise Unsupported(f"{where}.codec_type: only AUTO (HTTP/1.1 and HTTP/2 by preface)")
    if h.use_remote_address.value:
        raise Unsupported(f"{where}.use_remote_address: true is not supported")
    if h.HasField("stream_idle_timeout") and seconds(h.stream_idle_timeout) != 0:
        # Istio (and meshd) send 0s. Left unset, Envoy's 5 minutes would apply, which
        # we do not do either; that is what a stock Envoy would differ on, not a request.
        raise Unsupported(
            f"{where}.stream_idle_timeout: {seconds(h.stream_idle_timeout):g}s is not supported: "
            "this waypoint has no stream idle timeout (only 0s, which disables it)"
        )
    only(h.rds, {"config_source", "route_config_name"}, f"{where}.rds")
    if not h.rds.route_config_name:
        raise Unsupported(f"{where}.rds.route_config_name: is required (routes come by RDS)")
    fault = False
    stats_config: StatsConfig | None = None
    seen_jwt = False
    jwt_config: JwtConfig | None = None
    rbacs: list[Rbac] = []
    limit: m.LocalRateLimit | None = None
    limit_first = True
    names = [f.name for f in h.http_filters]
    if not names or names[-1] != ROUTER:
        raise Unsupported(f"{where}.http_filters: the last filter must be {ROUTER}")
    for i, f in enumerate(h.http_filters):
        fw = f"{where}.http_filters[{i}]"
        only(f, {"name", "typed_config"}, fw)
        if f.name == jwt.HTTP_JWT_AUTHN:
            if seen_jwt:
                raise Unsupported(f"{fw}: only one {jwt.HTTP_JWT_AUTHN} filter is supported")
            if i != (1 if limit is not None and limit_first else 0):
                # We run the JWT filter before the RBAC filters and the fault filter, always.
                raise Unsupported(f"{fw}: {jwt.HTTP_JWT_AUTHN} must be the first filter")
            seen_jwt = True
            jwt_config = jwt.http_filter(f.typed_config, fw)
        elif f.name == rbac.HTTP_RBAC:
            if fault:
                # We run the RBAC filters before the fault filter, always.
                raise Unsupported(f"{fw}: an RBAC filter after {FAULT} is not supported")
            rules = rbac.http_filter(f.typed_config, fw)
            if rules is not None:
                rbacs.append(rules)
        elif f.name == ratelimit.HTTP_LOCAL_RATELIMIT:
            if limit is not None:
                raise Unsupported(f"{fw}: only one {ratelimit.HTTP_LOCAL_RATELIMIT} is supported")
            # We run it either first or just before the router (after the fault filter).
            if i == 0:
                limit_first = True
            elif i == len(h.http_filters) - 2:
                limit_first = False
            else:
                raise Unsupported(
                    f"{fw}: {ratelimit.HTTP_LOCAL_RATELIMIT} must be the first filter "
                    f"or the one just before {ROUTER}"
                )
            limit = ratelimit.http_filter(f.typed_config, fw)
        elif f.name == stats.ISTIO_STATS:
            # istiod's place for it is after RBAC, before the router; it only observes.
            stats_config = stats.stats_filter(f.typed_config, fw)
        elif f.name == FAULT:
            config = unpack(f.typed_config, fault_pb2.HTTPFault, fw)
            only(config, (), fw + " (fault settings belong in the routes' typed_per_filter_config)")
            fault = True
        elif f.name == ROUTER:
            router = unpack(f.typed_config, router_pb2.Router, fw)
            only(router, (), fw)
        else:
            raise Unsupported(f"{fw}: filter {f.name} is not supported")
    websocket = False
    for i, u in enumerate(h.upgrade_configs):
        only(u, {"upgrade_type"}, f"{where}.upgrade_configs[{i}]")
        if u.upgrade_type.lower() != "websocket":
            raise Unsupported(f"{where}.upgrade_configs[{i}]: only websocket upgrades")
        websocket = True
    transform = h.server_header_transformation
    if transform not in (
        hcm_pb2.HttpConnectionManager.OVERWRITE,
        hcm_pb2.HttpConnectionManager.PASS_THROUGH,
    ):
        raise Unsupported(f"{where}.server_header_transformation: only OVERWRITE and PASS_THROUGH")
    return m.HttpManager(
        route_config=h.rds.route_config_name,
        stat_prefix=h.stat_prefix,
        server_name=h.server_name or "envoy",
        overwrite_server=transform == hcm_pb2.HttpConnectionManager.OVERWRITE,
        normalize_path=h.normalize_path.value,
        fault_filter=fault,
        websocket=websocket,
        jwt=jwt_config,
        rbac=tuple(rbacs),
        ratelimit=limit,
        ratelimit_first=limit_first,
        tracing=tracing.tracing(h.tracing, f"{where}.tracing") if h.HasField("tracing") else None,
        access_logs=accesslog.access_logs(h.access_log, f"{where}.access_log"),
        stats=stats_config,
    )


# ------------------------------------------------------------------ clusters


# Settings that do not apply to an ORIGINAL_DST cluster (no endpoints to balance over,
# eject or speak HTTP to: it relays a connection to its own destination).
_NOT_ORIGINAL_DST = (
    "eds_cluster_config",
    "ring_hash_lb_config",
    "least_request_lb_config",
    "outlier_detection",
    "common_lb_config",
    "typed_extension_protocol_options",
)


def cluster(msg: cluster_pb2.Cluster) -> m.Cluster:
    where = f"Cluster {msg.name}"
    only(
        msg,
        {
            "name",
            "type",
            "eds_cluster_config",
            "connect_timeout",
            "lb_policy",
            "ring_hash_lb_config",
            "least_request_lb_config",
            "circuit_breakers",
            "outlier_detection",
            "common_lb_config",
            "typed_extension_protocol_options",
            "metadata",
            "original_dst_lb_config",
        },
        where,
    )
    original = msg.type == cluster_pb2.Cluster.ORIGINAL_DST
    if msg.type not in (cluster_pb2.Cluster.EDS, cluster_pb2.Cluster.ORIGINAL_DST):
        raise Unsupported(f"{where}.type: only EDS and ORIGINAL_DST clusters")
    if original:
        given = {fd.name for fd, _ in msg.ListFields()}
        for name in _NOT_ORIGINAL_DST:
            if name in given:
                raise Unsupported(f"{where}.{name}: not supported on an ORIGINAL_DST cluster")
        settings = msg.original_dst_lb_config.ListFields()
        if settings:  # use_http_header, http_header_name, upstream_port_override, ...
            raise Unsupported(
                f"{where}.original_dst_lb_config.{settings[0][0].name}: not supported by this "
                "waypoint (it sends to the connection's own destination, nowhere else)"
            )
        if msg.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED:
            raise Unsupported(f"{where}.lb_policy: an ORIGINAL_DST cluster's is CLUSTER_PROVIDED")
    else:
        if msg.HasField("original_dst_lb_config"):
            raise Unsupported(f"{where}.original_dst_lb_config: only on ORIGINAL_DST clusters")
        if msg.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED:
            raise Unsupported(f"{where}.lb_policy: CLUSTER_PROVIDED is for ORIGINAL_DST clusters")
    if msg.eds_cluster_config.service_name not in ("", msg.name):
        raise Unsupported(f"{where}.eds_cluster_config.service_name: must be the cluster's name")
    try:
        lb = m.LbPolicy(msg.lb_policy)
    except ValueError:
        raise Unsupported(f"{where}.lb_policy: {msg.lb_policy} is not supported") from None
    thresholds = m.Thresholds()
    for i, t in enumerate(msg.circuit_breakers.thresholds):
        tw = f"{where}.circuit_breakers.thresholds[{i}]"
        only(
            t,
            {
                "max_connections",
                "max_pending_requests",
                "max_requests",
                "max_retries",
                "track_remaining",
            },
            tw,
        )
        if t.priority != base_pb2.DEFAULT:
            raise Unsupported(f"{tw}.priority: only DEFAULT")

        thresholds = m.Thresholds(
            max_connections=_uint(t, "max_connections", 1024),
            max_pending_requests=_uint(t, "max_pending_requests", 1024),
            max_requests=_uint(t, "max_requests", 1024),
            max_retries=_uint(t, "max_retries", 3),
        )
    outlier = None
    if msg.HasField("outlier_detection"):
        od = msg.outlier_detection
        only(
            od,
            {
                "consecutive_5xx",
                "enforcing_consecutive_5xx",
                "consecutive_gateway_failure",
                "enforcing_consecutive_gateway_failure",
                "interval",
                "base_ejection_time",
                "max_ejection_time",
                "max_ejection_percent",
                "enforcing_success_rate",
            },
            f"{where}.outlier_detection",
        )
        if od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value:
            raise Unsupported(
                f"{where}.outlier_detection.enforcing_success_rate: success-rate "
                "ejection is not supported (set 0)"
            )
        if not od.HasField("enforcing_success_rate"):
            raise Unsupported(
                f"{where}.outlier_detection.enforcing_success_rate: success-rate "
                "ejection (on by default) is not supported: set 0"
            )

        outlier = m.OutlierConfig(
            consecutive_5xx=_uint(od, "consecutive_5xx", 5),
            enforcing_consecutive_5xx=_uint(od, "enforcing_consecutive_5xx", 100),
            consecutive_gateway_failure=_uint(od, "consecutive_gateway_failure", 5),
            enforcing_consecutive_gateway_failure=_uint(
                od, "enforcing_consecutive_gateway_failure", 0
            ),
            interval_s=seconds(od.interval) if od.HasField("interval") else 10.0,
            base_ejection_time_s=seconds(od.base_ejection_time)
            if od.HasField("base_ejection_time")
            else 30.0,
            max_ejection_time_s=seconds(od.max_ejection_time)
            if od.HasField("max_ejection_time")
            else 300.0,
            max_ejection_percent=_uint(od, "max_ejection_percent", 10),
        )
    only(msg.common_lb_config, {"healthy_panic_threshold"}, f"{where}.common_lb_config")
    panic = (
        msg.common_lb_config.healthy_panic_threshold.value
        if msg.common_lb_config.HasField("healthy_panic_threshold")
        else 50.0
    )
    only(msg.ring_hash_lb_config, {"minimum_ring_size"}, f"{where}.ring_hash_lb_config")
    only(msg.least_request_lb_config, {"choice_count"}, f"{where}.least_request_lb_config")
    http2 = False
    idle = 3600.0
    per_connection = 0
    for name, packed in msg.typed_extension_protocol_options.items():
        ow = f"{where}.typed_extension_protocol_options[{name}]"
        if name != HTTP_OPTIONS:
            raise Unsupported(f"{ow}: not supported")
        options = unpack(packed, http_protocol_options_pb2.HttpProtocolOptions, ow)
        only(options, {"explicit_http_config", "common_http_protocol_options"}, ow)
        kind = options.explicit_http_config.WhichOneof("protocol_config")
        if kind == "http2_protocol_options":
            only(
                options.explicit_http_config.http2_protocol_options,
                (),
                f"{ow}.http2_protocol_options",
            )
            http2 = True
        elif kind == "http_protocol_options":
            only(
                options.explicit_http_config.http_protocol_options,
                (),
                f"{ow}.http_protocol_options",
            )
        else:
            raise Unsupported(f"{ow}: explicit_http_config is required")
        common = options.common_http_protocol_options
        only(
            common,
            {"idle_timeout", "max_requests_per_connection"},
            f"{ow}.common_http_protocol_options",
        )
        if common.HasField("idle_timeout"):
            idle = seconds(common.idle_timeout)
        per_connection = common.max_requests_per_connection.value
    metadata = {k: json_format.MessageToDict(v) for k, v in msg.metadata.filter_metadata.items()}
    return m.Cluster(
        original_dst=_original_dst(metadata, where) if original else None,
        name=msg.name,
        lb=lb,
        choice_count=msg.least_request_lb_config.choice_count.value or 2,
        minimum_ring_size=msg.ring_hash_lb_config.minimum_ring_size.value or 1024,
        connect_timeout_s=seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else 5.0,
        thresholds=thresholds,
        outlier=outlier,
        healthy_panic_percent=panic,
        http2=http2,
        idle_timeout_s=idle,
        max_requests_per_connection=per_connection,
        metadata=metadata,
    )


def _original_dst(metadata: Mapping[str, Any], where: str) -> m.OriginalDst:
    """How an ORIGINAL_DST cluster reaches its destination, from the cluster's metadata
    (in the form an EDS endpoint's metadata has): HBONE needs the identity to expect."""
    tunnel = _tunnel(metadata, f"{where}.metadata")
    istio = metadata.get("istio", {})
    identity = str(istio.get("identity") or "")
    if tunnel == "http":
        try:
            SpiffeId.parse(identity)
        except IdentityError as e:
            raise Unsupported(
                f"{where}.metadata: an HBONE destination needs istio.identity, the SPIFFE ID "
                f"it must present ({e})"
            ) from None
    return m.OriginalDst(
        hbone=tunnel == "http", identity=identity, workload=str(istio.get("workload") or "")
    )


def _tunnel(metadata: Mapping[str, Any], where: str) -> str | None:
    tunnel = metadata.get(TUNNEL_MATCH, {}).get("tunnel")
    if tunnel is None:
        return None
    if tunnel != "http":
        raise Unsupported(f"{where}: tunnel {tunnel!r} is not supported")
    return "http"


def _uint(msg: Any, name: str, default: int) -> int:
    """A wrapped UInt32Value field, or its default when unset."""
    return int(getattr(msg, name).value) if msg.HasField(name) else default


def load_assignment(msg: endpoint_pb2.ClusterLoadAssignment) -> m.LoadAssignment:
    where = f"ClusterLoadAssignment {msg.cluster_name}"
    only(msg, {"cluster_name", "endpoints"}, where)
    endpoints = []
    for i, locality in enumerate(msg.endpoints):
        lw = f"{where}.endpoints[{i}]"
        only(locality, {"lb_endpoints", "locality"}, lw)
        for j, lb in enumerate(locality.lb_endpoints):
            ew = f"{lw}.lb_endpoints[{j}]"
            only(lb, {"endpoint", "health_status", "metadata", "load_balancing_weight"}, ew)
            only(lb.endpoint, {"address"}, f"{ew}.endpoint")
            sa = lb.endpoint.address.socket_address
            only(lb.endpoint.address, {"socket_address"}, f"{ew}.endpoint.address")
            only(sa, {"address", "port_value"}, f"{ew}.endpoint.address.socket_address")
            try:
                ipaddress.ip_address(sa.address)
            except ValueError:
                raise Unsupported(f"{ew}: {sa.address!r} is not an IP address") from None
            meta = _struct(lb.metadata.filter_metadata)
            tunnel = _tunnel(meta, f"{ew}.metadata")
            istio = meta.get("istio", {})
            endpoints.append(
                m.Endpoint(
                    ip=sa.address,
                    port=sa.port_value,
                    healthy=lb.health_status
                    in (health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY),
                    hbone=tunnel == "http",
                    identity=str(istio.get("identity") or ""),
                    workload=str(istio.get("workload") or ""),
                    weight=lb.load_balancing_weight.value or 1,
                )
            )
    return m.LoadAssignment(cluster=msg.cluster_name, endpoints=tuple(endpoints))


def _struct(filter_metadata: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: json_format.MessageToDict(v) for k, v in filter_metadata.items()}
