"""One request's life through the waypoint: route, attempts, retries, timeouts, mirrors.

Modelled on Envoy's router: the decisions are pure and live elsewhere
(:mod:`waypoint.filters`, :mod:`waypoint.match`, :mod:`waypoint.retry`,
:mod:`waypoint.upstream.lb`, :mod:`waypoint.headers`); this module sequences
them for one request:

1. the HTTP filters (:mod:`waypoint.filters`): the connection manager's work
   on the head (path, hop-by-hop and Envoy-internal headers,
   ``x-forwarded-proto``, ``x-request-id``), then the local rate limit filter
   when it is first, JWT authentication and RBAC, all before any route is
   looked up;
2. the route (404 ``NR`` when none), the fault filter and the local rate limit
   filter when it is just before the router, then the route's action: a
   redirect or direct response answered here, or forwarding to a cluster
   (chosen by weight with the stream's random value; an unknown cluster
   answers the route's ``cluster_not_found`` status);
3. attempts: an endpoint from the load balancer (avoiding those already
   tried when the policy says ``previous_hosts``), a connection from its pool
   (or 503 ``UO`` when a circuit breaker is full), the request streamed while
   a copy is kept for retries (up to 1 MiB); the answer or the failure goes
   through the retry state, with back-off; the per-try and route timeouts
   answer 504 ``UT``;
4. the response: the route's header mutations, ``x-envoy-upstream-service-time``,
   the ``server`` and ``date`` headers, and the body streamed with
   back-pressure both ways;
5. mirrors: a copy of the request to each mirror cluster (its Host with
   ``-shadow``), fire and forget (:mod:`waypoint.mirror`).

Every request ends with one :class:`~waypoint.records.RequestRecord` (access
log, metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from waypoint import filters, mirror
from waypoint.config.model import DirectResponse, Forward, HttpManager, Redirect, Route
from waypoint.config.snapshot import WaypointConfig
from waypoint.grpc_messages import http_to_grpc_status
from waypoint.headers import http_date, mutate, redirect_location, rewrite_path
from waypoint.http import messages
from waypoint.http.body import BodyError
from waypoint.http.exchange import Exchange, Upstream
from waypoint.http.h1server import DownstreamGone
from waypoint.http.messages import Headers, LocalReply, RequestHead, ResponseHead
from waypoint.match import RequestView, pick_cluster, select_route
from waypoint.ratelimit import RateLimiter
from waypoint.records import RequestRecord
from waypoint.retry import RetryState
from waypoint.tracing import Tracer
from waypoint.upstream.lb import Host, stable_hash
from waypoint.upstream.pool import ClusterRuntime, ConnectFailed, Overflow, Upstreams

log = logging.getLogger("waypoint.router")
RETRY_BUFFER_LIMIT = 1 << 20  # Envoy's default per-request buffer for retries


class _Failed(Exception):
    """An attempt ended before its answer: ``reason`` in Envoy's words."""

    def __init__(self, reason: str, sent: bool, detail: str = "") -> None:
        self.reason = reason
        self.sent = sent
        self.detail = detail
        super().__init__(reason)


class _PerTryTimeout(Exception):
    pass


class _Attempt:
    """One try upstream: the connection's callbacks, turned into a future and a stream."""

    __slots__ = (
        "client",
        "committed",
        "ended",
        "head",
        "host",
        "life",
        "pending",
        "started",
        "trailers",
    )

    def __init__(self, life: _Life, host: Host) -> None:
        self.life = life
        self.host = host
        self.client: Upstream | None = None
        self.head: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self.committed = False
        self.ended = False
        self.pending: list[bytes] = []
        self.started = time.monotonic()
        self.trailers: Headers | None = None

    def on_informational(self, status: int, headers: Headers) -> None:
        self.life.informational(status, headers)

    def on_response(self, head: ResponseHead) -> None:
        if not self.head.done():
            self.head.set_result(head)

    def on_data(self, data: bytes) -> None:
        if self.committed:
            self.life.forward(self, data)
        else:
            self.pending.append(data)

    def on_end(self, trailers: Headers | None = None) -> None:
        self.ended = True
        self.trailers = trailers
        if self.committed:
            self.life.finish(self)

    def on_reset(self, reason: str, sent: bool) -> None:
        if not self.head.done():
            self.head.set_exception(_Failed(reason, sent))
        elif self.committed and not self.ended:
            self.life.upstream_broke(reason)

    def fail(self, error: BaseException) -> None:
        if not self.head.done():
            self.head.set_exception(error)


