"""The feed end to end, through real gRPC: meshd's ADS server and the proxies' client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from controlplane.ads.cache import Entry, SnapshotCache
from controlplane.ads.feed import TYPE_URLS, Feed
from controlplane.ads.server import AdsServer
from controlplane.ads.subscription import Subscription
from controlplane.authz_yaml import parse_authorization_policy
from controlplane.meshd import grpc_server_options
from controlplane.state import (
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    frozen_labels,
)
from controlplane.translate import translate
from mesh.model import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, TunnelProtocol
from mesh.proto.istio.workload import workload_pb2
from mesh.xds import XdsClient, XdsState
from tests.unit.hbone.conftest import run


def pod(name: str, ip: str, ns: str = "apps", **labels: str) -> PodInfo:
    return PodInfo(
        uid=name,
        name=name,
        namespace=ns,
        node="node1",
        ip=ip,
        labels=frozen_labels({"app": "web", **labels}),
    )


def world(pods: int = 3, ambient: bool = False) -> SourceState:
    return SourceState(
        namespaces=(
            NamespaceInfo(
                name="apps",
                labels=frozen_labels({"istio.io/dataplane-mode": "ambient"} if ambient else {}),
            ),
        ),
        pods=tuple(pod(f"p{i}", f"10.244.0.{i + 2}") for i in range(pods)),
        services=(
            ServiceInfo(
                name="web",
                namespace="apps",
                cluster_ips=("10.96.0.10",),
                ports=(ServicePortInfo(port=80, target_port=8080),),
                selector=frozen_labels({"app": "web"}),
            ),
        ),
    )


@dataclass
class Meshd:
    cache: SnapshotCache
    ads: AdsServer
    feed: Feed
    server: grpc.aio.Server
    target: str

    def publish(self, state: SourceState) -> None:
        self.cache.update(self.feed.entries(translate(state)))

    def subscription(self) -> Subscription:
        (sub,) = self.ads.subscriptions
        return sub


@contextlib.asynccontextmanager
async def meshd(
    state: SourceState | None = None,
    port: int = 0,
    options: Sequence[tuple[str, Any]] | None = None,
) -> AsyncIterator[Meshd]:
    """An ADS server as meshd runs it (its gRPC server options unless told)."""
    cache = SnapshotCache(TYPE_URLS)
    ads = AdsServer(cache)
    server = grpc.aio.server(options=grpc_server_options() if options is None else options)
    ads.add_to(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    m = Meshd(cache, ads, Feed(), server, f"127.0.0.1:{bound}")
    if state is not None:
        m.publish(state)
    try:
        yield m
    finally:
        await server.stop(grace=0.2)


@contextlib.asynccontextmanager
async def client(target: str, **kwargs: Any) -> AsyncIterator[XdsClient]:
    c = XdsClient(
        target, node_id="ztunnel~node1", backoff_initial_s=0.05, backoff_max_s=0.2, **kwargs
    )
    task = asyncio.ensure_future(c.run())
    try:
        yield c
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(check: Callable[[], bool], timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 - polling a condition owned by another task
            await asyncio.sleep(0.01)


def test_subscribe_receive_and_ack() -> None:
    async def body() -> None:
        async with meshd(world()) as m, client(m.target) as c:
            state = await c.wait_synced(5)
            assert sorted(w.name for w in state.workloads.values()) == ["p0", "p1", "p2"]
            (svc,) = state.services.values()
            assert svc.hostname == "web.apps.svc.cluster.local"
            assert str(svc.addresses[0]) == "10.96.0.10"
            web = next(iter(state.workloads.values()))
            assert web.services == {"apps/web.apps.svc.cluster.local": svc.ports}
            await eventually(lambda: m.subscription().in_sync(m.cache.snapshot))
            status = m.subscription().status()
            assert status["node"] == "ztunnel~node1"
            types: Any = status["types"]
            assert types[ADDRESS_TYPE_URL]["acks"] >= 1
            assert types[ADDRESS_TYPE_URL]["resources"] == 4

    run(body)


def test_labelling_a_namespace_switches_its_workloads_to_hbone() -> None:
    async def body() -> None:
        async with meshd(world()) as m, client(m.target) as c:
            state = await c.wait_synced(5)
            assert {w.tunnel_protocol for w in state.workloads.values()} == {TunnelProtocol.NONE}
            m.publish(world(ambient=True))
            await eventually(
                lambda: (
                    {w.tunnel_protocol for w in c.state.workloads.values()}
                    == {TunnelProtocol.HBONE}
                )
            )
            # Only the three workloads changed: the service was not sent again.
            assert m.subscription().resources_sent == 4 + 3

    run(body)


def test_deletes_reach_the_proxy() -> None:
    async def body() -> None:
        async with meshd(world(3)) as m, client(m.target) as c:
            await c.wait_synced(5)
            m.publish(world(2))
            await eventually(lambda: len(c.state.workloads) == 2)
            m.publish(replace(world(2), services=()))
            await eventually(lambda: not c.state.services)

    run(body)


def test_policies_come_and_go() -> None:
    policy = parse_authorization_policy(
        {
            "metadata": {"name": "deny-db", "namespace": "apps"},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}]},
        }
    )

    async def body() -> None:
        async with meshd(world()) as m, client(m.target) as c:
            await c.wait_synced(5)
            m.publish(replace(world(), policies=(policy,)))
            await eventually(lambda: "apps/deny-db" in c.state.policies)
            got = c.state.policies["apps/deny-db"]
            assert got.action.name == "DENY"
            assert got.rules[0].clauses[0].matches[0].destination_ports == (5432,)
            m.publish(world())
            await eventually(lambda: not c.state.policies)

    run(body)


def _bad_workload() -> Entry:
    bad = workload_pb2.Address(
        workload=workload_pb2.Workload(
            uid="bad", name="bad", namespace="apps", addresses=[b"\x01\x02\x03"]
        )
    )
    return Entry("badbadbad", any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=bad.SerializeToString()))


def test_a_bad_resource_is_nacked_alone_and_not_sent_again() -> None:
    async def body() -> None:
        async with meshd() as m, client(m.target) as c:
            entries = m.feed.entries(translate(world()))
            entries[ADDRESS_TYPE_URL]["bad"] = _bad_workload()
            m.cache.update(entries)
            await c.wait_synced(5)
            await eventually(lambda: m.subscription().nacks != [])
            nack = m.subscription().nacks[-1]
            assert nack.refused == ("bad",)
            assert "3 bytes" in nack.message
            # The good ones were applied, the bad one left out.
            assert len(c.state.workloads) == 3 and "bad" not in c.state.workloads
            sent = m.subscription().resources_sent
            # An unrelated change does not resend the refused version...
            m.cache.update({**entries, AUTHORIZATION_TYPE_URL: {}})
            entries2 = m.feed.entries(translate(world(4)))
            entries2[ADDRESS_TYPE_URL]["bad"] = _bad_workload()
            m.cache.update(entries2)
            await eventually(lambda: len(c.state.workloads) == 4)
            assert m.subscription().resources_sent == sent + 1
            assert c.nacks_sent == 1

    run(body)


def test_reconnecting_announces_versions_and_gets_only_changes() -> None:
    async def body() -> None:
        async with meshd(world(50)) as m:
            target = m.target
            port = int(target.rsplit(":", 1)[1])
            async with client(target) as c:
                await c.wait_synced(5)
                held = dict(c.state.workloads)
                await m.server.stop(grace=0)
                await eventually(lambda: not c.connected)
                assert dict(c.state.workloads) == held, "the last good state is kept"
                # meshd comes back (same content, one pod changed).
                async with meshd(port=port) as m2:
                    changed = list(world(50).pods)
                    changed[7] = replace(changed[7], labels=frozen_labels({"app": "db"}))
                    m2.publish(replace(world(50), pods=tuple(changed)))
                    await eventually(lambda: c.connected and len(m2.ads.subscriptions) == 1)
                    await eventually(lambda: m2.subscription().in_sync(m2.cache.snapshot))
                    # Only the changed workload crossed the wire again.
                    assert m2.subscription().resources_sent == 1
                    p7 = next(w for w in c.state.workloads.values() if w.name == "p7")
                    assert p7.services == {}

    run(body)


def test_a_subscriber_sending_garbage_is_refused_and_others_go_on() -> None:
    async def body() -> None:
        async with meshd(world()) as m, client(m.target) as good:
            await good.wait_synced(5)
            channel = grpc.aio.insecure_channel(m.target)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)

            async def garbage() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
                yield discovery_pb2.DeltaDiscoveryRequest()  # no type_url
                await asyncio.sleep(1)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.DeltaAggregatedResources(garbage()):
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "type_url" in (info.value.details() or "")
            await channel.close()
            m.publish(world(4))
            await eventually(lambda: len(good.state.workloads) == 4)

    run(body)


def test_a_slow_subscriber_gets_the_latest_state_not_a_queue() -> None:
    async def body() -> None:
        async with meshd(world(1)) as m:
            channel = grpc.aio.insecure_channel(m.target)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            queue: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()
            queue.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL))

            async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
                while True:
                    yield await queue.get()

            call = stub.DeltaAggregatedResources(requests())
            first = await call.read()
            assert len(first.resources) == 2
            # 100 changes while the subscriber sits on its first response...
            for n in range(2, 102):
                m.publish(world(n))
            await asyncio.sleep(0.2)
            assert m.subscription().responses_sent == 1
            # ...and one response with the latest state once it answers.
            queue.put_nowait(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=ADDRESS_TYPE_URL, response_nonce=first.nonce
                )
            )
            second = await call.read()
            assert len(second.resources) == 100
            assert m.subscription().responses_sent == 2
            call.cancel()
            await channel.close()

    run(body)


def test_large_states_arrive_in_chunks() -> None:
    async def body() -> None:
        big = replace(
            world(0),
            pods=tuple(
                pod(f"p{i}", f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}") for i in range(4500)
            ),
        )
        async with meshd(big) as m, client(m.target) as c:
            await c.wait_synced(10)
            await eventually(lambda: len(c.state.workloads) == 4500, 15)
            assert m.subscription().responses_sent >= 3

    run(body, timeout_s=60)


def test_the_proxy_keeps_serving_while_meshd_is_away_and_resyncs() -> None:
    seen: list[XdsState] = []

    async def body() -> None:
        async with meshd(world(2)) as m:
            port = int(m.target.rsplit(":", 1)[1])
            async with client(m.target, on_update=seen.append) as c:
                await c.wait_synced(5)
                await m.server.stop(grace=0)
                await asyncio.sleep(0.3)
                assert len(c.state.workloads) == 2
                async with meshd(world(3), port=port):
                    await eventually(lambda: len(c.state.workloads) == 3)
                assert c.connects == 2

    run(body)
    assert all(len(s.workloads) >= 2 for s in seen)


def test_no_answer_before_the_first_state_from_the_source() -> None:
    async def body() -> None:
        async with meshd() as m, client(m.target) as c:
            await eventually(lambda: len(m.ads.subscriptions) == 1)
            await asyncio.sleep(0.3)
            assert not c.state.synced, "an empty world must not pass for the whole one"
            m.publish(world(2))
            state = await c.wait_synced(5)
            assert len(state.workloads) == 2

    run(body)
