"""One waypoint's share as standard Envoy v3 resources: what meshd serves it.

A portable subset a stock Envoy 1.40 accepts unchanged (no Istio-internal
listeners or filters), consumed by our waypoint and by a real Envoy alike:

* one ``Listener`` named ``waypoint``: an internal listener (the traffic
  arrives in HBONE CONNECT streams, whose ``:authority`` is the original
  destination, as Envoy's ``original_dst`` listener filter would restore it),
  with one filter chain per service port, matched on the service's VIPs and
  port: an HTTP connection manager taking its routes by RDS, or a
  ``tcp_proxy`` to the service; the AuthorizationPolicies in force on the
  chain as Envoy RBAC filters ahead of them (:mod:`controlplane.l7.envoy_rbac`),
  and on an HTTP chain the RequestAuthentications in force as Envoy's
  ``jwt_authn`` filter ahead of those (:mod:`controlplane.l7.envoy_jwt`), and
  an EnvoyFilter's ``local_ratelimit`` first or just before the router
  (:mod:`controlplane.l7.envoy_filter`), its HTTP_ROUTE patches on the routes;
* one ``RouteConfiguration`` per HTTP service port, named like its cluster
  (``inbound-vip|<port>|http|<host>``, as Istio's waypoint names them), one
  virtual host for every domain, the rules in order;
* one ``Cluster`` (EDS) per service port and subset the routes send to, with
  the DestinationRule's load balancing, circuit breakers and outlier
  detection, Istio's defaults otherwise;
* one ``ClusterLoadAssignment`` per cluster: the pods, healthy or not; a pod in
  the mesh carries Istio's tunnel marker (``envoy.transport_socket_match``
  ``tunnel: http``) and its SPIFFE ID in the ``istio`` metadata: the waypoint
  reaches it over HBONE at ``ip:15008`` with ``:authority`` ``ip:port``;
* for each pod bound to the waypoint as a workload, filter chains matched on
  its IP alone (any port; and each port a service chain names, see
  :func:`_workload_chains`) with a ``tcp_proxy`` to that pod's own
  ``ORIGINAL_DST`` cluster (``inbound-pod|<ip>``): the connection goes to the
  address the client dialled, the pod's tunnel marker and identity in the
  Cluster's ``metadata`` as an endpoint's are in its own (a stock Envoy
  ignores metadata it has no use for).

Resource names are unique within one waypoint only: the feed is scoped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from controlplane.l7 import envoy_jwt, envoy_rbac, envoy_telemetry
from controlplane.l7.authz import WaypointPolicy
from controlplane.l7.envoy_clusters import _cluster, _load_assignment, _workload_cluster
from controlplane.l7.envoy_filter import HTTP_LOCAL_RATELIMIT
from controlplane.l7.envoy_pb import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    FAULT_FILTER,
    HTTP_PROTOCOL_OPTIONS,
    LISTENER_NAME,
    LISTENER_TYPE,
    ROUTE_TYPE,
    ROUTER_FILTER,
    SERVER_NAME,
    TUNNEL_MATCH,
    TYPE_URLS,
    UINT32_MAX,
    UNKNOWN_SERVICE,
    _ads,
    _any,
    _duration,
    _percent,
    _quote_meta,
)
from controlplane.l7.ir import (
    BackendRef,
    Fault,
    HashPolicy,
    HeaderMatch,
    HeaderOps,
    PathKind,
    PathMatch,
    PortRoutes,
    Protocol,
    Redirect,
    RequestMatch,
    Retry,
    Rule,
    StringKind,
    StringMatch,
)
from controlplane.l7.share import ClusterSpec, ServiceSpec, WaypointShare, cluster_name
from controlplane.l7.telemetry_metrics import ISTIO_STATS
from controlplane.l7.workloads import WorkloadSpec, pod_cluster_name

# The feed's names, for its readers (the waypoint's tests, the oracle), and the translation.
__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "FAULT_FILTER",
    "HTTP_PROTOCOL_OPTIONS",
    "LISTENER_NAME",
    "LISTENER_TYPE",
    "ROUTER_FILTER",
    "ROUTE_TYPE",
    "SERVER_NAME",
    "TUNNEL_MATCH",
    "TYPE_URLS",
    "UINT32_MAX",
    "UNKNOWN_SERVICE",
    "EnvoyResources",
    "translate",
]


@dataclass(frozen=True, slots=True)
class EnvoyResources:
    """One waypoint's resources, by type URL and name."""

    listeners: Mapping[str, listener_pb2.Listener]
    routes: Mapping[str, route_pb2.RouteConfiguration]
    clusters: Mapping[str, cluster_pb2.Cluster]
    endpoints: Mapping[str, endpoint_pb2.ClusterLoadAssignment]

    def by_type(self) -> dict[str, Mapping[str, Message]]:
        return {
            LISTENER_TYPE: self.listeners,
            ROUTE_TYPE: self.routes,
            CLUSTER_TYPE: self.clusters,
            ENDPOINT_TYPE: self.endpoints,
        }


