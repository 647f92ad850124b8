"""Each waypoint's share: bindings, routes attached and ordered, clusters, endpoints, statuses."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.l7.binding import Binding, bind
from controlplane.l7.build import L7Result, build
from controlplane.l7.gateway_api import parse_http_route
from controlplane.l7.ir import DEFAULT_RETRY, PathKind, PathMatch, PortRoutes, Protocol, Retry
from controlplane.l7.protocol import declared_protocol
from controlplane.l7.status import ObjectStatus
from controlplane.state import (
    EndpointSliceInfo,
    L7Object,
    NamespaceInfo,
    ServicePortInfo,
    WaypointInfo,
    frozen_labels,
)
from controlplane.translate import translate
from tests.support.l7world import CANARY, WAYPOINT, l7, pod, service, world

HOST = "reviews.shop.svc.cluster.local"
V1 = "inbound-vip|9080|http|reviews-v1.shop.svc.cluster.local"
V2 = "inbound-vip|9080|http|reviews-v2.shop.svc.cluster.local"
PARENT: dict[str, Any] = {"group": "", "kind": "Service", "name": "reviews", "port": 9080}
TO_V1 = [{"name": "reviews-v1", "port": 9080}]
TWO_PORTS = (
    ServicePortInfo(port=9080, target_port=8080, name="http"),
    ServicePortInfo(port=9090, target_port=8090, name="http-admin"),
)


def httproute(name: str, *rules: dict[str, Any], parent: Any = PARENT, **kw: Any) -> L7Object:
    return l7("HTTPRoute", name, {"parentRefs": [parent], "rules": list(rules)}, **kw)


def ports(result: L7Result, svc: str = "reviews") -> dict[int, PortRoutes]:
    (spec,) = [s for s in result.shares["shop/waypoint"].services if s.name == svc]
    return {pr.port: pr for pr in spec.ports}


def status(result: L7Result, key: str) -> ObjectStatus:
    return next(s for s in result.statuses if s.key == key)


def parent_conditions(result: L7Result, key: str) -> dict[str, tuple[bool, str]]:
    (p,) = status(result, key).parents
    return {c.type: (c.status, c.reason) for c in p.conditions}


# ------------------------------------------------------------------ binding


def test_the_namespace_label_binds_every_service_and_a_service_label_opts_out() -> None:
    result = build(world())
    assert [s.name for s in result.shares["shop/waypoint"].services] == [
        "reviews",
        "reviews-v1",
        "reviews-v2",
    ]
    opted = service("reviews-v2", {"app": "reviews"}, labels={"istio.io/use-waypoint": "none"})
    state = world(services=(*world().services[:2], opted))
    names = [s.name for s in build(state).shares["shop/waypoint"].services]
    assert names == ["reviews", "reviews-v1"]


def test_a_service_label_binds_without_a_namespace_label() -> None:
    state = world(
        namespaces=(NamespaceInfo(name="shop"),),
        services=(
            service("reviews", {"app": "reviews"}, labels={"istio.io/use-waypoint": "waypoint"}),
            service("reviews-v1", {"app": "reviews"}),
        ),
    )
    assert [s.name for s in build(state).shares["shop/waypoint"].services] == ["reviews"]


def test_the_waypoints_own_service_is_not_one_it_serves() -> None:
    """Its namespace is bound to it, but the waypoint's Service gets no listener there."""
    managed = {
        "gateway.istio.io/managed": "istio.io-mesh-controller",
        "gateway.networking.k8s.io/gateway-name": "waypoint",
    }
    own = service(
        "waypoint",
        {"gateway.networking.k8s.io/gateway-name": "waypoint"},
        ports=(ServicePortInfo(port=15008, target_port=15008, name="mesh"),),
        labels=managed,
        vip="10.96.0.30",
    )
    result = build(world(services=(*world().services, own)))
    names = [s.name for s in result.shares["shop/waypoint"].services]
    assert names == ["reviews", "reviews-v1", "reviews-v2"]


