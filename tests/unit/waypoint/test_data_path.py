"""The waypoint's data path end to end on loopback: meshd's config, our router, real sockets."""

from __future__ import annotations

import collections
import json
from typing import Any

from tests.support.l7world import CANARY, world
from tests.support.waypoint_harness import (
    backend_of,
    config_for,
    request,
    reviews_backends,
    waypoint,
    with_backends,
)
from tests.unit.hbone.conftest import run

REVIEWS = "10.96.0.20:9080"


def test_canary_split_and_user_agent_routing() -> None:
    async def body() -> tuple[collections.Counter[str], set[str]]:
        bs = await reviews_backends()
        config = config_for(with_backends(world(CANARY), bs))
        try:
            async with waypoint(config, REVIEWS) as wp:
                split: collections.Counter[str] = collections.Counter()
                for _ in range(400):
                    status, _, data = await request(wp.address)
                    assert status == 200
                    split[backend_of(data)] += 1
                iphone = set()
                for _ in range(20):
                    _, _, data = await request(
                        wp.address, headers={"user-agent": "Mozilla/5.0 (iPhone; CPU iPhone OS)"}
                    )
                    iphone.add(backend_of(data))
                return split, iphone
        finally:
            for b in bs.values():
                await b.stop()

    split, iphone = run(body)
    v2 = split["v2-a"] / sum(split.values())
    assert 0.05 < v2 < 0.16, split
    assert split["v1-a"] > 100 and split["v1-b"] > 100  # least-request spreads over both v1 pods
    assert iphone == {"v2-a"}


def test_the_request_reaches_the_backend_as_envoy_sends_it() -> None:
    async def body() -> dict[str, Any]:
        bs = await reviews_backends()
        config = config_for(with_backends(world(CANARY), bs))
        try:
            async with waypoint(config, REVIEWS) as wp:
                status, headers, data = await request(
                    wp.address,
                    method="POST",
                    path="/a/../b?x=1",
                    headers={"connection": "keep-alive, x-hop", "x-hop": "1", "x-keep": "yes"},
                    body=b"hello",
                )
                assert status == 200
                assert headers["server"] == "istio-envoy"
                assert int(headers["x-envoy-upstream-service-time"]) >= 0
                assert "date" in headers
                return dict(json.loads(data))
        finally:
            for b in bs.values():
                await b.stop()

    seen = run(body)
    sent = dict(seen["headers"])
    assert seen["path"] == "/b?x=1"  # normalised
    assert seen["body"] == "hello"
    assert sent["host"] == "reviews.shop.svc.cluster.local:9080"
    assert sent["x-keep"] == "yes" and "x-hop" not in sent
    assert sent["x-forwarded-proto"] == "http" and len(sent["x-request-id"]) == 36


def test_no_healthy_endpoint_and_unknown_destination() -> None:
    async def body() -> tuple[int, bytes]:
        bs = await reviews_backends()
        state = with_backends(world(CANARY), bs)
        for b in bs.values():
            await b.stop()  # nobody listens: connect failures, retried twice
        config = config_for(state)
        async with waypoint(config, REVIEWS) as wp:
            status, _, data = await request(wp.address)
            assert wp.records[-1].attempts == 3
            assert wp.records[-1].flags == "URX" or wp.records[-1].flags == "UF"
            return status, data

    status, data = run(body)
    assert status == 503
    assert data.startswith(b"upstream connect error or disconnect/reset before headers. ")
    assert b"remote connection failure" in data
