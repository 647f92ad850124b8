"""Request mirroring (Envoy's shadow): a copy of a request to a mirror cluster, fire and forget.

The router decides which mirrors a request gets (each mirror's share of
requests, by the stream's random value) and starts :func:`shadow` for each;
the copy goes to an endpoint of the mirror cluster with the original's
headers, its Host suffixed ``-shadow``, once the whole request body has
arrived. Its answer, or its failure, is dropped: a mirror never changes what
the client gets. The body is the copy the router keeps for retries: one
larger than that buffer, or one that failed, is not mirrored.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

from waypoint.headers import shadow_host
from waypoint.http.messages import Headers, RequestHead, ResponseHead
from waypoint.upstream.pool import ClusterRuntime, ConnectFailed, Overflow

WAIT_S = 30.0  # for the request body to complete, then for the mirror's answer


def shadow_head(upstream: RequestHead) -> RequestHead:
    """The mirror's request head: the upstream request's, to ``<host>-shadow``."""
    return RequestHead(
        method=upstream.method,
        target=upstream.target,
        authority=shadow_host(upstream.authority),
        scheme=upstream.scheme,
        headers=list(upstream.headers),
    )


async def shadow(
    runtime: ClusterRuntime,
    head: RequestHead,
    rng: random.Random,
    complete: asyncio.Event,
    body: Callable[[], bytes | None],
) -> None:
    """Send ``head`` to an endpoint of ``runtime``'s cluster, with ``body()`` once
    ``complete`` is set (None: the body cannot be mirrored), and drop the answer."""
    host = runtime.balancer.choose(rng)
    if host is None:
        return
    sink = _Sink()
    try:
        client = await runtime.acquire(host)
    except (ConnectFailed, Overflow):
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(complete.wait(), WAIT_S)
    data = body() if complete.is_set() else None
    if data is None:
        client.abort()
        return
    client.send(head, sink, has_body=bool(data), length=len(data) if data else None)
    if data:
        client.data(data)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(WAIT_S):
            await sink.done


class _Sink:
    """The receiver of a mirrored request's answer: it ignores it."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_informational(self, status: int, headers: Headers) -> None:
        pass

    def on_response(self, head: ResponseHead) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        pass

    def on_end(self, trailers: Headers | None = None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_reset(self, reason: str, sent: bool) -> None:
        self.on_end()