def test_binding_fails_closed_when_the_waypoint_cannot_be_used() -> None:
    def binding(
        waypoint: WaypointInfo | None, labels: dict[str, str], ns_labels: dict[str, str]
    ) -> Binding | None:
        return bind(
            kind="service",
            what="service shop/reviews",
            namespace="shop",
            object_labels=labels,
            namespace_labels=ns_labels,
            waypoints={} if waypoint is None else {("shop", "waypoint"): waypoint},
        )

    label = {"istio.io/use-waypoint": "waypoint"}
    missing = binding(None, label, {})
    assert missing is not None and not missing.usable and "does not exist" in missing.problem
    no_address = binding(replace(WAYPOINT, address=None), label, {})
    assert no_address is not None and not no_address.usable and "no address" in no_address.problem
    workload = replace(WAYPOINT, waypoint_for="workload")
    assert binding(workload, {}, label) is None  # a namespace label binds what it takes
    explicit = binding(workload, label, {})
    assert explicit is not None and not explicit.usable and "workload" in explicit.problem
    assert binding(WAYPOINT, {"istio.io/use-waypoint": "none"}, label) is None
    good = binding(WAYPOINT, label, {})
    assert good is not None and good.usable and good.hostname == "waypoint.shop.svc.cluster.local"


# ------------------------------------------------------------------ workloads


def for_traffic(kind: str) -> WaypointInfo:
    return replace(WAYPOINT, waypoint_for=kind)


def test_a_workload_waypoint_serves_the_pods_bound_to_it_not_the_services() -> None:
    result = build(world(waypoints=(for_traffic("workload"),)))
    share = result.shares["shop/waypoint"]
    assert share.services == ()
    assert [(w.name, w.ip, w.hbone) for w in share.workloads] == [
        ("reviews-v1-a", "10.244.1.11", True),
        ("reviews-v2-a", "10.244.1.21", True),
        ("reviews-v1-b", "10.244.2.12", True),
    ]
    first = share.workloads[0]
    assert (first.namespace, first.identity) == (
        "shop",
        "spiffe://cluster.local/ns/shop/sa/reviews",
    )
    assert (first.canonical_name, first.canonical_revision) == ("reviews", "v1")
    (programmed,) = [
        c for c in status(result, "Gateway/shop/waypoint").conditions if c.type == "Programmed"
    ]
    assert programmed.message == "serving its bound workloads"


def test_an_all_waypoint_serves_both_and_a_service_waypoint_no_pod() -> None:
    both = build(world(waypoints=(for_traffic("all"),))).shares["shop/waypoint"]
    assert len(both.services) == 3 and len(both.workloads) == 3
    assert build(world()).shares["shop/waypoint"].workloads == ()


def test_which_pods_are_bound_as_workloads() -> None:
    v1a, v1b, v2a = world().pods
    opted_out = replace(v1b, labels=frozen_labels({**v1b.labels, "istio.io/use-waypoint": "none"}))
    unwired = replace(v2a, ip=None)
    outside = replace(
        pod("legacy", "10.244.1.40", "v1"),
        labels=frozen_labels({"app": "legacy", "istio.io/dataplane-mode": "none"}),
    )
    twin = pod("twin", "10.244.1.11", "v1")  # another pod's IP: meshd refuses that workload
    instance = replace(
        pod("waypoint", "10.244.1.50", "v1"),
        labels=frozen_labels({"gateway.istio.io/managed": "istio.io-mesh-controller"}),
    )
    state = world(
        waypoints=(for_traffic("workload"),),
        pods=(v1a, opted_out, unwired, outside, twin, instance),
    )
    workloads = build(state).shares["shop/waypoint"].workloads
    # Out of the mesh, but bound: reached in plaintext, as such an endpoint is.
    assert [(w.name, w.hbone) for w in workloads] == [("reviews-v1-a", True), ("legacy", False)]


def told_and_served(state: Any) -> tuple[set[str], set[str]]:
    """The pods whose Workload names a reachable waypoint; the pods the waypoint serves."""
    told = {
        w.name
        for w in translate(state).workloads.values()
        if w.waypoint is not None and w.waypoint.address is not None
    }
    return told, {w.name for w in build(state).shares["shop/waypoint"].workloads}


