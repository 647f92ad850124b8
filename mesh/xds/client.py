"""The proxies' xDS client: one Delta ADS stream to meshd, kept alive.

It subscribes to every type it knows (wildcard), announces what it already
holds on reconnect (``initial_resource_versions``, so meshd sends only what
changed), applies each response as a new immutable :class:`XdsState`, ACKs
it, or NACKs the resources it refused while applying the rest. When meshd
is away it keeps serving the last good state and reconnects with
exponential backoff and jitter.

Keepalive is istio's (ztunnel's control-plane channel, istiod's default):
an HTTP/2 PING every 30 s, the connection dropped when one goes unanswered
for 10 s. The pings go on for as long as the stream is quiet (meshd may
have nothing to say for hours); meshd's server options permit them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Generic

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, struct_pb2
from google.rpc import status_pb2

from mesh.xds.state import TYPE_URLS, Applied, S, XdsState, apply_response

log = logging.getLogger("mesh.xds")
_INVALID_ARGUMENT = 3
_MAX_MESSAGE = 64 * 1024 * 1024
KEEPALIVE_TIME_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0


Apply = Callable[[S, str, Iterable[tuple[str, str, any_pb2.Any]], Iterable[str]], Applied[S]]


class FeedClient(Generic[S]):
    """Keeps a proxy's state current from meshd; ``on_update`` hears every change.

    ``apply`` turns one response into the next state (sans I/O); ztunnel's is
    :func:`mesh.xds.state.apply_response`, the waypoint has its own for
    Envoy's resource types.
    """

    def __init__(
        self,
        target: str,
        *,
        node_id: str,
        state: S,
        apply: Apply[S],
        type_urls: Sequence[str],
        node_metadata: struct_pb2.Struct | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        on_update: Callable[[S], None] | None = None,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
        keepalive_time_s: float = KEEPALIVE_TIME_S,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        rng: random.Random | None = None,
        logger: logging.Logger = log,
    ) -> None:
        self.target = target
        self.node_id = node_id
        self.node_metadata = node_metadata
        self._apply = apply
        self.credentials = credentials
        self.metadata = tuple(metadata)
        self.on_update = on_update
        self.type_urls = tuple(type_urls)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.keepalive_time_s = keepalive_time_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.rng = rng or random.Random()
        self.log = logger
        self.state = state
        self.connected = False
        self.connects = 0
        self.nacks_sent = 0
        self.last_error = ""
        self._synced = asyncio.Event()

    async def wait_synced(self, timeout_s: float | None = None) -> S:
        """Wait until every subscribed type has had its first response."""
        async with asyncio.timeout(timeout_s):
            await self._synced.wait()
        return self.state

    async def run(self) -> None:
        """Stay connected until cancelled."""
        delay = self.backoff_initial_s
        while True:
            try:
                got_response = await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                got_response = False
                self._lost(f"{e.code().name}: {e.details()}")
            except Exception as e:  # a bug must not end the proxy's feed for good
                got_response = False
                self._lost(f"{type(e).__name__}: {e}")
            else:
                self._lost("meshd ended the stream")
            if got_response:
                delay = self.backoff_initial_s
            # Full jitter: spread reconnects of many proxies after a meshd restart.
            await asyncio.sleep(self.rng.uniform(delay / 2, delay))
            delay = min(self.backoff_max_s, delay * 2)

    def _lost(self, reason: str) -> None:
        was = self.connected
        self.connected = False
        self.last_error = reason
        self.log.warning(
            "xds: %s meshd at %s (%s); keeping the last good state (%s)",
            "lost" if was else "cannot reach",
            self.target,
            reason,
            self.state.summary(),
        )

    def channel_options(self) -> list[tuple[str, int]]:
        keepalive_ms = max(1, round(self.keepalive_time_s * 1000))
        timeout_ms = max(1, round(self.keepalive_timeout_s * 1000))
        return [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            # gRPC core waits for a keepalive PING's ACK this long (default
            # 1 min, whatever keepalive_timeout_ms says).
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            # By default the client pings twice without sending data, then
            # only once a minute: keep pinging while the stream is quiet.
            ("grpc.http2.max_pings_without_data", 0),
        ]

    async def _session(self) -> bool:
        options = self.channel_options()
        if self.credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            channel = grpc.aio.secure_channel(self.target, self.credentials, options=options)
        # None ends the request stream (and grpc's task that consumes it).
        queue: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = asyncio.Queue()
        got_response = False
        call: grpc.aio.StreamStreamCall[Any, Any] | None = None

        async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
            while (request := await queue.get()) is not None:
                yield request

        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources(requests(), metadata=self.metadata)
            node = base_pb2.Node(id=self.node_id)
            if self.node_metadata is not None:
                node.metadata.CopyFrom(self.node_metadata)
            for type_url in self.type_urls:
                queue.put_nowait(
                    discovery_pb2.DeltaDiscoveryRequest(
                        node=node,
                        type_url=type_url,
                        resource_names_subscribe=["*"],
                        initial_resource_versions=dict(self.state.versions.get(type_url, {})),
                    )
                )
            async for response in call:
                if not got_response:
                    got_response = True
                    self.connected = True
                    self.connects += 1
                    self.log.info("xds: connected to meshd at %s", self.target)
                queue.put_nowait(self._handle(response))
        finally:
            # End the request generator before the channel goes: grpc's task
            # consuming it would otherwise wait on the queue forever (and be
            # destroyed pending, its generator closed while still running).
            queue.put_nowait(None)
            if call is not None:
                call.cancel()
            await channel.close()
        return got_response

    def _handle(
        self, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        applied = self._apply(
            self.state,
            response.type_url,
            ((r.name, r.version, r.resource) for r in response.resources),
            response.removed_resources,
        )
        if applied.changed:
            self.state = applied.state
            if self.state.synced:
                self._synced.set()
            if self.on_update is not None:
                self.on_update(self.state)
        answer = discovery_pb2.DeltaDiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce
        )
        if applied.refused:
            self.nacks_sent += 1
            self.log.warning(
                "xds: refusing %d resources from meshd: %s",
                len(applied.refused),
                applied.nack_message,
            )
            answer.error_detail.CopyFrom(
                status_pb2.Status(
                    code=_INVALID_ARGUMENT,
                    message=applied.nack_message,
                    details=applied.refused_details(),
                )
            )
        return answer


class XdsClient(FeedClient[XdsState]):
    """ztunnel's client: the Workload API and Authorization types into an :class:`XdsState`."""

    def __init__(
        self,
        target: str,
        *,
        node_id: str,
        type_urls: Sequence[str] = TYPE_URLS,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            target,
            node_id=node_id,
            state=XdsState(),
            apply=apply_response,
            type_urls=type_urls,
            **kwargs,
        )


async def close_quietly(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