def translate(share: WaypointShare) -> EnvoyResources:
    routes: dict[str, route_pb2.RouteConfiguration] = {}
    chains = []
    ports: set[int] = set()
    for service in share.services:
        if not service.vips:
            # A headless service has no address to match on: a chain without one
            # would take every destination on its port (and two would clash).
            continue
        for pr in service.ports:
            chains.append(_filter_chain(service, pr, service.policies, share))
            ports.add(pr.port)
            if pr.protocol.is_http:
                rc = _route_config(service, pr, share.clusters)
                routes[rc.name] = rc
    for workload in share.workloads:
        chains.extend(_workload_chains(workload, sorted(ports), share.workload_policies))
    listener = listener_pb2.Listener(
        name=LISTENER_NAME,
        # istiod's main_internal is INBOUND: spans are SERVER spans named "ingress".
        traffic_direction=base_pb2.INBOUND,
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.original_dst",
                typed_config=_any(original_dst_pb2.OriginalDst()),
            )
        ],
        filter_chains=chains,
    )
    clusters = {name: _cluster(spec) for name, spec in share.clusters.items()}
    endpoints = {name: _load_assignment(spec) for name, spec in share.clusters.items()}
    for workload in share.workloads:
        cluster = _workload_cluster(workload)
        clusters[cluster.name] = cluster  # ORIGINAL_DST: no ClusterLoadAssignment
    return EnvoyResources(
        listeners={LISTENER_NAME: listener},
        routes=routes,
        clusters=clusters,
        endpoints=endpoints,
    )


# ------------------------------------------------------------------ listener


def _host_range(ip: str) -> address_pb2.CidrRange:
    return address_pb2.CidrRange(
        address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=128 if ":" in ip else 32)
    )


def _http_filters(
    service: ServiceSpec, policies: Sequence[WaypointPolicy]
) -> list[hcm_pb2.HttpFilter]:
    """jwt_authn, RBAC, fault, router; and an EnvoyFilter's local_ratelimit where istiod
    would have inserted it: first (the recipe's INSERT_BEFORE without a subFilter, and
    INSERT_FIRST) or just before the router (INSERT_BEFORE the router)."""
    filters = [
        *envoy_jwt.http_filters(service.authentications),
        *envoy_rbac.http_filters(policies),
    ]
    if (stats := envoy_telemetry.stats_filter(service.telemetry)) is not None:
        filters.append(hcm_pb2.HttpFilter(name=ISTIO_STATS, typed_config=stats))
    filters.append(hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=_any(fault_pb2.HTTPFault())))
    limit = next((f for f in service.ratelimits if f.config is not None), None)
    if limit is not None:
        assert limit.config is not None
        inserted = hcm_pb2.HttpFilter(name=HTTP_LOCAL_RATELIMIT, typed_config=_any(limit.config))
        if limit.first:
            filters.insert(0, inserted)
        else:
            filters.append(inserted)
    filters.append(hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_any(router_pb2.Router())))
    return filters