def test_the_share_holds_the_pods_whose_workload_names_the_waypoint() -> None:
    """What ztunnel is told (the Workload's waypoint) and what the waypoint serves agree."""
    other_ns = NamespaceInfo(
        name="other",
        labels=frozen_labels(
            {"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "shop"}
        ),
    )
    # The waypoint's listener allows its own namespace only (allowedRoutes: Same).
    foreign = replace(pod("foreign", "10.244.3.3", "v1"), namespace="other")
    explicit = replace(
        pod("explicit", "10.244.3.4", "v1"),
        namespace="other",
        labels=frozen_labels({"app": "x", "istio.io/use-waypoint": "waypoint"}),
    )  # names shop's waypoint without the namespace label: a waypoint that does not exist
    state = world(
        waypoints=(for_traffic("all"),),
        namespaces=(*world().namespaces, other_ns),
        pods=(*world().pods, foreign, explicit),
    )
    told, served = told_and_served(state)
    assert served == told == {"reviews-v1-a", "reviews-v1-b", "reviews-v2-a"}
    everywhere = replace(
        for_traffic("all"),
        listeners=(replace(WAYPOINT.listeners[0], allowed_from="All"),),
    )
    state = replace(state, waypoints=(everywhere,))
    told, served = told_and_served(state)
    assert served == told and "foreign" in served and "explicit" not in served


def test_a_pod_with_a_service_vip_of_the_waypoint_is_not_served_and_said() -> None:
    clash = pod("clash", "10.96.0.21", "v1")  # reviews-v1's VIP
    result = build(world(waypoints=(for_traffic("all"),), pods=(*world().pods, clash)))
    assert "clash" not in {w.name for w in result.shares["shop/waypoint"].workloads}
    assert any("pod shop/clash: IP 10.96.0.21 is also a service VIP" in r for r in result.rejected)


# ------------------------------------------------------------------ attachment


def test_the_canary_attaches_to_its_service_port_only() -> None:
    result = build(world(CANARY))
    pr = ports(result)[9080]
    assert (pr.source, pr.protocol) == ("HTTPRoute", Protocol.HTTP)
    assert [r.name for r in pr.rules] == ["shop.canary.0", "shop.canary.1"]
    assert [b.weight for b in pr.rules[1].backends] == [90, 10]
    assert ports(result, "reviews-v1")[9080].source == "default"
    assert parent_conditions(result, "HTTPRoute/shop/canary") == {
        "Accepted": (True, "Accepted"),
        "ResolvedRefs": (True, "ResolvedRefs"),
    }
    assert sorted(result.shares["shop/waypoint"].clusters) == [V1, V2]


def test_a_parent_port_limits_the_route_to_that_port_and_no_port_means_all() -> None:
    svc = service("reviews", {"app": "reviews"}, ports=TWO_PORTS)
    state = world(services=(svc, *world().services[1:]))
    scoped = build(replace(state, l7=(httproute("r", {"backendRefs": TO_V1}),)))
    assert ports(scoped)[9080].source == "HTTPRoute" and ports(scoped)[9090].source == "default"
    every = {"group": "", "kind": "Service", "name": "reviews"}
    unscoped = build(replace(state, l7=(httproute("r", {"backendRefs": TO_V1}, parent=every),)))
    assert {p: pr.source for p, pr in ports(unscoped).items()} == {
        9080: "HTTPRoute",
        9090: "HTTPRoute",
    }


@pytest.mark.parametrize(
    ("route", "reason", "message"),
    [
        (httproute("r", parent={**PARENT, "name": "ratings"}), "NoMatchingParent", "not found"),
        (httproute("r", parent={**PARENT, "port": 1}), "NoMatchingParent", "no port 1"),
        (
            httproute("r", parent={**PARENT, "namespace": "shop"}, namespace="other"),
            "NotAllowedByParent",
            "consumer routes",
        ),
    ],
)
def test_routes_that_cannot_attach_are_not_accepted(
    route: L7Object, reason: str, message: str
) -> None:
    result = build(world(l7=(route,)))
    conditions = parent_conditions(result, f"HTTPRoute/{route.namespace}/r")
    assert conditions["Accepted"] == (False, reason)
    assert any(message in line for line in result.rejected)
    assert ports(result)[9080].source == "default"


def test_a_route_with_only_gateway_parents_is_not_ours() -> None:
    route = httproute("r", {"backendRefs": TO_V1}, parent={"name": "ingress"})
    result = build(world(l7=(route,)))
    assert ports(result)[9080].source == "default"
    assert not any(s.kind == "HTTPRoute" for s in result.statuses)


def test_an_invalid_route_tells_its_service_parents_why() -> None:
    bad = httproute("bad", {"filters": [{"type": "ExtensionRef"}]})
    result = build(world(l7=(bad,)))
    (p,) = status(result, "HTTPRoute/shop/bad").parents
    (accepted,) = p.conditions
    assert (accepted.status, accepted.reason) == (False, "UnsupportedValue")
    assert accepted.message.startswith("spec.rules[0].filters[0].type: ")
    assert result.rejected[0].startswith("HTTPRoute shop/bad: spec.rules[0].filters[0].type")


# ------------------------------------------------------------------ protocols


def test_declared_protocols() -> None:
    def declared(name: str, app: str = "", protocol: str = "TCP") -> Protocol | None:
        port = ServicePortInfo(
            port=80, target_port=80, name=name, app_protocol=app, protocol=protocol
        )
        return declared_protocol(port)

    names = ("http", "http-web", "http2", "grpc-api", "grpc-web", "tcp-db", "https", "web")
    assert [declared(n) for n in names] == [
        *(Protocol.HTTP, Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC, Protocol.HTTP),
        *(Protocol.TCP, Protocol.TCP, None),  # "web" declares nothing
    ]
    assert declared("x", "HTTP") is Protocol.HTTP  # appProtocol first, any case
    assert declared("http", "kubernetes.io/h2c") is Protocol.HTTP2
    assert declared("http", "mysql") is Protocol.TCP
    assert declared("dns", protocol="UDP") is Protocol.TCP


def with_reviews_port(name: str) -> Any:
    svc = service(
        "reviews",
        {"app": "reviews"},
        ports=(ServicePortInfo(port=9080, target_port=8080, name=name),),
    )
    return world(services=(svc, *world().services[1:]))


def test_an_unlabeled_port_is_tcp_without_a_route_and_http_with_one() -> None:
    state = with_reviews_port("")
    alone = build(state)
    pr = ports(alone)[9080]
    assert (pr.protocol, pr.rules) == (Protocol.TCP, ())
    assert [b.service for b in pr.tcp_backends] == [f"shop/{HOST}"]
    assert f"inbound-vip|9080|tcp|{HOST}" in alone.shares["shop/waypoint"].clusters
    routed = build(replace(state, l7=(httproute("r", {"backendRefs": TO_V1}),)))
    assert ports(routed)[9080].protocol is Protocol.HTTP
    grpc = l7("GRPCRoute", "g", {"parentRefs": [PARENT], "rules": [{"backendRefs": TO_V1}]})
    assert ports(build(replace(state, l7=(grpc,))))[9080].protocol is Protocol.HTTP2


def test_an_http_route_on_a_port_declared_tcp_is_refused() -> None:
    result = build(replace(with_reviews_port("tcp-db"), l7=(httproute("r"),)))
    assert parent_conditions(result, "HTTPRoute/shop/r")["Accepted"] == (False, "UnsupportedValue")
    assert ports(result)[9080].protocol is Protocol.TCP


def test_a_backend_on_an_unlabeled_port_gets_an_http_cluster() -> None:
    v1 = service(
        "reviews-v1",
        {"app": "reviews", "version": "v1"},
        ports=(ServicePortInfo(port=9080, target_port=8080),),
    )
    state = world(CANARY, services=(world().services[0], v1, world().services[2]))
    clusters = build(state).shares["shop/waypoint"].clusters
    assert clusters[V1].protocol is Protocol.HTTP
    assert "inbound-vip|9080|tcp|reviews-v1.shop.svc.cluster.local" in clusters  # its own port


# ------------------------------------------------------------------ rules


def rules_of(*routes: L7Object) -> PortRoutes:
    return ports(build(world(l7=routes)))[9080]


def test_the_default_route_when_no_route_attaches() -> None:
    (rule,) = ports(build(world()))[9080].rules
    assert (rule.name, rule.timeout_s, rule.retry, rule.operation) == (
        "default",
        0.0,
        DEFAULT_RETRY,
        f"{HOST}:9080/*",
    )
    assert rule.matches[0].path == PathMatch(kind=PathKind.PREFIX, value="/")
    assert [(b.service, b.port) for b in rule.backends] == [(f"shop/{HOST}", 9080)]


def test_weights_zero_are_dropped_and_no_backend_answers_500() -> None:
    pr = rules_of(
        httproute(
            "r",
            {
                "matches": [{"path": {"value": "/a"}}],
                "backendRefs": [{**TO_V1[0], "weight": 0}, {"name": "reviews-v2", "port": 9080}],
            },
            {"matches": [{"path": {"value": "/b"}}], "backendRefs": [{**TO_V1[0], "weight": 0}]},
            {"matches": [{"path": {"value": "/c"}}]},
        )
    )
    a, b, c = pr.rules
    assert [x.service.split(".")[0] for x in a.backends] == ["shop/reviews-v2"]
    assert (b.direct_status, b.retry, c.direct_status) == (500, None, 500)


def test_backends_that_cannot_be_used_say_so_and_get_no_cluster() -> None:
    refs = [
        {"name": "details", "port": 9080},
        {"name": "reviews-v1", "port": 1234},
        {**TO_V1[0], "kind": "ServiceImport", "group": "multicluster.x-k8s.io"},
    ]
    result = build(world(l7=(httproute("r", {"backendRefs": refs}),)))
    conditions = parent_conditions(result, "HTTPRoute/shop/r")
    assert conditions == {
        "Accepted": (True, "Accepted"),
        "ResolvedRefs": (False, "BackendNotFound"),
    }
    missing, no_port, other = ports(result)[9080].rules[0].backends
    assert "backend(details.shop.svc.cluster.local) not found" in missing.problem
    assert "no port 1234" in no_port.problem
    assert "unsupported backendRef" in other.problem and other.service == ""
    built = result.shares["shop/waypoint"].clusters
    assert not any(n.endswith("|details.shop.svc.cluster.local") or "|1234|" in n for n in built)


def test_an_unsupported_kind_alone_is_invalid_kind() -> None:
    ref = {**TO_V1[0], "kind": "ServiceImport", "group": "multicluster.x-k8s.io"}
    result = build(world(l7=(httproute("r", {"backendRefs": [ref]}),)))
    assert parent_conditions(result, "HTTPRoute/shop/r")["ResolvedRefs"] == (False, "InvalidKind")


def test_timeouts_and_retries_as_istio_maps_them() -> None:
    def rule(body: dict[str, Any]) -> Any:
        (r,) = rules_of(httproute("r", {"backendRefs": TO_V1, **body})).rules
        return r

    both = rule(
        {
            "timeouts": {"request": "10s", "backendRequest": "2s"},
            "retry": {"attempts": 3, "codes": [503], "backoff": "100ms"},
        }
    )
    assert both.timeout_s == 10.0
    assert both.retry == Retry(
        attempts=3,
        retry_on="connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        codes=(503,),
        per_try_timeout_s=2.0,
        backoff_base_s=0.1,
    )
    # Without a retry stanza, backendRequest is the route's timeout (even over request).
    no_retry = rule({"timeouts": {"request": "10s", "backendRequest": "2s"}})
    assert (no_retry.timeout_s, no_retry.retry) == (2.0, DEFAULT_RETRY)
    plain = rule({"retry": {}})
    assert plain.retry == Retry(
        attempts=2, retry_on="connect-failure,refused-stream,unavailable,cancelled"
    )
    assert rule({"retry": {"attempts": 0}}).retry is None
    assert rule({}).timeout_s == 0.0 and rule({"timeouts": {"request": "0s"}}).timeout_s == 0.0


# ------------------------------------------------------------------ precedence


def at(path: dict[str, str], **more: Any) -> dict[str, Any]:
    return {"matches": [{"path": path, **more}], "backendRefs": TO_V1}


def order(pr: PortRoutes) -> list[tuple[str, PathMatch | None]]:
    return [(r.origin.split(" ")[1], r.matches[0].path) for r in pr.rules]


def test_gamma_matching_order_header_beats_the_bare_slash() -> None:
    route = httproute(
        "mesh-matching",
        {"matches": [{"path": {"value": "/"}}, {"headers": [{"name": "version", "value": "one"}]}]},
        {
            "matches": [
                {"path": {"value": "/v2"}},
                {"headers": [{"name": "version", "value": "two"}]},
            ]
        },
    )
    pr = rules_of(route)
    found = [(r.origin.rsplit(" ", 1)[1], r.matches[0]) for r in pr.rules]
    assert [(i, m.path.value if m.path else "", len(m.headers)) for i, m in found] == [
        ("1", "/v2", 0),
        ("0", "/", 1),  # version: one (rule order breaks the tie)
        ("1", "/", 1),
        ("0", "/", 0),  # the catch-all, last
    ]


def test_exact_beats_prefix_beats_regex_and_a_matchless_rule_is_last() -> None:
    pr = rules_of(
        httproute(
            "r",
            {"backendRefs": TO_V1},  # no matches: after everything, even a regex
            at({"type": "RegularExpression", "value": "/api/.*"}),
            at({"value": "/a"}),
            at({"value": "/api/"}),
            at({"type": "Exact", "value": "/"}),
            at({"value": "/a"}, method="GET"),
        )
    )
    assert [r.origin.rsplit(" ", 1)[1] for r in pr.rules] == ["4", "3", "5", "2", "1", "0"]


def test_ties_go_to_the_oldest_route_then_namespace_and_name() -> None:
    same = at({"value": "/x"})
    pr = rules_of(
        httproute("b", same, created="2026-01-01T00:00:00Z"),
        httproute("a", same, created="2026-01-01T00:00:00Z"),
        httproute("old", same, created="2025-01-01T00:00:00Z"),
    )
    assert [r.origin for r in pr.rules] == [
        "HTTPRoute shop/old rule 0",
        "HTTPRoute shop/a rule 0",
        "HTTPRoute shop/b rule 0",
    ]


def test_nothing_after_a_catch_all() -> None:
    pr = rules_of(
        httproute("a", at({"value": "/"}, method="GET"), at({"value": "/"})),
        httproute("b", at({"value": "/"}), at({"type": "RegularExpression", "value": ".*"})),
    )
    assert [r.origin for r in pr.rules] == ["HTTPRoute shop/a rule 0", "HTTPRoute shop/a rule 1"]


# A straightforward reference for Gateway API / Istio precedence (research A.1): a
# comparator as Istio writes it, applied by a stable sort; then cut after a catch-all.

PATHS = st.one_of(
    st.builds(lambda v: {"type": "Exact", "value": v}, st.sampled_from(["/", "/a", "/a/b"])),
    st.builds(
        lambda v: {"type": "PathPrefix", "value": v},
        st.sampled_from(["/", "/a", "/a/", "/ab", "/a/b"]),
    ),
    st.builds(
        lambda v: {"type": "RegularExpression", "value": v},
        st.sampled_from([".*", "/a.*", "/[ab]+"]),
    ),
)
MATCHES = st.fixed_dictionaries(
    {},
    optional={
        "path": PATHS,
        "method": st.sampled_from(["GET", "POST"]),
        "headers": st.lists(st.sampled_from(["h1", "h2", "h3"]), unique=True, max_size=3).map(
            lambda names: [{"name": n, "value": "v"} for n in names]
        ),
        "queryParams": st.lists(st.sampled_from(["q1", "q2"]), unique=True, max_size=2).map(
            lambda names: [{"name": n, "value": "v"} for n in names]
        ),
    },
)
RULES = st.lists(st.lists(MATCHES, max_size=3), min_size=1, max_size=3)
ROUTES = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["", "2026-01-01T00:00:00Z", "2025-06-01T00:00:00Z"]),
        RULES,
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda r: r[0],
)


