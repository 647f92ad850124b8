"""Envoy's zipkin tracer's B3 semantics, as the Envoy 1.40 probe and the differential
(tests/interop/test_envoy_waypoint_zipkin.py) found them: the cases the differential's
default config does not reach (no shared span context, W3C propagation)."""

from __future__ import annotations

import random

from waypoint.config.tracing import Collector, Tracing
from waypoint.http.messages import RequestHead
from waypoint.zipkin import extract, span_json, start

TRACE, SPAN, PARENT = "463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312", "0020000000000001"


def head(*headers: tuple[str, str]) -> RequestHead:
    return RequestHead(method="GET", target="/", authority="svc", headers=list(headers))


def config(shared: bool = True, w3c: bool = False) -> Tracing:
    return Tracing(
        collector=Collector(
            service_name="",
            cluster="z",
            zipkin=True,
            path="/api/v2/spans",
            shared_span_context=shared,
            w3c=w3c,
        )
    )


def sent(h: RequestHead) -> dict[str, str]:
    return {k: v for k, v in h.headers if k.startswith("x-b3") or k in ("b3", "traceparent")}


def test_extraction_reads_multi_single_and_w3c_and_refuses_malformed_ids() -> None:
    multi = extract(
        head(("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-flags", "1")), False
    )
    assert multi is not None and multi.sampled is True  # debug samples
    single = extract(head(("b3", f"{TRACE}-{SPAN}-d-{PARENT}")), False)
    assert single is not None and (single.parent_id, single.sampled, single.single) == (
        PARENT, True, True)  # fmt: skip
    tp = head(("traceparent", f"00-{TRACE}-{SPAN}-01"))
    assert extract(tp, False) is None and extract(tp, True) is not None
    for bad in (("x-b3-traceid", "xyz"), ("b3", "nothex-" + SPAN)):
        assert extract(head(bad, ("x-b3-spanid", SPAN)), False) is None


def test_without_a_shared_context_the_waypoint_opens_a_child_span() -> None:
    h = head(("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "1"))
    t = start(h, config(shared=False), random.Random(1))
    assert t.parent_id == SPAN and t.span_id != SPAN and t.sampled
    assert sent(h) == {"x-b3-traceid": TRACE, "x-b3-spanid": t.span_id,
                       "x-b3-parentspanid": SPAN, "x-b3-sampled": "1"}  # fmt: skip
    single = head(("b3", f"{TRACE}-{SPAN}-1"))
    t = start(single, config(shared=False), random.Random(2))
    assert sent(single) == {"b3": f"{TRACE}-{t.span_id}-1-{SPAN}"}
    doc = span_json(t, "svc:80/*", 1.0, 2.5, {"k": "v"}, "waypoint.shop")
    assert (doc["parentId"], doc["duration"], "shared" in doc) == (SPAN, 2500, False)


def test_w3c_propagation_adds_traceparent_and_a_new_trace_is_64_bits() -> None:
    h = head()
    t = start(h, config(w3c=True), random.Random(3))
    assert len(t.trace_id) == 16 and t.span_id == t.trace_id
    assert sent(h)["traceparent"] == f"00-{t.trace_id.rjust(32, '0')}-{t.span_id}-01"
    unsampled = head(("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "0"))
    t = start(unsampled, config(w3c=True), random.Random(4))
    assert not t.sampled and sent(unsampled)["traceparent"] == f"00-{TRACE}-{SPAN}-00"


def test_the_upstream_s_decision_wins_as_envoy_s_zipkin_tracer_takes_it() -> None:
    """Probed against Envoy 1.40 at random_sampling 0: a sampled B3 parent is reported, one
    without a flag is not (the percentage decides)."""
    zero = Tracing(random_ppm=0, collector=config().collector)
    sampled = head(("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "1"))
    assert start(sampled, zero, random.Random(5)).sampled
    no_flag = head(("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN))
    t = start(no_flag, zero, random.Random(6))
    assert not t.sampled and sent(no_flag)["x-b3-sampled"] == "0"
