"""Pods bound to the waypoint as workloads: meshd's ORIGINAL_DST clusters, read and relayed.

The conversion keeps what we do (the connection's own destination, over HBONE
with the pod's identity from the cluster's metadata, or plain TCP) and refuses
every ORIGINAL_DST setting we do not; the relay sends a stream to the address
it was dialled at, and only when that is the pod its filter chain names. End
to end: HBONE in to our waypoint, HBONE out to a stand-in for the pod's
ztunnel on ``podIP:15008``, which sees ``:authority`` ``podIP:port`` and the
waypoint's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane.l7 import envoy
from controlplane.l7.build import build
from controlplane.meshd import Meshd, grpc_server_options
from controlplane.state import SourceState, frozen_labels
from mesh.hbone import (
    HboneClientPool,
    HboneServer,
    LocalSocket,
    PlainProtocol,
    PoolKey,
    StatusError,
    TlsIdentity,
    open_upstream,
)
from mesh.hbone.server import ConnectRequest
from mesh.identity import SpiffeId, generate_key_and_csr
from mesh.identity.store import WorkloadCertificate
from tests.support.l7world import WAYPOINT, pod, world
from tests.support.waypoint_harness import Backend, config_for
from tests.unit.hbone.conftest import Pki, issue, run
from waypoint.config import convert
from waypoint.config import model as m
from waypoint.proxy import original_destination
from waypoint.runtime import WaypointRuntime

POD = "inbound-pod|10.244.1.11"
REVIEWS = "spiffe://cluster.local/ns/shop/sa/reviews"
WAYPOINT_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/waypoint")
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/client/sa/client")


def workload_world(**changes: Any) -> SourceState:
    return world(waypoints=(replace(WAYPOINT, waypoint_for="all"),), **changes)


def meshd_cluster(name: str = POD) -> cluster_pb2.Cluster:
    share = build(workload_world()).shares["shop/waypoint"]
    return envoy.translate(share).clusters[name]


# ------------------------------------------------------------------ conversion


def test_meshds_pod_clusters_become_original_dst_clusters() -> None:
    config = config_for(workload_world())  # every resource accepted
    cluster = config.clusters[POD]
    assert cluster.lb is m.LbPolicy.CLUSTER_PROVIDED
    assert cluster.original_dst == m.OriginalDst(
        hbone=True, identity=REVIEWS, workload="reviews-v1-a;shop;reviews;v1;Kubernetes"
    )
    assert POD not in config.endpoints
    service = config.clusters["inbound-vip|9080|http|reviews.shop.svc.cluster.local"]
    assert service.original_dst is None


def _http_options(c: cluster_pb2.Cluster) -> None:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http_protocol_options.SetInParent()
    c.typed_extension_protocol_options[convert.HTTP_OPTIONS].Pack(options)


def _no_identity(c: cluster_pb2.Cluster) -> None:
    del c.metadata.filter_metadata["istio"].fields["identity"]


Change = Callable[[cluster_pb2.Cluster], object]
REFUSED: list[tuple[Change, str]] = [
    (
        lambda c: setattr(c.original_dst_lb_config, "use_http_header", True),
        f"Cluster {POD}.original_dst_lb_config.use_http_header: not supported",
    ),
    (
        lambda c: setattr(c.original_dst_lb_config, "http_header_name", "x-dst"),
        "original_dst_lb_config.http_header_name: not supported",
    ),
    (
        lambda c: c.original_dst_lb_config.upstream_port_override.MergeFrom(
            type(c.original_dst_lb_config.upstream_port_override)(value=15008)
        ),
        "original_dst_lb_config.upstream_port_override: not supported",
    ),
    (
        lambda c: setattr(c, "lb_policy", cluster_pb2.Cluster.ROUND_ROBIN),
        f"Cluster {POD}.lb_policy: an ORIGINAL_DST cluster's is CLUSTER_PROVIDED",
    ),
    (
        lambda c: c.eds_cluster_config.SetInParent(),
        "eds_cluster_config: not supported on an ORIGINAL_DST cluster",
    ),
    (
        lambda c: c.outlier_detection.consecutive_5xx.MergeFrom(
            type(c.outlier_detection.consecutive_5xx)(value=1)
        ),
        "outlier_detection: not supported on an ORIGINAL_DST cluster",
    ),
    (_http_options, "typed_extension_protocol_options: not supported on an ORIGINAL_DST"),
    (
        lambda c: c.cleanup_interval.MergeFrom(type(c.cleanup_interval)(seconds=1)),
        f"Cluster {POD}.cleanup_interval: not supported by this waypoint",
    ),
    (_no_identity, "an HBONE destination needs istio.identity"),
    (
        lambda c: c.metadata.filter_metadata[convert.TUNNEL_MATCH].update({"tunnel": "h2"}),
        "tunnel 'h2' is not supported",
    ),
]


@pytest.mark.parametrize(("change", "reason"), REFUSED)
def test_original_dst_settings_we_do_not_implement_are_refused(change: Change, reason: str) -> None:
    cluster = meshd_cluster()
    change(cluster)
    with pytest.raises(convert.Unsupported, match=reason.replace("|", r"\|")):
        convert.cluster(cluster)


def test_eds_clusters_cannot_borrow_original_dst_settings() -> None:
    eds = meshd_cluster("inbound-vip|9080|http|reviews.shop.svc.cluster.local")
    eds.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    with pytest.raises(convert.Unsupported, match="CLUSTER_PROVIDED is for ORIGINAL_DST"):
        convert.cluster(eds)
    eds = meshd_cluster("inbound-vip|9080|http|reviews.shop.svc.cluster.local")
    eds.original_dst_lb_config.SetInParent()
    with pytest.raises(convert.Unsupported, match="only on ORIGINAL_DST clusters"):
        convert.cluster(eds)


def test_a_pod_outside_the_mesh_is_reached_in_plaintext() -> None:
    cluster = meshd_cluster()
    del cluster.metadata.filter_metadata[convert.TUNNEL_MATCH]
    _no_identity(cluster)  # nothing to check over plain TCP
    original = convert.cluster(cluster).original_dst
    assert original is not None and not original.hbone


# ------------------------------------------------------------------ deciding


def test_chains_are_picked_as_envoy_picks_them_port_first() -> None:
    listener = config_for(workload_world()).listeners["waypoint"]

    def chain(host: str, port: int) -> str | None:
        found = listener.chain_for(host, port)
        return found.name if found else None

    assert chain("10.96.0.20", 9080) == "reviews.shop.svc.cluster.local:9080"
    assert chain("10.244.1.11", 8080) == "direct-tcp|10.244.1.11"
    assert chain("10.244.1.11", 9080) == "direct-tcp|10.244.1.11|9080"
    assert chain("10.244.9.9", 8080) is None
    assert chain("10.96.0.20", 8080) is None
    # Envoy's rule, which the extra chain is there for: the chains of a port are the
    # only ones considered for it, even when none of them takes the address.
    lone = m.Listener(
        name="waypoint",
        chains=tuple(c for c in listener.chains if c.name != "direct-tcp|10.244.1.11|9080"),
    )
    assert lone.chain_for("10.244.1.11", 9080) is None


def _chain(*prefixes: str) -> m.FilterChain:
    return m.FilterChain(
        name="direct-tcp|x",
        prefixes=tuple(ipaddress.ip_network(p) for p in prefixes),
        port=None,
        handler=m.TcpProxy(cluster=POD),
    )


def test_the_relay_goes_to_the_address_dialled_and_only_to_the_chains_pod() -> None:
    cluster = config_for(workload_world()).clusters[POD]
    target = original_destination(_chain("10.244.1.11/32"), cluster, "10.244.1.11", 3306)
    assert target == m.Endpoint(
        ip="10.244.1.11",
        port=3306,
        hbone=True,
        identity=REVIEWS,
        workload="reviews-v1-a;shop;reviews;v1;Kubernetes",
    )
    assert target.address == "10.244.1.11:3306"
    # Fail closed: a chain naming a range (or another pod) names no one pod to send to.
    for chain, host in (
        (_chain("10.244.1.0/24"), "10.244.1.11"),
        (_chain("10.244.1.12/32"), "10.244.1.11"),
    ):
        refused = original_destination(chain, cluster, host, 3306)
        assert isinstance(refused, str) and "relays only to the pod address" in refused
    eds = config_for(workload_world()).clusters[
        "inbound-vip|9080|http|reviews.shop.svc.cluster.local"
    ]
    assert isinstance(original_destination(_chain("10.244.1.11/32"), eds, "10.244.1.11", 1), str)


# ------------------------------------------------------------------ end to end


@dataclass
class PodZtunnel:
    """A stand-in for a pod's ztunnel: HBONE on ``ip:15008``, relaying to the pod's app."""

    ip: str
    identity: TlsIdentity
    seen: list[ConnectRequest] = field(default_factory=list)
    server: HboneServer | None = None

    async def start(self) -> PodZtunnel:
        async def handler(request: ConnectRequest) -> PlainProtocol:
            self.seen.append(request)
            return await open_upstream(request.host, request.port)

        self.server = HboneServer(identity=self.identity, handler=handler)
        await self.server.listen(self.ip, 15008)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close(drain_timeout_s=0.1)


class Answer(asyncio.Protocol):
    """Sends one HTTP/1.1 request on the stream; keeps the response (by its length)."""

    def __init__(self) -> None:
        self.data = b""
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"GET /db HTTP/1.1\r\nhost: db\r\nconnection: close\r\n\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        lengths = [
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ]
        if sep and lengths and len(body) >= lengths[0] and not self.done.done():
            self.done.set_result(self.data)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(self.data)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Loopback addresses no other test listens on (a pod's ztunnel takes 15008 there).
MESH_POD, PLAIN_POD = "127.0.0.131", "127.0.0.132"


@contextlib.asynccontextmanager
async def running(
    pki: Pki, pod_identity: TlsIdentity
) -> AsyncIterator[tuple[int, HboneClientPool, PodZtunnel, dict[str, Backend]]]:
    """meshd, our waypoint (HBONE on loopback) for a world whose waypoint takes workloads:
    one pod in the mesh (behind ``PodZtunnel``) and one outside it, both echo backends."""
    mesh_app = await Backend("in-mesh", MESH_POD).start()
    plain_app = await Backend("plain", PLAIN_POD, mesh_app.port).start()
    ztunnel = await PodZtunnel(MESH_POD, pod_identity).start()
    outside = replace(
        pod("plain", PLAIN_POD, "v1"),
        labels=frozen_labels({"app": "plain", "istio.io/dataplane-mode": "none"}),
    )
    state = workload_world(pods=(pod("in-mesh", MESH_POD, "v1"), outside), services=())
    meshd = Meshd()
    server = grpc.aio.server(options=grpc_server_options())
    meshd.ads.add_to(server)
    xds_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    meshd.on_source(state)

    async def fetch(identity: SpiffeId) -> WorkloadCertificate:
        key, csr = generate_key_and_csr(identity)
        issued = pki.ca.sign_csr(csr, identity, timedelta(hours=1), now=datetime.now(UTC))
        return WorkloadCertificate.from_issued(issued, key)

    runtime = WaypointRuntime(
        namespace="shop",
        gateway="waypoint",
        pod="waypoint",
        pod_ip="127.0.0.1",
        identity=WAYPOINT_ID,
        fetch_certificate=fetch,
        xds_target=f"127.0.0.1:{xds_port}",
    )
    port = _free_port()
    task = asyncio.create_task(runtime.run("127.0.0.1", port))
    client = HboneClientPool(identities=pki.client)
    try:
        async with asyncio.timeout(15):
            while not runtime.ready()[0]:  # noqa: ASYNC110 - the runtime's own readiness
                await asyncio.sleep(0.05)
        yield port, client, ztunnel, {"in-mesh": mesh_app, "plain": plain_app}
    finally:
        await client.close()
        await runtime.drain(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await server.stop(0.2)
        await ztunnel.stop()
        await mesh_app.stop()
        await plain_app.stop()


async def dial(client: HboneClientPool, port: int, authority: str) -> bytes:
    """What a client's ztunnel does for a pod with a waypoint: HBONE to the waypoint,
    ``:authority`` the pod's IP and the port the app dialled."""
    answer = Answer()
    key = PoolKey(
        source=CLIENT, destination=("127.0.0.1", port), destination_identities=(WAYPOINT_ID,)
    )
    await client.connect(key, authority, (), plain=LocalSocket(answer))
    async with asyncio.timeout(5):
        return await answer.done