class Router:
    """Serves requests for one waypoint over its current config and upstreams."""

    def __init__(
        self,
        config: Callable[[], WaypointConfig],
        upstreams: Upstreams,
        *,
        rng: random.Random | None = None,
        on_record: Callable[[RequestRecord], None] | None = None,
        logger: logging.Logger = log,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.tracer = tracer
        self.upstreams = upstreams
        self.rng = rng or random.Random()
        self.on_record = on_record
        self.log = logger
        self.tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        # The local rate limit buckets: this instance's, kept across config updates.
        self.limiter = RateLimiter()

    def handle(self, exchange: Exchange, manager: HttpManager) -> None:
        """The codec's handler: one task per request."""
        task = asyncio.get_running_loop().create_task(_Life(self, exchange, manager).run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class _Life:
    """The state of one request; owned by its task."""

    def __init__(self, router: Router, exchange: Exchange, manager: HttpManager) -> None:
        self.router = router
        self.exchange = exchange
        self.manager = manager
        self.loop = asyncio.get_running_loop()
        self.record = RequestRecord(start=time.time())
        self.random = router.rng.getrandbits(63)  # Envoy's stream id: weights, mirrors, faults
        self.buffered: list[bytes] = []
        self.buffered_size = 0
        self.buffer_overflowed = False
        self.request_done_at: float | None = None
        self.current: _Attempt | None = None
        self.timed_out = False
        self.done = asyncio.get_running_loop().create_future()
        self.any_1xx = False
        self.response_started = False
        self.upstream_head: RequestHead | None = None
        self.response_head: ResponseHead | None = None  # as sent downstream (access log)
        self.route: Route | None = None
        self.timeout_s = 0.0
        self.timeout_handle: asyncio.TimerHandle | None = None
        self.timeout_event = asyncio.Event()
        self.request_complete = asyncio.Event()

    # ------------------------------------------------------------ the whole request

    async def run(self) -> None:
        router = self.router
        router.active += 1
        exchange = self.exchange
        head = exchange.head
        rec = self.record
        rec.opened(exchange)
        try:
            reply = await self._serve()
            if reply is not None:
                self._local(reply)
            elif not exchange.ended and not exchange.closed:
                await exchange.done
        except (DownstreamGone, BodyError) as e:
            rec.flags = "DC"
            rec.details = rec.details or f"downstream_remote_disconnect ({e})"
            if self.current is not None and self.current.client is not None:
                self.current.client.abort()
        except asyncio.CancelledError:
            exchange.abort()
            raise
        except Exception:
            router.log.exception("waypoint: request %s %s failed", head.method, head.target)
            if not exchange.head_sent:
                self._local(LocalReply(500, b"internal error in the waypoint", details="bug"))
            else:
                exchange.abort()
        finally:
            router.active -= 1
            # The attempt points back at this life: break the cycle, so reference
            # counting frees the request at once (a cycle per request kept the
            # collector busy, and its pauses were the waypoint's p99).
            self.current = None
            rec.closed(exchange)
            filters.finished(router.tracer, rec, self.manager, head, self.upstream_head,
                             self.response_head)  # fmt: skip
            if router.on_record is not None:
                router.on_record(rec)

    def _local(self, reply: LocalReply) -> None:
        exchange = self.exchange
        rec = self.record
        if rec.flags == "-":
            rec.flags = reply.flag
        rec.details = rec.details or reply.details
        rec.status = reply.status
        if exchange.head_sent or exchange.closed:
            exchange.abort()
            return
        head = reply.head()
        head.headers.append(("date", http_date()))
        head.headers.append(("server", self.manager.server_name))
        route = self.route
        if route is not None and route.response_headers:
            head.headers = mutate(head.headers, route.response_headers)
        grpc = self.exchange.head.is_grpc
        if grpc and reply.status != 200:
            # Envoy answers gRPC requests with a trailers-only 200 carrying grpc-status.
            head = ResponseHead(
                status=200,
                headers=[
                    ("content-type", "application/grpc"),
                    ("grpc-status", str(http_to_grpc_status(reply.status))),
                    ("grpc-message", reply.body.decode("latin-1")),
                    ("content-length", "0"),
                    ("date", http_date()),
                    ("server", self.manager.server_name),
                ],
            )
            exchange.respond(head, end=True)
            return
        exchange.respond(head, end=not reply.body)
        self.response_head = head
        if reply.body:
            exchange.write(reply.body, end=True)

    async def _serve(self) -> LocalReply | None:
        exchange, manager = self.exchange, self.manager
        head = exchange.head
        if (reply := filters.sanitize(head, manager)) is not None:
            return reply
        rec = self.record
        rec.saw_headers(head.headers, filters.request_id(head))
        router = self.router
        if manager.tracing is not None and router.tracer is not None:
            rec.trace = router.tracer.start(head, manager.tracing)
        config = router.config()
        routes = config.routes.get(manager.route_config)
        reply = filters.before_route(
            head, exchange.info, manager, routes, router.limiter, router.rng
        )
        if reply is not None:
            return reply
        if routes is None:
            return messages.no_route()
        route = select_route(routes, filters.request_view(head))
        if route is None:
            return messages.no_route()
        self.route = route
        rec.route, rec.operation = route.name, route.operation
        if manager.fault_filter and route.fault is not None:
            reply = await filters.fault(route, router.rng, rec, exchange)
            if reply is not None:
                return reply
        if (
            manager.ratelimit is not None
            and not manager.ratelimit_first
            and (reply := filters.local_limit(router.limiter, router.rng, manager, route))
            is not None
        ):
            return reply
        action = route.action
        if isinstance(action, Redirect):
            location = redirect_location(
                action, route.match, head.authority, head.target, head.scheme
            )
            rec.details = "direct_response"
            return LocalReply(action.status, b"", headers=(("location", location),))
        if isinstance(action, DirectResponse):
            return messages.direct(action.status, action.body)
        return await self._forward(route, action, config)

    # ------------------------------------------------------------ forwarding

    async def _forward(
        self, route: Route, action: Forward, config: WaypointConfig
    ) -> LocalReply | None:
        exchange = self.exchange
        head = exchange.head
        rec = self.record
        name = pick_cluster(action, self.random)
        rec.cluster = name
        runtime = self.router.upstreams.clusters.get(name)
        if runtime is None or name not in config.clusters:
            return messages.no_cluster(action.cluster_not_found_status)
        upstream = RequestHead(
            method=head.method,
            target=head.target,
            authority=head.authority,
            scheme=head.scheme,
            version="1.1",
            headers=list(head.headers),
            upgrade=head.upgrade,
        )
        if action.prefix_rewrite is not None or action.regex_rewrite is not None:
            rewritten = rewrite_path(
                head.target, route.match, action.prefix_rewrite, action.regex_rewrite
            )
            if rewritten != head.target:
                upstream.headers.append(("x-envoy-original-path", head.target))
                upstream.target = rewritten
        if action.host_rewrite:
            upstream.authority = action.host_rewrite
        if action.timeout_s > 0:
            per_try = action.retry.per_try_timeout_s if action.retry else 0.0
            expected = per_try if 0 < per_try < action.timeout_s else action.timeout_s
            upstream.headers.append(("x-envoy-expected-rq-timeout-ms", str(round(expected * 1000))))
        upstream.headers = mutate(upstream.headers, route.request_headers)
        self.upstream_head = upstream
        self.timeout_s = action.timeout_s
        for policy in action.mirrors:
            if self.random % 1_000_000 < policy.ppm:
                self._mirror(policy.cluster, upstream)
        retry = RetryState(action.retry, self.router.rng) if action.retry else None
        hash_key = self._hash_key(action)
        body_task = None
        if exchange.body.ended and not exchange.body.size:
            self._request_done()
        else:
            body_task = self.loop.create_task(self._pump_body())
        try:
            tried: list[Host] = []
            while True:
                host = runtime.balancer.choose(
                    self.router.rng,
                    hash_key=hash_key,
                    tried=tried if action.retry and action.retry.previous_hosts else (),
                    attempts=action.retry.host_selection_attempts if action.retry else 0,
                )
                if host is None:
                    return messages.no_healthy_upstream()
                tried.append(host)
                outcome = await self._attempt(runtime, host, action, retry)
                if outcome is None:
                    return None  # the response went downstream
                if self.timed_out:
                    return messages.upstream_timeout()
                reply, retryable = outcome
                if not retryable or not self._can_retry(runtime, retry):
                    if retryable and retry is not None and retry.remaining == 0:
                        rec.flags = "URX"
                    return reply
                assert retry is not None
                wait = retry.take() or 0.0
                runtime.retries += 1
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.timeout_event.wait(), wait)
                finally:
                    runtime.retries -= 1
                if self.timed_out:
                    return messages.upstream_timeout()
        finally:
            if self.timeout_handle is not None:
                self.timeout_handle.cancel()
            if body_task is not None and not body_task.done():
                if self.current is not None and self.current.committed:
                    # The answer is under way (or the connection upgraded): the request
                    # body (or the client's side of the tunnel) still flows upstream.
                    self.router.tasks.add(body_task)
                    body_task.add_done_callback(self.router.tasks.discard)
                else:
                    body_task.cancel()

    def _can_retry(self, runtime: ClusterRuntime, retry: RetryState | None) -> bool:
        return (
            retry is not None
            and retry.remaining > 0
            and not self.any_1xx
            and not self.buffer_overflowed
            and not self.timed_out
            and runtime.retries < runtime.cluster.thresholds.max_retries
        )

    def _hash_key(self, action: Forward) -> int | None:
        head = self.exchange.head
        for policy in action.hash_policies:
            value = None
            if policy.header:
                value = head.get(policy.header)
            elif policy.cookie:
                for cookie in head.get_all("cookie"):
                    for part in cookie.split(";"):
                        k, _, v = part.strip().partition("=")
                        if k == policy.cookie:
                            value = v
            elif policy.source_ip:
                value = str(self.exchange.info.get("source_ip") or "")
            elif policy.query:
                view = RequestView(
                    method=head.method, path=head.target, authority="", scheme="", headers=()
                )
                value = view.query().get(policy.query)
            if value:
                return stable_hash(value)
        return None

    def _request_done(self) -> None:
        """The downstream request is complete: the route timeout starts now (Envoy's rule)."""
        self.request_done_at = time.monotonic()
        self.request_complete.set()
        if self.timeout_s > 0 and self.timeout_handle is None:
            self.timeout_handle = self.loop.call_later(self.timeout_s, self._route_timeout)

    def _route_timeout(self) -> None:
        self.timed_out = True
        self.timeout_event.set()
        attempt = self.current
        if attempt is None:
            return
        if attempt.committed:
            # Headers are gone already: all Envoy can do is reset the stream.
            self.record.flags = "UT"
            self.record.details = "upstream_response_timeout"
            if attempt.client is not None:
                attempt.client.abort()
            self.exchange.abort()
        else:
            attempt.fail(_Failed("timeout", True))

    async def _pump_body(self) -> None:
        """Downstream body -> the current attempt, keeping a copy for retries."""
        body = self.exchange.body
        messages_in = self.record.request_messages  # gRPC: its messages, counted
        while True:
            data = await body.read()
            if data is None:
                break
            if messages_in is not None:
                messages_in.feed(data)
            if not self.buffer_overflowed:
                self.buffered_size += len(data)
                if self.buffered_size > RETRY_BUFFER_LIMIT:
                    self.buffer_overflowed = True
                    self.buffered.clear()
                else:
                    self.buffered.append(data)
            attempt = self.current
            if attempt is not None and attempt.client is not None:
                attempt.client.data(data)
                await attempt.client.drain()
        self._request_done()
        attempt = self.current
        if attempt is not None and attempt.client is not None:
            if self.exchange.head.upgrade is not None:
                attempt.client.raw_end()
            else:
                attempt.client.end()

    async def _attempt(
        self, runtime: ClusterRuntime, host: Host, action: Forward, retry: RetryState | None
    ) -> tuple[LocalReply, bool] | None:
        """One try. None: its response is on its way downstream; else the reply to give if
        no retry follows, and whether the policy would retry it."""
        rec = self.record
        rec.attempts += 1
        rec.upstream_host = host.address
        rec.upstream_workload, rec.upstream_identity = (
            host.endpoint.workload,
            host.endpoint.identity,
        )
        if runtime.requests >= runtime.cluster.thresholds.max_requests:
            runtime.overflows += 1
            return messages.overflow(), False
        attempt = _Attempt(self, host)
        self.current = attempt
        runtime.requests += 1
        host.active += 1
        per_try_handle = None
        retried = rec.attempts > 1
        try:
            try:
                client = await runtime.acquire(host)
            except Overflow:
                return messages.overflow(), False
            except ConnectFailed as e:
                runtime.record(host, 0)
                reply = messages.upstream_reset(e.reason, e.detail, retried=retried)
                rec.flags = reply.flag
                return reply, retry is not None and retry.wants_reset(e.reason, False)
            if self.timed_out:
                client.abort()
                return messages.upstream_timeout(), False
            attempt.client = client
            self._send(client, attempt)
            per_try = action.retry.per_try_timeout_s if action.retry else 0.0
            if per_try > 0:
                per_try_handle = self.loop.call_later(per_try, attempt.fail, _PerTryTimeout())
            try:
                response = await attempt.head
            except _PerTryTimeout:
                client.abort()
                runtime.record(host, 0)
                rec.flags = "UT"
                wants = retry is not None and retry.wants_timeout()
                return messages.upstream_timeout(per_try=True), wants
            except _Failed as e:
                client.abort()
                if e.reason == "timeout":
                    rec.flags = "UT"
                    return messages.upstream_timeout(), False
                runtime.record(host, 0)
                reply = messages.upstream_reset(e.reason, e.detail, retried=retried)
                rec.flags = reply.flag
                return reply, retry is not None and retry.wants_reset(e.reason, e.sent)
            finally:
                if per_try_handle is not None:
                    per_try_handle.cancel()
            runtime.record(host, response.status)
            if retry is not None and retry.wants_status(response.status, response.headers):
                if self._can_retry(runtime, retry):
                    client.abort()  # this answer goes nowhere: the next attempt's will
                    return LocalReply(response.status), True
                if retry.remaining == 0:
                    rec.flags = "URX"
            rec.flags = "-" if rec.flags in ("UF", "UC", "UR", "UT") else rec.flags
            self._commit(attempt, response)
            return None
        finally:
            runtime.requests -= 1
            host.active -= 1
            if self.current is attempt and not attempt.committed:
                self.current = None

    def _send(self, client: Upstream, attempt: _Attempt) -> None:
        """The request head, what is buffered of the body, and its end if it came."""
        upstream = self.upstream_head
        assert upstream is not None
        body = self.exchange.body
        complete = self.request_done_at is not None and not self.buffer_overflowed
        if complete:
            length: int | None = self.buffered_size
            has_body = bool(length)
            if not has_body:
                length = None
        else:
            declared = self.exchange.head.get("content-length")
            length = int(declared) if declared is not None and declared.isdigit() else None
            has_body = True
        if upstream.upgrade is not None:
            has_body, length = False, None
        client.send(upstream, attempt, has_body=has_body, length=length)
        for chunk in self.buffered:
            client.data(chunk)
        if complete and upstream.upgrade is None:
            client.end()
        elif complete and body.ended:
            client.raw_end()

    # ------------------------------------------------------------ the response

    def informational(self, status: int, headers: Headers) -> None:
        if status == 100 and self.exchange.head.version == "1.1":
            self.any_1xx = True
            self.exchange.informational(status, messages.without_hop_by_hop(headers))

    def _commit(self, attempt: _Attempt, response: ResponseHead) -> None:
        """This attempt's answer is the one: it goes downstream, body and all."""
        exchange = self.exchange
        rec = self.record
        attempt.committed = True
        self.response_started = True
        elapsed = (time.monotonic() - (self.request_done_at or attempt.started)) * 1000
        rec.upstream_service_ms = elapsed
        rec.status = response.status
        upgraded = response.status == 101 and exchange.head.upgrade is not None
        headers = messages.without_hop_by_hop(response.headers, keep_upgrade=upgraded)
        route = self.route
        if route is not None and route.response_headers:
            headers = mutate(headers, route.response_headers)
        headers.append(("x-envoy-upstream-service-time", str(int(elapsed))))
        if self.manager.overwrite_server:
            headers = [(k, v) for k, v in headers if k != "server"]
            headers.append(("server", self.manager.server_name))
        if not any(k == "date" for k, _ in headers):
            headers.append(("date", http_date()))
        rec.grpc_status = next((v for k, v in headers if k == "grpc-status"), "")
        head = ResponseHead(status=response.status, headers=headers, reason=response.reason)
        self.response_head, rec.details = head, rec.details or "via_upstream"
        bodyless = messages.body_forbidden(exchange.head.method, response.status) and not upgraded
        # An answer that is already complete without a body goes out as headers alone
        # (a gRPC trailers-only response must stay one: grpc-status in the headers).
        complete = attempt.ended and not attempt.pending and not attempt.trailers
        exchange.respond(head, end=(bodyless or complete) and attempt.ended and not upgraded)
        if upgraded:
            head.headers.append(("upgrade", response.get("upgrade") or ""))
        pending, attempt.pending = attempt.pending, []
        for data in pending:
            self.forward(attempt, data)
        if attempt.ended:
            self.finish(attempt)

    def forward(self, attempt: _Attempt, data: bytes) -> None:
        exchange = self.exchange
        exchange.write(data)
        if (messages_out := self.record.response_messages) is not None:
            messages_out.feed(data)
        client = attempt.client
        if client is not None and exchange.write_paused:
            client.pause_reading()
            task = self.loop.create_task(self._resume_after_drain(client))
            self.router.tasks.add(task)
            task.add_done_callback(self.router.tasks.discard)

    async def _resume_after_drain(self, client: Upstream) -> None:
        with contextlib.suppress(DownstreamGone):
            await self.exchange.drain()
        client.resume_reading()

    def finish(self, attempt: _Attempt) -> None:
        if attempt.trailers:
            self.record.grpc_status = next(
                (v for k, v in attempt.trailers if k == "grpc-status"), self.record.grpc_status
            )
        if not self.exchange.ended:
            self.exchange.end(attempt.trailers)

    def upstream_broke(self, reason: str) -> None:
        """The upstream reset mid-response: nothing to do but reset downstream too."""
        self.record.flags = "UR" if "reset" in reason else "UC"
        self.exchange.abort()

    # ------------------------------------------------------------ mirrors

    def _mirror(self, cluster: str, upstream: RequestHead) -> None:
        runtime = self.router.upstreams.clusters.get(cluster)
        if runtime is None:
            return
        shadow = mirror.shadow(
            runtime,
            mirror.shadow_head(upstream),
            self.router.rng,
            self.request_complete,
            self._mirrored_body,
        )
        task = self.loop.create_task(shadow)
        self.router.tasks.add(task)
        task.add_done_callback(self.router.tasks.discard)

    def _mirrored_body(self) -> bytes | None:
        """The whole request body for the mirrors; None when it was not kept or failed."""
        if self.buffer_overflowed or self.exchange.body.error is not None:
            return None
        return b"".join(self.buffered)
