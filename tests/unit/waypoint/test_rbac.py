"""The waypoint's RBAC: meshd's filters for AuthorizationPolicies, converted and enforced.

The policies go the whole way a user's do: YAML -> meshd's Envoy RBAC filters
-> the waypoint's conversion -> :mod:`waypoint.authz`; the Envoy differential
(``tests/interop/test_envoy_waypoint_authz.py``) holds the verdicts to Envoy's.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
import re2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from google.protobuf import any_pb2, json_format

from controlplane.state import ServicePortInfo
from mesh.hbone.local import LocalSocket
from mesh.hbone.server import ConnectRequest
from mesh.identity import SpiffeId
from tests.support.l7world import service, world
from tests.support.waypoint_harness import (
    config_for,
    request,
    reviews_backends,
    waypoint,
    with_backends,
)
from tests.unit.hbone.conftest import run
from waypoint import authz
from waypoint.config import rbac
from waypoint.config import rbac_model as r
from waypoint.config.checks import Unsupported
from waypoint.config.model import HttpManager
from waypoint.http.messages import RequestHead
from waypoint.proxy import LISTENER

REVIEWS = "10.96.0.20:9080"
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ROBOT = "spiffe://cluster.local/ns/other/sa/robot"
GATEWAY = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"
POLICIES = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: shop}}
spec:
  {GATEWAY}
  action: DENY
  rules:
  - to: [{{operation: {{paths: [/admin*]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: frontend, namespace: shop}}
spec:
  {GATEWAY}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/frontend]}}}}]
    to: [{{operation: {{methods: [GET], paths: ["/items/{{*}}/reviews", "/admin*"]}}}}]
  - from: [{{source: {{namespaces: [other]}}}}]
    to: [{{operation: {{methods: [POST]}}}}]
    when: [{{key: "request.headers[x-team]", values: [blue]}}]
"""


def chain_rbac(docs: str, authority: str = REVIEWS, **changes: Any) -> Any:
    config = config_for(world(docs, **changes))
    host, _, port = authority.rpartition(":")
    chain = config.listeners[LISTENER].chain_for(host, int(port))
    assert chain is not None
    return chain


def decide(
    filters: tuple[r.Rbac, ...],
    method: str,
    path: str,
    identity: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    info: dict[str, Any] = {
        "authority": REVIEWS,
        "peer": "10.244.1.5:40000",
        "peer_identity": identity,
    }
    head = RequestHead(
        method=method,
        target=path,
        authority="reviews.shop.svc.cluster.local:9080",
        scheme="http",
        headers=list((headers or {}).items()),
    )
    reply = authz.http_denial(filters, info, head)
    return (200, "") if reply is None else (reply.status, reply.details)


def test_istio_policies_decide_on_the_waypoint() -> None:
    chain = chain_rbac(POLICIES)
    assert isinstance(chain.handler, HttpManager)
    filters = chain.handler.rbac
    assert [f.action for f in filters] == [r.Action.DENY, r.Action.ALLOW]
    allowed = "rbac_access_denied_matched_policy[none]"
    deny_admin = "rbac_access_denied_matched_policy[ns[shop]-policy[no-admin]-rule[0]]"
    cases = [
        (("GET", "/items/42/reviews", FRONTEND), (200, "")),
        (("GET", "/items/42/reviews?x=1", FRONTEND), (200, "")),  # the query is not the path
        (("GET", "/items/42/43/reviews", FRONTEND), (403, allowed)),  # {*}: one segment
        (("POST", "/items/42/reviews", FRONTEND), (403, allowed)),  # methods
        (("GET", "/items/42/reviews", ROBOT), (403, allowed)),  # principals
        (("GET", "/items/42/reviews", ""), (403, allowed)),  # no peer identity: fail closed
        (("GET", "/admin/users", FRONTEND), (403, deny_admin)),  # DENY comes first
        (("POST", "/anything", ROBOT), (403, allowed)),  # the header condition fails
    ]
    for (method, path, who), expected in cases:
        assert decide(filters, method, path, who) == expected, (method, path, who)
    assert decide(filters, "POST", "/anything", ROBOT, {"x-team": "blue"}) == (200, "")


def test_without_policies_nothing_is_checked_and_an_empty_allow_denies_all() -> None:
    chain = chain_rbac("")
    assert isinstance(chain.handler, HttpManager) and chain.handler.rbac == ()
    # An ALLOW policy without rules: Istio's "allow nothing".
    nothing = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-nothing, namespace: shop}}