def test_a_pod_in_the_mesh_is_reached_over_hbone_at_the_address_dialled(pki: Pki) -> None:
    async def body() -> tuple[bytes, list[ConnectRequest], int]:
        async with running(pki, issue(pki.ca, REVIEWS)) as (port, client, ztunnel, apps):
            answer = await dial(client, port, f"{MESH_POD}:{apps['in-mesh'].port}")
            return answer, ztunnel.seen, apps["in-mesh"].port

    answer, seen, app_port = run(body)
    assert answer.startswith(b"HTTP/1.1 200") and b'"backend": "in-mesh"' in answer
    (request,) = seen
    assert request.authority == f"{MESH_POD}:{app_port}"
    assert request.peer_identity == WAYPOINT_ID  # the waypoint's own identity, not the client's


def test_a_pod_outside_the_mesh_is_relayed_to_in_plaintext(pki: Pki) -> None:
    async def body() -> tuple[bytes, list[ConnectRequest]]:
        async with running(pki, issue(pki.ca, REVIEWS)) as (port, client, ztunnel, apps):
            answer = await dial(client, port, f"{PLAIN_POD}:{apps['plain'].port}")
            return answer, ztunnel.seen

    answer, seen = run(body)
    assert answer.startswith(b"HTTP/1.1 200") and b'"backend": "plain"' in answer
    assert seen == []


def test_a_pod_that_is_not_who_meshd_says_is_refused(pki: Pki) -> None:
    async def body() -> tuple[int, list[ConnectRequest]]:
        impostor = issue(pki.ca, "spiffe://cluster.local/ns/shop/sa/impostor")
        async with running(pki, impostor) as (port, client, ztunnel, apps):
            with pytest.raises(StatusError) as refused:
                await dial(client, port, f"{MESH_POD}:{apps['in-mesh'].port}")
            return refused.value.status, ztunnel.seen

    status, seen = run(body)
    assert status == 503 and seen == []


def test_an_address_no_bound_pod_has_is_refused(pki: Pki) -> None:
    async def body() -> int:
        async with running(pki, issue(pki.ca, REVIEWS)) as (port, client, _, apps):
            with pytest.raises(StatusError) as refused:
                await dial(client, port, f"127.0.0.133:{apps['in-mesh'].port}")
            return refused.value.status

    assert run(body) == 503
