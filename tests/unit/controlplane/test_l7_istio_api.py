"""VirtualService and DestinationRule as users write them, with Istio's semantics."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml

from controlplane.l7 import ir
from controlplane.l7.destination_rule import parse_destination_rule
from controlplane.l7.istio_api import parse_all
from controlplane.l7.istio_object import resolve_host
from controlplane.l7.reader import InvalidObject
from controlplane.l7.share import service_key
from controlplane.l7.status import ObjectStatus
from controlplane.l7.virtual_service import parse_virtual_service
from controlplane.state import L7Object, ServicePortInfo
from tests.support.l7world import service, world

RATINGS = service(
    "ratings",
    {"app": "ratings"},
    vip="10.96.0.40",
    ports=(
        ServicePortInfo(port=9080, target_port=8080, name="http"),
        ServicePortInfo(port=9090, target_port=8090, name="http-admin"),
    ),
)
SERVICES = {service_key(s.namespace, s.name): s for s in (*world().services, RATINGS)}
REVIEWS = "shop/reviews.shop.svc.cluster.local"
V1 = "shop/reviews-v1.shop.svc.cluster.local"


def _object(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": name, "namespace": "shop"}
    return {"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec}


def vs(*http: dict[str, Any], name: str = "vs", **spec: Any) -> dict[str, Any]:
    return _object("VirtualService", name, {"hosts": ["reviews"], "http": list(http), **spec})


def dr(name: str = "dr", host: str = "reviews", **spec: Any) -> dict[str, Any]:
    return _object("DestinationRule", name, {"host": host, **spec})


TO_V1 = {"route": [{"destination": {"host": "reviews-v1"}}]}


def Y(text: str) -> Any:
    return yaml.safe_load(textwrap.dedent(text))


def rules(obj: dict[str, Any]) -> tuple[ir.Rule, ...]:
    parsed = parse_virtual_service(obj, SERVICES)
    assert parsed is not None
    return parsed.rules


def one(http: dict[str, Any] | str) -> ir.Rule:
    """The one rule of a VirtualService with the http route ``http`` (a mapping or YAML)."""
    (r,) = rules(vs(Y(http) if isinstance(http, str) else http))
    return r


def refused(obj: dict[str, Any]) -> InvalidObject:
    with pytest.raises(InvalidObject) as e:
        if obj["kind"] == "VirtualService":
            parse_virtual_service(obj, SERVICES)
        else:
            parse_destination_rule(obj)
    return e.value


def policy(text: str = "{}", **traffic: Any) -> ir.TrafficPolicy:
    """The service's policy of a DestinationRule whose trafficPolicy is ``text`` (YAML)."""
    p = parse_destination_rule(dr(trafficPolicy={**Y(text), **traffic}))
    assert p is not None
    return p.default


# ------------------------------------------------------------------ hosts


def test_hosts_short_namespace_qualified_and_fully_qualified() -> None:
    for host in ("reviews", "reviews.shop", "reviews.shop.svc.cluster.local"):
        assert resolve_host(host, "shop") == REVIEWS
        parsed = parse_virtual_service(vs(TO_V1, hosts=[host]), SERVICES)
        assert parsed is not None and parsed.services == (REVIEWS,)
    assert refused(vs(TO_V1, hosts=[])).path == "spec.hosts"


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("*.shop.svc.cluster.local", "wildcard"),
        ("reviews.other", "not a service of namespace shop"),
        ("reviews.other.svc.cluster.local", "not a service of namespace shop"),
        ("details", "no service details.shop.svc.cluster.local"),
    ],
)
def test_hosts_refused(host: str, reason: str) -> None:
    e = refused(vs(TO_V1, hosts=["reviews", host]))
    assert e.path == "spec.hosts[1]" and reason in e.reason


def test_a_virtual_service_for_gateways_without_mesh_is_not_ours() -> None:
    assert parse_virtual_service(vs(TO_V1, gateways=["istio-system/ingress"]), SERVICES) is None
    assert parse_virtual_service(vs(TO_V1, gateways=["mesh", "ingress"]), SERVICES) is not None


# ------------------------------------------------------------------ matches


