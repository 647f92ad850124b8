"""meshd with ``--source kubernetes``, as a program: the real client, a local API server.

No Kubernetes API server can be installed on these machines; the test runs
meshd against ``tests/support/fake_kube/``, which speaks the API server's
list and watch wire format with objects as a kind cluster returns them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from bench.envoy import free_port
from mesh.caclient import CaClient, CaError
from mesh.identity import SpiffeId
from mesh.model import TunnelProtocol
from mesh.xds import XdsClient
from tests.support import fake_kube
from tests.support.fake_kube import FakeKube
from tests.unit.hbone.conftest import run


@contextlib.asynccontextmanager
async def meshd(kubeconfig: Path) -> AsyncIterator[tuple[str, str]]:
    """meshd's plaintext and TLS targets."""
    port, tls_port, status = free_port(), free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.meshd",
        "--source",
        "kubernetes",
        "--kubeconfig",
        str(kubeconfig),
        "--listen",
        f"127.0.0.1:{port}",
        "--tls-listen",
        f"127.0.0.1:{tls_port}",
        "--status-listen",
        f"127.0.0.1:{status}",
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", tls_port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield f"127.0.0.1:{port}", f"127.0.0.1:{tls_port}"
    finally:
        process.terminate()
        await process.wait()


async def eventually(check: object, timeout_s: float = 15) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def test_meshd_follows_the_api_server_and_signs_for_its_nodes(tmp_path: Path) -> None:
    with FakeKube() as kube:
        kube.add("namespaces", fake_kube.namespace("shop"))
        kube.add(
            "pods",
            fake_kube.pod(
                "web-1",
                "shop",
                ip="10.244.1.7",
                node="kind-worker",
                service_account="web",
                labels={"app": "web"},
            ),
        )
        kube.add(
            "services",
            fake_kube.service(
                "web", "shop", cluster_ip="10.96.7.7", ports=[(80, 8080)], selector={"app": "web"}
            ),
        )
        kube.add_token(
            "ztunnel-worker",
            namespace="istio-system",
            service_account="ztunnel",
            node="kind-worker",
            audiences=["istio-ca"],  # the DaemonSet's projected token
        )
        kube.add_token(  # the same account's default API token
            "ztunnel-api",
            namespace="istio-system",
            service_account="ztunnel",
            node="kind-worker",
        )
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        web = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")

        async def body() -> None:
            async with meshd(kubeconfig) as (plain, target):
                # The root persists where istiod keeps its own: a Secret.
                secret = kube.get("secrets", "istio-ca-secret", "istio-system")
                root_pem = base64.b64decode(secret["data"]["root-cert.pem"])
                # Over TLS, checked against the mesh root, as a ztunnel reaches istiod.
                root = grpc.ssl_channel_credentials(root_pem)
                client = XdsClient(
                    target,
                    node_id="ztunnel~kind-worker",
                    credentials=root,
                    backoff_initial_s=0.05,
                )
                task = asyncio.ensure_future(client.run())
                try:
                    state = await client.wait_synced(30)
                    (workload,) = state.workloads.values()
                    assert workload.name == "web-1" and workload.node == "kind-worker"
                    assert workload.tunnel_protocol is TunnelProtocol.NONE
                    (svc,) = state.services.values()
                    assert str(svc.addresses[0]) == "10.96.7.7"
                    kube.update(
                        "namespaces",
                        fake_kube.namespace("shop", {"istio.io/dataplane-mode": "ambient"}),
                    )
                    await eventually(
                        lambda: (
                            {w.tunnel_protocol for w in client.state.workloads.values()}
                            == {TunnelProtocol.HBONE}
                        )
                    )
                    kube.add(
                        "pods",
                        fake_kube.pod(
                            "web-2",
                            "shop",
                            ip="10.244.2.9",
                            node="kind-worker2",
                            service_account="web",
                            labels={"app": "web"},
                        ),
                    )
                    await eventually(lambda: len(client.state.workloads) == 2)

                    # A service-account token never goes over plaintext: no CA there.
                    plain_ca = CaClient(plain, "ztunnel-worker")
                    try:
                        with pytest.raises(CaError) as refused:
                            await plain_ca.fetch(web)
                        assert refused.value.code == grpc.StatusCode.UNIMPLEMENTED
                    finally:
                        await plain_ca.close()

                    ca = CaClient(target, "ztunnel-worker", credentials=root)
                    try:
                        cert = await ca.fetch(web)
                        assert cert.identity == web
                        with pytest.raises(CaError) as info:
                            await ca.fetch(
                                SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/other")
                            )
                        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
                    finally:
                        await ca.close()
                    # A token for the API server, not for the CA: refused.
                    api_only = CaClient(target, "ztunnel-api", credentials=root)
                    try:
                        with pytest.raises(CaError) as wrong_audience:
                            await api_only.fetch(web)
                        assert wrong_audience.value.code == grpc.StatusCode.UNAUTHENTICATED
                    finally:
                        await api_only.close()
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        run(body, timeout_s=90)
