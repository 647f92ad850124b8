"""Gateway API objects as users write them: HTTPRoute, GRPCRoute and waypoint Gateways.

Each refusal must name the field, as the API server's validation would; each
default is the CRD's.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from controlplane.l7.gateway_api import (
    RouteSpec,
    RuleSpec,
    parse_gateway,
    parse_grpc_route,
    parse_http_route,
)
from controlplane.l7.ir import (
    HeaderMatch,
    PathKind,
    PathMatch,
    QueryMatch,
    Redirect,
    RequestMatch,
    Rewrite,
    StringKind,
    StringMatch,
)
from controlplane.l7.reader import InvalidObject, Reader, gep_duration, go_duration

PARENT = {"group": "", "kind": "Service", "name": "reviews", "port": 9080}
BACKEND = {"name": "reviews-v1", "port": 9080}


def route(*rules: dict[str, Any], kind: str = "HTTPRoute", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"parentRefs": [PARENT], "rules": list(rules)}
    body.update(spec)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": "r", "namespace": "shop", "generation": 3},
        "spec": body,
    }


def parse(obj: dict[str, Any]) -> RouteSpec:
    return parse_http_route(obj) if obj["kind"] == "HTTPRoute" else parse_grpc_route(obj)


def rule(body: dict[str, Any] | str, kind: str = "HTTPRoute") -> RuleSpec:
    """The first rule of a route with ``body`` (a mapping, or YAML)."""
    written = yaml.safe_load(textwrap.dedent(body)) if isinstance(body, str) else body
    return parse(route(written, kind=kind)).rules[0]


def refused(obj: dict[str, Any]) -> InvalidObject:
    with pytest.raises(InvalidObject) as e:
        parse(obj)
    return e.value


def exact(value: str) -> StringMatch:
    return StringMatch(kind=StringKind.EXACT, value=value)


def regex(value: str) -> StringMatch:
    return StringMatch(kind=StringKind.REGEX, value=value)


def segment(value: str) -> PathMatch:
    return PathMatch(kind=PathKind.SEGMENT_PREFIX, value=value)


# ------------------------------------------------------------------ HTTPRoute: the whole object


def test_a_route_names_its_parents_and_keeps_its_age_for_precedence() -> None:
    obj = route({"backendRefs": [BACKEND]})
    obj["metadata"]["creationTimestamp"] = "2026-01-02T03:04:05Z"
    obj["spec"]["parentRefs"].append({"name": "ingress", "sectionName": "http"})
    spec = parse(obj)
    assert (spec.key, spec.generation, spec.created) == ("shop/r", 3, "2026-01-02T03:04:05Z")
    service, gateway = spec.parents
    assert (service.kind, service.group, service.namespace, service.port) == (
        "Service",
        "",
        "shop",
        9080,
    )
    assert str(service) == "Service shop/reviews:9080"
    # parentRef defaults: a Gateway of the Gateway API's group, in the route's namespace.
    assert (gateway.kind, gateway.group, gateway.namespace, gateway.section) == (
        "Gateway",
        "gateway.networking.k8s.io",
        "shop",
        "http",
    )


def test_a_route_without_rules_has_the_api_default_rule() -> None:
    (only,) = parse(route()).rules
    assert only.matches == (RequestMatch(path=segment("/")),)
    assert not only.has_matches and only.backends == ()


def test_a_rule_without_matches_matches_every_path_and_says_it_had_none() -> None:
    r = rule({"backendRefs": [BACKEND]})
    assert r.matches == (RequestMatch(path=segment("/")),) and not r.has_matches
    assert rule({"matches": [{}], "backendRefs": [BACKEND]}).has_matches


def test_crd_defaults_path_prefix_slash_weight_one_and_exact_header_matches() -> None:
    r = rule(
        {
            "matches": [{"path": {}}, {"headers": [{"name": "X-A", "value": "1"}]}],
            "backendRefs": [BACKEND],
        }
    )
    assert r.matches[0].path == segment("/")
    assert r.matches[1] == RequestMatch(
        path=segment("/"), headers=(HeaderMatch(name="x-a", match=exact("1")),)
    )
    (b,) = r.backends
    assert (b.kind, b.group, b.namespace, b.name, b.port, b.weight) == (
        "Service",
        "",
        "shop",
        "reviews-v1",
        9080,
        1,
    )


def test_every_match_field_is_read() -> None:
    m = rule("""
        matches:
        - path: {type: Exact, value: /api/v1}
          headers:
          - {name: X-Env, value: canary}
          - {name: User-Agent, type: RegularExpression, value: .*iPhone.*}
          queryParams:
          - {name: Debug, value: "1"}
          - {name: v, type: RegularExpression, value: "[0-9]+"}
          method: POST
        """).matches[0]
    assert m == RequestMatch(
        path=PathMatch(kind=PathKind.EXACT, value="/api/v1"),
        headers=(
            HeaderMatch(name="x-env", match=exact("canary")),
            HeaderMatch(name="user-agent", match=regex(".*iPhone.*")),
        ),
        # Query parameter names are case-sensitive: kept as written.
        query=(
            QueryMatch(name="Debug", match=exact("1")),
            QueryMatch(name="v", match=regex("[0-9]+")),
        ),
        method="POST",
    )


def test_path_kinds() -> None:
    def path(p: dict[str, str]) -> PathMatch | None:
        return rule({"matches": [{"path": p}]}).matches[0].path

    assert path({"type": "PathPrefix", "value": "/v2/"}) == segment("/v2/")
    assert path({"type": "RegularExpression", "value": "/u/[0-9]+"}) == PathMatch(
        kind=PathKind.REGEX, value="/u/[0-9]+"
    )


def test_only_the_first_of_equal_header_or_query_names_counts() -> None:
    m = rule("""
        matches:
        - headers: [{name: Version, value: one}, {name: version, value: two}]
          queryParams: [{name: a, value: "1"}, {name: a, value: "2"}, {name: A, value: "3"}]
        """).matches[0]
    assert m.headers == (HeaderMatch(name="version", match=exact("one")),)
    assert [(q.name, q.match) for q in m.query] == [("a", exact("1")), ("A", exact("3"))]


# ------------------------------------------------------------------ filters


def test_header_modifiers_lower_case_names_and_keep_set_add_remove_apart() -> None:
    r = rule("""
        filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Set, value: s}]
            add: [{name: X-Set, value: a}, {name: X-Add, value: b}]
            remove: [X-Gone]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: X-Header-Set, value: v}]}
        """)
    assert r.request_headers.set == (("x-set", "s"),)
    assert r.request_headers.add == (("x-set", "a"), ("x-add", "b"))
    assert r.request_headers.remove == ("x-gone",)
    assert r.response_headers.set == (("x-header-set", "v"),)


def test_request_mirrors_percent_fraction_and_several() -> None:
    def mirror(body: dict[str, Any]) -> dict[str, Any]:
        return {"type": "RequestMirror", "requestMirror": {"backendRef": BACKEND, **body}}

    r = rule(
        {
            "filters": [
                mirror({}),
                mirror({"percent": 25}),
                mirror({"fraction": {"numerator": 1, "denominator": 8}}),
                mirror({"fraction": {"numerator": 3}}),
            ],
            "backendRefs": [BACKEND],
        }
    )
    assert [m.percent for m in r.mirrors] == [100.0, 25.0, 12.5, 3.0]
    assert r.mirrors[0].backend.name == "reviews-v1" and r.mirrors[0].backend.port == 9080


def redirect(body: dict[str, Any]) -> Redirect | None:
    return rule(
        {
            "matches": [{"path": {"value": "/old"}}],
            "filters": [{"type": "RequestRedirect", "requestRedirect": body}],
        }
    ).redirect


def test_redirect_default_status_is_302_and_keeps_the_request_port() -> None:
    assert redirect({}) == Redirect(status=302, request_port=True)


def test_redirect_fields() -> None:
    assert redirect({"scheme": "https", "hostname": "example.org", "statusCode": 301}) == Redirect(
        scheme="https", host="example.org", status=301, strip_port=True
    )
    assert redirect({"port": 8083}) == Redirect(port=8083)
    full = {"type": "ReplaceFullPath", "replaceFullPath": "/new"}
    assert redirect({"path": full}).path == "/new"  # type: ignore[union-attr]
    prefix = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}
    assert redirect({"path": prefix}).prefix == "/new"  # type: ignore[union-attr]
    for code in (303, 307, 308):
        assert redirect({"statusCode": code}).status == code  # type: ignore[union-attr]


def rewrite(path: str, match: str = "/prefix/one") -> Rewrite | None:
    return rule(f"""
        matches: [{{path: {{value: {match}}}}}]
        filters: [{{type: URLRewrite, urlRewrite: {path}}}]
        """).rewrite


def test_url_rewrite_is_read() -> None:
    prefix = (
        "{hostname: one.example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}"
    )
    assert rewrite(prefix) == Rewrite(host="one.example.org", prefix="/one")
    assert rewrite("{path: {type: ReplaceFullPath, replaceFullPath: /x}}") == Rewrite(path="/x")
    # "" is the spec's "strip the prefix".
    empty = "{path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}"
    assert rewrite(empty, "/strip") == Rewrite(prefix="")


# ------------------------------------------------------------------ timeouts and retry


def test_timeouts_and_retry() -> None:
    r = rule(
        {
            "timeouts": {"request": "10s", "backendRequest": "500ms"},
            "retry": {"attempts": 3, "codes": [503, 429], "backoff": "1m"},
            "backendRefs": [BACKEND],
        }
    )
    assert (r.timeout_s, r.backend_timeout_s) == (10.0, 0.5)
    assert r.retry is not None
    assert (r.retry.attempts, r.retry.codes, r.retry.backoff_s) == (3, (503, 429), 60.0)
    assert rule({"retry": {}}).retry is not None
    assert rule({"retry": {}}).retry.attempts is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h30m", 5400.0), ("1h1m1s1ms", 3661.001), ("0s", 0.0), ("99999ms", 99.999)],
)
def test_gateway_api_durations(text: str, seconds: float) -> None:
    assert rule({"timeouts": {"request": text}}).timeout_s == pytest.approx(seconds)


@given(
    st.lists(
        st.tuples(st.integers(0, 99999), st.sampled_from(["h", "m", "s", "ms"])),
        min_size=1,
        max_size=4,
    )
)
def test_gep_durations_add_up_their_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    r = Reader({"d": text}, "HTTPRoute", "shop/r")
    assert gep_duration(r, "d") == pytest.approx(sum(n * unit[u] for n, u in parts))


@pytest.mark.parametrize("text", ["1.5s", "10", "1d", "-1s", "1h1h1h1h1h", "123456s", ""])
def test_bad_gateway_api_durations_are_refused_with_their_path(text: str) -> None:
    e = refused(route({"timeouts": {"request": text}}))
    assert e.path == "spec.rules[0].timeouts.request" and "duration" in e.reason


def test_istio_durations() -> None:
    def seconds(text: str) -> float | None:
        return go_duration(Reader({"d": text}, "VirtualService", "shop/vs"), "d")

    assert seconds("1.5s") == 1.5 and seconds("1m30s") == 90.0
    assert seconds("200ms") == pytest.approx(0.2)
    with pytest.raises(InvalidObject, match="not a duration"):
        seconds("1.5")


# ------------------------------------------------------------------ refusals


def _many_rules(n: int) -> list[dict[str, Any]]:
    return [{"backendRefs": [BACKEND]} for _ in range(n)]


REDIRECT = {"type": "RequestRedirect", "requestRedirect": {}}
PREFIX = (
    "{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}"
)
HEADERS = "{type: RequestHeaderModifier, requestHeaderModifier: %s}"


@pytest.mark.parametrize(
    ("body", "path", "reason"),
    [
        (
            "{filters: [{type: ExtensionRef, extensionRef: {name: x}}]}",
            "filters[0].type",
            "not supp",
        ),
        ("{filters: [{type: CORS, cors: {}}]}", "filters[0].type", "CORS"),
        ("{filters: [{type: Glob}]}", "filters[0].type", "not a HTTPRoute"),
        ("{sessionPersistence: {sessionName: s}}", "sessionPersistence", "session persistence"),
        (
            "{matches: [{path: {type: RegularExpression, value: '/(?=x)'}}]}",
            "matches[0].path.value",
            "RE2",
        ),
        (
            "{matches: [{headers: [{name: a, type: RegularExpression, value: '(a'}]}]}",
            "matches[0].headers[0].value",
            "RE2",
        ),
        (
            "{filters: [{type: RequestRedirect}], backendRefs: [{name: a, port: 80}]}",
            "backendRefs",
            "RequestRedirect",
        ),
        (
            f"{{matches: [{{path: {{type: Exact, value: /a}}}}], filters: [{PREFIX}]}}",
            "matches[0]",
            "PathPrefix",
        ),
        (f"{{filters: [{PREFIX}]}}", "matches", "PathPrefix"),
        (
            "{matches: [{headers: [{name: bad name, value: x}]}]}",
            "matches[0].headers[0].name",
            "header name",
        ),
        (
            "{filters: [%s]}" % (HEADERS % "{remove: [ok, 'x:y']}"),
            "filters[0].requestHeaderModifier.remove[1]",
            "header name",
        ),
        (
            "{filters: [%s]}"
            % (HEADERS % "{set: [{name: X-A, value: '1'}, {name: x-a, value: '2'}]}"),
            "filters[0].requestHeaderModifier.set[1].name",
            "twice",
        ),
        (
            "{filters: [{type: RequestRedirect}, {type: RequestRedirect}]}",
            "filters[1].type",
            "once",
        ),
        ("{filters: [{type: RequestRedirect}, {type: URLRewrite}]}", "filters[1].type", "combined"),
        (
            "{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]}",
            "filters[0].requestRedirect.statusCode",
            "redirect status",
        ),
        (
            "{filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]}",
            "filters[0].requestRedirect.scheme",
            "http or https",
        ),
        ("{matches: [{method: get}]}", "matches[0].method", "GET"),
        ("{matches: [{path: {value: api}}]}", "matches[0].path.value", "'/'"),
        ("{matches: [{path: {value: /a//b}}]}", "matches[0].path.value", "normalised"),
        ("{matches: [{path: {value: /a/..}}]}", "matches[0].path.value", "normalised"),
        ("{matches: [{path: {value: /a%2Fb}}]}", "matches[0].path.value", "normalised"),
        ("{matches: [{path: {type: Glob, value: /a}}]}", "matches[0].path.type", "not supported"),
        ("{backendRefs: [{name: reviews-v1}]}", "backendRefs[0].port", "required"),
        ("{backendRefs: [{name: a, port: 80, weight: 1000001}]}", "backendRefs[0].weight", "range"),
        (
            "{backendRefs: [{name: a, port: 80, filters: [{type: RequestRedirect}]}]}",
            "backendRefs[0].filters",
            "not supported",
        ),
        ("{timeouts: {request: 1s, backendRequest: 2s}}", "timeouts.backendRequest", "longer"),
        ("{retry: {codes: [200]}}", "retry.codes[0]", "400-599"),
        ("{retry: {attempts: -1}}", "retry.attempts", "out of range"),
        ("{colour: blue}", "colour", "unknown field"),
    ],
)
def test_malformed_and_unsupported_rules_are_refused_with_the_field_path(
    body: str, path: str, reason: str
) -> None:
    e = refused(route(yaml.safe_load(body)))
    assert e.path == f"spec.rules[0].{path}"
    assert reason in e.reason
    assert str(e) == f"HTTPRoute shop/r: spec.rules[0].{path}: {e.reason}"


def test_sixteen_rules_at_most() -> None:
    assert len(parse(route(*_many_rules(16))).rules) == 16
    e = refused(route(*_many_rules(17)))
    assert e.path == "spec.rules" and "at most 16" in e.reason


def test_rule_names_are_unique() -> None:
    e = refused(route({"name": "a"}, {"name": "b"}, {"name": "a"}))
    assert e.path == "spec.rules" and "unique" in e.reason
    assert [r.name for r in parse(route({"name": "a"}, {}, {})).rules] == ["a", "", ""]


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"parentRefs": []}, "spec.parentRefs"),
        ({"hostnames": ["Bad_Host"]}, "spec.hostnames[0]"),
        ({"parentRefs": [{"name": "x", "port": 0}]}, "spec.parentRefs[0].port"),
        ({"parentRefs": [{"kind": "Service"}]}, "spec.parentRefs[0].name"),
    ],
)
def test_spec_refusals(change: dict[str, Any], path: str) -> None:
    obj = route()
    obj["spec"].update(change)
    assert refused(obj).path == path


def test_the_object_must_be_what_it_says() -> None:
    obj = route()
    obj["apiVersion"] = "gateway.networking.k8s.io/v9"
    assert refused(obj).path == "apiVersion"
    obj = route()
    del obj["metadata"]["name"]
    assert refused(obj).path == "metadata.name"
    with pytest.raises(InvalidObject) as e:
        parse_http_route({**route(), "kind": "GRPCRoute"})
    assert e.value.path == "kind"


# ------------------------------------------------------------------ GRPCRoute


def grpc_path(method: dict[str, str]) -> PathMatch | None:
    return rule({"matches": [{"method": method}]}, kind="GRPCRoute").matches[0].path


def test_grpc_methods_become_paths_as_istio_converts_them() -> None:
    svc = "proto.EchoTestService"
    assert grpc_path({"service": svc, "method": "Echo"}) == PathMatch(
        kind=PathKind.EXACT, value=f"/{svc}/Echo"
    )
    assert grpc_path({"service": svc}) == segment(f"/{svc}")
    assert grpc_path({"method": "Echo"}) == PathMatch(kind=PathKind.REGEX, value="/[^/]+/Echo")


def test_grpc_regular_expression_methods_each_in_its_own_group() -> None:
    rx = "RegularExpression"
    assert grpc_path({"type": rx, "service": "a|b", "method": "Get.*"}) == PathMatch(
        kind=PathKind.REGEX, value="/(?:a|b)/(?:Get.*)"
    )
    assert grpc_path({"type": rx, "service": "echo\\..*"}) == PathMatch(
        kind=PathKind.REGEX, value="/(?:echo\\..*)/.+"
    )
    assert grpc_path({"type": rx, "method": "Echo"}) == PathMatch(
        kind=PathKind.REGEX, value="/[^/]+/(?:Echo)"
    )


def test_grpc_route_headers_and_default_match() -> None:
    r = rule(
        {
            "matches": [
                {
                    "headers": [
                        {"name": "X-Test-Case", "value": "set"},
                        {"name": "x-test-case", "value": "add"},
                    ]
                }
            ]
        },
        kind="GRPCRoute",
    )
    assert r.matches == (
        RequestMatch(headers=(HeaderMatch(name="x-test-case", match=exact("set")),)),
    )
    plain = rule({"backendRefs": [{"name": "echo", "port": 7070}]}, kind="GRPCRoute")
    assert plain.matches == (RequestMatch(),) and not plain.has_matches


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"matches": [{"method": {}}]}, "spec.rules[0].matches[0].method"),
        ({"matches": [{"method": {"service": "a/b"}}]}, "spec.rules[0].matches[0].method.service"),
        (
            {"matches": [{"method": {"type": "RegularExpression", "method": "(x"}}]},
            "spec.rules[0].matches[0].method.method",
        ),
        ({"matches": [{"path": {"value": "/"}}]}, "spec.rules[0].matches[0].path"),
        ({"timeouts": {"request": "1s"}}, "spec.rules[0].timeouts"),
        ({"filters": [REDIRECT]}, "spec.rules[0].filters[0].type"),
        ({"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}, "spec.rules[0].filters[0].type"),
    ],
)
def test_grpc_route_refusals(body: dict[str, Any], path: str) -> None:
    assert refused(route(body, kind="GRPCRoute")).path == path


def test_grpc_route_filters_it_supports() -> None:
    r = rule(
        {
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"add": [{"name": "X-Header-Add", "value": "v"}]},
                },
                {"type": "RequestMirror", "requestMirror": {"backendRef": BACKEND}},
            ],
            "backendRefs": [BACKEND],
        },
        kind="GRPCRoute",
    )
    assert r.request_headers.add == (("x-header-add", "v"),) and len(r.mirrors) == 1


# ------------------------------------------------------------------ Gateway


def gateway(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    }
    body.update(spec)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop", "generation": 2},
        "spec": body,
        "status": {"addresses": [{"type": "IPAddress", "value": "10.96.0.30"}]},
    }


def test_a_waypoint_gateway() -> None:
    w = parse_gateway(gateway())
    assert (w.key, w.address, w.waypoint_for, w.problem, w.generation) == (
        "shop/waypoint",
        "10.96.0.30",
        "service",
        "",
        2,
    )
    (listener,) = w.listeners
    assert (listener.port, listener.protocol, listener.allowed_from) == (15008, "HBONE", "Same")


def test_a_gateway_without_an_hbone_listener_exists_but_has_a_problem() -> None:
    w = parse_gateway(gateway(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]))
    assert "HBONE" in w.problem


def test_gateway_listener_selector_and_waypoint_for_label() -> None:
    obj = gateway(
        listeners=[
            {
                "name": "mesh",
                "port": 15008,
                "protocol": "HBONE",
                "allowedRoutes": {
                    "namespaces": {"from": "Selector", "selector": {"matchLabels": {"a": "b"}}}
                },
            }
        ]
    )
    obj["metadata"]["labels"] = {"istio.io/waypoint-for": "all"}
    w = parse_gateway(obj)
    assert w.waypoint_for == "all"
    assert w.accepts_namespace("other", {"a": "b"}) and not w.accepts_namespace("other", {})
    obj["metadata"]["labels"] = {"istio.io/waypoint-for": "everything"}
    assert "istio.io/waypoint-for" in parse_gateway(obj).problem


def test_a_gateway_of_another_class_is_refused_and_no_status_means_no_address() -> None:
    with pytest.raises(InvalidObject) as e:
        parse_gateway(gateway(gatewayClassName="istio"))
    assert e.value.path == "spec.gatewayClassName"
    obj = gateway()
    del obj["status"]
    assert parse_gateway(obj).address is None