def match(m: dict[str, Any] | str) -> ir.RequestMatch:
    return one({"match": [Y(m) if isinstance(m, str) else m], **TO_V1}).matches[0]


def sm(kind: str, value: str) -> ir.StringMatch:
    return ir.StringMatch(kind=ir.StringKind(kind), value=value)


def test_uri_kinds_and_ignore_uri_case() -> None:
    def path(kind: str, value: str, case: bool = False) -> ir.PathMatch:
        return ir.PathMatch(kind=ir.PathKind(kind), value=value, ignore_case=case)

    assert match("{uri: {exact: /a}}").path == path("exact", "/a")
    # A VirtualService prefix is a plain string prefix, not whole segments.
    assert match("{uri: {prefix: /a}}").path == path("prefix", "/a")
    assert match("{uri: {regex: /a/.*}}").path == path("regex", "/a/.*")
    assert match("{uri: {prefix: /A}, ignoreUriCase: true}").path == path("prefix", "/A", True)
    assert match({}).path is None


def test_header_matches_sorted_with_regex_star_meaning_present() -> None:
    m = match("{headers: {X-B: {prefix: b}, x-a: {exact: a}, x-c: {regex: '*'}, x-d: {regex: v.}}}")
    assert m.headers == (
        ir.HeaderMatch(name="x-a", match=sm("exact", "a")),
        ir.HeaderMatch(name="x-b", match=sm("prefix", "b")),
        ir.HeaderMatch(name="x-c", match=None),
        ir.HeaderMatch(name="x-d", match=sm("regex", "v.")),
    )


def test_without_headers_invert_and_treat_a_missing_header_as_empty() -> None:
    m = match("{withoutHeaders: {x-user: {exact: bot}, x-debug: {regex: '*'}}}")
    assert m.headers == (
        # A presence match must not count a missing header as "" (present): it would fail.
        ir.HeaderMatch(name="x-debug", match=None, invert=True, missing_as_empty=False),
        ir.HeaderMatch(name="x-user", match=sm("exact", "bot"), invert=True, missing_as_empty=True),
    )


def test_method_authority_scheme_and_query() -> None:
    m = match("""
        method: {exact: GET}
        authority: {prefix: reviews}
        scheme: {exact: http}
        queryParams: {v: {exact: "1"}, debug: {regex: "*"}}
        """)
    assert m.method == "GET"
    assert [(h.name, h.match) for h in m.headers] == [
        (":authority", sm("prefix", "reviews")),
        (":scheme", sm("exact", "http")),
    ]
    assert m.query == (
        ir.QueryMatch(name="debug", match=None),
        ir.QueryMatch(name="v", match=sm("exact", "1")),
    )
    regex_method = match("{method: {regex: GET|HEAD}}")
    assert regex_method.method is None and regex_method.headers[0].name == ":method"


def test_match_port_applies_the_route_to_one_port() -> None:
    r = one({"match": [{"port": 9080, "uri": {"prefix": "/a"}}, {"port": 9080}], **TO_V1})
    assert r.port == 9080


@pytest.mark.parametrize(
    ("m", "path", "reason"),
    [
        ("{sourceLabels: {app: x}}", "sourceLabels", "client"),
        ("{sourceNamespace: x}", "sourceLabels", "client"),
        ("{gateways: [ingress]}", "gateways", "mesh"),
        ("{uri: {regex: '(?=a)'}}", "uri.regex", "RE2"),
        ("{uri: {exact: /a, prefix: /a}}", "uri", "exactly one"),
        ("{uri: {suffix: /a}}", "uri.suffix", "unknown field"),
        ("{headers: {bad name: {exact: x}}}", "headers.bad name", "header name"),
        ("{withoutHeaders: {'x:y': {exact: x}}}", "withoutHeaders.x:y", "header name"),
        (
            "{headers: {'@request.auth.claims.sub': {exact: x}}}",
            "headers.@request.auth.claims.sub",
            "JWT",
        ),
        ("{port: 0}", "port", "out of range"),
    ],
)
def test_match_refusals(m: str, path: str, reason: str) -> None:
    e = refused(vs({"match": [Y(m)], **TO_V1}))
    assert e.path == f"spec.http[0].match[0].{path}" and reason in e.reason


