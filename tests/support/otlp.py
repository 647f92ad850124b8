"""A real OTLP/gRPC trace receiver on loopback: what an OpenTelemetry Collector listens with.

The collector's ``TraceService/Export`` (OpenTelemetry's own protos and gRPC
stubs, ``opentelemetry-proto``), served by grpcio; every span exported to it
is kept, with its resource's attributes, for the test to read.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1 Span.SpanKind (2: SERVER)
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int


@dataclass
class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ReceivedSpan] = field(default_factory=list)
    port: int = 0
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            ReceivedSpan(
                                name=s.name,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_span_id=s.parent_span_id.hex(),
                                kind=s.kind,
                                attributes={a.key: _value(a.value) for a in s.attributes},
                                resource=resource,
                                status_code=s.status.code,
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> OtlpReceiver:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.spans) >= n:
                    return list(self.spans)
            time.sleep(0.05)
        with self._lock:
            return list(self.spans)


def main() -> None:
    """``python -m tests.support.otlp --listen HOST:PORT --out FILE``: a receiver in a pod,
    one JSON line per span appended to FILE (for tests that run it inside a meshlab pod)."""
    import argparse
    import json
    from dataclasses import asdict

    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="0.0.0.0:4317")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    class Writing(OtlpReceiver):
        def Export(self, request: Any, context: Any) -> Any:
            before = len(self.spans)
            reply = super().Export(request, context)
            with open(args.out, "a", encoding="utf-8") as f:
                for span in self.spans[before:]:
                    f.write(json.dumps(asdict(span)) + "\n")
            return reply

    receiver = Writing()
    receiver._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, receiver._server)  # type: ignore[no-untyped-call]
    receiver._server.add_insecure_port(args.listen)
    receiver._server.start()
    receiver._server.wait_for_termination()


if __name__ == "__main__":
    main()