def _rank(entry: dict[str, Any] | None) -> tuple[int, int]:
    path = (entry or {}).get("path", {"type": "PathPrefix", "value": "/"})
    kind, value = path["type"], path["value"]
    if kind == "PathPrefix" and value != "/":
        value = value.rstrip("/")
    return {"Exact": 3, "PathPrefix": 2, "RegularExpression": 1}[kind], len(value)


def _istio_less(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None:
        return False
    if b is None:
        return True
    (ra, la), (rb, lb) = _rank(a), _rank(b)
    if ra != rb:
        return ra > rb
    if la != lb:
        return la > lb
    if ("method" in a) != ("method" in b):
        return "method" in a
    if len(a.get("headers", [])) != len(b.get("headers", [])):
        return len(a.get("headers", [])) > len(b.get("headers", []))
    return len(a.get("queryParams", [])) > len(b.get("queryParams", []))


def _catch_all(m: dict[str, Any] | None) -> bool:
    m = m or {}
    path = m.get("path", {"type": "PathPrefix", "value": "/"})
    slash = path in (
        {"type": "PathPrefix", "value": "/"},
        {"type": "RegularExpression", "value": ".*"},
    )
    return slash and not (m.get("method") or m.get("headers") or m.get("queryParams"))


@settings(max_examples=150, deadline=None)
@given(ROUTES)
def test_precedence_is_istio_stable_sort(routes: list[tuple[str, str, list[Any]]]) -> None:
    objects = [
        httproute(name, *({"matches": ms, "backendRefs": TO_V1} for ms in rules), created=created)
        for name, created, rules in routes
    ]
    entries = []  # (origin, the match as written or None, the match as parsed)
    for obj in sorted(
        objects, key=lambda o: (o.raw["metadata"].get("creationTimestamp", ""), o.name)
    ):
        parsed = parse_http_route(obj.raw)
        for i, rule in enumerate(obj.raw["spec"]["rules"]):
            written = rule["matches"] or [None]
            for j, m in enumerate(written):
                entries.append(
                    (f"HTTPRoute shop/{obj.name} rule {i}", m, parsed.rules[i].matches[j])
                )

    def compare(x: Any, y: Any) -> int:
        return -1 if _istio_less(x[1], y[1]) else (1 if _istio_less(y[1], x[1]) else 0)

    expected = []
    for origin, written, match in sorted(entries, key=functools.cmp_to_key(compare)):
        expected.append((origin, match))
        if _catch_all(written):
            break
    pr = rules_of(*objects)
    assert [(r.origin, r.matches[0]) for r in pr.rules] == expected


# ------------------------------------------------------------------ VirtualService beside HTTPRoute


VS = l7(
    "VirtualService",
    "vs",
    {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews-v2"}}]}]},
)


def test_a_virtual_service_applies_when_no_http_route_does() -> None:
    pr = rules_of(VS)
    assert pr.source == "VirtualService" and pr.rules[0].backends[0].service.startswith(
        "shop/reviews-v2"
    )


def test_mixing_apis_on_one_service_drops_the_virtual_service_on_every_port() -> None:
    svc = service("reviews", {"app": "reviews"}, ports=TWO_PORTS)
    state = world(
        services=(svc, *world().services[1:]), l7=(VS, httproute("r", {"backendRefs": TO_V1}))
    )
    result = build(state)
    assert {p: pr.source for p, pr in ports(result).items()} == {9080: "HTTPRoute", 9090: "default"}
    assert any(
        line.startswith("VirtualService shop/vs: ") and "is not applied" in line
        for line in result.rejected
    )


SUBSETS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v3}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
"""


def test_subsets_get_clusters_with_their_pods_and_a_missing_subset_is_said() -> None:
    result = build(world(SUBSETS))
    clusters = result.shares["shop/waypoint"].clusters
    assert not any("v3" in n for n in clusters)
    subset = clusters[f"inbound-vip|9080|http/v1|{HOST}"]
    assert [e.pod for e in subset.endpoints] == ["reviews-v1-a", "reviews-v1-b"]
    assert any("no DestinationRule subset 'v3'" in line for line in result.rejected)


# ------------------------------------------------------------------ endpoints


def endpoints(state: Any, name: str = "inbound-vip|9080|tcp|" + HOST) -> Any:
    return build(state).shares["shop/waypoint"].clusters[name].endpoints


def test_endpoints_are_the_selected_pods_with_identity_health_and_hbone() -> None:
    opted_out = replace(
        pod("reviews-v2-a", "10.244.1.21", "v2", ready=False),
        labels=frozen_labels(
            {"app": "reviews", "version": "v2", "istio.io/dataplane-mode": "none"}
        ),
    )
    state = world(CANARY, pods=(*world().pods[:2], opted_out))
    v1 = endpoints(state, V1)
    assert [(e.ip, e.port, e.healthy, e.hbone) for e in v1] == [
        ("10.244.1.11", 8080, True, True),
        ("10.244.2.12", 8080, True, True),
    ]
    first = v1[0]
    assert first.identity == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert (first.canonical_name, first.canonical_revision, first.node) == (
        "reviews",
        "v1",
        "node1",
    )
    (v2,) = endpoints(state, V2)
    assert (v2.healthy, v2.hbone) == (False, False)


def test_pods_outside_an_ambient_namespace_are_reached_in_plaintext() -> None:
    ns = NamespaceInfo(name="shop", labels=frozen_labels({"istio.io/use-waypoint": "waypoint"}))
    assert not any(e.hbone for e in endpoints(world(CANARY, namespaces=(ns,)), V1))


def test_a_service_without_a_selector_takes_its_endpoint_slices() -> None:
    bare = service("reviews", {}, ports=(ServicePortInfo(port=9080, target_port=8080),))
    state = world(
        services=(bare,),
        endpoint_slices=(
            EndpointSliceInfo(service="reviews", namespace="shop", addresses=("10.244.1.21",)),
        ),
    )
    assert [e.pod for e in endpoints(state)] == ["reviews-v2-a"]


# ------------------------------------------------------------------ Gateway status


def test_gateway_statuses() -> None:
    def conditions(w: WaypointInfo) -> dict[str, tuple[bool, str]]:
        result = build(world(waypoints=(w,)))
        return {
            c.type: (c.status, c.reason) for c in status(result, "Gateway/shop/waypoint").conditions
        }

    assert conditions(WAYPOINT) == {
        "Accepted": (True, "Accepted"),
        "Programmed": (True, "Programmed"),
    }
    assert conditions(replace(WAYPOINT, address=None)) == {
        "Accepted": (True, "Accepted"),
        "Programmed": (False, "AddressNotAssigned"),
    }
    broken = replace(WAYPOINT, problem="no HBONE listener")
    assert conditions(broken) == {"Accepted": (False, "Invalid"), "Programmed": (False, "Invalid")}
    result = build(world(waypoints=(broken,)))
    assert "shop/waypoint" not in result.shares
    assert "Gateway shop/waypoint: no HBONE listener" in result.rejected
    gw = status(build(world()), "Gateway/shop/waypoint").to_status()
    assert gw["addresses"] == [{"type": "IPAddress", "value": "10.96.0.30"}]


def test_route_status_in_the_gateway_api_shape() -> None:
    out = status(build(world(CANARY)), "HTTPRoute/shop/canary").to_status()
    (parent,) = out["parents"]
    assert parent["parentRef"] == {
        "group": "",
        "kind": "Service",
        "namespace": "shop",
        "name": "reviews",
        "port": 9080,
    }
    assert parent["controllerName"] == "istio.io/mesh-controller"
    assert [(c["type"], c["status"]) for c in parent["conditions"]] == [
        ("Accepted", "True"),
        ("ResolvedRefs", "True"),
    ]