def test_matches_of_one_route_name_one_port() -> None:
    e = refused(vs({"match": [{"port": 9080}, {"port": 9090}], **TO_V1}))
    assert e.path == "spec.http[0].match"


# ------------------------------------------------------------------ destinations


def dest(host: str, weight: int | None = None, **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": {"host": host, **more}}
    if weight is not None:
        out["weight"] = weight
    return out


def test_weights_and_a_single_destination_takes_everything() -> None:
    split = one({"route": [dest("reviews-v1", 80), dest("reviews-v2", 20)]})
    assert [(b.service.split("/")[1].split(".")[0], b.weight) for b in split.backends] == [
        ("reviews-v1", 80),
        ("reviews-v2", 20),
    ]
    assert one({"route": [dest("reviews-v1")]}).backends[0].weight == 100
    assert one({"route": [dest("reviews-v1", 0)]}).backends[0].weight == 100
    # Several destinations: an unweighted one has weight 0, and is dropped.
    (kept,) = one({"route": [dest("reviews-v1", 100), dest("reviews-v2")]}).backends
    assert kept.service == V1


def test_every_destination_with_weight_zero_is_refused() -> None:
    e = refused(vs({"route": [dest("reviews-v1", 0), dest("reviews-v2", 0)]}))
    assert e.path == "spec.http[0].route"


def test_destination_ports() -> None:
    # One port: that one; several: the port the request came to (0), settled per port.
    assert one({"route": [dest("reviews-v1")]}).backends[0].port == 9080
    assert one({"route": [dest("ratings", subset="v1")]}).backends[0].port == 0


def test_a_portless_destination_settles_on_each_port_it_serves() -> None:
    raw = vs({"route": [dest("ratings")], "mirror": {"host": "ratings"}}, hosts=["ratings"])
    routes = parse_many(raw)[1]["shop/ratings.shop.svc.cluster.local"]
    for port in (9080, 9090):
        (r,) = routes.rules_for(port)
        assert r.backends[0].port == port and r.mirrors[0].backend.port == port


def test_destinations_that_cannot_be_used_carry_their_problem() -> None:
    r = one({"route": [dest("details", 50), dest("reviews-v1", 50, port={"number": 1234})]})
    assert "no service details.shop.svc.cluster.local" in r.backends[0].problem
    assert "has no port 1234" in r.backends[1].problem


def test_a_route_names_itself_after_the_object_unless_named() -> None:
    first, second = rules(vs(TO_V1, {"name": "canary", **TO_V1}))
    assert (first.name, second.name) == ("shop.vs.0", "canary")
    assert second.origin == "VirtualService shop/vs http[1] (canary)"
    assert first.retry is ir.DEFAULT_RETRY and first.timeout_s is None


# ------------------------------------------------------------------ retries, timeout, fault, mirror


def test_retries() -> None:
    assert one({"retries": {"attempts": 0}, **TO_V1}).retry is None
    # Istio: retries without attempts (0 in proto3) disable retrying.
    assert one({"retries": {"perTryTimeout": "1s"}, **TO_V1}).retry is None
    r = one("""
        route: [{destination: {host: reviews-v1}}]
        retries: {attempts: 4, perTryTimeout: 250ms, retryOn: "5xx, 503,gateway-error,429",
                  retryIgnorePreviousHosts: false}
        """)
    assert r.retry == ir.Retry(
        attempts=4,
        retry_on="5xx,gateway-error,retriable-status-codes",
        codes=(503, 429),
        per_try_timeout_s=0.25,
        other_host=False,
    )
    keeps = one({"retries": {"attempts": 3}, **TO_V1}).retry
    assert keeps is not None and keeps.retry_on == ir.DEFAULT_RETRY.retry_on


def test_an_unknown_retry_condition_is_refused() -> None:
    e = refused(vs({"retries": {"attempts": 1, "retryOn": "5xx,sometimes"}, **TO_V1}))
    assert e.path == "spec.http[0].retries.retryOn" and "'sometimes'" in e.reason


def test_timeout() -> None:
    assert one({"timeout": "1.5s", **TO_V1}).timeout_s == 1.5
    assert one({"timeout": "0s", **TO_V1}).timeout_s == 0.0
    assert refused(vs({"timeout": "soon", **TO_V1})).path == "spec.http[0].timeout"


def test_fault_delay_and_abort() -> None:
    f = one("""
        route: [{destination: {host: reviews-v1}}]
        fault:
          delay: {fixedDelay: 2s, percentage: {value: 12.5}}
          abort: {httpStatus: 503, percentage: {value: 0.1}}
        """).fault
    assert f == ir.Fault(delay_s=2.0, delay_percent=12.5, abort_status=503, abort_percent=0.1)
    old = one({"fault": {"delay": {"fixedDelay": "1s", "percent": 30}}, **TO_V1}).fault
    assert old == ir.Fault(delay_s=1.0, delay_percent=30.0)
    grpc = one({"fault": {"abort": {"grpcStatus": "UNAVAILABLE"}}, **TO_V1}).fault
    assert grpc == ir.Fault(abort_grpc_status=14)


@pytest.mark.parametrize(
    ("fault", "path"),
    [
        ("{abort: {grpcStatus: NOPE}}", "abort.grpcStatus"),
        ("{abort: {httpStatus: 503, grpcStatus: OK}}", "abort"),
        ("{abort: {}}", "abort"),
        ("{abort: {http2Error: x}}", "abort.http2Error"),
        ("{delay: {exponentialDelay: 1s}}", "delay.exponentialDelay"),
        ("{delay: {percentage: {value: 5}}}", "delay.fixedDelay"),
        ("{delay: {fixedDelay: 1s, percentage: {value: 101}}}", "delay.percentage.value"),
    ],
)
def test_fault_refusals(fault: str, path: str) -> None:
    assert refused(vs({"fault": Y(fault), **TO_V1})).path == f"spec.http[0].fault.{path}"


def test_mirrors() -> None:
    r = one("""
        route: [{destination: {host: reviews-v1}}]
        mirror: {host: reviews-v2}
        mirrorPercentage: {value: 5.5}
        mirrors:
        - destination: {host: reviews-v1}
        - {destination: {host: reviews-v2}, percentage: {value: 0}}
        """)
    assert [(m.backend.service.split(".")[0], m.percent) for m in r.mirrors] == [
        ("shop/reviews-v2", 5.5),
        ("shop/reviews-v1", 100.0),
    ]
    old = one({"mirror": {"host": "reviews-v2"}, "mirrorPercent": 20, **TO_V1})
    assert old.mirrors[0].percent == 20.0
    zero = one({"mirror": {"host": "reviews-v2"}, "mirrorPercentage": {"value": 0}, **TO_V1})
    assert zero.mirrors == ()


# ------------------------------------------------------------------ rewrite, redirect, direct


def test_rewrite() -> None:
    r = one({"rewrite": {"uri": "/v2", "authority": "new.example"}, **TO_V1})
    assert r.rewrite == ir.Rewrite(host="new.example", prefix="/v2")
    rx = one({"rewrite": {"uriRegexRewrite": {"match": "^/a/(.*)", "rewrite": "/b/\\1"}}, **TO_V1})
    assert rx.rewrite == ir.Rewrite(regex=("^/a/(.*)", "/b/\\1"))
    both = {"uri": "/x", "uriRegexRewrite": {"match": "a", "rewrite": "b"}}
    assert refused(vs({"rewrite": both, **TO_V1})).path == "spec.http[0].rewrite.uriRegexRewrite"


def test_redirect() -> None:
    r = one({"redirect": {"uri": "/new", "authority": "example.org", "scheme": "https"}})
    assert r.redirect == ir.Redirect(scheme="https", host="example.org", path="/new", status=301)
    assert r.retry is None and r.backends == ()
    assert one({"redirect": {"redirectCode": 308}}).redirect == ir.Redirect(status=308)
    assert one({"redirect": {"port": 8443}}).redirect == ir.Redirect(port=8443, status=301)
    derived = one({"redirect": {"derivePort": "FROM_REQUEST_PORT"}}).redirect
    assert derived is not None and derived.request_port and not derived.strip_port
    default = one({"redirect": {"derivePort": "FROM_PROTOCOL_DEFAULT"}}).redirect
    assert default is not None and default.strip_port and not default.request_port
    bad = refused(vs({"redirect": {"redirectCode": 305}}))
    assert bad.path == "spec.http[0].redirect.redirectCode"
    bad = refused(vs({"redirect": {"derivePort": "SOMEHOW"}}))
    assert bad.path == "spec.http[0].redirect.derivePort"


def test_direct_response() -> None:
    r = one({"directResponse": {"status": 418, "body": {"string": "teapot"}}})
    assert (r.direct_status, r.direct_body, r.retry) == (418, "teapot", None)
    e = refused(vs({"directResponse": {"status": 200, "body": {"bytes": "aGk="}}}))
    assert e.path == "spec.http[0].directResponse.body.bytes"


def test_header_operations() -> None:
    r = one("""
        route: [{destination: {host: reviews-v1}}]
        headers:
          request: {set: {X-B: "2", x-a: "1"}, add: {X-C: "3"}, remove: [X-D]}
          response: {remove: [Server]}
        """)
    assert r.request_headers.set == (("x-a", "1"), ("x-b", "2"))
    assert r.request_headers.add == (("x-c", "3"),)
    assert r.request_headers.remove == ("x-d",)
    assert r.response_headers.remove == ("server",)
    e = refused(vs({"headers": {"request": {"set": {"no good": "x"}}}, **TO_V1}))
    assert e.path == "spec.http[0].headers.request.set.no good"


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        (vs(tcp=[{"route": []}]), "spec.tcp"),
        (vs(tls=[{"route": []}]), "spec.tls"),
        (vs(delegate={"name": "x"}), "spec.delegate"),
        (
            vs({"corsPolicy": {"allowOrigins": [{"exact": "*"}]}, **TO_V1}),
            "spec.http[0].corsPolicy",
        ),
        (vs({"delegate": {"name": "x"}}), "spec.http[0].delegate"),
        (vs({"route": [{**dest("reviews-v1"), "headers": {"request": {}}}]}), "spec.http[0]"),
        (vs({}), "spec.http[0]"),
        (vs({**TO_V1, "redirect": {}}), "spec.http[0]"),
    ],
)
def test_what_a_waypoint_does_not_do_is_refused(obj: dict[str, Any], path: str) -> None:
    assert refused(obj).path.startswith(path)


