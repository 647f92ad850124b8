"""The node agent on Kubernetes, end to end on this machine: real network namespaces and
in-pod capture, a ZDS proxy that acks, and the local API server of
tests/support/fake_kube/ reached through the official client.

What a user of ``kubectl`` sees: the agent's ``/readyz`` turns 200 once it has
listed the cluster and enrolled the pods recorded on its node; each enrolled pod
carries ``ambient.istio.io/redirection`` (``pending`` until a ztunnel takes it,
then ``enabled``), and loses it when its namespace leaves the mesh, its capture
removed; a pod the CNI plugin adds is enrolled and annotated too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS, netns

from tests.integration.conftest import unique_name
from tests.support import fake_kube as k
from tests.support.fake_kube import FakeKube
from tests.unit.hbone.conftest import run
from ztunnel.capture import inpod
from ztunnel.nodeagent import plugin, reconcile
from ztunnel.nodeagent.health import HealthServer
from ztunnel.nodeagent.kube import KubernetesView, api_client
from ztunnel.nodeagent.records import PodRecord, RecordStore
from ztunnel.nodeagent.service import ZDS_SOCKET, NodeAgent
from ztunnel.zds.proxy import Event, ZdsProxy

pytestmark = pytest.mark.skipif(
    not (shutil.which("iptables-restore") and shutil.which("nsenter")),
    reason="needs iptables-restore (Debian package iptables) and nsenter (util-linux)",
)
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
NODE = "kind-worker"


@contextlib.contextmanager
def pod_namespaces(count: int) -> Iterator[list[Path]]:
    prefix = unique_name()
    names = [f"{prefix}-{i}" for i in range(count)]
    try:
        for name in names:
            netns.create(name)
            with NetNS(name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield [Path(f"/run/netns/{name}") for name in names]
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                netns.remove(name)


def redirection(kube: FakeKube, ns: str, name: str) -> str | None:
    value = (kube.get("pods", name, ns)["metadata"].get("annotations") or {}).get(
        reconcile.REDIRECTION
    )
    return None if value is None else str(value)


def readyz(port: int) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/readyz")
        answer = connection.getresponse()
        return answer.status, answer.read().decode().strip()
    finally:
        connection.close()


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def acks(_: Event) -> None:
    """A ztunnel that takes every pod."""


def test_enrolled_pods_say_their_redirection_and_lose_it_on_leaving(tmp_path: Path) -> None:
    with FakeKube() as kube, pod_namespaces(2) as (running, added):
        kube.add("namespaces", k.namespace("shop", AMBIENT))
        kube.add("pods", k.pod("web-1", "shop", node=NODE))
        kube.add("pods", k.pod("web-2", "shop", node="kind-worker2"))  # another node's
        run_dir = tmp_path / "run"
        # The CNI plugin recorded web-1 before the agent (re)started.
        RecordStore(run_dir / plugin.PODS_DIR).put(
            PodRecord("sb-web-1", "shop", "web-1", str(running))
        )
        api = api_client(str(kube.write_kubeconfig(tmp_path / "kubeconfig")))

        async def scenario() -> None:
            view = KubernetesView(NODE, api, patch_retry_initial_s=0.05)
            agent = NodeAgent(run_dir=run_dir, source=view, poll_s=0.05)
            health = HealthServer(agent.ready)
            await health.start("127.0.0.1", 0)
            assert health.bound is not None
            port = health.bound[1]
            proxy_task: asyncio.Future[None] | None = None
            assert (await asyncio.to_thread(readyz, port))[0] == 503
            view.start()
            task = asyncio.ensure_future(agent.run())
            try:
                await until(lambda: readyz(port) == (200, "ready"))
                assert await asyncio.to_thread(inpod.installed_tables, running) == ["mangle", "nat"]
                # Captured, but no ztunnel has it yet.
                await until(lambda: redirection(kube, "shop", "web-1") == "pending")
                proxy = ZdsProxy(str(run_dir / ZDS_SOCKET), acks, backoff_initial_s=0.02)
                proxy_task = asyncio.ensure_future(proxy.run())
                await until(lambda: redirection(kube, "shop", "web-1") == "enabled")

                # A pod the CNI plugin adds while ztunnel is there: enrolled, enabled.
                kube.add("pods", k.pod("db-0", "shop", node=NODE))
                new = PodRecord("sb-db-0", "shop", "db-0", str(added))
                agent.records.put(new)  # the plugin records the pod, then asks
                answer = await agent.handle_add(new)
                assert answer == {"ok": True, "enrolled": True}
                await until(lambda: redirection(kube, "shop", "db-0") == "enabled")

                # The namespace leaves the mesh: capture removed, annotations gone.
                kube.update("namespaces", k.namespace("shop"))
                await until(lambda: redirection(kube, "shop", "web-1") is None)
                await until(lambda: redirection(kube, "shop", "db-0") is None)
                assert await asyncio.to_thread(inpod.installed_tables, running) == []
                assert await asyncio.to_thread(inpod.installed_tables, added) == []
                assert redirection(kube, "shop", "web-2") is None  # never this agent's

                writes = kube.writes("pods")
                assert {w.path.rsplit("/", 1)[-1] for w in writes} == {"status"}
                assert {w.content_type for w in writes} == {"application/merge-patch+json"}
                assert await asyncio.to_thread(readyz, port) == (200, "ready")
            finally:
                if proxy_task is not None:
                    proxy_task.cancel()
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                await health.close()
                for path in (running, added):
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(inpod.uninstall, path)

        with contextlib.closing(api):
            run(scenario, timeout_s=60)
