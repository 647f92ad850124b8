"""The gRPC shell of the ADS server: ``DeltaAggregatedResources`` over grpc.aio.

Each stream has a reader (requests into its :class:`Subscription`) and a
writer loop (responses out, one per type in flight). A snapshot change only
wakes the writers; what each sends is worked out by its subscription. A
stream that sends garbage is ended with INVALID_ARGUMENT; the others never
notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.ads.cache import Changes, Snapshot, SnapshotCache
from controlplane.ads.subscription import InvalidRequest, ScopeOf, Subscription, no_scope

log = logging.getLogger("controlplane.ads")


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves a :class:`SnapshotCache` to every subscriber over Delta ADS."""

    def __init__(
        self, cache: SnapshotCache, *, logger: logging.Logger = log, scope_of: ScopeOf = no_scope
    ) -> None:
        self.cache = cache
        self.log = logger
        self.scope_of = scope_of
        # Envoy's Cluster -> ClusterLoadAssignment warming (see Subscription).
        self.resend_with: dict[str, str] = {}
        self.subscriptions: set[Subscription] = set()
        self.streams_total = 0

    def add_to(self, server: grpc.aio.Server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "meshd serves Delta xDS only: use DeltaAggregatedResources",
        )

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        peer = context.peer()
        subscription = Subscription(
            self.cache.type_urls,
            peer,
            scoped_types=self.cache.scoped_type_urls,
            scope_of=self.scope_of,
            resend_with=self.resend_with,
        )
        wake = asyncio.Event()

        def changed(snapshot: Snapshot, names: Changes) -> None:
            subscription.on_change(names)
            wake.set()

        async def read() -> None:
            async for request in request_iterator:
                nack = subscription.on_request(request, self.cache.snapshot)
                if nack is not None:
                    self.log.warning(
                        "ads: %s (%s) refused %d %s resources (%s): %s",
                        subscription.node_id or peer,
                        peer,
                        len(nack.refused),
                        nack.type_url.rsplit("/", 1)[-1],
                        ", ".join(nack.refused[:5]),
                        nack.message,
                    )
                wake.set()

        self.cache.subscribe(changed)
        self.subscriptions.add(subscription)
        self.streams_total += 1
        reader = asyncio.ensure_future(read())
        waiter: asyncio.Future[Any] | None = None
        try:
            while True:
                waiter = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    waiter.cancel()
                    error = reader.exception()
                    if isinstance(error, InvalidRequest):
                        self.log.warning("ads: ending stream from %s: %s", peer, error)
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                    if error is not None and not isinstance(error, asyncio.CancelledError):
                        raise error
                    # The subscriber ended its side; flush nothing more.
                    return
                wake.clear()
                if not self.cache.ready:
                    continue  # requests are recorded; answers wait for the first state
                while (response := subscription.next_response(self.cache.snapshot)) is not None:
                    await context.write(response)
        finally:
            self.cache.unsubscribe(changed)
            self.subscriptions.discard(subscription)
            # A handler cancelled in asyncio.wait leaves its waiter pending on
            # an event nobody sets any more: end both tasks, not only the reader.
            pending = [t for t in (reader, waiter) if t is not None]
            for task in pending:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*pending, return_exceptions=True)

    def status(self) -> list[dict[str, object]]:
        return [s.status() for s in self.subscriptions]