# ------------------------------------------------------------------ parse_all


def parse_many(*raws: dict[str, Any], stamps: tuple[str, ...] = ()) -> Any:
    """parse_all over ``raws`` (created at ``stamps``): policies, routes, rejected, statuses."""
    objs = []
    for raw, stamp in zip(raws, stamps or ("",) * len(raws), strict=True):
        raw["metadata"]["creationTimestamp"] = stamp
        objs.append(
            L7Object(kind=raw["kind"], namespace="shop", name=raw["metadata"]["name"], raw=raw)
        )
    rejected: list[str] = []
    statuses: list[ObjectStatus] = []
    policies, merged = parse_all(objs, SERVICES, rejected.append, statuses)
    return policies, merged, rejected, statuses


OLD_NEW = ("2026-02-01T00:00:00Z", "2026-01-01T00:00:00Z")


def test_virtual_services_for_one_host_are_merged_oldest_first() -> None:
    new, old = vs({"name": "new", **TO_V1}, name="b"), vs({"name": "old", **TO_V1}, name="a")
    _, merged, rejected, statuses = parse_many(new, old, stamps=OLD_NEW)
    assert merged[REVIEWS].origin == "shop/a, shop/b"
    assert [r.name for r in merged[REVIEWS].rules] == ["old", "new"]
    assert rejected == [] and all(s.conditions[0].status for s in statuses)


