"""The waypoint's traces: the connection manager's tracing with Envoy's OpenTelemetry tracer.

What Envoy does per request when its HCM has ``tracing``
(``source/extensions/tracers/opentelemetry``):

* the connection manager decides at ``random_sampling`` (and
  ``overall_sampling``) percent;
* a W3C ``traceparent`` on the request continues its trace; it is sampled
  only if both its flag and that decision say so (what Envoy 1.40 does, seen
  in ``tests/interop/test_envoy_waypoint_tracing.py``: an upstream's
  unsampled trace stays unsampled at 100%, a sampled one is not reported at
  0%); one that cannot be read makes no span and is passed on untouched;
* without one, the request starts a trace with that decision;
* the upstream request carries ``traceparent`` naming the waypoint's span
  (same trace id, the span's id, the decision) and the ``tracestate`` as it
  came;
* a sampled request's span is exported, kind SERVER, named by the route's
  ``decorator.operation`` (istiod's ``<service>:<port>/*``; ``ingress``
  without one), with Envoy's tags (``http.method``, ``http.url`` cut at
  ``max_path_tag_length``, ``http.status_code``, ``http.protocol``,
  ``response_flags``, ``upstream_cluster``, ``guid:x-request-id``,
  ``error`` for 5xx...) and the custom ones.

Spans go through OpenTelemetry's SDK (a batch processor with a bounded queue:
when the collector is slow, spans are dropped, never requests delayed) and
its OTLP/gRPC exporter, one per collector. Unsampled requests touch the SDK
not at all: ids come from the router's generator.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace as otel
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.trace.status import Status, StatusCode

from waypoint import zipkin
from waypoint.config.tracing import MILLION, Collector, Tracing
from waypoint.http.messages import RequestHead
from waypoint.records import RequestRecord

log = logging.getLogger("waypoint.tracing")
TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
DEFAULT_OPERATION = "ingress"
EXPORT_DELAY_MS = 1000
QUEUE_SIZE = 2048  # spans waiting for export, at most; more are dropped
MAX_EXPORTERS = 4  # collectors exported to at once (old targets are retired)


@dataclass(frozen=True, slots=True)
class Parent:
    trace_id: int
    span_id: int
    sampled: bool


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def parse_traceparent(value: str) -> Parent | None:
    """W3C trace context (version 00; a later version's first four fields); None if invalid."""
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return Parent(trace_id=trace_id, span_id=span_id, sampled=bool(int(flags_hex, 16) & 1))


def traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


@dataclass(slots=True)
class Trace:
    """One request's place in its trace; ``span`` is the SDK's when it is reported."""

    trace_id: int
    span_id: int
    sampled: bool
    config: Tracing
    span: Any = None
    tags: tuple[tuple[str, str], ...] = ()


Resolve = Callable[[str], str | None]  # an Envoy cluster name -> a gRPC target


class Tracer:
    """The waypoint's tracer: per-request decisions here, export through the SDK."""

    def __init__(
        self,
        rng: random.Random,
        node_id: str = "",
        resolve: Resolve | None = None,
        service_name: str = "waypoint",
    ):
        """``resolve``: a cluster's first endpoint (the collector of istiod's form, and the
        zipkin tracer's); ``service_name``: the waypoint's, for Zipkin's localEndpoint."""
        self.rng = rng
        self.node_id = node_id
        self.resolve = resolve or (lambda _: None)
        self.service_name = service_name
        self._zipkin: dict[tuple[str, str], zipkin.Exporter] = {}
        # Per (target, service name), oldest first: a collector whose pods changed gets a
        # new target, and the exporter of an old one is shut down past MAX_EXPORTERS.
        self._tracers: dict[tuple[str, str], tuple[TracerProvider, Any]] = {}

    def start(self, head: RequestHead, config: Tracing) -> Trace | zipkin.ZipkinTrace | None:
        """The request's trace (and its upstream headers rewritten), or None: no tracer, or a
        traceparent that cannot be read (then passed on as it came)."""
        if config.collector is None:
            return None
        if config.collector.zipkin:
            t = zipkin.start(head, config, self.rng)
            t.tags = _header_tags(head, config)
            return t
        found = next((v for k, v in head.headers if k == TRACEPARENT), None)
        parent = None
        if found is not None:
            parent = parse_traceparent(found)
            if parent is None:
                return None
        rng = self.rng.randrange
        # The connection manager's decision, and the upstream's when it made one: Envoy
        # samples only what both sample (a sampled parent at 0% is not reported either).
        sampled = rng(MILLION) < config.random_ppm and rng(MILLION) < config.overall_ppm
        if parent is not None:
            trace_id, sampled = parent.trace_id, sampled and parent.sampled
        else:
            trace_id = self.rng.getrandbits(128) or 1
        span = None
        if sampled:
            tracer = self._tracer(config.collector)
            if tracer is not None:
                ctx = Context()
                if parent is not None:
                    state = next((v for k, v in head.headers if k == TRACESTATE), None)
                    ctx = otel.set_span_in_context(
                        NonRecordingSpan(
                            SpanContext(
                                trace_id=parent.trace_id,
                                span_id=parent.span_id,
                                is_remote=True,
                                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                                trace_state=_trace_state(state),
                            )
                        )
                    )
                span = tracer.start_span(DEFAULT_OPERATION, context=ctx, kind=SpanKind.SERVER)
                trace_id = span.get_span_context().trace_id
        span_id = span.get_span_context().span_id if span is not None else self.rng.getrandbits(64)
        head.headers = [h for h in head.headers if h[0] != TRACEPARENT]
        head.headers.append((TRACEPARENT, traceparent(trace_id, span_id or 1, sampled)))
        return Trace(trace_id, span_id, sampled, config, span, _header_tags(head, config))

    def finish(
        self, t: Trace | zipkin.ZipkinTrace, rec: RequestRecord, operation: str, scheme: str
    ) -> None:
        if isinstance(t, zipkin.ZipkinTrace):
            self._finish_zipkin(t, rec, operation, scheme)
            return
        span = t.span
        if span is None:
            return
        try:
            span.update_name(operation or DEFAULT_OPERATION)
            attributes = self._tags(rec, scheme, t.config, t.tags)
            if rec.status >= 500 or rec.status == 0:
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
            span.end(end_time=int((rec.start + rec.duration_ms / 1000) * 1e9))
        except Exception:  # a span must never fail a request
            log.exception("tracing: a span could not be ended")

    def _finish_zipkin(
        self, t: zipkin.ZipkinTrace, rec: RequestRecord, operation: str, scheme: str
    ) -> None:
        collector = t.config.collector
        if not t.sampled or collector is None:
            return
        try:
            key = (collector.cluster, collector.path)
            exporter = self._zipkin.get(key)
            if exporter is None:
                exporter = self._zipkin[key] = zipkin.Exporter(collector, self.resolve)
            tags = self._tags(rec, scheme, t.config, t.tags)
            exporter.add(
                zipkin.span_json(
                    t, operation or DEFAULT_OPERATION, rec.start, rec.duration_ms, tags,
                    self.service_name,
                )
            )  # fmt: skip
        except Exception:  # a span must never fail a request
            log.exception("tracing: a zipkin span could not be reported")

    def _tags(
        self, rec: RequestRecord, scheme: str, config: Tracing, header: tuple[tuple[str, str], ...]
    ) -> dict[str, str]:
        """Envoy's span tags, then the custom ones; ``error`` for a 5xx or no response."""
        url = f"{scheme}://{rec.authority}{rec.path}"[: config.max_path_tag_length]
        attributes = {
            "node_id": self.node_id,
            "zone": "",
            "guid:x-request-id": rec.request_id,
            "http.url": url,
            "http.method": rec.method,
            "downstream_cluster": "-",
            "user_agent": rec.user_agent or "-",
            "http.protocol": rec.protocol,
            "peer.address": str(rec.info.get("source_ip") or rec.info.get("peer") or ""),
            "request_size": str(rec.bytes_received),
            "response_size": str(rec.bytes_sent),
            "response_flags": rec.flags,
            "http.status_code": str(rec.status),
            "upstream_cluster": rec.cluster or "-",
            "upstream_cluster.name": rec.cluster or "-",
            "upstream_address": rec.upstream_host or "-",
            "component": "proxy",
        }
        attributes.update(config.literal_tags)
        attributes.update(header)
        if rec.status >= 500 or rec.status == 0:
            attributes["error"] = "true"
        return attributes

    async def aclose(self) -> None:
        """Post what the zipkin exporters hold, and stop them."""
        for exporter in self._zipkin.values():
            await exporter.close()
        self._zipkin.clear()

    def _tracer(self, collector: Collector) -> Any:
        target = collector.target or self.resolve(collector.cluster) or ""
        if not target:
            return None
        key = (target, collector.service_name)
        found = self._tracers.get(key)
        if found is not None:
            return found[1]
        provider = TracerProvider(
            resource=Resource.create({"service.name": collector.service_name or "waypoint"})
        )
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=target, insecure=True),
                max_queue_size=QUEUE_SIZE,
                schedule_delay_millis=EXPORT_DELAY_MS,
            )
        )
        tracer = provider.get_tracer("waypoint")
        self._tracers[key] = (provider, tracer)
        log.info("tracing: exporting spans of %s to %s", collector.service_name, target)
        while len(self._tracers) > MAX_EXPORTERS:
            old, (retired, _) = next(iter(self._tracers.items()))
            del self._tracers[old]
            # Its queue is flushed and its thread ended off the loop.
            threading.Thread(target=_shutdown, args=(retired,), daemon=True).start()
        return tracer

    def shutdown(self) -> None:
        """Export what is queued (bounded by the SDK's timeouts) and stop."""
        for provider, _ in self._tracers.values():
            _shutdown(provider)
        self._tracers.clear()

    @property
    def exporters(self) -> int:
        return len(self._tracers)


def _shutdown(provider: TracerProvider) -> None:
    try:
        provider.shutdown()
    except Exception:
        log.exception("tracing: shutting an exporter down failed")


def _header_tags(head: RequestHead, config: Tracing) -> tuple[tuple[str, str], ...]:
    return tuple(
        (tag, next((v for k, v in head.headers if k == name), default))
        for tag, name, default in config.header_tags
    )


def _trace_state(value: str | None) -> TraceState:
    if not value:
        return TraceState()
    try:
        return TraceState.from_header([value])
    except Exception:
        return TraceState()
