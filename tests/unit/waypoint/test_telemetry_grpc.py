"""The waypoint's Istio metrics: gRPC message counts, bounded label sets, wire bytes.

The message counter is checked against a byte-at-a-time model of Envoy's
``FrameInspector`` over every way of cutting a body; the metrics through the
router, with a gRPC-shaped HTTP/2 backend (raw ``h2``, so that it can send any
``grpc-status``) and an HTTP/2 client on a plain socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from controlplane.state import ServicePortInfo, SourceState
from tests.support.l7world import CANARY, service, world
from tests.support.waypoint_harness import (
    Waypoint,
    config_for,
    reviews_backends,
    waypoint,
    with_backends,
)
from tests.unit.hbone.conftest import run
from waypoint import telemetry
from waypoint.grpc_messages import MessageCounter, grpc_status_label, is_grpc
from waypoint.http.h2server import hpack_size
from waypoint.records import RequestRecord
from waypoint.telemetry import Telemetry

AUTHORITY = "10.96.0.20:9080"
BACKEND_IP = "127.0.0.41"
CLIENT = "spiffe://cluster.local/ns/client/sa/client"
METHOD = "/shop.Reviews/List"


def message(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def model_count(body: bytes) -> int:
    """Envoy's FrameInspector, one byte at a time: a message counts at its flag byte."""
    count, state, length, got = 0, "flag", 0, b""
    for b in body:
        if state == "flag":
            count += 1
            state, got = "len", b""
        elif state == "len":
            got += bytes([b])
            if len(got) == 4:
                length = int.from_bytes(got, "big")
                state = "data" if length else "flag"
        else:
            length -= 1
            if length == 0:
                state = "flag"
    return count


def fed(chunks: Iterable[bytes]) -> int:
    counter = MessageCounter()
    for chunk in chunks:
        counter.feed(chunk)
    return counter.count