def test_an_invalid_object_is_rejected_alone_with_a_status() -> None:
    bad = vs({"timeout": "x", **TO_V1}, name="bad")
    _, merged, rejected, statuses = parse_many(vs(TO_V1, name="good"), bad)
    assert merged[REVIEWS].origin == "shop/good"
    (line,) = rejected
    assert line.startswith("VirtualService shop/bad: spec.http[0].timeout: ")
    (status,) = [s for s in statuses if s.name == "bad"]
    assert (status.conditions[0].status, status.conditions[0].reason) == (False, "Invalid")
    assert status.conditions[0].message.startswith("spec.http[0].timeout: ")


def test_a_second_destination_rule_for_a_host_is_refused_and_the_oldest_wins() -> None:
    newer = dr("newer", trafficPolicy={"loadBalancer": {"simple": "RANDOM"}})
    older = dr("older", host="reviews.shop.svc.cluster.local")
    policies, _, rejected, _ = parse_many(newer, older, stamps=OLD_NEW)
    assert policies[REVIEWS].origin == "shop/older"
    assert policies[REVIEWS].default.lb is ir.LbPolicy.LEAST_REQUEST
    (line,) = rejected
    assert line.startswith("DestinationRule shop/newer: spec.host:") and "shop/older" in line


def test_a_destination_rule_for_no_service_is_refused() -> None:
    policies, _, rejected, _ = parse_many(dr(host="details"))
    assert policies == {} and "no service" in rejected[0]


