"""meshd following a running meshlab cluster: the feed and the CA, end to end.

meshd runs as the real program (``meshd --source meshlab:NAME``); the test
talks to it as a ztunnel would, with the xDS client and the CA client.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from bench.envoy import free_port
from mesh.caclient import CaClient, CaError
from mesh.cluster.statefile import node_token_path
from mesh.identity import SpiffeId
from mesh.model import TunnelProtocol
from mesh.xds import XdsClient
from tests.integration.conftest import meshlab, unique_name
from tests.unit.hbone.conftest import run

SPEC = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "namespaces": [{"name": "shop"}],
    "serviceAccounts": [{"namespace": "shop", "name": "web"}],
    "pods": [
        {
            "name": "web-1",
            "namespace": "shop",
            "node": "node1",
            "serviceAccount": "web",
            "labels": {"app": "web"},
        },
        {
            "name": "web-2",
            "namespace": "shop",
            "node": "node2",
            "serviceAccount": "web",
            "labels": {"app": "web"},
        },
        {"name": "client", "namespace": "default", "node": "node2"},
    ],
    "services": [
        {
            "name": "web",
            "namespace": "shop",
            "vip": "10.96.0.50",
            "ports": [{"port": 80, "targetPort": 8080}],
            "selector": {"app": "web"},
        }
    ],
}
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-default, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["default"]}}]
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = unique_name()
    path = tmp_path_factory.mktemp("meshd") / "cluster.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    try:
        meshlab("up", "-f", str(path), "--name", name)
        yield name
    finally:
        meshlab("down", "--name", name, check=False)


@contextlib.asynccontextmanager
async def meshd(cluster: str) -> AsyncIterator[str]:
    port, status = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.meshd",
        "--source",
        f"meshlab:{cluster}",
        "--listen",
        f"127.0.0.1:{port}",
        "--tls-listen",
        f"127.0.0.1:{free_port()}",
        "--status-listen",
        f"127.0.0.1:{status}",
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        await process.wait()


async def eventually(check: object, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def test_the_feed_follows_the_cluster(cluster: str, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)

    async def body() -> None:
        async with meshd(cluster) as target:
            client = XdsClient(target, node_id="ztunnel~node1", backoff_initial_s=0.05)
            task = asyncio.ensure_future(client.run())
            try:
                state = await client.wait_synced(15)
                names = sorted(w.name for w in state.workloads.values())
                assert names == ["client", "web-1", "web-2"]
                web1 = next(w for w in state.workloads.values() if w.name == "web-1")
                assert web1.tunnel_protocol is TunnelProtocol.NONE
                assert str(web1.identity) == "spiffe://cluster.local/ns/shop/sa/web"
                assert web1.node == "node1"
                (svc,) = state.services.values()
                assert str(svc.addresses[0]) == "10.96.0.50"

                # Labelling the namespace puts its pods in the mesh, live.
                meshlab(
                    "label",
                    "--name",
                    cluster,
                    "namespace",
                    "shop",
                    "istio.io/dataplane-mode=ambient",
                )
                await eventually(
                    lambda: (
                        {w.name: w.tunnel_protocol for w in client.state.workloads.values()}
                        == {
                            "client": TunnelProtocol.NONE,
                            "web-1": TunnelProtocol.HBONE,
                            "web-2": TunnelProtocol.HBONE,
                        }
                    )
                )

                # A policy applied at the source reaches the proxy, and leaves again.
                out = meshlab("apply", "--name", cluster, "-f", str(policy_file))
                assert "authorizationpolicy.security.istio.io/deny-default created" in out.stdout
                await eventually(lambda: "shop/deny-default" in client.state.policies)
                meshlab(
                    "delete", "--name", cluster, "authorizationpolicy", "deny-default", "-n", "shop"
                )
                await eventually(lambda: not client.state.policies)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    run(body, timeout_s=90)


def test_the_ca_signs_only_for_pods_on_the_callers_node(cluster: str) -> None:
    web = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
    default = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/default")

    async def body() -> None:
        async with meshd(cluster) as target:
            node1 = node_token_path(cluster, "node1").read_text().strip()
            ca = CaClient(target, node1)
            try:
                cert = None
                for _ in range(100):  # until meshd has read the cluster
                    try:
                        cert = await ca.fetch(web)
                        break
                    except CaError as e:
                        if e.code != grpc.StatusCode.PERMISSION_DENIED:
                            raise
                        await asyncio.sleep(0.1)
                assert cert is not None and cert.identity == web
                # Only node2 runs a pod with the default identity.
                with pytest.raises(CaError) as info:
                    await ca.fetch(default)
                assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert "node1" in str(info.value) and str(default) in str(info.value)
            finally:
                await ca.close()
            stranger = CaClient(target, "not-a-token")
            try:
                with pytest.raises(CaError) as info:
                    await stranger.fetch(web)
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            finally:
                await stranger.close()

    run(body, timeout_s=90)