def cut(body: bytes, points: Sequence[int]) -> list[bytes]:
    edges = [0, *sorted(points), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


# ------------------------------------------------------------ counting messages


STREAM = message(b"hello") + message(b"") + message(b"x" * 300, flag=1) + message(b"")


def test_several_messages_in_one_chunk_and_zero_length_ones_count() -> None:
    assert fed([STREAM]) == 4
    assert fed([message(b"") * 7]) == 7
    assert fed([b""]) == 0


def test_a_prefix_split_over_chunks_counts_once() -> None:
    one = message(b"abcdef")
    for i in range(1, 5):  # the cut inside the 5-byte prefix
        assert fed([one[:i], one[i:]]) == 1
        assert fed([one[:i], one[i:], one]) == 2
    assert fed([bytes([b]) for b in one + one]) == 2  # byte by byte
    # A prefix in three pieces, the last one followed by the next message whole.
    assert fed([one[:1], one[1:3], one[3:] + message(b"")]) == 2


def test_every_single_and_double_cut_gives_the_same_count() -> None:
    for i in range(len(STREAM) + 1):
        assert fed(cut(STREAM, [i])) == 4, i
    for i in range(0, len(STREAM) + 1, 3):
        for j in range(i, len(STREAM) + 1, 7):
            assert fed(cut(STREAM, [i, j])) == 4, (i, j)


def test_a_body_cut_mid_message_counts_the_messages_started() -> None:
    two = message(b"a" * 10) + message(b"b" * 10)
    assert fed([two[:17]]) == 2  # cut in the second message's payload
    assert fed([two[:16]]) == 2  # in its prefix, after the flag byte
    assert fed([two[:15]]) == 1  # before it started
    assert fed([two[:3]]) == 1


@given(
    st.lists(st.tuples(st.binary(max_size=40), st.integers(0, 1)), max_size=8),
    st.lists(st.integers(0, 400), max_size=12),
    st.integers(0, 30),
)
def test_any_chunking_counts_as_envoy_does(
    messages: list[tuple[bytes, int]], points: list[int], truncate: int
) -> None:
    body = b"".join(message(p, f) for p, f in messages)
    body = body[: max(0, len(body) - truncate)]
    points = [p for p in points if p <= len(body)]
    assert fed(cut(body, points)) == model_count(body)


def test_payloads_are_jumped_over_not_walked() -> None:
    # 64 MiB of one message's payload in 1 MiB chunks: per-chunk arithmetic only (a
    # walk over the bytes in Python would take seconds).
    counter = MessageCounter()
    counter.feed((1 << 30).to_bytes(5, "big"))
    chunk = bytes(1 << 20)
    started = time.perf_counter()
    for _ in range(64):
        counter.feed(chunk)
    assert time.perf_counter() - started < 0.05
    assert counter.count == 1


def test_grpc_is_envoys_content_type_rule() -> None:
    assert is_grpc("application/grpc") and is_grpc("application/grpc+proto")
    assert not is_grpc("application/grpc-web") and not is_grpc("application/json")
    assert not is_grpc(None) and not is_grpc("")


def test_grpc_status_labels_are_grpcs_codes_or_unknown() -> None:
    assert grpc_status_label("0", 200) == "0" and grpc_status_label("16", 200) == "16"
    for bogus in ("99", "abc", "17", "-1", " 1", "01"):
        assert grpc_status_label(bogus, 200) == "unknown", bogus
    assert grpc_status_label("", 503) == "14"  # none sent: Envoy's httpToGrpcStatus
    assert grpc_status_label("", 0) == ""  # no response at all


# ------------------------------------------------------------ labels and the cap


def record(**changes: Any) -> RequestRecord:
    rec = RequestRecord(start=time.time(), status=200, cluster="c")
    rec.info = {"peer_identity": CLIENT}
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def samples(t: Telemetry, name: str) -> list[dict[str, str]]:
    out = []
    for family in t.registry.collect():
        for s in family.samples:
            if s.name == name:
                out.append({**s.labels, "value": str(s.value)})
    return out


def test_bogus_grpc_status_trailers_are_reported_unknown() -> None:
    t = Telemetry()
    for status in ("99", "abc", "7"):
        t.record(record(grpc=True, grpc_status=status))
    t.record(record(status=502))  # plain HTTP: no gRPC status at all
    seen = {
        (s["request_protocol"], s["grpc_response_status"], s["value"])
        for s in samples(t, "istio_requests_total")
    }
    assert seen == {("grpc", "unknown", "2.0"), ("grpc", "7", "1.0"), ("http", "", "1.0")}


def test_response_codes_outside_http_are_unknown() -> None:
    t = Telemetry()
    for status in (0, 200, 1234, 42):
        t.record(record(status=status))
    codes = sorted(s["response_code"] for s in samples(t, "istio_requests_total"))
    assert codes == ["0", "200", "unknown"]


def test_label_sets_past_the_cap_fold_into_one_overflow_series(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(telemetry, "MAX_SERIES", 3)
    t = Telemetry()
    caplog.set_level(logging.WARNING, "waypoint.telemetry")
    for i in range(10):
        principal = f"spiffe://cluster.local/ns/n{i}/sa/s"
        t.record(record(info={"peer_identity": principal}, status=503 if i % 2 else 201))
    t.record(record(info={"peer_identity": "spiffe://cluster.local/ns/n0/sa/s"}, status=201))
    requests = samples(t, "istio_requests_total")
    own = [s for s in requests if s["source_principal"] != "unknown"]
    folded = {s["response_code"]: s for s in requests if s["source_principal"] == "unknown"}
    assert len(own) == 3  # the first three label sets; the repeat of one is still its own
    assert sum(float(s["value"]) for s in own) == 4
    assert set(folded) == {"2xx", "5xx"}
    assert float(folded["2xx"]["value"]) == 3 and float(folded["5xx"]["value"]) == 4
    overflow = folded["5xx"]
    assert overflow["reporter"] == "waypoint" and overflow["request_protocol"] == "http"
    assert overflow["source_workload_namespace"] == "unknown"
    assert overflow["destination_service"] == "unknown"
    for name in ("istio_request_duration_milliseconds_count", "istio_request_bytes_count"):
        assert len(samples(t, name)) == 5  # every family folds alike
    assert samples(t, "waypoint_metric_series_overflow_total")[0]["value"] == "7.0"
    warnings = [r for r in caplog.records if "overflow" in r.getMessage()]
    assert len(warnings) == 1


# ------------------------------------------------------------ through the waypoint


class GrpcBackend(asyncio.Protocol):
    """An h2c server shaped like a gRPC one: every stream gets ``reply`` (chunks, each a
    DATA frame) and the trailers ``grpc-status: <status>``."""

    def __init__(self, reply: Sequence[bytes], status: str) -> None:
        self.reply = reply
        self.status = status
        self.received: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                self.received.append(bytes(event.data or b""))
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
                sid = event.stream_id
                self.conn.send_headers(sid, [(":status", "200"), ("content-type", GRPC_CT)])
                for chunk in self.reply:
                    self.conn.send_data(sid, chunk)
                self.conn.send_headers(sid, [("grpc-status", self.status)], end_stream=True)
        assert self.transport is not None
        self.transport.write(self.conn.data_to_send())


GRPC_CT = "application/grpc"


def h2_call(
    port: int, chunks: Sequence[bytes], content_type: str = GRPC_CT
) -> tuple[bytes, dict[str, str]]:
    """One POST over HTTP/2 (prior knowledge), the body as ``chunks`` (one DATA frame
    each): the response body and its trailers."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        conn.initiate_connection()
        headers = [(":method", "POST"), (":path", METHOD), (":scheme", "http")]
        headers += [(":authority", AUTHORITY), ("content-type", content_type), ("te", "trailers")]
        conn.send_headers(1, headers)
        for chunk in chunks:
            conn.send_data(1, chunk)
            sock.sendall(conn.data_to_send())
        conn.end_stream(1)
        sock.sendall(conn.data_to_send())
        body, trailers, done = b"", {}, False
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data or b""
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = {_s(k): _s(v) for k, v in event.headers or []}
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
            sock.sendall(conn.data_to_send())
    return body, trailers


def _s(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def grpc_world(port: int) -> SourceState:
    base = world()
    pods = tuple(replace(p, ip=BACKEND_IP) for p in base.pods if p.name == "reviews-v2-a")
    reviews = service(
        "reviews",
        {"app": "reviews"},
        ports=(ServicePortInfo(port=9080, target_port=port, name="grpc"),),
    )
    namespaces = tuple(
        replace(ns, labels={k: v for k, v in ns.labels.items() if k != "istio.io/dataplane-mode"})
        for ns in base.namespaces
    )
    return replace(base, pods=pods, services=(reviews,), namespaces=namespaces)


def telemetry_of(wp: Waypoint) -> Telemetry:
    """The runtime's telemetry over the harness's records (cluster metadata as the runtime
    reads it)."""

    def service_of(cluster: str) -> dict[str, Any]:
        c = wp.config.clusters.get(cluster)
        services = c.metadata.get("istio", {}).get("services") if c is not None else None
        return dict((services or [{}])[0])

    t = Telemetry(service_of)
    for rec in wp.records:
        t.record(rec)
    return t


def exposition_line(text: str, name: str) -> str:
    lines = [li for li in text.splitlines() if li.startswith(name + "{")]
    assert len(lines) == 1, lines
    return lines[0]


def serve_grpc(
    reply: Sequence[bytes], status: str, chunks: Sequence[bytes], content_type: str = GRPC_CT
) -> tuple[bytes, dict[str, str], Telemetry, RequestRecord, GrpcBackend]:
    async def body() -> tuple[bytes, dict[str, str], Telemetry, RequestRecord, GrpcBackend]:
        backend = GrpcBackend(reply, status)
        server = await asyncio.get_running_loop().create_server(lambda: backend, BACKEND_IP, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            config = config_for(grpc_world(port))
            async with waypoint(config, AUTHORITY, peer_identity=CLIENT) as wp:
                answer, trailers = await asyncio.to_thread(
                    h2_call, wp.address[1], chunks, content_type
                )
                for _ in range(100):
                    if wp.records:
                        break
                    await asyncio.sleep(0.01)
                return answer, trailers, telemetry_of(wp), wp.records[-1], backend
        finally:
            server.close()

    return run(body)


def test_a_grpc_call_through_the_waypoint_counts_its_messages_both_ways() -> None:
    request = message(b"one") + message(b"") + message(b"three" * 20)
    # The client's DATA frames cut a prefix and a payload; the backend's hold two
    # messages in one frame, then a third split at its prefix.
    chunks = [request[:2], request[2:9], request[9:]]
    reply = [message(b"r1") + message(b"r2") + message(b"r3")[:3], message(b"r3")[3:]]
    answer, trailers, t, rec, backend = serve_grpc(reply, "0", chunks)
    assert answer == b"".join(reply) and trailers["grpc-status"] == "0"
    assert b"".join(backend.received) == request
    text = generate_latest(t.registry).decode()
    line = exposition_line(text, "istio_request_messages_total")
    for label in (
        'reporter="waypoint"',
        'request_protocol="grpc"',
        'response_code="200"',
        'grpc_response_status="0"',
        f'source_principal="{CLIENT}"',
        'destination_workload="reviews-v2-a"',
        'destination_service="reviews.shop.svc.cluster.local"',
    ):
        assert label in line, label
    assert line.endswith(" 3.0")
    assert exposition_line(text, "istio_response_messages_total").endswith(" 3.0")
    requests = exposition_line(text, "istio_requests_total")
    assert requests.split("{", 1)[1] == line.split("{", 1)[1].replace(" 3.0", " 1.0")
    # Wire bytes: the bodies plus the heads (HTTP/2: their HPACK size) and trailers.
    assert rec.bytes_received == len(request) and rec.bytes_sent == len(answer)
    assert rec.head_bytes_received > len(METHOD) + len(AUTHORITY) + 4 * 32
    assert rec.head_bytes_sent >= hpack_size([(":status", "200"), ("grpc-status", "0")])
    sums = {s.name: s.value for f in t.registry.collect() for s in f.samples}
    assert sums["istio_request_bytes_sum"] == len(request) + rec.head_bytes_received
    assert sums["istio_response_bytes_sum"] == len(answer) + rec.head_bytes_sent


def test_a_bogus_grpc_status_from_the_upstream_is_reported_unknown() -> None:
    for bogus in ("99", "abc"):
        _, trailers, t, _, _ = serve_grpc([message(b"r")], bogus, [message(b"q")])
        assert trailers["grpc-status"] == bogus  # passed on as it came
        text = generate_latest(t.registry).decode()
        assert 'grpc_response_status="unknown"' in exposition_line(text, "istio_requests_total")


def test_grpc_web_is_not_grpc_and_counts_no_messages() -> None:
    _, _, t, rec, _ = serve_grpc([message(b"r")], "0", [message(b"q")], "application/grpc-web")
    assert not rec.grpc and rec.request_messages is None
    text = generate_latest(t.registry).decode()
    assert 'request_protocol="http"' in exposition_line(text, "istio_requests_total")
    assert not [li for li in text.splitlines() if li.startswith("istio_request_messages_total")]


async def _raw_http1(address: tuple[str, int], request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


def test_plain_http_has_no_message_counters_and_its_bytes_are_the_wire_bytes() -> None:
    sent = (
        b"POST /reviews/1 HTTP/1.1\r\nhost: reviews.shop.svc.cluster.local:9080\r\n"
        b"connection: close\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n"
        b'{"a":1}'
    )

    async def body() -> tuple[bytes, Telemetry, RequestRecord]:
        bs = await reviews_backends()
        config = config_for(with_backends(world(CANARY), bs))
        try:
            async with waypoint(config, AUTHORITY, peer_identity=CLIENT) as wp:
                raw = await _raw_http1(wp.address, sent)
                for _ in range(100):
                    if wp.records:
                        break
                    await asyncio.sleep(0.01)
                return raw, telemetry_of(wp), wp.records[-1]
        finally:
            for b in bs.values():
                await b.stop()

    raw, t, rec = run(body)
    assert raw.startswith(b"HTTP/1.1 200")
    text = generate_latest(t.registry).decode()
    line = exposition_line(text, "istio_requests_total")
    assert 'request_protocol="http"' in line and 'grpc_response_status=""' in line
    for name in ("istio_request_messages_total", "istio_response_messages_total"):
        assert not [li for li in text.splitlines() if li.startswith(name)]
    # The access log's bytes are body bytes (Envoy's %BYTES_*%), the histograms' wire bytes.
    head, _, answer = raw.partition(b"\r\n\r\n")
    assert rec.bytes_received == 7 and rec.bytes_sent == len(answer)
    assert rec.head_bytes_received == len(sent) - 7  # the head as the client sent it
    assert rec.head_bytes_sent == len(head) + 4
    sums = {s.name: s.value for f in t.registry.collect() for s in f.samples}
    assert sums["istio_request_bytes_sum"] == len(sent)
    assert sums["istio_response_bytes_sum"] == len(raw)