def _filter_chain(
    service: ServiceSpec, pr: PortRoutes, policies: Sequence[WaypointPolicy], share: WaypointShare
) -> listener_components_pb2.FilterChain:
    name = cluster_name(service.hostname, pr.port, pr.protocol)
    match = listener_components_pb2.FilterChainMatch(
        destination_port=wrappers_pb2.UInt32Value(value=pr.port),
        prefix_ranges=[_host_range(vip) for vip in service.vips],
    )
    if pr.protocol.is_http:
        hcm = hcm_pb2.HttpConnectionManager(
            stat_prefix=name,
            codec_type=hcm_pb2.HttpConnectionManager.AUTO,
            rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=name),
            http_filters=_http_filters(service, policies),
            server_name=SERVER_NAME,
            server_header_transformation=hcm_pb2.HttpConnectionManager.OVERWRITE,
            use_remote_address=wrappers_pb2.BoolValue(value=False),
            normalize_path=wrappers_pb2.BoolValue(value=True),
            upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
            # 0s: no stream idle timeout, as Istio's HCMs say and as our waypoint does
            # (Envoy's default would reset a stream idle for 5 minutes).
            stream_idle_timeout=_duration(0),
            access_log=envoy_telemetry.access_logs(service.telemetry.access_logs),
        )
        tracing = envoy_telemetry.hcm_tracing(
            service.telemetry,
            f"{share.waypoint.name}.{share.waypoint.namespace}",
            lambda p: share.collectors.get(p.name, f"dns:///{p.service}:{p.port}"),
        )
        if tracing is not None:
            hcm.tracing.CopyFrom(tracing)
        filters = [
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm)
            )
        ]
    else:
        (backend,) = pr.tcp_backends
        proxy = tcp_proxy_pb2.TcpProxy(
            stat_prefix=name,
            cluster=cluster_name(backend.service.split("/", 1)[1], backend.port, Protocol.TCP),
        )
        filters = list(envoy_rbac.network_filters(policies))
        if (stats := envoy_telemetry.stats_filter(service.telemetry)) is not None:
            filters.append(listener_components_pb2.Filter(name=ISTIO_STATS, typed_config=stats))
        filters.append(
            listener_components_pb2.Filter(
                name="envoy.filters.network.tcp_proxy", typed_config=_any(proxy)
            )
        )
    return listener_components_pb2.FilterChain(
        name=f"{service.hostname}:{pr.port}", filter_chain_match=match, filters=filters
    )


def _workload_chains(
    workload: WorkloadSpec, service_ports: Iterable[int], policies: Sequence[WaypointPolicy]
) -> list[listener_components_pb2.FilterChain]:
    """The chains of traffic addressed to a pod: its IP on any port, relayed to its cluster.

    Envoy narrows the chains by destination port before it looks at the
    address, and never falls back: with a service chain on port 9080, a
    connection to ``podIP:9080`` would be left with the chains of port 9080,
    none for the pod, and refused. So the pod also gets a chain on each port
    that a service chain names (Istio avoids this with a matcher tree keyed
    on the address first, which is not in the portable subset).
    """
    cluster = pod_cluster_name(workload.ip)
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)
    network = [
        *envoy_rbac.network_filters(policies),
        listener_components_pb2.Filter(
            name="envoy.filters.network.tcp_proxy", typed_config=_any(proxy)
        ),
    ]
    chains = [
        listener_components_pb2.FilterChain(
            name=f"direct-tcp|{workload.ip}",
            filter_chain_match=listener_components_pb2.FilterChainMatch(
                prefix_ranges=[_host_range(workload.ip)]
            ),
            filters=network,
        )
    ]
    for port in service_ports:
        chains.append(
            listener_components_pb2.FilterChain(
                name=f"direct-tcp|{workload.ip}|{port}",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    destination_port=wrappers_pb2.UInt32Value(value=port),
                    prefix_ranges=[_host_range(workload.ip)],
                ),
                filters=network,
            )
        )
    return chains


# ------------------------------------------------------------------ routes


