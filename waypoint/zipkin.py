"""Envoy's zipkin tracer: B3 propagation, shared span contexts, Zipkin v2 JSON export.

What Envoy 1.40 does (seen against it, tests/interop/test_envoy_waypoint_tracing.py):

* context from ``x-b3-traceid``/``x-b3-spanid``/``x-b3-parentspanid``/
  ``x-b3-sampled`` (``x-b3-flags: 1``, debug, samples), or the single ``b3``
  header (``trace-span[-sampled[-parent]]``), and with
  ``USE_B3_WITH_W3C_PROPAGATION`` a W3C ``traceparent`` when there is no B3;
* with ``shared_span_context`` (Envoy's default) the waypoint's SERVER span is
  the client's: its id is the incoming span id, its parent the incoming
  parent, and the upstream gets the same ids back; without it, a new span
  whose parent is the incoming span, and the upstream gets the new one;
* without a context: a new 64-bit trace whose first span has the trace's id;
* the sampling decision is the upstream's when it made one (``x-b3-sampled``,
  the ``b3`` flag, ``traceparent``'s flag), else ``random_sampling``: a sampled
  parent is reported even at 0% (the OpenTelemetry tracer would not);
* the upstream gets the same form that came (a single ``b3`` stays single),
  plus ``traceparent`` with ``USE_B3_WITH_W3C_PROPAGATION``;
* sampled spans are posted as Zipkin v2 JSON to the collector cluster's first
  endpoint at ``collector_endpoint``, in batches (a bounded queue: a slow
  collector loses spans, never delays requests).

Zipkin's span ids are the client's here, which OpenTelemetry's SDK cannot
take (it makes its own): the JSON is written directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from waypoint.config.tracing import MILLION, Collector, Tracing
from waypoint.http.messages import RequestHead

log = logging.getLogger("waypoint.tracing")
B3_HEADERS = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")
QUEUE_SIZE = 2048
FLUSH_S = 1.0
_HEX = re.compile(r"^(?:[0-9a-f]{16}|[0-9a-f]{32})$")
_SPAN = re.compile(r"^[0-9a-f]{16}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(slots=True)
class Context:
    trace_id: str
    span_id: str
    parent_id: str = ""
    sampled: bool | None = None
    single: bool = False  # it came as one b3 header


def _trace(hex_id: str) -> str:
    """Envoy keeps a 128-bit trace id whose high half is zero as a 64-bit one."""
    return hex_id[16:] if len(hex_id) == 32 and hex_id[:16] == "0" * 16 else hex_id


def extract(head: RequestHead, w3c: bool) -> Context | None:
    """The request's B3 (or, with ``w3c``, W3C) context; None when it has none usable."""
    h = {k: v for k, v in head.headers if k in B3_HEADERS or k in ("b3", "traceparent")}
    if "x-b3-traceid" in h and "x-b3-spanid" in h:
        trace, span = h["x-b3-traceid"].lower(), h["x-b3-spanid"].lower()
        parent = h.get("x-b3-parentspanid", "").lower()
        if not _HEX.match(trace) or not _SPAN.match(span) or (parent and not _SPAN.match(parent)):
            return None
        flag = h.get("x-b3-sampled", "").lower()
        sampled = True if flag in ("1", "true") else False if flag in ("0", "false") else None
        if h.get("x-b3-flags") == "1":
            sampled = True
        return Context(_trace(trace), span, parent, sampled)
    if "b3" in h:
        parts = h["b3"].lower().split("-")
        if len(parts) < 2 or not _HEX.match(parts[0]) or not _SPAN.match(parts[1]):
            return None
        flag = parts[2] if len(parts) > 2 else ""
        sampled = True if flag in ("1", "d") else False if flag == "0" else None
        parent = parts[3] if len(parts) > 3 and _SPAN.match(parts[3]) else ""
        return Context(_trace(parts[0]), parts[1], parent, sampled, single=True)
    if w3c and "traceparent" in h and (m := _TRACEPARENT.match(h["traceparent"])):
        return Context(_trace(m.group(1)), m.group(2), "", bool(int(m.group(3), 16) & 1))
    return None


