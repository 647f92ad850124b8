"""An OTLP/gRPC trace receiver for the waypoint bench: it counts spans, per waypoint.

    python -m bench.mesh.otlp_sink --listen 0.0.0.0:4317 --out counts.json

OpenTelemetry's collector service (``TraceService/Export``, the protos and
stubs of ``opentelemetry-proto``, served by grpcio), as
:mod:`tests.support.otlp`'s, but keeping no span: at 100 % sampling the
waypoints export thousands a second. Each span is counted under its
``node_id`` attribute (what Envoy and our waypoint set on every server span:
the proxy's node id), else its resource's ``service.name``; after each
export the counts are written to ``--out`` (JSON, replaced atomically).
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def span_owner(resource: dict[str, Any], attributes: dict[str, Any]) -> str:
    """Whose span: its ``node_id`` attribute, else its resource's ``service.name``."""
    return str(attributes.get("node_id") or resource.get("service.name") or "?")


class CountingReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.counts: Counter[str] = Counter()
        self.exports = 0
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        seen: Counter[str] = Counter()
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    node = next((a for a in s.attributes if a.key == "node_id"), None)
                    attributes = {"node_id": _value(node.value)} if node is not None else {}
                    seen[span_owner(resource, attributes)] += 1
        with self._lock:
            self.counts.update(seen)
            self.exports += 1
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"exports": self.exports, "spans": dict(self.counts)}))
            tmp.replace(self.out)
        return trace_service_pb2.ExportTraceServiceResponse()


def read_counts(path: Path) -> dict[str, int]:
    """The spans counted so far, by owner ({} before the first export)."""
    try:
        return {k: int(v) for k, v in json.loads(path.read_text())["spans"].items()}
    except (OSError, ValueError, KeyError):
        return {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mesh.otlp_sink")
    parser.add_argument("--listen", default="0.0.0.0:4317")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    receiver = CountingReceiver(args.out)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(args.listen)
    server.start()
    print(f"otlp sink listening on {args.listen}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
