"""One waypoint's share as the Envoy protos meshd serves: what a stock Envoy would do."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from typing import Any

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import json_format

from controlplane.l7 import envoy
from controlplane.l7.build import build
from controlplane.state import NamespaceInfo, ServicePortInfo, frozen_labels
from tests.support.l7world import CANARY, WAYPOINT, l7, objects, service, world

HOST = "reviews.shop.svc.cluster.local"
REVIEWS = f"inbound-vip|9080|http|{HOST}"
V1 = "inbound-vip|9080|http|reviews-v1.shop.svc.cluster.local"
V2 = "inbound-vip|9080|http|reviews-v2.shop.svc.cluster.local"
PARENT = {"group": "", "kind": "Service", "name": "reviews", "port": 9080}
TO_V1 = [{"name": "reviews-v1", "port": 9080}]


def Y(text: str) -> Any:
    return yaml.safe_load(textwrap.dedent(text))


def resources(*objects: Any, **changes: Any) -> envoy.EnvoyResources:
    state = world(l7=objects, **changes)
    return envoy.translate(build(state).shares["shop/waypoint"])


def httproute(*rules: dict[str, Any]) -> Any:
    return l7("HTTPRoute", "r", {"parentRefs": [PARENT], "rules": list(rules)})


def routes(*objects: Any, **changes: Any) -> list[rc.Route]:
    (vhost,) = resources(*objects, **changes).routes[REVIEWS].virtual_hosts
    return list(vhost.routes)


def route(rule: str, **changes: Any) -> rc.Route:
    """The first Envoy route of a one-rule HTTPRoute written in YAML flow style."""
    return routes(httproute({"backendRefs": TO_V1, **Y(rule)}), **changes)[0]


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# ------------------------------------------------------------------ listener


def test_one_filter_chain_per_vip_and_port_hcm_with_rds_or_tcp_proxy() -> None:
    tcp = service(
        "reviews-v2", {"app": "reviews"}, ports=(ServicePortInfo(port=3306, target_port=3306),)
    )
    res = resources(services=(*world().services[:2], tcp))
    listener = res.listeners["waypoint"]
    assert listener.HasField("internal_listener")
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
    chains = {c.name: c for c in listener.filter_chains}
    assert set(chains) == {
        f"{HOST}:9080",
        "reviews-v1.shop.svc.cluster.local:9080",
        "reviews-v2.shop.svc.cluster.local:3306",
    }
    http = chains[f"{HOST}:9080"]
    assert http.filter_chain_match.destination_port.value == 9080
    (vip,) = http.filter_chain_match.prefix_ranges
    assert (vip.address_prefix, vip.prefix_len.value) == ("10.96.0.20", 32)
    hcm = hcm_pb2.HttpConnectionManager()
    http.filters[0].typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name == REVIEWS and hcm.rds.config_source.HasField("ads")
    assert [f.name for f in hcm.http_filters] == [envoy.FAULT_FILTER, envoy.ROUTER_FILTER]
    assert (hcm.server_name, hcm.use_remote_address.value) == ("istio-envoy", False)
    assert [u.upgrade_type for u in hcm.upgrade_configs] == ["websocket"]
    # Said, not left to Envoy's 5-minute default: no stream idle timeout, as Istio's and ours.
    assert hcm.HasField("stream_idle_timeout") and hcm.stream_idle_timeout.ToNanoseconds() == 0
    proxy = tcp_proxy_pb2.TcpProxy()
    chains["reviews-v2.shop.svc.cluster.local:3306"].filters[0].typed_config.Unpack(proxy)
    assert proxy.cluster == "inbound-vip|3306|tcp|reviews-v2.shop.svc.cluster.local"
    assert "inbound-vip|3306|tcp|reviews-v2.shop.svc.cluster.local" not in res.routes


def test_a_headless_service_gets_no_chain_that_would_take_every_address() -> None:
    headless = replace(world().services[2], cluster_ips=("None",))
    res = resources(services=(*world().services[:2], headless))
    names = [c.name for c in res.listeners["waypoint"].filter_chains]
    assert all(c.filter_chain_match.prefix_ranges for c in res.listeners["waypoint"].filter_chains)
    assert "reviews-v2.shop.svc.cluster.local:9080" not in names


def workload_resources(kind: str = "all", **changes: Any) -> envoy.EnvoyResources:
    waypoint = replace(WAYPOINT, waypoint_for=kind)
    return envoy.translate(build(world(waypoints=(waypoint,), **changes)).shares["shop/waypoint"])


def test_a_workload_gets_chains_on_its_ip_alone_to_an_original_dst_cluster() -> None:
    res = workload_resources()
    chains = {c.name: c for c in res.listeners["waypoint"].filter_chains}
    any_port = chains["direct-tcp|10.244.1.11"]
    assert not any_port.filter_chain_match.HasField("destination_port")
    (ip,) = any_port.filter_chain_match.prefix_ranges
    assert (ip.address_prefix, ip.prefix_len.value) == ("10.244.1.11", 32)
    # Envoy picks by port before address, with no fall back: on a port a service chain
    # names, the pod needs a chain of its own, or podIP:9080 would match nothing.
    on_9080 = chains["direct-tcp|10.244.1.11|9080"]
    assert on_9080.filter_chain_match.destination_port.value == 9080
    assert list(on_9080.filter_chain_match.prefix_ranges) == [ip]
    proxy = tcp_proxy_pb2.TcpProxy()
    any_port.filters[0].typed_config.Unpack(proxy)
    assert (proxy.cluster, proxy.stat_prefix) == (
        "inbound-pod|10.244.1.11",
        "inbound-pod|10.244.1.11",
    )
    assert on_9080.filters[0] == any_port.filters[0]
    cluster = res.clusters["inbound-pod|10.244.1.11"]
    assert cluster.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert cluster.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    assert not cluster.HasField("eds_cluster_config") and not cluster.HasField("load_assignment")
    assert cluster.connect_timeout.ToSeconds() == 10  # Istio's default
    meta = as_dict(cluster.metadata)["filter_metadata"]
    assert meta[envoy.TUNNEL_MATCH] == {"tunnel": "http"}
    assert meta["istio"] == {
        "workload": "reviews-v1-a;shop;reviews;v1;Kubernetes",
        "identity": "spiffe://cluster.local/ns/shop/sa/reviews",
    }
    # Reached at the address dialled: no endpoints to send.
    assert "inbound-pod|10.244.1.11" not in res.endpoints
    assert {n for n in res.clusters if n.startswith("inbound-pod|")} == {
        "inbound-pod|10.244.1.11",
        "inbound-pod|10.244.1.21",
        "inbound-pod|10.244.2.12",
    }


def test_workload_chains_leave_the_service_chains_as_they_were() -> None:
    def service_chains(res: envoy.EnvoyResources) -> list[Any]:
        return [c for c in res.listeners["waypoint"].filter_chains if "direct-tcp" not in c.name]

    both = workload_resources("all")
    assert service_chains(both) == service_chains(resources())
    assert set(resources().clusters) < set(both.clusters)
    only_pods = workload_resources("workload")
    names = [c.name for c in only_pods.listeners["waypoint"].filter_chains]
    assert names == ["direct-tcp|10.244.1.11", "direct-tcp|10.244.1.21", "direct-tcp|10.244.2.12"]
    assert only_pods.routes == {} and set(only_pods.endpoints) == set()


def test_a_workload_outside_the_mesh_has_no_tunnel_marker() -> None:
    ns = NamespaceInfo(name="shop", labels=frozen_labels({"istio.io/use-waypoint": "waypoint"}))
    cluster = workload_resources(namespaces=(ns,)).clusters["inbound-pod|10.244.1.11"]
    meta = as_dict(cluster.metadata)["filter_metadata"]
    assert envoy.TUNNEL_MATCH not in meta
    assert meta["istio"]["identity"] == "spiffe://cluster.local/ns/shop/sa/reviews"


def test_route_configuration_shape() -> None:
    rc_ = resources().routes[REVIEWS]
    assert rc_.validate_clusters.value is False
    (vhost,) = rc_.virtual_hosts
    assert (vhost.name, list(vhost.domains)) == ("inbound|http|9080", ["*"])


# ------------------------------------------------------------------ matches


def test_the_default_route() -> None:
    (default,) = routes()
    assert as_dict(default) == {
        "name": "default",
        "match": {"prefix": "/", "case_sensitive": True},
        "decorator": {"operation": f"{HOST}:9080/*"},
        "route": {
            "cluster": REVIEWS,  # cluster_not_found_response_code: 503, proto3's default
            "timeout": "0s",
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream,unavailable,cancelled,"
                "retriable-status-codes",
                "num_retries": 2,
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.retry.host."
                            "previous_hosts.v3.PreviousHostsPredicate"
                        },
                    }
                ],
                "host_selection_retry_max_attempts": "5",
            },
        },
    }


def match(path: str) -> dict[str, Any]:
    return as_dict(route(f"{{matches: [{{path: {path}}}]}}").match)


def test_path_match_forms() -> None:
    assert match("{value: /v2/}") == {"path_separated_prefix": "/v2", "case_sensitive": True}
    assert match("{value: /}") == {"prefix": "/", "case_sensitive": True}
    assert match("{type: Exact, value: /a}") == {"path": "/a", "case_sensitive": True}
    assert match("{type: RegularExpression, value: '/u/[0-9]+'}") == {
        "safe_regex": {"regex": "/u/[0-9]+"}
    }


def test_header_query_and_method_matchers() -> None:
    m = as_dict(
        route(
            "{matches: [{method: GET, headers: [{name: X-Env, value: c}, "
            "{name: ua, type: RegularExpression, value: '.*x'}], "
            "queryParams: [{name: q, value: '1'}]}]}"
        ).match
    )
    assert m["headers"] == [
        {"name": "x-env", "string_match": {"exact": "c"}},
        {"name": "ua", "string_match": {"safe_regex": {"regex": ".*x"}}},
        {"name": ":method", "string_match": {"exact": "GET"}},
    ]
    assert m["query_parameters"] == [{"name": "q", "string_match": {"exact": "1"}}]


def vs_route(http: str) -> rc.Route:
    vs = l7("VirtualService", "vs", {"hosts": ["reviews"], "http": [Y(http)]})
    return routes(vs)[0]


def test_virtual_service_matches_prefix_ignore_case_and_without_headers() -> None:
    to = "route: [{destination: {host: reviews-v1}}]"
    m = as_dict(
        vs_route(
            f"{{{to}, match: [{{uri: {{prefix: /A}}, ignoreUriCase: true, "
            "headers: {x-p: {regex: '*'}}, "
            "withoutHeaders: {x-bot: {exact: 'yes'}, x-dbg: {regex: '*'}}}]}"
        ).match
    )
    assert m["prefix"] == "/A" and m["case_sensitive"] is False
    assert m["headers"] == [
        {"name": "x-p", "present_match": True},
        {
            "name": "x-bot",
            "string_match": {"exact": "yes"},
            "invert_match": True,
            "treat_missing_header_as_empty": True,
        },
        {"name": "x-dbg", "present_match": True, "invert_match": True},
    ]
    assert as_dict(vs_route(to).match) == {"prefix": "/"}  # no case_sensitive without a uri


# ------------------------------------------------------------------ actions


def test_weighted_clusters_or_one_cluster_and_500_for_unusable_backends() -> None:
    canary = routes(*objects(CANARY))
    assert canary[0].route.cluster == V2
    assert [(c.name, c.weight.value) for c in canary[1].route.weighted_clusters.clusters] == [
        (V1, 90),
        (V2, 10),
    ]
    assert not canary[1].route.weighted_clusters.HasField("total_weight")
    code = rc.RouteAction.INTERNAL_SERVER_ERROR
    assert canary[1].route.cluster_not_found_response_code == code
    missing = route("{backendRefs: [{name: details, port: 9080}]}")
    assert missing.route.cluster == "inbound-vip|9080|http|details.shop.svc.cluster.local"
    other = route("{backendRefs: [{kind: ServiceImport, group: x, name: reviews-v1, port: 9080}]}")
    assert other.route.cluster == "UnknownService"
    assert route("{backendRefs: []}").direct_response.status == 500


def test_retry_policy_fields_and_no_predicate_with_consistent_hash() -> None:
    r = route(
        "{retry: {attempts: 3, codes: [503], backoff: 100ms}, timeouts: {backendRequest: 2s}}"
    )
    policy = r.route.retry_policy
    assert (policy.num_retries.value, list(policy.retriable_status_codes)) == (3, [503])
    assert policy.retry_on.endswith(",retriable-status-codes")
    assert policy.per_try_timeout.ToMilliseconds() == 2000
    assert policy.retry_back_off.base_interval.ToMilliseconds() == 100
    assert policy.host_selection_retry_max_attempts == 5
    assert route("{retry: {attempts: 0}}").route.HasField("retry_policy") is False
    dr = l7(
        "DestinationRule",
        "dr",
        {
            "host": "reviews-v1",
            "trafficPolicy": {"loadBalancer": {"consistentHash": Y("{httpHeaderName: X-User}")}},
        },
    )
    hashed = routes(httproute({"backendRefs": TO_V1}), dr)[0].route
    assert [h.header.header_name for h in hashed.hash_policy] == ["x-user"]
    assert not hashed.retry_policy.retry_host_predicate
    assert hashed.retry_policy.host_selection_retry_max_attempts == 0


def test_timeout_zero_and_set() -> None:
    assert route("{}").route.timeout.ToMilliseconds() == 0
    assert route("{timeouts: {request: 1500ms}}").route.timeout.ToMilliseconds() == 1500


def test_mirrors_as_parts_per_million() -> None:
    r = route(
        "{filters: [{type: RequestMirror, requestMirror: "
        "{backendRef: {name: reviews-v2, port: 9080}, fraction: {numerator: 1, denominator: 8}}}]}"
    )
    (mirror,) = r.route.request_mirror_policies
    assert mirror.cluster == V2 and mirror.trace_sampled.value is False
    fraction = mirror.runtime_fraction.default_value
    assert (fraction.numerator, fraction.denominator) == (
        125_000,
        percent_pb2.FractionalPercent.MILLION,
    )


def test_header_options_and_host_rewrite() -> None:
    r = route(
        """
        filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-B, value: '2'}, {name: Host, value: new.example}]
            add: [{name: x-a, value: '1'}]
            remove: [x-gone]
        - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [server]}}
        """
    )
    assert [(h.header.key, h.header.value, h.append_action) for h in r.request_headers_to_add] == [
        ("x-b", "2", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
        ("x-a", "1", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
    ]
    assert list(r.request_headers_to_remove) == ["x-gone"]
    assert list(r.response_headers_to_remove) == ["server"]
    assert r.route.host_rewrite_literal == "new.example"
    vs = vs_route(
        "{route: [{destination: {host: reviews-v1}}], headers: {response: {remove: [host, x-a]}}}"
    )
    assert list(vs.response_headers_to_remove) == ["x-a"]  # Envoy refuses a route removing host


def redirect(body: str, path: str = "/old") -> dict[str, Any]:
    r = routes(
        httproute(
            {
                "matches": [{"path": {"value": path}}],
                "filters": [{"type": "RequestRedirect", "requestRedirect": Y(body)}],
            }
        )
    )[0]
    assert not r.HasField("route")
    return as_dict(r.redirect)


def test_redirect_fields_and_port_rules() -> None:
    assert redirect("{}") == {"response_code": "FOUND", "port_redirect": 9080}  # the request's port
    assert redirect("{scheme: https, hostname: example.org, statusCode: 301}") == {
        "scheme_redirect": "https",
        "host_redirect": "example.org",
    }
    assert redirect("{port: 80}") == {"response_code": "FOUND"}  # http's own port is left out
    assert redirect("{scheme: https, port: 443}") == {
        "response_code": "FOUND",
        "scheme_redirect": "https",
    }
    assert redirect("{scheme: https, port: 8443}")["port_redirect"] == 8443
    assert redirect("{path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 308}") == {
        "response_code": "PERMANENT_REDIRECT",
        "port_redirect": 9080,
        "path_redirect": "/new",
    }
    prefix = redirect(
        "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix/}}"
    )
    # The spec's table: a trailing slash on the replacement leaves no "//" behind.
    assert prefix["prefix_rewrite"] == "/replacement-prefix"
    strip = redirect("{path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}")
    assert strip["regex_rewrite"] == {
        "pattern": {"regex": "^/old(/?)(.*)"},
        "substitution": "/\\2",
    }
    for code, name in ((303, "SEE_OTHER"), (307, "TEMPORARY_REDIRECT")):
        assert redirect(f"{{statusCode: {code}}}")["response_code"] == name


def test_virtual_service_redirect_port_derivation() -> None:
    derived = vs_route("{redirect: {uri: /n, derivePort: FROM_REQUEST_PORT}}").redirect
    assert (derived.port_redirect, derived.path_redirect) == (9080, "/n")
    default = vs_route("{redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}}").redirect
    assert (
        default.port_redirect == 0 and default.response_code == rc.RedirectAction.MOVED_PERMANENTLY
    )


def rewrite(match: str, path: str) -> dict[str, Any]:
    r = route(
        f"{{matches: [{{path: {match}}}], "
        f"filters: [{{type: URLRewrite, urlRewrite: {{path: {path}}}}}]}}"
    )
    out = as_dict(r.route)
    return {k: v for k, v in out.items() if k in ("prefix_rewrite", "regex_rewrite")}


def test_url_rewrites_as_istio_writes_them() -> None:
    prefix = "{type: ReplacePrefixMatch, replacePrefixMatch: /one/}"
    assert rewrite("{value: /prefix/one}", prefix) == {"prefix_rewrite": "/one"}
    strip = {
        "regex_rewrite": {"pattern": {"regex": "^/strip\\.me(/?)(.*)"}, "substitution": "/\\2"}
    }
    for replacement in ("/", "''"):
        value = f"{{type: ReplacePrefixMatch, replacePrefixMatch: {replacement}}}"
        assert rewrite("{value: /strip.me/}", value) == strip
    full = "{type: ReplaceFullPath, replaceFullPath: /full}"
    assert rewrite("{value: /a}", full) == {
        "regex_rewrite": {"pattern": {"regex": "/.*"}, "substitution": "/full"}
    }
    host = route("{filters: [{type: URLRewrite, urlRewrite: {hostname: one.example.org}}]}")
    assert host.route.host_rewrite_literal == "one.example.org"


def test_virtual_service_rewrites_direct_responses_and_faults() -> None:
    to = "route: [{destination: {host: reviews-v1}}]"
    assert vs_route(f"{{{to}, rewrite: {{uri: /v2}}}}").route.prefix_rewrite == "/v2"
    rx = vs_route(f"{{{to}, rewrite: {{uriRegexRewrite: {{match: '^/a(.*)', rewrite: '/b\\1'}}}}}}")
    assert (rx.route.regex_rewrite.pattern.regex, rx.route.regex_rewrite.substitution) == (
        "^/a(.*)",
        "/b\\1",
    )
    direct = vs_route("{directResponse: {status: 418, body: {string: teapot}}}")
    assert (direct.direct_response.status, direct.direct_response.body.inline_string) == (
        418,
        "teapot",
    )
    fr = vs_route(
        f"{{{to}, fault: {{delay: {{fixedDelay: 2s, percentage: {{value: 12.5}}}}, "
        "abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}}"
    )
    fault = fault_pb2.HTTPFault()
    fr.typed_per_filter_config[envoy.FAULT_FILTER].Unpack(fault)
    assert fault.delay.fixed_delay.ToMilliseconds() == 2000
    assert fault.delay.percentage.numerator == 125_000
    assert (fault.abort.grpc_status, fault.abort.percentage.numerator) == (14, 500_000)
    # VirtualService routes are not Gateway API routes: a missing cluster is Envoy's 503.
    assert vs_route(to).route.cluster_not_found_response_code == rc.RouteAction.SERVICE_UNAVAILABLE


# ------------------------------------------------------------------ clusters and endpoints


def test_clusters_with_istio_defaults() -> None:
    c = resources().clusters[REVIEWS]
    assert (c.type, c.eds_cluster_config.service_name) == (c.EDS, REVIEWS)
    assert c.lb_policy == c.LEAST_REQUEST and c.connect_timeout.seconds == 10
    (t,) = c.circuit_breakers.thresholds
    assert {t.max_connections.value, t.max_pending_requests.value, t.max_requests.value} == {
        envoy.UINT32_MAX
    }
    assert t.max_retries.value == envoy.UINT32_MAX and t.track_remaining
    assert not c.HasField("outlier_detection")
    options = http_protocol_options_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options[envoy.HTTP_PROTOCOL_OPTIONS].Unpack(options)
    assert options.explicit_http_config.HasField("http_protocol_options")
    assert as_dict(c.metadata)["filter_metadata"]["istio"] == {
        "services": [{"host": HOST, "name": "reviews", "namespace": "shop"}]
    }


def test_http2_for_grpc_and_http2_ports() -> None:
    grpc = service(
        "reviews",
        {"app": "reviews"},
        ports=(ServicePortInfo(port=9080, target_port=8080, name="grpc"),),
    )
    c = resources(services=(grpc,)).clusters[REVIEWS]
    options = http_protocol_options_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options[envoy.HTTP_PROTOCOL_OPTIONS].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")


def cluster_with(policy: str, name: str = REVIEWS) -> Any:
    dr = l7("DestinationRule", "dr", {"host": "reviews", "trafficPolicy": Y(policy)})
    return resources(dr).clusters[name]


def test_destination_rule_settings_on_the_cluster() -> None:
    c = cluster_with(
        """
        loadBalancer: {consistentHash: {useSourceIp: true}}
        connectionPool:
          tcp: {maxConnections: 7, connectTimeout: 1s}
          http: {http1MaxPendingRequests: 0, idleTimeout: 5s, maxRequestsPerConnection: 1}
        outlierDetection:
          {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, minHealthPercent: 20}
        """
    )
    assert c.lb_policy == c.RING_HASH and c.ring_hash_lb_config.minimum_ring_size.value == 1024
    (t,) = c.circuit_breakers.thresholds
    assert (t.max_connections.value, t.max_pending_requests.value) == (7, envoy.UINT32_MAX)
    assert c.connect_timeout.seconds == 1
    od = c.outlier_detection
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value) == (3, 100)
    assert (
        od.consecutive_gateway_failure.value,
        od.enforcing_consecutive_gateway_failure.value,
    ) == (2, 100)
    assert (od.interval.seconds, od.base_ejection_time.seconds, od.max_ejection_percent.value) == (
        10,
        30,
        10,
    )
    assert od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value == 0
    assert c.common_lb_config.healthy_panic_threshold.value == 20.0
    options = http_protocol_options_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options[envoy.HTTP_PROTOCOL_OPTIONS].Unpack(options)
    common = options.common_http_protocol_options
    assert (common.idle_timeout.seconds, common.max_requests_per_connection.value) == (5, 1)
    assert cluster_with("{loadBalancer: {simple: ROUND_ROBIN}}").lb_policy == c.ROUND_ROBIN
    maglev = cluster_with("{loadBalancer: {consistentHash: {httpHeaderName: x, maglev: {}}}}")
    assert maglev.lb_policy == c.MAGLEV and not maglev.HasField("ring_hash_lb_config")


def test_outlier_detection_5xx_unset_is_envoys_default_and_zero_is_off() -> None:
    unset = cluster_with("{outlierDetection: {interval: 5s}}").outlier_detection
    assert not unset.HasField("consecutive_5xx") and not unset.HasField("enforcing_consecutive_5xx")
    off = cluster_with("{outlierDetection: {consecutive5xxErrors: 0}}").outlier_detection
    assert off.HasField("enforcing_consecutive_5xx") and off.enforcing_consecutive_5xx.value == 0


def test_load_assignments_health_tunnel_and_identity() -> None:
    state_pods = list(world().pods)
    state_pods[0] = replace(state_pods[0], ready=False)
    state_pods[1] = replace(
        state_pods[1],
        labels={**state_pods[1].labels, "istio.io/dataplane-mode": "none"},
    )
    cla = resources(pods=tuple(state_pods)).endpoints[V1]
    assert cla.cluster_name == V1
    (locality,) = cla.endpoints
    first, second = locality.lb_endpoints
    assert first.endpoint.address.socket_address.address == "10.244.1.11"
    assert first.endpoint.address.socket_address.port_value == 8080
    assert (first.health_status, second.health_status) == (
        health_check_pb2.UNHEALTHY,
        health_check_pb2.HEALTHY,
    )
    meta = as_dict(first.metadata)["filter_metadata"]
    assert meta[envoy.TUNNEL_MATCH] == {"tunnel": "http"}
    assert meta["istio"] == {
        "workload": "reviews-v1-a;shop;reviews;v1;Kubernetes",
        "identity": "spiffe://cluster.local/ns/shop/sa/reviews",
    }
    assert envoy.TUNNEL_MATCH not in as_dict(second.metadata)["filter_metadata"]
    empty = resources(pods=()).endpoints[V1]
    assert list(empty.endpoints) == []


def test_by_type_names_every_resource() -> None:
    by_type = resources().by_type()
    assert set(by_type) == set(envoy.TYPE_URLS)
    assert set(by_type[envoy.CLUSTER_TYPE]) == set(by_type[envoy.ENDPOINT_TYPE])
