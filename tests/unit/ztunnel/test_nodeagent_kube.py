"""The node agent on Kubernetes: its view (list, then watch), the redirection it reports
on each pod, and its readiness, through the official client against the local API
server of tests/support/fake_kube/ (no real one runs here). Enrolling pods needs
root: tests/integration/test_nodeagent_kubernetes.py."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import fake_kube as k
from tests.support.fake_kube import FakeKube
from tests.unit.hbone.conftest import run
from ztunnel.nodeagent import reconcile
from ztunnel.nodeagent.health import HealthServer
from ztunnel.nodeagent.kube import KubernetesView, api_client
from ztunnel.nodeagent.records import PodRecord
from ztunnel.nodeagent.service import NodeAgent
from ztunnel.zds.protocol import PodInfo

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
REDIRECTION = reconcile.REDIRECTION


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        server.add("namespaces", k.namespace("shop", AMBIENT))
        server.add("namespaces", k.namespace("plain"))
        server.add("pods", k.pod("web-1", "shop", node="kind-worker", service_account="web"))
        server.add("pods", k.pod("web-2", "shop", node="kind-worker2"))  # another node's
        server.add("pods", k.pod("agent", "plain", node="kind-worker", host_network=True))
        yield server


@contextlib.contextmanager
def following(kube: FakeKube, tmp_path: Path, *, start: bool = True) -> Iterator[KubernetesView]:
    api = api_client(str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    with contextlib.closing(api):
        v = KubernetesView(
            "kind-worker",
            api,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
            patch_retry_initial_s=0.05,
        )
        if start:
            v.start()
        try:
            yield v
        finally:
            v.close()


@pytest.fixture
def view(kube: FakeKube, tmp_path: Path) -> Iterator[KubernetesView]:
    with following(kube, tmp_path) as v:
        until(lambda: v.read().known)
        yield v


def record(ns: str, name: str) -> PodRecord:
    return PodRecord(f"uid-{name}", ns, name, f"/proc/1/ns/net-{name}")


def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def annotation(kube: FakeKube, ns: str, name: str) -> str | None:
    value = (kube.get("pods", name, ns)["metadata"].get("annotations") or {}).get(REDIRECTION)
    return None if value is None else str(value)


# -- the view -----------------------------------------------------------------------------


def test_the_view_holds_this_nodes_pods_and_every_namespaces_labels(
    kube: FakeKube, view: KubernetesView
) -> None:
    v = view.read()
    assert set(v.pods) == {("shop", "web-1")}  # not another node's, not host-network
    assert v.namespaces["shop"]["istio.io/dataplane-mode"] == "ambient"
    assert reconcile.wanted(v, record("shop", "web-1")) == PodInfo("web-1", "shop", "web")
    # Other nodes' pods are never asked for: the list and the watch select the node's.
    pod_requests = kube.list_requests("pods") + kube.watch_requests("pods")
    assert pod_requests
    assert {r.query.get("fieldSelector") for r in pod_requests} == {"spec.nodeName=kind-worker"}


def test_changes_arrive_by_watch_without_listing_again(
    kube: FakeKube, view: KubernetesView
) -> None:
    kube.update("namespaces", k.namespace("shop"))  # the ambient label removed
    until(lambda: reconcile.wanted(view.read(), record("shop", "web-1")) is None)
    kube.add("pods", k.pod("db-0", "plain", node="kind-worker", labels=AMBIENT))
    kube.add("pods", k.pod("db-1", "plain", node="kind-worker2", labels=AMBIENT))
    until(lambda: ("plain", "db-0") in view.read().pods)
    kube.delete("pods", k.pod("web-1", "shop"))
    until(lambda: ("shop", "web-1") not in view.read().pods)
    assert set(view.read().pods) == {("plain", "db-0")}
    assert len(kube.list_requests("pods")) == len(kube.list_requests("namespaces")) == 1


def test_bookmarks_move_the_version_on_and_410_gone_lists_again(
    kube: FakeKube, view: KubernetesView
) -> None:
    pods = view.informers["pods"]
    until(lambda: len(kube.watch_requests("pods")) == 1)
    version = kube.send_bookmark()
    until(lambda: pods.resource_version == version)
    assert kube.watch_requests("pods")[0].query.get("allowWatchBookmarks") == "true"
    # History compacted, and a pod added meanwhile: the informer lists again and has it.
    with kube.held():
        kube.expire("pods")
        kube.add("pods", k.pod("late-0", "shop", node="kind-worker"))
    until(lambda: ("shop", "late-0") in view.read().pods)
    assert len(kube.list_requests("pods")) == 2
    assert len(kube.list_requests("namespaces")) == 1
    # A watch from too old a version answered with HTTP 410 (not an event) does the same.
    kube.expire("pods", how="http")
    kube.add("pods", k.pod("later-0", "shop", node="kind-worker"))
    until(lambda: ("shop", "later-0") in view.read().pods)
    assert len(kube.list_requests("pods")) == 3


def test_a_new_pod_the_plugin_asks_about_is_fetched_at_once(
    kube: FakeKube, view: KubernetesView
) -> None:
    kube.add("pods", k.pod("db-0", "plain", node="kind-worker", labels=AMBIENT))
    fresh = view.refresh_pod("plain", "db-0")
    assert reconcile.wanted(fresh, record("plain", "db-0")) == PodInfo("db-0", "plain", "default")


def test_before_the_first_list_the_view_is_unknown_and_says_why(
    kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kube.fail_next(8)  # the first lists of both kinds, and their retries
    with caplog.at_level(logging.INFO, "ztunnel.nodeagent"), following(kube, tmp_path) as view:
        until(lambda: "HTTP 500" in view.error)
        assert not view.read().known
        until(lambda: view.read().known)
        assert view.error == ""
    failures = [r for r in caplog.records if "following" in r.message and "500" in r.message]
    assert len(failures) == 2  # said once for each kind, not once for each retry


def test_an_unreachable_api_server_keeps_the_last_view(
    kube: FakeKube, view: KubernetesView
) -> None:
    before = view.read()
    kube.stop()
    until(lambda: view.error != "")
    assert view.read() is before
    assert view.refresh_pod("shop", "web-9") is before


# -- the redirection annotation ------------------------------------------------------------


def test_the_redirection_is_patched_on_pods_status_and_removed_when_the_pod_leaves(
    kube: FakeKube, view: KubernetesView
) -> None:
    kube.add("pods", k.pod("mine-0", "shop", node="kind-worker"))
    disabled = k.pod("optout-0", "shop", node="kind-worker")
    disabled["metadata"]["annotations"] = {REDIRECTION: "disabled"}
    kube.add("pods", disabled)
    until(lambda: ("shop", "optout-0") in view.read().pods)

    view.report({("shop", "web-1"): reconcile.PENDING, ("shop", "db-9"): reconcile.ENABLED})
    until(lambda: annotation(kube, "shop", "web-1") == "pending")
    view.report({("shop", "web-1"): reconcile.ENABLED, ("shop", "db-9"): reconcile.ENABLED})
    until(lambda: annotation(kube, "shop", "web-1") == "enabled")
    # A pod the agent enrolled before the view had it is annotated once it arrives.
    kube.add("pods", k.pod("db-9", "shop", node="kind-worker"))
    until(lambda: annotation(kube, "shop", "db-9") == "enabled")
    # Out of the mesh: the annotation goes; a value the agent never writes stays.
    view.report({("shop", "db-9"): reconcile.ENABLED})
    until(lambda: annotation(kube, "shop", "web-1") is None)
    until(lambda: view.read().pods[("shop", "web-1")].redirection is None)
    assert annotation(kube, "shop", "optout-0") == "disabled"
    assert annotation(kube, "shop", "mine-0") is None

    writes = kube.writes("pods")
    assert [(w.method, w.path.rsplit("/", 2)[-2:]) for w in writes] == [
        ("PATCH", ["web-1", "status"]),
        ("PATCH", ["web-1", "status"]),
        ("PATCH", ["db-9", "status"]),
        ("PATCH", ["web-1", "status"]),
    ]
    assert {w.content_type for w in writes} == {"application/merge-patch+json"}
    assert (
        writes[-1].body == b'{"metadata": {"annotations": {"ambient.istio.io/redirection": null}}}'
    )
    # The pod's spec is what it was: only its metadata went through /status.
    assert kube.get("pods", "web-1", "shop")["spec"]["serviceAccountName"] == "web"


def test_a_failed_patch_is_said_once_and_retried(
    kube: FakeKube, view: KubernetesView, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "ztunnel.nodeagent"):
        kube.fail_next(3)
        view.report({("shop", "web-1"): reconcile.ENABLED})
        until(lambda: annotation(kube, "shop", "web-1") == "enabled", timeout_s=10)
    said = [r.message for r in caplog.records if "shop/web-1" in r.message]
    assert len([m for m in said if "cannot annotate" in m]) == 1
    assert "HTTP 500" in said[0] and "retrying" in said[0]
    assert said[-1] == "node agent: shop/web-1: redirection enabled reported"
    assert len(kube.writes("pods")) == 4  # three refused, then the one that took


# -- readiness -----------------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def test_readyz_is_503_with_the_reason_until_the_agent_has_listed_and_reconciled(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.fail_next(2)

    async def body(view: KubernetesView) -> None:
        agent = NodeAgent(run_dir=tmp_path / "run", source=view)
        health = HealthServer(agent.ready)
        await health.start("127.0.0.1", 0)
        assert health.bound is not None
        port = health.bound[1]
        try:
            status = await asyncio.to_thread(_get, port, "/readyz")
            assert status == (503, "the plugin and ZDS sockets are not listening yet\n")
            assert await asyncio.to_thread(_get, port, "/healthz") == (200, "ok\n")
            await agent.start()
            view.start()
            code, why = await asyncio.to_thread(_get, port, "/readyz")
            assert code == 503
            assert why.startswith("waiting for Kubernetes, pods of node 'kind-worker'")
            await asyncio.to_thread(until, lambda: view.read().known)
            code, why = await asyncio.to_thread(_get, port, "/readyz")
            assert (code, why) == (503, "the pods recorded on this node are not reconciled yet\n")
            await agent.reconcile()
            assert await asyncio.to_thread(_get, port, "/readyz") == (200, "ready\n")
            assert (await asyncio.to_thread(_get, port, "/ready"))[0] == 404
        finally:
            await health.close()
            await agent.close()

    with following(kube, tmp_path, start=False) as view:
        run(lambda: body(view), timeout_s=20)


def daemonset(**meta: object) -> dict[str, object]:
    return {
        "metadata": {"name": "ztunnel-node-agent", "namespace": "istio-system", **meta},
        "spec": {"selector": {"matchLabels": {"app": "ztunnel-node-agent"}}},
    }


def test_the_daemonset_says_whether_the_agent_is_removed_or_only_restarted(
    kube: FakeKube, view: KubernetesView
) -> None:
    ask = view.daemonset_removed
    assert ask("istio-system", "ztunnel-node-agent") == (
        True,
        "DaemonSet istio-system/ztunnel-node-agent is gone",
    )
    kube.add("daemonsets", daemonset())
    assert ask("istio-system", "ztunnel-node-agent")[0] is False
    kube.fail_next(1)  # cannot tell: keep the plugin, pods fail closed
    removed, why = ask("istio-system", "ztunnel-node-agent")
    assert not removed and "cannot tell" in why and "HTTP 500" in why
    kube.delete("daemonsets", daemonset())
    kube.add("daemonsets", daemonset(deletionTimestamp="2026-12-03T10:00:00Z"))
    assert ask("istio-system", "ztunnel-node-agent") == (
        True,
        "DaemonSet istio-system/ztunnel-node-agent is being deleted",
    )


def _conflist(conf_dir: Path) -> list[str]:
    conf = json.loads((conf_dir / "10-kindnet.conflist").read_text())
    return [p["type"] for p in conf["plugins"]]


@pytest.mark.parametrize("removed", [False, True])
def test_on_sigterm_the_agent_takes_ztunnel_cni_out_only_when_its_daemonset_is_gone(
    kube: FakeKube, tmp_path: Path, removed: bool
) -> None:
    """The program as the DaemonSet runs it (--cni-uninstall=when-removed): an upgrade
    leaves the plugin in the chain, deleting the DaemonSet takes it out."""
    plugin = Path(sys.executable).parent / "ztunnel-cni"
    if not plugin.is_file():
        pytest.skip(f"{plugin} is missing: build it with `make cni-plugin`")
    kube.add("daemonsets", daemonset())
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    kindnet = {"cniVersion": "0.3.1", "name": "kindnet", "plugins": [{"type": "ptp"}]}
    (conf_dir / "10-kindnet.conflist").write_text(json.dumps(kindnet))
    argv = [
        *(sys.executable, "-m", "ztunnel.nodeagent.cli"),
        *("--source", "kubernetes", "--node", "kind-worker"),
        *("--kubeconfig", str(kube.write_kubeconfig(tmp_path / "kubeconfig"))),
        *("--run-dir", str(tmp_path / "run"), "--readiness-address", "off"),
        *("--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)),
        *("--cni-uninstall", "when-removed", "--pod-namespace", "istio-system"),
    ]
    agent = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: _conflist(conf_dir) == ["ptp", "ztunnel-cni"], timeout_s=15)
        assert (bin_dir / "ztunnel-cni").is_file()
        if removed:
            kube.delete("daemonsets", daemonset())
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=15)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err
    if removed:
        assert _conflist(conf_dir) == ["ptp"] and not (bin_dir / "ztunnel-cni").exists()
        assert "DaemonSet istio-system/ztunnel-node-agent is gone: removing" in err
    else:
        assert _conflist(conf_dir) == ["ptp", "ztunnel-cni"] and (bin_dir / "ztunnel-cni").exists()
        assert "remains (a restart or an upgrade): keeping ztunnel-cni" in err