# ------------------------------------------------------------------ DestinationRule


def test_simple_load_balancers() -> None:
    lb = ir.LbPolicy
    for simple, chosen in (
        ("LEAST_REQUEST", lb.LEAST_REQUEST),
        ("LEAST_CONN", lb.LEAST_REQUEST),
        ("UNSPECIFIED", lb.LEAST_REQUEST),
        ("ROUND_ROBIN", lb.ROUND_ROBIN),
        ("RANDOM", lb.RANDOM),
    ):
        assert policy(loadBalancer={"simple": simple}).lb is chosen


def test_istio_defaults_without_a_policy() -> None:
    assert policy() == ir.TrafficPolicy(origin="shop/dr")
    assert policy().lb is ir.LbPolicy.LEAST_REQUEST and policy().connect_timeout_s == 10.0


def test_consistent_hash_keys_use_a_ring_of_at_least_1024() -> None:
    for key, expected in (
        ("{httpHeaderName: X-User}", ir.HashPolicy(header="x-user")),
        (
            "{httpCookie: {name: session, path: /, ttl: 60s}}",
            ir.HashPolicy(cookie="session", cookie_path="/", cookie_ttl_s=60.0),
        ),
        ("{useSourceIp: true}", ir.HashPolicy(source_ip=True)),
        ("{httpQueryParameterName: user}", ir.HashPolicy(query="user")),
    ):
        p = policy(loadBalancer={"consistentHash": Y(key)})
        assert (p.lb, p.hash_policy, p.minimum_ring_size) == (ir.LbPolicy.RING_HASH, expected, 1024)


def test_ring_sizes_and_maglev() -> None:
    ring = {"httpHeaderName": "x", "ringHash": {"minimumRingSize": 2048}}
    assert policy(loadBalancer={"consistentHash": ring}).minimum_ring_size == 2048
    old = {"httpHeaderName": "x", "minimumRingSize": 4096}
    assert policy(loadBalancer={"consistentHash": old}).minimum_ring_size == 4096
    maglev = policy(loadBalancer={"consistentHash": {"httpHeaderName": "x", "maglev": {}}})
    assert (maglev.lb, maglev.minimum_ring_size) == (ir.LbPolicy.MAGLEV, None)


@pytest.mark.parametrize(
    ("lb", "path"),
    [
        ("{simple: PASSTHROUGH}", ".simple"),
        ("{simple: RANDOM, consistentHash: {}}", ""),
        ("{consistentHash: {}}", ".consistentHash"),
        ("{consistentHash: {useSourceIp: false}}", ".consistentHash"),
        ("{consistentHash: {useSourceIp: true, httpHeaderName: x}}", ".consistentHash"),
        (
            "{consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}",
            ".consistentHash.maglev.tableSize",
        ),
        ("{localityLbSetting: {enabled: true}}", ".localityLbSetting"),
        ("{warmupDurationSecs: 10s}", ".warmupDurationSecs"),
    ],
)
def test_load_balancer_refusals(lb: str, path: str) -> None:
    e = refused(dr(trafficPolicy={"loadBalancer": Y(lb)}))
    assert e.path == f"spec.trafficPolicy.loadBalancer{path}"


