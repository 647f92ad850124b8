"""The waypoint's traces: Istio's Telemetry and MeshConfig through meshd, spans to a real
OTLP/gRPC receiver, W3C trace context to the upstream.

End to end on loopback: meshd builds the waypoint's HCM ``tracing`` from a
``Telemetry`` and the ``istio`` ConfigMap's extension providers; the xDS
applier converts it; requests through the waypoint reach a backend that shows
what it received; the OpenTelemetry SDK exports the spans to
:class:`tests.support.otlp.OtlpReceiver`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from controlplane.l7.build import build
from controlplane.state import L7Object
from tests.support.l7world import world
from tests.support.otlp import OtlpReceiver
from tests.support.waypoint_harness import Backend, config_for, request, waypoint, with_backends
from tests.unit.hbone.conftest import run
from waypoint.config.model import HttpManager
from waypoint.tracing import Tracer, parse_traceparent, traceparent

REVIEWS = "10.96.0.20:9080"
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def mesh_config(port: int, extra: str = "") -> L7Object:
    mesh = (
        "extensionProviders:\n"
        "- name: otel\n"
        "  opentelemetry:\n"
        "    service: 127.0.0.1\n"
        f"    port: {port}\n"
        "- name: zipkin\n"
        "  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}\n"
        "- name: authz\n"
        "  envoyExtAuthzGrpc: {service: authz.shop.svc.cluster.local, port: 9000}\n" + extra
    )
    raw = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": mesh},
    }
    return L7Object(kind="ConfigMap", namespace="istio-system", name="istio", raw=raw)


def telemetry(tracing: str, name: str = "tracing", target: bool = True) -> str:
    refs = (
        "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n"
        if target
        else ""
    )
    return (
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        f"metadata: {{name: {name}, namespace: shop}}\nspec:\n{refs}  tracing:\n{tracing}"
    )


SAMPLE_ALL = (
    "  - providers: [{name: otel}]\n"
    "    randomSamplingPercentage: 100\n"
    "    customTags:\n"
    "      team: {literal: {value: reviews}}\n"
    "      user: {header: {name: x-user, defaultValue: nobody}}\n"
)

Check = Callable[[Any, Backend, OtlpReceiver], Awaitable[None]]


def _serve(docs: str, check: Check, mesh_extra: str = "") -> None:
    receiver = OtlpReceiver().start()

    async def body() -> None:
        backend = await Backend("v1-a", "127.0.0.11").start()
        tracer = Tracer(random.Random(7), node_id="waypoint~10.96.0.30~waypoint-1.shop")
        try:
            state = world(docs)
            state = replace(state, l7=(*state.l7, mesh_config(receiver.port, mesh_extra)))
            config = config_for(with_backends(state, {"reviews-v1-a": backend}))
            async with waypoint(config, REVIEWS, tracer=tracer) as wp:
                await check(wp, backend, receiver)
        finally:
            await asyncio.to_thread(tracer.shutdown)
            await backend.stop()

    try:
        run(body)
    finally:
        receiver.stop()


def _upstream(backend: Backend, i: int = -1) -> dict[str, str]:
    return dict(backend.requests[i]["headers"])


def test_traceparent_parsing_follows_w3c() -> None:
    p = parse_traceparent(f"00-{PARENT_TRACE}-{PARENT_SPAN}-01")
    assert p is not None and p.sampled and f"{p.trace_id:032x}" == PARENT_TRACE
    assert parse_traceparent(f"00-{PARENT_TRACE}-{PARENT_SPAN}-00").sampled is False  # type: ignore[union-attr]
    for bad in (
        f"00-{'0' * 32}-{PARENT_SPAN}-01",  # all-zero trace id
        f"00-{PARENT_TRACE}-{'0' * 16}-01",  # all-zero span id
        f"ff-{PARENT_TRACE}-{PARENT_SPAN}-01",  # version ff is invalid
        f"00-{PARENT_TRACE.upper()}-{PARENT_SPAN}-01",  # upper case is not W3C
        f"00-{PARENT_TRACE}-{PARENT_SPAN}-01-extra",  # version 00 has four fields
        f"00-{PARENT_TRACE[:-1]}-{PARENT_SPAN}-01",
        "garbage",
    ):
        assert parse_traceparent(bad) is None, bad
    # A later version may carry more fields: the first four are read.
    assert parse_traceparent(f"01-{PARENT_TRACE}-{PARENT_SPAN}-01-more") is not None
    assert traceparent(1, 2, True) == f"00-{1:032x}-{2:016x}-01"


def test_a_new_request_starts_a_sampled_trace_and_its_span_reaches_the_collector() -> None:
    async def check(wp: Any, backend: Backend, receiver: OtlpReceiver) -> None:
        status, _, _ = await request(wp.address, path="/ratings", headers={"x-user": "ada"})
        assert status == 200
        sent = _upstream(backend)
        parent = parse_traceparent(sent["traceparent"])
        assert parent is not None and parent.sampled
        (span,) = await asyncio.to_thread(receiver.wait_for, 1)
        assert span.trace_id == f"{parent.trace_id:032x}"
        assert span.span_id == f"{parent.span_id:016x}"  # the upstream's parent is our span
        assert span.parent_span_id == ""
        assert span.kind == 2  # SERVER
        assert span.name == "reviews.shop.svc.cluster.local:9080/*"  # istiod's decorator
        a = span.attributes
        assert a["http.method"] == "GET"
        assert a["http.status_code"] == "200"
        assert a["http.url"] == "http://reviews.shop.svc.cluster.local:9080/ratings"
        assert a["guid:x-request-id"] == sent["x-request-id"]
        assert a["upstream_cluster"] == "inbound-vip|9080|http|reviews.shop.svc.cluster.local"
        assert a["team"] == "reviews" and a["user"] == "ada"
        assert "error" not in a
        assert span.resource["service.name"] == "waypoint.shop"

    _serve(telemetry(SAMPLE_ALL), check)


def test_an_upstream_sampled_trace_is_continued() -> None:
    async def check(wp: Any, backend: Backend, receiver: OtlpReceiver) -> None:
        incoming = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
        await request(wp.address, headers={"traceparent": incoming, "tracestate": "k=v"})
        sent = _upstream(backend)
        assert sent["tracestate"] == "k=v"
        parent = parse_traceparent(sent["traceparent"])
        assert parent is not None and f"{parent.trace_id:032x}" == PARENT_TRACE
        assert f"{parent.span_id:016x}" != PARENT_SPAN
        (span,) = await asyncio.to_thread(receiver.wait_for, 1)
        assert (span.trace_id, span.parent_span_id) == (PARENT_TRACE, PARENT_SPAN)
        assert span.span_id == f"{parent.span_id:016x}"

    _serve(telemetry(SAMPLE_ALL), check)


def test_a_sampled_parent_is_not_reported_at_zero_percent_as_envoy_does() -> None:
    async def check(wp: Any, backend: Backend, receiver: OtlpReceiver) -> None:
        await request(wp.address, headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"})
        parent = parse_traceparent(_upstream(backend)["traceparent"])
        assert parent is not None and not parent.sampled
        assert f"{parent.trace_id:032x}" == PARENT_TRACE
        assert await asyncio.to_thread(receiver.wait_for, 1, 2.0) == []

    _serve(telemetry(SAMPLE_ALL.replace("100", "0")), check)


def test_an_unsampled_trace_is_propagated_and_nothing_is_reported() -> None:
    async def check(wp: Any, backend: Backend, receiver: OtlpReceiver) -> None:
        await request(wp.address, headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00"})
        parent = parse_traceparent(_upstream(backend)["traceparent"])
        assert parent is not None and not parent.sampled
        assert f"{parent.trace_id:032x}" == PARENT_TRACE
        await request(wp.address, headers={"traceparent": "00-not-a-trace-01"})
        assert _upstream(backend)["traceparent"] == "00-not-a-trace-01"  # passed as it came
        assert await asyncio.to_thread(receiver.wait_for, 1, 2.0) == []

    _serve(telemetry(SAMPLE_ALL), check)


def test_sampling_zero_starts_unsampled_traces() -> None:
    async def check(wp: Any, backend: Backend, receiver: OtlpReceiver) -> None:
        for _ in range(5):
            await request(wp.address)
        flags = {_upstream(backend, i)["traceparent"][-2:] for i in range(5)}
        assert flags == {"00"}
        assert await asyncio.to_thread(receiver.wait_for, 1, 2.0) == []

    _serve(telemetry(SAMPLE_ALL.replace("100", "0")), check)


def test_a_5xx_span_is_an_error() -> None:
    async def check(wp: Any, backend: Backend, receiver: OtlpReceiver) -> None:
        backend.status = 503
        backend.fail_first = 0
        await request(wp.address)
        spans = await asyncio.to_thread(receiver.wait_for, 1)
        assert spans[-1].attributes["error"] == "true"
        assert spans[-1].status_code == 2  # STATUS_CODE_ERROR

    _serve(telemetry(SAMPLE_ALL), check)


def test_without_a_provider_the_trace_headers_are_left_alone() -> None:
    async def check(wp: Any, backend: Backend, receiver: OtlpReceiver) -> None:
        await request(wp.address)
        assert "traceparent" not in _upstream(backend)
        incoming = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
        await request(wp.address, headers={"traceparent": incoming})
        assert _upstream(backend)["traceparent"] == incoming

    _serve("", check)  # no Telemetry, no default provider: no tracer
    spans_off = "  - disableSpanReporting: true\n"
    _serve(telemetry(SAMPLE_ALL) + "\n---\n" + telemetry(spans_off, "quiet", False), check)


def test_the_mesh_default_provider_and_sampling_apply_without_a_telemetry() -> None:
    async def check(wp: Any, backend: Backend, receiver: OtlpReceiver) -> None:
        await request(wp.address)
        assert _upstream(backend)["traceparent"].endswith("-01")
        assert len(await asyncio.to_thread(receiver.wait_for, 1)) == 1

    extra = "defaultProviders: {tracing: [otel]}\ndefaultConfig: {tracing: {sampling: 100}}\n"
    _serve("", check, extra)


# ------------------------------------------------------------------ meshd's side


def _statuses(port: int, *docs: str) -> dict[str, tuple[bool, str, str]]:
    state = world("---\n".join(docs))
    state = replace(state, l7=(*state.l7, mesh_config(port)))
    out = {}
    for s in build(state).statuses:
        if s.kind == "Telemetry":
            (c,) = s.conditions
            assert c.type == "WaypointAccepted"
            out[s.name] = (c.status, c.reason, c.message)
    return out


def test_telemetry_statuses_say_where_it_is_in_force_and_what_is_refused() -> None:
    got = _statuses(
        4317,
        telemetry(SAMPLE_ALL),
        telemetry("  - providers: [{name: nope}]\n", "unknown"),
        telemetry("  - providers: [{name: zipkin}]\n", "zipkin"),
        telemetry("  - providers: [{name: authz}]\n", "authz"),
        telemetry("  - providers: [{name: otel}]\n", "metrics").replace(
            "  tracing:",
            "  metrics:\n  - overrides: [{match: {customMetric: mine}, disabled: true}]\n"
            "  tracing:",
        ),
        telemetry("  - providers: [{name: otel}]\n", "cel").replace(
            "  tracing:",
            "  accessLogging:\n  - filter: {expression: 'response.code >= 400'}\n  tracing:",
        ),
    )
    assert got["tracing"] == (True, "Accepted", "tracing in force on waypoint shop/waypoint")
    assert got["unknown"][:2] == (False, "Invalid")
    assert "no extension provider 'nope'" in got["unknown"][2]
    # A zipkin provider is accepted; one whose Service meshd does not know sends nothing,
    # and meshd says so once (test_a_zipkin_collector_meshd_does_not_know_is_said).
    # (Here an older Telemetry at the same level is in force: it is not Invalid, though.)
    assert got["zipkin"][1] == "TargetNotFound"
    assert "envoyExtAuthzGrpc, which this mesh does not run" in got["authz"][2]
    assert "not supported: custom metrics" in got["metrics"][2]
    assert "CEL filter expressions" in got["cel"][2]


@pytest.mark.parametrize(
    "levels, expected",
    [
        # namespace-wide sets 10%, the waypoint's Telemetry sets only tags: 10% stays
        ((("ns", "  - providers: [{name: otel}]\n    randomSamplingPercentage: 10\n"),
          ("wp", "  - customTags: {a: {literal: {value: b}}}\n")), 10.0),
        # the waypoint's overrides the namespace's
        ((("ns", "  - providers: [{name: otel}]\n    randomSamplingPercentage: 10\n"),
          ("wp", "  - randomSamplingPercentage: 50\n")), 50.0),
        # a CLIENT-only entry does not apply to a waypoint: the mesh default (1%) stays
        ((("wp", "  - providers: [{name: otel}]\n  - match: {mode: CLIENT}\n"
                 "    randomSamplingPercentage: 70\n"),), 1.0),
    ],
)  # fmt: skip
def test_tracing_merges_down_the_levels_as_istiod_does(
    levels: tuple[tuple[str, str], ...], expected: float
) -> None:
    docs = [telemetry(spec, name, target=name == "wp") for name, spec in levels]
    from dataclasses import replace

    state = world("---\n".join(docs))
    state = replace(state, l7=(*state.l7, mesh_config(4317)))
    share = build(state).shares["shop/waypoint"]
    (spec,) = {s.telemetry.tracing for s in share.services if s.telemetry.tracing}
    assert spec.sampling == expected
    assert spec.provider.name == "otel"


def test_exporters_of_old_collector_targets_are_retired() -> None:
    """A collector whose pods change gets a new target each time: the exporters (a thread
    each) stay bounded."""
    from waypoint.config.tracing import Collector
    from waypoint.tracing import MAX_EXPORTERS

    tracer = Tracer(random.Random(1))
    try:
        for i in range(MAX_EXPORTERS + 3):
            assert tracer._tracer(Collector(service_name="w", target=f"127.0.0.1:{40000 + i}"))
        assert tracer.exporters == MAX_EXPORTERS
    finally:
        tracer.shutdown()
    assert tracer.exporters == 0


def test_a_zipkin_collector_meshd_does_not_know_is_said_and_no_tracer_is_sent() -> None:
    state = world(telemetry("  - providers: [{name: zipkin}]\n    randomSamplingPercentage: 100\n"))
    state = replace(state, l7=(*state.l7, mesh_config(4317)))
    result = build(state)
    assert any(
        "zipkin provider zipkin" in line and "not a Service" in line for line in result.rejected
    )
    config = config_for(state)
    manager = next(
        c.handler for c in config.listeners["waypoint"].chains if c.name.startswith("reviews.")
    )
    assert isinstance(manager, HttpManager)
    assert manager.tracing is not None and manager.tracing.collector is None