spec:
  {GATEWAY}
  action: ALLOW
"""
    filters = chain_rbac(nothing).handler.rbac
    assert decide(filters, "GET", "/", FRONTEND)[0] == 403


def test_a_denied_request_is_answered_403_and_never_reaches_a_pod() -> None:
    async def body() -> None:
        bs = await reviews_backends()
        config = config_for(with_backends(world(POLICIES), bs))
        try:
            async with waypoint(config, REVIEWS, peer_identity=FRONTEND) as wp:
                status, headers, data = await request(wp.address, path="/admin/x")
                assert (status, data) == (403, b"RBAC: access denied")
                assert headers["content-type"] == "text/plain"
                assert sum(len(b.requests) for b in bs.values()) == 0
                record = wp.records[-1]
                assert record.details == (
                    "rbac_access_denied_matched_policy[ns[shop]-policy[no-admin]-rule[0]]"
                )
                status, _, _ = await request(wp.address, path="/items/1/reviews")
                assert status == 200
                assert sum(len(b.requests) for b in bs.values()) == 1
        finally:
            for b in bs.values():
                await b.stop()

    run(body)


class _Channel:
    """The HBONE stream's side of a LocalSocket: records a reset."""

    def __init__(self) -> None:
        self.resets: list[str] = []
        self.data: list[bytes] = []

    def reset(self, reason: str) -> None:
        self.resets.append(reason)

    def reading_paused(self) -> bool:
        return False

    def plain_data(self, data: memoryview) -> None:
        self.data.append(bytes(data))

    def plain_eof(self) -> None:
        pass

    def plain_lost(self, exc: BaseException | None) -> None:
        pass


def test_a_tcp_chain_closes_a_denied_connection_before_dialling() -> None:
    tcp_reviews = service(
        "reviews",
        {"app": "reviews"},
        ports=[ServicePortInfo(port=9080, target_port=8080, name="tcp")],
    )
    only_frontend = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: frontend, namespace: shop}}
spec:
  {GATEWAY}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/frontend]}}}}]
