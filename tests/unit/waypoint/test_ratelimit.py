"""The waypoint's local rate limiting: Envoy's local_ratelimit filter, converted and enforced.

End to end: Istio's recipe (an EnvoyFilter with targetRefs) through meshd's
translation and the xDS applier into the waypoint, requests on a loopback port.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lrl_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, json_format

from tests.support.l7world import world
from tests.support.waypoint_harness import Backend, config_for, request, waypoint, with_backends
from tests.unit.controlplane.test_l7_ratelimit import (
    RECIPE_PATCHES,
    RECIPE_PER_ROUTE,
    envoy_filter,
)
from tests.unit.hbone.conftest import run
from waypoint.config import convert, ratelimit
from waypoint.config.checks import Unsupported
from waypoint.config.model import LocalRateLimit, TokenBucket
from waypoint.ratelimit import RateLimiter

REVIEWS = "10.96.0.20:9080"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def recipe(**changes: str) -> str:
    patches = RECIPE_PATCHES
    for old, new in changes.items():
        assert old in patches
        patches = patches.replace(old, new)
    return envoy_filter(patches)


async def _burst(wp: object, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    return [await request(wp.address) for _ in range(n)]  # type: ignore[attr-defined]


def _serve(doc: str, check: object) -> None:
    async def body() -> None:
        backend = await Backend("v1-a", "127.0.0.11").start()
        try:
            config = config_for(with_backends(world(doc), {"reviews-v1-a": backend}))
            async with waypoint(config, REVIEWS) as wp:
                clock = Clock()
                wp.router.limiter.clock = clock
                await check(wp, backend, clock)  # type: ignore[operator]
        finally:
            await backend.stop()

    run(body)


def test_the_recipe_lets_max_tokens_through_then_429_with_its_headers() -> None:
    async def check(wp: object, backend: Backend, clock: Clock) -> None:
        answers = await _burst(wp, 6)
        assert [a[0] for a in answers] == [200, 200, 200, 200, 429, 429]
        _, headers, data = answers[-1]
        assert data == b"local_rate_limited"
        assert headers["x-local-rate-limit"] == "true"
        assert "x-local-rate-limit" not in answers[0][1]
        assert len(backend.requests) == 4
        records = wp.records  # type: ignore[attr-defined]
        assert (records[-1].flags, records[-1].details) == ("RL", "local_rate_limited")
        clock.now += 15  # 4 per 60s: one token back every 15s
        assert [a[0] for a in await _burst(wp, 2)] == [200, 429]
        clock.now += 600  # never more than max_tokens
        assert [a[0] for a in await _burst(wp, 5)] == [200, 200, 200, 200, 429]

    _serve(recipe(), check)


def test_filter_enabled_zero_is_a_no_op() -> None:
    async def check(wp: object, backend: Backend, clock: Clock) -> None:
        assert {a[0] for a in await _burst(wp, 7)} == {200}

    doc = recipe(
        **{
            "numerator: 100\n                denominator: HUNDRED\n            filter_enforced": (
                "numerator: 0\n                denominator: HUNDRED\n            filter_enforced"
            )
        }
    )
    _serve(doc, check)


def test_filter_enforced_zero_counts_but_never_refuses() -> None:
    async def check(wp: object, backend: Backend, clock: Clock) -> None:
        assert {a[0] for a in await _burst(wp, 6)} == {200}
        limiter = wp.router.limiter  # type: ignore[attr-defined]
        (bucket,) = limiter.buckets.values()
        assert bucket.tokens < 1  # counted

    doc = recipe(
        **{
            "numerator: 100\n                denominator: HUNDRED\n            response": (
                "numerator: 0\n                denominator: HUNDRED\n            response"
            )
        }
    )
    _serve(doc, check)


def test_the_per_route_bucket_replaces_the_filter_s() -> None:
    async def check(wp: object, backend: Backend, clock: Clock) -> None:
        answers = await _burst(wp, 5)
        assert [a[0] for a in answers] == [200, 200, 200, 200, 429]
        assert answers[-1][1]["x-local-rate-limit"] == "true"

    _serve(envoy_filter(RECIPE_PER_ROUTE), check)


def test_buckets_survive_a_config_update_that_keeps_them() -> None:
    async def check(wp: object, backend: Backend, clock: Clock) -> None:
        assert [a[0] for a in await _burst(wp, 3)] == [200, 200, 200]
        same = config_for(with_backends(world(recipe()), {"reviews-v1-a": backend}))
        wp.update(same)  # type: ignore[attr-defined]
        assert [a[0] for a in await _burst(wp, 2)] == [200, 429]
        bigger = config_for(
            with_backends(
                world(recipe(**{"max_tokens: 4": "max_tokens: 6"})), {"reviews-v1-a": backend}
            )
        )
        wp.update(bigger)  # type: ignore[attr-defined]
        assert [a[0] for a in await _burst(wp, 7)] == [200] * 6 + [429]

    _serve(recipe(), check)


# ------------------------------------------------------------------ conversion and buckets


def _packed(d: dict[str, object]) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(json_format.ParseDict(d, lrl_pb2.LocalRateLimit()))
    return packed


def test_conversion_defaults_are_envoy_s() -> None:
    c = ratelimit.http_filter(_packed({"stat_prefix": "s"}), "f")
    assert (c.status, c.bucket, c.enabled_ppm, c.enforced_ppm) == (429, None, 0, 0)
    c = ratelimit.http_filter(
        _packed(
            {
                "stat_prefix": "s",
                "status": {"code": 302},
                "token_bucket": {"max_tokens": 2, "fill_interval": "1s"},
            }
        ),
        "f",
    )
    assert c.status == 429  # below 400
    assert c.bucket == TokenBucket(max_tokens=2, tokens_per_fill=1, fill_interval_s=1.0)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"stage": 1}, "stage"),
        ({"descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}, "descriptors"),
        ({"enable_x_ratelimit_headers": "DRAFT_VERSION_03"}, "enable_x_ratelimit_headers"),
        ({"token_bucket": {"max_tokens": 1, "fill_interval": "0.01s"}}, "fill_interval"),
    ],
)
def test_unsupported_fields_are_refused_by_name(extra: dict[str, object], field: str) -> None:
    with pytest.raises(Unsupported, match=field):
        ratelimit.http_filter(_packed({"stat_prefix": "s", **extra}), "f")


def test_a_per_route_config_needs_a_bucket() -> None:
    with pytest.raises(Unsupported, match="token_bucket"):
        ratelimit.per_route(_packed({"stat_prefix": "s"}), "r")


def test_the_bucket_refills_continuously_up_to_max_tokens() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    config = LocalRateLimit(
        stat_prefix="s",
        bucket=TokenBucket(max_tokens=2, tokens_per_fill=2, fill_interval_s=1.0),
        enabled_ppm=1_000_000,
        enforced_ppm=1_000_000,
    )
    rng = random.Random(1)
    assert [limiter.check(config, "a", rng) is None for _ in range(3)] == [True, True, False]
    clock.now += 0.5  # one token
    assert [limiter.check(config, "a", rng) is None for _ in range(2)] == [True, False]
    assert limiter.check(config, "b", rng) is None  # another place, another bucket
    reply = limiter.check(replace(config, status=503), "a", rng)
    assert reply is not None and (reply.status, reply.body, reply.flag) == (
        503,
        b"local_rate_limited",
        "RL",
    )


def test_the_filter_is_first_or_just_before_the_router_nowhere_else() -> None:
    def hcm(*names: str) -> hcm_pb2.HttpConnectionManager:
        typed = {
            ratelimit.HTTP_LOCAL_RATELIMIT: _packed({"stat_prefix": "s"}),
            "envoy.filters.http.fault": fault_pb2.HTTPFault(),
            "envoy.filters.http.router": router_pb2.Router(),
        }
        filters = []
        for n in names:
            f = hcm_pb2.HttpFilter(name=n)
            value = typed[n]
            if isinstance(value, any_pb2.Any):
                f.typed_config.CopyFrom(value)
            else:
                f.typed_config.Pack(value)
            filters.append(f)
        return hcm_pb2.HttpConnectionManager(
            stat_prefix="c", rds=hcm_pb2.Rds(route_config_name="r"), http_filters=filters
        )

    lrl, fault, router = (
        ratelimit.HTTP_LOCAL_RATELIMIT,
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    )
    assert convert._hcm(hcm(lrl, fault, router), "h").ratelimit_first
    assert not convert._hcm(hcm(fault, lrl, router), "h").ratelimit_first
    with pytest.raises(Unsupported, match="only one"):
        convert._hcm(hcm(lrl, fault, lrl, router), "h")
    with pytest.raises(Unsupported, match="last filter"):
        convert._hcm(hcm(fault, router, lrl), "h")
