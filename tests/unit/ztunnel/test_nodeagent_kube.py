"""The node agent's Kubernetes view, through the official client against the
local API server of tests/support/fake_kube.py (no real one runs here)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import fake_kube as k
from tests.support.fake_kube import FakeKube
from ztunnel.nodeagent import reconcile
from ztunnel.nodeagent.kube import KubernetesView, api_client
from ztunnel.nodeagent.records import PodRecord
from ztunnel.zds.protocol import PodInfo

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def view(kube: FakeKube, tmp_path: Path) -> Iterator[KubernetesView]:
    kube.add("namespaces", k.namespace("shop", AMBIENT))
    kube.add("namespaces", k.namespace("plain"))
    kube.add("pods", k.pod("web-1", "shop", node="kind-worker", service_account="web"))
    kube.add("pods", k.pod("web-2", "shop", node="kind-worker2"))  # another node's
    kube.add("pods", k.pod("agent", "plain", node="kind-worker", host_network=True))
    api = api_client(str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    with contextlib.closing(api):
        v = KubernetesView("kind-worker", api, poll_s=0.1)
        v.start()
        try:
            yield v
        finally:
            v.close()


def record(ns: str, name: str) -> PodRecord:
    return PodRecord(f"uid-{name}", ns, name, f"/proc/1/ns/net-{name}")


def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_view_holds_this_nodes_pods_and_every_namespaces_labels(
    view: KubernetesView,
) -> None:
    v = view.read()
    assert set(v.pods) == {("shop", "web-1")}  # not another node's, not host-network
    assert v.namespaces["shop"]["istio.io/dataplane-mode"] == "ambient"
    assert reconcile.wanted(v, record("shop", "web-1")) == PodInfo("web-1", "shop", "web")


def test_a_label_change_reaches_the_view_and_a_new_pod_is_fetched_at_once(
    kube: FakeKube, view: KubernetesView
) -> None:
    kube.update("namespaces", k.namespace("shop"))  # the ambient label removed
    until(lambda: reconcile.wanted(view.read(), record("shop", "web-1")) is None)
    # A pod the CNI plugin asks about before the next list: fetched by name.
    view.poll_s = 3600.0
    kube.add("pods", k.pod("db-0", "plain", node="kind-worker", labels=AMBIENT))
    fresh = view.refresh_pod("plain", "db-0")
    assert reconcile.wanted(fresh, record("plain", "db-0")) == PodInfo("db-0", "plain", "default")


def test_an_unreachable_api_server_keeps_the_last_view(
    kube: FakeKube, view: KubernetesView
) -> None:
    before = view.read()
    kube.stop()
    view.poll()
    assert view.read() is before
    assert "listing from the API server failed" in view.error
    assert view.refresh_pod("shop", "web-9") is before