def _route_config(
    service: ServiceSpec, pr: PortRoutes, clusters: Mapping[str, ClusterSpec]
) -> route_pb2.RouteConfiguration:
    name = cluster_name(service.hostname, pr.port, pr.protocol)
    vhost = f"inbound|http|{pr.port}"
    routes = []
    for rule in pr.rules:
        for match in rule.matches:
            route = _route(rule, match, pr, clusters)
            # istiod's span name for a waypoint's routes (route.go GetRouteOperation).
            route.decorator.operation = f"{service.hostname}:{pr.port}/*"
            # EnvoyFilter HTTP_ROUTE MERGE patches, in order: a later one wins a route.
            for f in service.ratelimits:
                for patch in f.routes:
                    if patch.matches(vhost, route.name):
                        route.typed_per_filter_config[HTTP_LOCAL_RATELIMIT].CopyFrom(
                            _any(patch.config)
                        )
            routes.append(route)
    return route_pb2.RouteConfiguration(
        name=name,
        validate_clusters=wrappers_pb2.BoolValue(value=False),
        virtual_hosts=[route_components_pb2.VirtualHost(name=vhost, domains=["*"], routes=routes)],
    )


def _string_matcher(m: StringMatch) -> string_pb2.StringMatcher:
    if m.kind is StringKind.REGEX:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=m.value))
    return string_pb2.StringMatcher(**{m.kind.value: m.value}, ignore_case=m.ignore_case)


def _header_matcher(h: HeaderMatch) -> route_components_pb2.HeaderMatcher:
    out = route_components_pb2.HeaderMatcher(name=h.name, invert_match=h.invert)
    if h.match is None:
        out.present_match = True
    else:
        out.string_match.CopyFrom(_string_matcher(h.match))
    if h.missing_as_empty:
        out.treat_missing_header_as_empty = True
    return out


def _route_match(m: RequestMatch) -> route_components_pb2.RouteMatch:
    out = route_components_pb2.RouteMatch()
    path = m.path or PathMatch(kind=PathKind.PREFIX, value="/")
    if path.kind is PathKind.EXACT:
        out.path = path.value
    elif path.kind is PathKind.PREFIX or (
        path.kind is PathKind.SEGMENT_PREFIX and path.value.rstrip("/") == ""
    ):
        out.prefix = path.value if path.kind is PathKind.PREFIX else "/"
    elif path.kind is PathKind.SEGMENT_PREFIX:
        out.path_separated_prefix = path.value.rstrip("/")
    else:
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=path.value))
    if m.path is not None and path.kind is not PathKind.REGEX:
        out.case_sensitive.value = not path.ignore_case
    out.headers.extend(_header_matcher(h) for h in m.headers)
    if m.method:
        out.headers.append(
            route_components_pb2.HeaderMatcher(
                name=":method", string_match=string_pb2.StringMatcher(exact=m.method)
            )
        )
    for q in m.query:
        qm = route_components_pb2.QueryParameterMatcher(name=q.name)
        if q.match is None:
            qm.present_match = True
        else:
            qm.string_match.CopyFrom(_string_matcher(q.match))
        out.query_parameters.append(qm)
    return out


def _header_options(ops: HeaderOps) -> list[base_pb2.HeaderValueOption]:
    options = []
    for pairs, action in (
        (ops.set, base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
        (ops.add, base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
    ):
        for name, value in sorted(pairs):
            if name in ("host", ":authority") or name.startswith(":"):
                continue  # becomes host_rewrite_literal (request side), as Istio does
            options.append(
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=name, value=value), append_action=action
                )
            )
    return options


def _host_from_headers(ops: HeaderOps) -> str | None:
    for pairs in (ops.set, ops.add):
        for name, value in pairs:
            if name in ("host", ":authority"):
                return value
    return None


def _backend_cluster(b: BackendRef, clusters: Mapping[str, ClusterSpec]) -> str:
    if not b.service:
        return UNKNOWN_SERVICE  # never built: Envoy answers cluster_not_found
    host = b.service.split("/", 1)[1]
    for protocol in (Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC):
        name = cluster_name(host, b.port, protocol, b.subset)
        if name in clusters:
            return name
    # Not built (a backend that cannot be used): Envoy answers cluster_not_found.
    return cluster_name(host, b.port, Protocol.HTTP, b.subset)