"""

    async def body() -> None:
        bs = await reviews_backends()
        state = with_backends(world(only_frontend, services=(tcp_reviews,)), bs)
        try:
            async with waypoint(config_for(state), REVIEWS) as wp:
                chain = wp.proxy.chain("10.96.0.20", 9080)
                assert (
                    chain is not None and chain.rbac and not isinstance(chain.handler, HttpManager)
                )
                host, port = "10.96.0.20", 9080

                def connect(identity: str) -> ConnectRequest:
                    return ConnectRequest(
                        peer_identity=SpiffeId.parse(identity),
                        peer_address="10.244.1.5:40000",
                        authority=f"{host}:{port}",
                        host=host,
                        port=port,
                    )

                denied = await wp.proxy.connect(connect(ROBOT))
                assert isinstance(denied, LocalSocket)
                channel = _Channel()
                denied.attach(channel)  # type: ignore[arg-type]
                await asyncio.sleep(0.05)
                assert channel.resets and denied.closed
                assert sum(len(b.requests) for b in bs.values()) == 0
                allowed = await wp.proxy.connect(connect(FRONTEND))
                assert isinstance(allowed, LocalSocket)
                channel = _Channel()
                allowed.attach(channel)  # type: ignore[arg-type]
                allowed.from_peer(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
                for _ in range(100):
                    if b"".join(channel.data).startswith(b"HTTP/1.1 200"):
                        break
                    await asyncio.sleep(0.02)
                assert b"".join(channel.data).startswith(b"HTTP/1.1 200") and not channel.resets
                assert sum(len(b.requests) for b in bs.values()) == 1
                allowed.peer_closed(None)
        finally:
            for b in bs.values():
                await b.stop()

    run(body)


def _packed(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _http(doc: dict[str, Any]) -> any_pb2.Any:
    return _packed(json_format.ParseDict(doc, http_rbac_pb2.RBAC()))


ANY_POLICY = {"permissions": [{"any": True}], "principals": [{"any": True}]}


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        ({"shadow_rules": {"action": "DENY"}}, "shadow_rules"),
        ({"matcher": {}}, "matcher"),
        ({"rules": {"action": "LOG"}}, "rules.action"),
        (
            {"rules": {"policies": {"p": {**ANY_POLICY, "condition": {"const_expr": {}}}}}},
            "condition",
        ),
        (
            {
                "rules": {
                    "policies": {
                        "p": {
                            "permissions": [{"destination_port_range": {"start": 1, "end": 2}}],
                            "principals": [{"any": True}],
                        }
                    }
                }
            },
            "destination_port_range",
        ),
        ({"rules": {"policies": {"p": {"permissions": [{"any": True}]}}}}, "principals"),
        (
            {
                "rules": {
                    "policies": {
                        "p": {
                            "permissions": [{"any": True}],
                            "principals": [{"source_ip": {"address_prefix": "10.0.0.1/8"}}],
                        }
                    }
                }
            },
            "source_ip",
        ),
    ],
)
def test_what_the_waypoint_does_not_enforce_is_refused_by_name(
    doc: dict[str, Any], named: str
) -> None:
    with pytest.raises(Unsupported, match=named):
        rbac.http_filter(_http(doc), "f")


def test_an_rbac_filter_without_rules_does_nothing_and_policies_go_in_name_order() -> None:
    assert rbac.http_filter(_http({}), "f") is None
    rules = rbac.http_filter(
        _http({"rules": {"action": "DENY", "policies": {"b": ANY_POLICY, "a": ANY_POLICY}}}), "f"
    )
    assert rules is not None and [p.name for p in rules.policies] == ["a", "b"]
    network = network_rbac_pb2.RBAC(
        stat_prefix="tcp.", rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    )
    converted = rbac.network_filter(_packed(network), "f")
    assert converted is not None and converted.action is r.Action.DENY and not converted.policies
    network.enforcement_type = network_rbac_pb2.RBAC.CONTINUOUS
    with pytest.raises(Unsupported, match="enforcement_type"):
        rbac.network_filter(_packed(network), "f")


@pytest.mark.parametrize(
    ("template", "path", "matches"),
    [
        ("/items/*/reviews", "/items/42/reviews", True),
        ("/items/*/reviews", "/items/4/2/reviews", False),
        ("/items/*/reviews", "/items//reviews", False),
        ("/items/**", "/items/4/2/x", True),
        ("/items/**", "/items/", True),
        ("/items/*/reviews/**", "/items/1/reviews/a/b", True),
        ("/{a}/{b=x/*}/c", "/q/x/y/c", True),
        ("/{a}/{b=x/*}/c", "/q/z/y/c", False),
        ("/v1/*.txt", "/v1/a.txt", True),
        ("/v1/*.txt", "/v1/a.json", False),
        ("/a.b/*", "/aXb/c", False),  # '.' is a literal
    ],
)
def test_uri_templates_match_as_envoys(template: str, path: str, matches: bool) -> None:
    assert (re2.fullmatch(rbac.uri_template_regex(template), path) is not None) is matches


@pytest.mark.parametrize("template", ["items", "/**/a/*", "/{a}/{a}", "/{1a}", "/a*b/c", "/{a="])
def test_templates_envoy_refuses_are_refused(template: str) -> None:
    with pytest.raises(ValueError):
        rbac.uri_template_regex(template)


def test_remote_ip_is_the_last_forwarded_address_else_the_peer() -> None:
    conn = authz.Connection(source=authz._address("10.244.1.5"))
    rule = r.IpRule(r.Address.REMOTE, ipaddress.ip_network("10.0.0.0/8"))
    assert authz.matches(rule, authz.Attributes(conn, forwarded_for=None))
    assert not authz.matches(rule, authz.Attributes(conn, forwarded_for="10.1.1.1, 192.168.0.1"))
    assert authz.matches(rule, authz.Attributes(conn, forwarded_for="192.168.0.1,10.1.1.1"))
    # Not an address: Envoy falls back to the connection's peer.
    assert authz.matches(rule, authz.Attributes(conn, forwarded_for="junk"))