@dataclass(slots=True)
class ZipkinTrace:
    """One request's span: what goes upstream, and (sampled) what is reported."""

    trace_id: str
    span_id: str
    parent_id: str
    sampled: bool
    config: Tracing
    shared: bool
    tags: tuple[tuple[str, str], ...] = ()  # the custom header tags, read at the start


def start(head: RequestHead, config: Tracing, rng: random.Random) -> ZipkinTrace:
    collector = config.collector
    assert collector is not None and collector.zipkin
    ctx = extract(head, collector.w3c)
    decided = (
        rng.randrange(MILLION) < config.random_ppm and rng.randrange(MILLION) < config.overall_ppm
    )
    shared = collector.shared_span_context
    if ctx is None:
        trace = f"{rng.getrandbits(64) or 1:016x}"
        t = ZipkinTrace(trace, trace, "", decided, config, shared)
        single = False
    else:
        # Unlike the OpenTelemetry tracer, Envoy's zipkin tracer takes the upstream's
        # decision when it made one (a sampled parent is reported even at 0%).
        sampled = ctx.sampled if ctx.sampled is not None else decided
        if shared:
            t = ZipkinTrace(ctx.trace_id, ctx.span_id, ctx.parent_id, sampled, config, shared)
        else:
            new = f"{rng.getrandbits(64) or 1:016x}"
            t = ZipkinTrace(ctx.trace_id, new, ctx.span_id, sampled, config, shared)
        single = ctx.single
    _inject(head, t, single, collector.w3c)
    return t


def _inject(head: RequestHead, t: ZipkinTrace, single: bool, w3c: bool) -> None:
    drop = (*B3_HEADERS, "b3") + (("traceparent",) if w3c else ())
    head.headers = [h for h in head.headers if h[0] not in drop]
    flag = "1" if t.sampled else "0"
    if single:
        value = f"{t.trace_id}-{t.span_id}-{flag}"
        head.headers.append(("b3", value + (f"-{t.parent_id}" if t.parent_id else "")))
    else:
        head.headers.append(("x-b3-traceid", t.trace_id))
        head.headers.append(("x-b3-spanid", t.span_id))
        if t.parent_id:
            head.headers.append(("x-b3-parentspanid", t.parent_id))
        head.headers.append(("x-b3-sampled", flag))
    if w3c:
        head.headers.append(("traceparent", f"00-{t.trace_id.rjust(32, '0')}-{t.span_id}-0{flag}"))


def span_json(
    t: ZipkinTrace,
    name: str,
    start_s: float,
    duration_ms: float,
    tags: dict[str, str],
    service_name: str,
) -> dict[str, Any]:
    span: dict[str, Any] = {
        "traceId": t.trace_id,
        "id": t.span_id,
        "name": name,
        "kind": "SERVER",
        "timestamp": int(start_s * 1_000_000),
        "duration": int(duration_ms * 1000),
        "localEndpoint": {"serviceName": service_name},
        "tags": tags,
    }
    if t.parent_id:
        span["parentId"] = t.parent_id
    if t.shared:
        span["shared"] = True
    return span


class Exporter:
    """Batches of spans posted to the collector (resolved from its cluster at each post)."""

    def __init__(self, collector: Collector, resolve: Callable[[str], str | None]) -> None:
        self.collector = collector
        self.resolve = resolve
        self.queue: deque[dict[str, Any]] = deque(maxlen=QUEUE_SIZE)
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None

    def add(self, span: dict[str, Any]) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(span)
        if self.task is None:
            with contextlib.suppress(RuntimeError):  # no loop: nothing to post with
                self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(FLUSH_S)
                await self.flush(session)

    async def flush(self, session: aiohttp.ClientSession) -> None:
        if not self.queue:
            return
        address = self.resolve(self.collector.cluster)
        batch = list(self.queue)
        self.queue.clear()
        if address is None:
            self.dropped += len(batch)
            return
        try:
            async with session.post(
                f"http://{address}{self.collector.path}",
                json=batch,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                if resp.status >= 300:
                    log.warning("tracing: zipkin collector %s: status %d", address, resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            self.dropped += len(batch)
            log.warning("tracing: zipkin collector %s: %s", address, e)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            self.task = None
        async with aiohttp.ClientSession() as session:
            await self.flush(session)