def _retry_policy(retry: Retry, hashed: bool) -> route_components_pb2.RetryPolicy:
    out = route_components_pb2.RetryPolicy(
        retry_on=retry.retry_on,
        num_retries=wrappers_pb2.UInt32Value(value=retry.attempts),
        retriable_status_codes=list(retry.codes),
    )
    if retry.per_try_timeout_s:
        out.per_try_timeout.CopyFrom(_duration(retry.per_try_timeout_s))
    if retry.backoff_base_s:
        out.retry_back_off.base_interval.CopyFrom(_duration(retry.backoff_base_s))
    if retry.other_host and not hashed:
        out.retry_host_predicate.append(
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        )
        out.host_selection_retry_max_attempts = 5
    return out


def _hash_policy(h: HashPolicy) -> route_components_pb2.RouteAction.HashPolicy:
    out = route_components_pb2.RouteAction.HashPolicy()
    if h.header:
        out.header.header_name = h.header
    elif h.cookie:
        out.cookie.name = h.cookie
        out.cookie.path = h.cookie_path
        if h.cookie_ttl_s is not None:
            out.cookie.ttl.CopyFrom(_duration(h.cookie_ttl_s))
    elif h.source_ip:
        out.connection_properties.source_ip = True
    else:
        out.query_parameter.name = h.query
    return out


def _redirect(r: Redirect, port: int, match: RequestMatch) -> route_components_pb2.RedirectAction:
    codes = {
        301: route_components_pb2.RedirectAction.MOVED_PERMANENTLY,
        302: route_components_pb2.RedirectAction.FOUND,
        303: route_components_pb2.RedirectAction.SEE_OTHER,
        307: route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
        308: route_components_pb2.RedirectAction.PERMANENT_REDIRECT,
    }
    out = route_components_pb2.RedirectAction(response_code=codes[r.status])
    if r.scheme:
        out.scheme_redirect = r.scheme
    if r.host:
        out.host_redirect = r.host
    new_port = r.port if r.port is not None else (port if r.request_port else None)
    if new_port is not None and ((r.scheme or "http"), new_port) not in (
        ("http", 80),
        ("https", 443),
    ):
        out.port_redirect = new_port
    if r.path is not None:
        out.path_redirect = r.path
    elif r.prefix is not None:
        _prefix_swap(out, r.prefix, match)
    return out


def _fault(f: Fault) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if f.delay_s is not None:
        out.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=_duration(f.delay_s), percentage=_percent(f.delay_percent)
            )
        )
    if f.abort_status is not None:
        out.abort.http_status = f.abort_status
        out.abort.percentage.CopyFrom(_percent(f.abort_percent))
    elif f.abort_grpc_status is not None:
        out.abort.grpc_status = f.abort_grpc_status
        out.abort.percentage.CopyFrom(_percent(f.abort_percent))
    return out