def test_connection_pool_becomes_circuit_breakers_with_zero_meaning_unset() -> None:
    p = policy("""
        connectionPool:
          tcp: {maxConnections: 10, connectTimeout: 250ms, idleTimeout: 1h}
          http: {http1MaxPendingRequests: 0, http2MaxRequests: 100, maxRetries: 3,
                 maxRequestsPerConnection: 1}
        """)
    assert p.breakers == ir.CircuitBreakers(max_connections=10, max_requests=100, max_retries=3)
    assert (p.connect_timeout_s, p.idle_timeout_s, p.max_requests_per_connection) == (0.25, 3600, 1)
    both = policy("{connectionPool: {tcp: {idleTimeout: 1h}, http: {idleTimeout: 5s}}}")
    assert both.idle_timeout_s == 5.0


@pytest.mark.parametrize(
    "http",
    [
        "{h2UpgradePolicy: DEFAULT}",
        "{h2UpgradePolicy: DO_NOT_UPGRADE}",
        "{useClientProtocol: false}",
        "{h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: false, maxRetries: 3}",
    ],
)
def test_protocol_choices_that_are_the_default_are_accepted(http: str) -> None:
    p = policy(connectionPool={"http": Y(http)})
    assert p.lb is ir.LbPolicy.LEAST_REQUEST


@pytest.mark.parametrize(
    ("http", "key", "reason"),
    [
        ("{h2UpgradePolicy: UPGRADE}", "h2UpgradePolicy", "not supported: UPGRADE"),
        ("{h2UpgradePolicy: SOMETIMES}", "h2UpgradePolicy", "'SOMETIMES' is not supported"),
        ("{useClientProtocol: true}", "useClientProtocol", "not supported: true"),
        ("{useClientProtocol: 'yes'}", "useClientProtocol", "must be true or false"),
    ],
)
def test_protocol_choices_the_waypoint_does_not_make_are_refused(
    http: str, key: str, reason: str
) -> None:
    """Upstream, the waypoint speaks the port's protocol and never upgrades HTTP/1.1: a
    DestinationRule asking otherwise is refused (with a status), not quietly ignored."""
    obj = dr(trafficPolicy={"connectionPool": {"http": Y(http)}})
    e = refused(obj)
    path = f"spec.trafficPolicy.connectionPool.http.{key}"
    assert e.path == path and e.reason.startswith(reason)
    policies, _, _, statuses = parse_many(obj)
    assert policies == {}
    (status,) = statuses
    (condition,) = status.conditions
    assert (condition.status, condition.reason) == (False, "Invalid")
    assert condition.message == f"{path}: {e.reason}"


def test_outlier_detection_defaults_and_zero() -> None:
    od = ir.OutlierDetection
    seven = policy("{outlierDetection: {consecutive5xxErrors: 7}}").outlier
    assert seven == od(
        consecutive_5xx=7, interval_s=10, base_ejection_time_s=30, max_ejection_percent=10
    )
    # Not written: Envoy's default applies (None); 0 turns 5xx ejection off.
    assert policy("{outlierDetection: {interval: 5s}}").outlier == od(interval_s=5.0)
    assert policy("{outlierDetection: {consecutive5xxErrors: 0}}").outlier == od(consecutive_5xx=0)
    full = policy("""
        outlierDetection: {consecutiveErrors: 2, consecutiveGatewayErrors: 3, baseEjectionTime: 1m,
                           maxEjectionPercent: 50, minHealthPercent: 20}
        """).outlier
    assert full == od(
        consecutive_5xx=2,
        consecutive_gateway_errors=3,
        base_ejection_time_s=60.0,
        max_ejection_percent=50,
        min_health_percent=20,
    )


def test_tls_origination_is_refused_istio_mutual_is_not() -> None:
    assert policy("{tls: {mode: ISTIO_MUTUAL}}").lb is ir.LbPolicy.LEAST_REQUEST
    simple = refused(dr(trafficPolicy={"tls": {"mode": "SIMPLE"}}))
    assert simple.path == "spec.trafficPolicy.tls.mode" and "TLS origination" in simple.reason
    port_tls = Y("{portLevelSettings: [{port: {number: 9080}, tls: {mode: MUTUAL}}]}")
    e = refused(dr(trafficPolicy=port_tls))
    assert e.path == "spec.trafficPolicy.portLevelSettings[0].tls.mode"


