"""Telemetry metrics overrides: meshd's istio.stats config, the waypoint's metrics after it.

A Telemetry bound to the waypoint drops a metric, removes a tag, upserts one from a
request header; requests through the waypoint (loopback) are observed by its
Telemetry, and the exposition shows what a user's dashboard would.
"""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.l7.build import build
from tests.support.l7world import world
from tests.support.waypoint_harness import Backend, config_for, request, waypoint, with_backends
from tests.unit.hbone.conftest import run
from waypoint.config.stats import STANDARD_TAGS
from waypoint.telemetry import LABELS, Telemetry

TELEMETRY = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: metrics, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT, mode: SERVER}
      tagOverrides:
        response_flags: {operation: REMOVE}
        destination_service_name: {value: "request.headers['x-tenant']"}
        source_app: {value: "'frontend'"}
    - match: {metric: REQUEST_DURATION}
      disabled: true
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      disabled: true
"""


def _samples(telemetry: Telemetry) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(generate_latest(telemetry.registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


def test_a_telemetry_drops_removes_and_upserts_as_it_says() -> None:
    async def body() -> Telemetry:
        backend = await Backend("v1-a", "127.0.0.11").start()
        telemetry = Telemetry()
        try:
            state = with_backends(world(TELEMETRY), {"reviews-v1-a": backend})
            async with waypoint(config_for(state), "10.96.0.20:9080") as wp:
                await request(wp.address, headers={"x-tenant": "acme"})
                await request(wp.address)
                for rec in wp.records:
                    telemetry.record(rec)
        finally:
            await backend.stop()
        return telemetry

    samples = _samples(run(body))
    requests = samples["istio_requests_total"]
    assert sorted(s["destination_service_name"] for s in requests) == ["acme", "unknown"]
    assert {s["response_flags"] for s in requests} == {""}  # removed
    assert {s["source_app"] for s in requests} == {"frontend"}
    assert {s["destination_service"] for s in requests} == {"reviews.shop.svc.cluster.local"}
    assert "istio_request_duration_milliseconds_bucket" not in samples  # disabled
    assert "istio_request_bytes_bucket" in samples  # untouched
    # The CLIENT-mode entry does not apply to a waypoint: requests stay counted.
    assert len(requests) == 2


def _status(doc: str) -> tuple[bool, str, str]:
    (s,) = [s for s in build(world(doc)).statuses if s.kind == "Telemetry"]
    (c,) = s.conditions
    return c.status, c.reason, c.message


def test_what_is_not_supported_is_refused_naming_it() -> None:
    assert _status(TELEMETRY) == (
        True,
        "Accepted",
        "metrics overrides in force on waypoint shop/waypoint",
    )
    for change, said in (
        ("response_flags: {operation: REMOVE}", "custom_tag: {value: \"'x'\"}"),
        ("{metric: REQUEST_DURATION}", "{customMetric: my_metric}"),
        ("\"'frontend'\"", '"request.auth.claims.sub"'),
    ):
        doc = TELEMETRY.replace(change, said)
        ok, reason, message = _status(doc)
        assert (ok, reason) == (False, "Invalid"), message
    assert "a new dimension is not" in _status(TELEMETRY.replace(
        "response_flags: {operation: REMOVE}", "custom_tag: {value: \"'x'\"}"))[2]  # fmt: skip


def test_the_waypoint_s_tags_are_istio_s_standard_ones() -> None:
    assert set(LABELS) == STANDARD_TAGS


def test_without_overrides_nothing_is_sent() -> None:
    share = build(replace(world(), l7=())).shares["shop/waypoint"]
    assert all(not s.telemetry.metrics for s in share.services)
