"""The HTTP filter chain a request passes before the router forwards it.

What Envoy's connection manager and its decoder filters do ahead of the
router filter, in their order (:mod:`waypoint.router` sequences them):

- the connection manager's work (:func:`sanitize`, :func:`request_id`):
  normalise the path, drop hop-by-hop and Envoy-internal headers, refuse an
  upgrade the listener does not allow, add ``x-forwarded-proto`` and
  ``x-request-id`` when absent;
- the filters before route selection (:func:`before_route`): the local rate
  limit filter when it is first (:mod:`waypoint.ratelimit`: 429 ``RL``, with
  the route's per-route config when it has one), the JWT authentication
  filter (:mod:`waypoint.jwt_authn`: 401 or 403, and the token's payload as
  dynamic metadata) and the RBAC filters (:mod:`waypoint.authz`, which see
  that metadata: 403);
- after the route is chosen: the fault filter (:func:`fault`: delay, abort)
  and the local rate limit filter when it is just before the router
  (:func:`local_limit`).

Each answers a :class:`~waypoint.http.messages.LocalReply` when it stops the
request, else None. When the request is over, :func:`finished` does what the
connection manager does last: the span ends (:mod:`waypoint.tracing`), the
access logs get their lines (:mod:`waypoint.accesslog`).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

from waypoint import authz, jwt_authn
from waypoint.accesslog import AccessLogEntry, loggers
from waypoint.config.model import HttpManager, Route, RouteConfig
from waypoint.http import messages
from waypoint.http.exchange import Exchange
from waypoint.http.messages import LocalReply, RequestHead, ResponseHead
from waypoint.match import RequestView, normalize_path, select_route
from waypoint.ratelimit import RateLimiter
from waypoint.records import RequestRecord
from waypoint.tracing import Tracer


def sanitize(head: RequestHead, manager: HttpManager) -> LocalReply | None:
    """The connection manager's work on the request head, in place; a reply when it refuses."""
    if manager.normalize_path:
        head.target = normalize_path(head.target)
    head.headers = messages.without_hop_by_hop(
        (h for h in head.headers if h[0] not in messages.ENVOY_INTERNAL),
        keep_upgrade=head.upgrade is not None,
    )
    if head.upgrade is not None and not manager.websocket:
        return LocalReply(403, b"", details="upgrade_failed")
    if not any(k == "x-forwarded-proto" for k, _ in head.headers):
        head.headers.append(("x-forwarded-proto", head.scheme))
    return None


def request_id(head: RequestHead) -> str:
    """The request's ``x-request-id``, added (a fresh UUID) when absent."""
    found = next((v for k, v in head.headers if k == "x-request-id"), None)
    if found is None:
        found = str(uuid.uuid4())
        head.headers.append(("x-request-id", found))
    return found


def request_view(head: RequestHead) -> RequestView:
    """What route matching sees of the request."""
    return RequestView(
        method=head.method,
        path=head.target,
        authority=head.authority,
        scheme=head.scheme,
        headers=head.headers,
    )


def before_route(
    head: RequestHead,
    info: dict[str, Any],
    manager: HttpManager,
    routes: RouteConfig | None,
    limiter: RateLimiter,
    rng: random.Random,
) -> LocalReply | None:
    """The filters ahead of route selection: local rate limit (when first), JWT, RBAC."""
    metadata: dict[str, Any] = {}
    if manager.ratelimit is not None and manager.ratelimit_first:
        # Envoy's filter asks for the route (to read its typed_per_filter_config)
        # before the JWT and RBAC filters run (jwt_authn may change the headers and
        # clear the route cache: the router picks the route again after them).
        early = select_route(routes, request_view(head)) if routes is not None else None
        if (reply := local_limit(limiter, rng, manager, early)) is not None:
            return reply
    if manager.jwt is not None:
        denial, metadata = jwt_authn.jwt_denial(manager.jwt, head)
        if denial is not None:
            return denial
    if manager.rbac and (denial := authz.http_denial(manager.rbac, info, head, metadata)):
        return denial
    return None


def local_limit(
    limiter: RateLimiter, rng: random.Random, manager: HttpManager, route: Route | None
) -> LocalReply | None:
    """The local rate limit filter: the route's config if it has one, else the filter's."""
    assert manager.ratelimit is not None
    if route is not None and route.ratelimit is not None:
        where: tuple[str, ...] = ("route", manager.route_config, route.name)
        if not route.name:
            where += (repr(route.match),)
        return limiter.check(route.ratelimit, where, rng)
    where = ("filter", manager.stat_prefix, manager.route_config)
    return limiter.check(manager.ratelimit, where, rng)


async def fault(
    route: Route, rng: random.Random, record: RequestRecord, exchange: Exchange
) -> LocalReply | None:
    """The fault filter: a delay, then an abort (a gRPC abort is answered here, as headers)."""
    fault = route.fault
    assert fault is not None
    if fault.delay_s is not None and rng.randrange(1_000_000) < fault.delay_ppm:
        record.flags = "DI"
        await asyncio.sleep(fault.delay_s)
    if rng.randrange(1_000_000) < fault.abort_ppm:
        if fault.abort_grpc_status is not None:
            record.flags = "FI"
            head = ResponseHead(
                status=200,
                headers=[
                    ("content-type", "application/grpc"),
                    ("grpc-status", str(fault.abort_grpc_status)),
                    ("grpc-message", "fault filter abort"),
                    ("content-length", "0"),
                ],
            )
            exchange.respond(head, end=True)
            record.status = 200
            record.grpc_status = str(fault.abort_grpc_status)
            return None
        if fault.abort_status is not None:
            return messages.fault_abort(fault.abort_status)
    return None


def finished(
    tracer: Tracer | None,
    rec: RequestRecord,
    manager: HttpManager,
    head: RequestHead,
    upstream: RequestHead | None,
    response: ResponseHead | None,
) -> None:
    """The request is over: its span ends, its access log lines are written (the request
    as it went upstream, with ``x-envoy-original-path`` when rewritten, as Envoy logs it)."""
    if rec.trace is not None and tracer is not None:
        tracer.finish(rec.trace, rec, rec.operation, head.scheme)
    if manager.stats is not None:
        rec.stats, rec.request_headers = manager.stats, (upstream or head).headers
    if not manager.access_logs:
        return
    sent = upstream or head
    headers = [(":path", sent.target), (":authority", sent.authority), *sent.headers]
    if sent.target != rec.path:
        headers.append(("x-envoy-original-path", rec.path))
    entry = AccessLogEntry(
        rec,
        request_headers=headers,
        response_headers=response.headers if response is not None else None,
        scheme=head.scheme,
    )
    for logger in loggers(manager.access_logs):
        logger.log(entry)