def service_policy(spec: str) -> ir.ServicePolicy:
    p = parse_destination_rule(dr(**Y(spec)))
    assert p is not None
    return p


def test_port_level_settings_replace_the_top_level_policy_whole() -> None:
    p = service_policy("""
        trafficPolicy:
          loadBalancer: {simple: RANDOM}
          connectionPool: {tcp: {maxConnections: 5}}
          portLevelSettings: [{port: {number: 9090}, loadBalancer: {simple: ROUND_ROBIN}}]
        """)
    assert p.for_port(9080).lb is ir.LbPolicy.RANDOM
    assert p.for_port(9080).breakers.max_connections == 5
    assert p.for_port(9090).lb is ir.LbPolicy.ROUND_ROBIN
    assert p.for_port(9090).breakers == ir.CircuitBreakers()  # not the top level's


def test_subsets_take_the_sections_they_write_and_the_rest_from_the_service() -> None:
    p = service_policy("""
        trafficPolicy:
          loadBalancer: {simple: RANDOM}
          outlierDetection: {consecutive5xxErrors: 3}
          portLevelSettings: [{port: {number: 9090}, loadBalancer: {simple: ROUND_ROBIN}}]
        subsets:
        - {name: v1, labels: {version: v1}}
        - name: v2
          labels: {version: v2}
          trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
        - {name: v3, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
        """)
    v1 = p.subset("v1")
    assert v1 is not None and dict(v1.labels) == {"version": "v1"} and v1.policy is None
    assert p.for_port(9080, "v1") == p.for_port(9080)
    v2 = p.for_port(9080, "v2")
    assert (v2.lb, v2.breakers.max_connections) == (ir.LbPolicy.RANDOM, 1)
    assert v2.outlier == ir.OutlierDetection(consecutive_5xx=3)
    # The port's policy replaced the top level's; the subset's section still wins.
    assert p.for_port(9090, "v2").lb is ir.LbPolicy.ROUND_ROBIN
    assert p.for_port(9090, "v3").lb is ir.LbPolicy.LEAST_REQUEST
    assert p.for_port(9080, "v3").outlier == ir.OutlierDetection(consecutive_5xx=3)
    assert p.subset("v4") is None and p.for_port(9080, "v4") == p.for_port(9080)


def test_service_policy_for_port_precedence() -> None:
    base = ir.TrafficPolicy(lb=ir.LbPolicy.RANDOM)
    port = ir.TrafficPolicy(lb=ir.LbPolicy.ROUND_ROBIN)
    sub = ir.TrafficPolicy(lb=ir.LbPolicy.MAGLEV, breakers=ir.CircuitBreakers(max_requests=1))
    sp = ir.ServicePolicy(
        service=REVIEWS,
        default=base,
        ports={9090: port},
        subsets=(
            ir.Subset(name="all", policy=sub),
            ir.Subset(name="pool", policy=sub, sections=frozenset({"connectionPool"})),
        ),
    )
    assert sp.for_port(9080) is base and sp.for_port(9090) is port
    assert sp.for_port(9090, "all").lb is ir.LbPolicy.MAGLEV
    pooled = sp.for_port(9090, "pool")
    assert (pooled.lb, pooled.breakers.max_requests) == (ir.LbPolicy.ROUND_ROBIN, 1)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ("{host: '*.shop.svc.cluster.local'}", "spec.host"),
        ("{subsets: [{name: a}, {name: a}]}", "spec.subsets"),
        ("{workloadSelector: {matchLabels: {a: b}}}", "spec.workloadSelector"),
        ("{trafficPolicy: {tunnel: {protocol: CONNECT}}}", "spec.trafficPolicy.tunnel"),
        (
            "{subsets: [{name: a, trafficPolicy: {portLevelSettings: []}}]}",
            "spec.subsets[0].trafficPolicy.portLevelSettings",
        ),
        (
            "{trafficPolicy: {connectionPool: {http: {maxConcurrentStreams: 5}}}}",
            "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams",
        ),
    ],
)
def test_destination_rule_refusals(change: str, path: str) -> None:
    obj = dr()
    obj["spec"].update(Y(change))
    assert refused(obj).path == path
