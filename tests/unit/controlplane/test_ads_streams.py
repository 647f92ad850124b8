"""The life of ADS streams: keepalive on a quiet stream, reconnects and ended streams leak nothing.

meshd's ADS server runs with its real gRPC server options (see ``meshd`` in
``test_ads``) and the proxies' :class:`XdsClient` with its real channel
options, only the keepalive shortened.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.meshd import grpc_server_options
from mesh.model import ADDRESS_TYPE_URL
from mesh.xds import XdsClient
from mesh.xds.client import KEEPALIVE_TIME_S
from tests.unit.controlplane.test_ads import client, eventually, meshd, world
from tests.unit.hbone.conftest import run


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler ("Task was destroyed but it is pending!", ...)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


def described(errors: list[dict[str, Any]]) -> list[str]:
    return [f"{e.get('message')}: {e.get('task') or e.get('exception')!r}" for e in errors]


async def settle() -> None:
    """Let cancelled tasks finish, then collect what is left, so leaks show up now."""
    for _ in range(3):
        await asyncio.sleep(0.05)
        gc.collect()
    await asyncio.sleep(0.05)


def request_consumers() -> list[asyncio.Task[Any]]:
    """grpc's tasks feeding a request iterator into a call, still running."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and "_consume_request_iterator" in repr(t.get_coro())
    ]


def new_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since ``before`` and still pending, grpc's own serving loop aside."""
    return [
        t
        for t in asyncio.all_tasks() - before
        if not t.done() and "AioServer._request_registered_call" not in repr(t)
    ]


def test_meshd_permits_the_proxies_keepalive() -> None:
    options = dict(grpc_server_options())
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_ping_strikes"] == 0
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= KEEPALIVE_TIME_S * 1000
    assert "grpc.http2.min_recv_ping_interval_without_data_ms" not in options  # no such option


def test_a_quiet_stream_is_not_sent_away_for_its_keepalive_pings() -> None:
    """gRPC's default server policy answers the third early ping with GOAWAY too_many_pings."""

    async def body() -> None:
        async with (
            meshd(world()) as m,
            client(m.target, keepalive_time_s=0.5, keepalive_timeout_s=5) as c,
        ):
            await c.wait_synced(5)
            await eventually(lambda: m.subscription().in_sync(m.cache.snapshot))
            # Nothing to say for a while: only pings cross the connection.
            await asyncio.sleep(6)
            assert c.connected
            assert c.connects == 1, f"reconnected: {c.last_error}"
            assert c.last_error == ""
            assert m.ads.streams_total == 1

    run(body)


def test_a_reconnect_leaves_no_stream_behind_and_keeps_the_state() -> None:
    async def body() -> None:
        with loop_errors() as errors:
            async with meshd(world(2)) as m:
                port = int(m.target.rsplit(":", 1)[1])
                async with client(m.target) as c:
                    await c.wait_synced(5)
                    held = dict(c.state.workloads)
                    # meshd goes away and comes back.
                    await m.server.stop(grace=0)
                    await eventually(lambda: not c.connected)
                    async with meshd(world(2), port=port) as m2:
                        await eventually(lambda: c.connected and len(m2.ads.subscriptions) == 1)
                        await eventually(lambda: m2.subscription().in_sync(m2.cache.snapshot))
                        assert c.connects == 2
                        assert dict(c.state.workloads) == held
                        # Only the live stream has a request feeder.
                        await asyncio.sleep(0.1)
                        assert len(request_consumers()) == 1
                        await settle()
                        assert described(errors) == []
                # Closing the client ends its stream too.
                await settle()
                assert request_consumers() == []
            await settle()
        assert described(errors) == []

    run(body)


def test_ended_streams_leave_no_task_behind_in_meshd() -> None:
    async def body() -> None:
        with loop_errors() as errors:
            async with meshd(world(2)) as m:
                await asyncio.sleep(0.1)
                before = asyncio.all_tasks()
                for n in range(6):
                    channel = grpc.aio.insecure_channel(m.target)
                    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                    call = stub.DeltaAggregatedResources()
                    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL))
                    first = await call.read()
                    assert len(first.resources) == 3
                    await eventually(lambda: len(m.ads.subscriptions) == 1)
                    # The subscriber goes: it cancels, hangs up, or ends its side.
                    if n % 3 == 0:
                        call.cancel()
                    elif n % 3 == 1:
                        await call.done_writing()
                        assert await call.code() == grpc.StatusCode.OK
                    await channel.close()
                    await eventually(lambda: not m.ads.subscriptions)
                assert m.ads.streams_total == 6
                await asyncio.sleep(0.2)
                assert new_tasks(before) == []
                await settle()
            await settle()
        assert described(errors) == []

    run(body)


def test_the_client_channel_options_follow_its_keepalive() -> None:
    options = dict(
        XdsClient("x", node_id="n", keepalive_time_s=2, keepalive_timeout_s=1.5).channel_options()
    )
    assert options["grpc.keepalive_time_ms"] == 2000
    assert options["grpc.keepalive_timeout_ms"] == 1500
    assert options["grpc.http2.ping_timeout_ms"] == 1500
    assert options["grpc.http2.max_pings_without_data"] == 0