def _route(
    rule: Rule, match: RequestMatch, pr: PortRoutes, clusters: Mapping[str, ClusterSpec]
) -> route_components_pb2.Route:
    out = route_components_pb2.Route(name=rule.name, match=_route_match(match))
    if rule.operation:
        out.decorator.operation = rule.operation
    out.request_headers_to_add.extend(_header_options(rule.request_headers))
    out.request_headers_to_remove.extend(
        n for n in rule.request_headers.remove if not n.startswith(":") and n != "host"
    )
    out.response_headers_to_add.extend(_header_options(rule.response_headers))
    # Envoy refuses the whole RouteConfiguration for a pseudo-header or host here too.
    out.response_headers_to_remove.extend(
        n for n in rule.response_headers.remove if not n.startswith(":") and n != "host"
    )
    if rule.fault is not None:
        out.typed_per_filter_config[FAULT_FILTER].CopyFrom(_any(_fault(rule.fault)))
    if rule.redirect is not None:
        out.redirect.CopyFrom(_redirect(rule.redirect, pr.port, match))
        return out
    if rule.direct_status is not None:
        out.direct_response.status = rule.direct_status
        if rule.direct_body:
            out.direct_response.body.inline_string = rule.direct_body
        return out
    action = out.route
    names = [_backend_cluster(b, clusters) for b in rule.backends]
    if len(rule.backends) == 1:
        action.cluster = names[0]
    else:
        for b, name in zip(rule.backends, names, strict=True):
            action.weighted_clusters.clusters.append(
                route_components_pb2.WeightedCluster.ClusterWeight(
                    name=name, weight=wrappers_pb2.UInt32Value(value=b.weight)
                )
            )
    # Gateway API: an unusable backend's share of requests is answered with 500.
    action.cluster_not_found_response_code = (
        route_components_pb2.RouteAction.INTERNAL_SERVER_ERROR
        if pr.source in ("HTTPRoute", "GRPCRoute")
        else route_components_pb2.RouteAction.SERVICE_UNAVAILABLE
    )
    action.timeout.CopyFrom(_duration(rule.timeout_s or 0.0))
    hashes = [
        clusters[n].policy.hash_policy
        for n in names
        if n in clusters and clusters[n].policy.hash_policy is not None
    ]
    for h in _unique(hashes):
        action.hash_policy.append(_hash_policy(h))
    if rule.retry is not None:
        action.retry_policy.CopyFrom(_retry_policy(rule.retry, hashed=bool(hashes)))
    for mirror in rule.mirrors:
        if mirror.backend.problem:
            continue  # Istio drops a mirror it cannot resolve (and says so in status)
        action.request_mirror_policies.append(
            route_components_pb2.RouteAction.RequestMirrorPolicy(
                cluster=_backend_cluster(mirror.backend, clusters),
                runtime_fraction=base_pb2.RuntimeFractionalPercent(
                    default_value=_percent(mirror.percent)
                ),
                trace_sampled=wrappers_pb2.BoolValue(value=False),
            )
        )
    rewrite = rule.rewrite
    host = (rewrite.host if rewrite is not None else None) or _host_from_headers(
        rule.request_headers
    )
    if host:
        action.host_rewrite_literal = host
    if rewrite is not None:
        _path_rewrite(action, rewrite.path, rewrite.prefix, rewrite.regex, match)
    return out


def _unique(hashes: Iterable[HashPolicy | None]) -> list[HashPolicy]:
    seen: list[HashPolicy] = []
    for h in hashes:
        if h is not None and h not in seen:
            seen.append(h)
    return seen


def _path_rewrite(
    action: route_components_pb2.RouteAction,
    full: str | None,
    prefix: str | None,
    regex: tuple[str, str] | None,
    match: RequestMatch,
) -> None:
    """Istio's conversions of URLRewrite (and VirtualService rewrite.uri)."""
    if regex is not None:
        action.regex_rewrite.pattern.regex = regex[0]
        action.regex_rewrite.substitution = regex[1]
    elif full is not None:
        action.regex_rewrite.pattern.regex = "/.*"
        action.regex_rewrite.substitution = full
    elif prefix is not None:
        _prefix_swap(action, prefix, match)


def _prefix_swap(
    action: route_components_pb2.RouteAction | route_components_pb2.RedirectAction,
    prefix: str,
    match: RequestMatch,
) -> None:
    """ReplacePrefixMatch, in a rewrite or a redirect: the matched path prefix (whole
    segments) swapped for ``prefix``, never leaving "//" behind."""
    segment = match.path is not None and match.path.kind is PathKind.SEGMENT_PREFIX
    if not segment:
        action.prefix_rewrite = prefix
        return
    value = prefix.rstrip("/") or "/"
    if value == "/":
        # Replacing a prefix with "/" must not leave "//": keep one slash.
        assert match.path is not None
        matched = match.path.value.rstrip("/")
        action.regex_rewrite.pattern.regex = f"^{_quote_meta(matched)}(/?)(.*)"
        action.regex_rewrite.substitution = "/\\2"
    else:
        action.prefix_rewrite = value


# ------------------------------------------------------------------ clusters
