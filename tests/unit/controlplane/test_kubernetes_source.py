"""The Kubernetes source, through the official client, against a local API server.

``tests.support.fake_kube`` speaks the API's list and watch wire format with
objects shaped as a kind cluster returns them; each test drives it the way a
cluster would (objects change, watches expire, requests fail) and checks what
meshd would see: the published SourceState.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from controlplane.sources.kubernetes import (
    LAST_APPLIED,
    KubernetesConfigError,
    KubernetesSource,
    ServiceAccountInfo,
    api_client_from,
    review_token,
)
from controlplane.state import (
    EndpointSliceInfo,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    WaypointInfo,
    WaypointListener,
    frozen_labels,
)
from mesh.model import Rule
from tests.support import fake_kube as k
from tests.support.fake_kube import FakeKube

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
# kubernetes.watch is not annotated.
new_watch: Callable[[], Any] = watch.Watch
LOGGER = "test.kubernetes-source"
STARTUP_S = 5.0
ApiClient = kubernetes.client.ApiClient

ALLOW_REVIEWS = {
    "selector": {"matchLabels": {"app": "reviews"}},
    "action": "ALLOW",
    "rules": [
        {
            "from": [{"source": {"principals": ["cluster.local/ns/default/sa/productpage"]}}],
            "to": [{"operation": {"ports": ["9080"]}}],
        }
    ],
}
# Methods are HTTP: ztunnel cannot enforce them, so the policy is refused.
BAD_POLICY = {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}  # a name, not a number


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def client(kube: FakeKube, tmp_path: Path) -> Iterator[ApiClient]:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    with contextlib.closing(api_client_from(str(kubeconfig))) as api:
        yield api


def bookinfo(kube: FakeKube) -> None:
    """A small cluster: an ambient namespace with a waypoint, two apps, a policy."""
    kube.add("namespaces", k.namespace("istio-system"))
    kube.add("namespaces", k.namespace("default", {"istio.io/dataplane-mode": "ambient"}))
    kube.add("serviceaccounts", k.service_account("default"))
    kube.add("serviceaccounts", k.service_account("bookinfo-reviews"))
    reviews = {"app": "reviews", "version": "v1"}
    kube.add(
        "pods",
        k.pod(
            "reviews-v1-7d9c4", ip="10.244.1.5", labels=reviews, service_account="bookinfo-reviews"
        ),
    )
    kube.add(
        "pods",
        k.pod(
            "ratings-v1-5fd8b",
            ip="10.244.2.7",
            node="kind-control-plane",
            labels={"app": "ratings"},
            ready=False,
        ),
    )
    kube.add("pods", k.pod("details-v1-6b8f9", ip=None, phase="Pending"))
    kube.add(
        "services",
        k.service(
            "reviews",
            cluster_ip="10.96.14.2",
            ports=[(9080, 9080)],
            selector={"app": "reviews"},
            labels={"app": "reviews"},
        ),
    )
    kube.add(
        "services",
        k.service(
            "ratings", cluster_ip="10.96.14.3", ports=[(9080, "http")], selector={"app": "ratings"}
        ),
    )
    kube.add(
        "endpointslices",
        k.endpoint_slice(
            "reviews-x2x9q", "default", "reviews", ["10.244.1.5"], not_ready=["10.244.1.6"]
        ),
    )
    kube.add("authorizationpolicies", k.authorization_policy("reviews", "default", ALLOW_REVIEWS))
    kube.add("gateways", k.gateway("waypoint", "default", "10.96.200.10"))
    kube.add(
        "gateways", k.gateway("ingress", "istio-system", "172.18.0.100", gateway_class="istio")
    )


class Recorder:
    """The on_change callback: every published state, and a way to wait for one."""

    def __init__(self) -> None:
        self.states: list[SourceState] = []
        self._changed = asyncio.Event()

    def __call__(self, state: SourceState) -> None:
        self.states.append(state)
        self._changed.set()

    async def until(
        self, predicate: Callable[[SourceState], bool] = lambda s: True, within_s: float = 1.0
    ) -> SourceState:
        deadline = time.monotonic() + within_s
        while not (self.states and predicate(self.states[-1])):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = self.states[-1] if self.states else None
                raise AssertionError(f"no such state within {within_s}s; last: {last}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.states[-1]

    async def first(self) -> SourceState:
        # Generous: the client builds its API classes on first use (about a second).
        return await self.until(within_s=STARTUP_S)


@contextlib.asynccontextmanager
async def running(client: ApiClient, **options: Any) -> AsyncIterator[Recorder]:
    """Run a source until the block ends, then cancel it as meshd does on shutdown."""
    recorder = Recorder()
    options.setdefault("logger", logging.getLogger(LOGGER))
    source = KubernetesSource(client, on_change=recorder, **options)
    task = asyncio.create_task(source.run())
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(condition: Callable[[], bool], within_s: float = 1.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def pods(state: SourceState) -> dict[str, PodInfo]:
    return {p.name: p for p in state.pods}


def warning_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_initial_state_converts_every_kind(kube: FakeKube, client: ApiClient) -> None:
    bookinfo(kube)

    async def scenario() -> SourceState:
        # Pages of two: the lists follow their continue tokens.
        async with running(client, list_page_size=2) as recorder:
            state = await recorder.first()
            await asyncio.sleep(0.1)
            assert len(recorder.states) == 1, "one publication, after every kind was listed"
            return state

    state = asyncio.run(scenario())
    assert any("continue" in r.query for r in kube.list_requests("pods"))
    assert state.namespaces == (
        NamespaceInfo(
            name="default",
            labels=frozen_labels(
                {"kubernetes.io/metadata.name": "default", "istio.io/dataplane-mode": "ambient"}
            ),
        ),
        NamespaceInfo(
            name="istio-system",
            labels=frozen_labels({"kubernetes.io/metadata.name": "istio-system"}),
        ),
    )
    uid = kube.get("pods", "reviews-v1-7d9c4", "default")["metadata"]["uid"]
    assert pods(state)["reviews-v1-7d9c4"] == PodInfo(
        uid=uid,
        name="reviews-v1-7d9c4",
        namespace="default",
        node="kind-worker",
        ip="10.244.1.5",
        service_account="bookinfo-reviews",
        labels=frozen_labels({"app": "reviews", "version": "v1"}),
        ready=True,
    )
    ratings = pods(state)["ratings-v1-5fd8b"]
    assert (ratings.ready, ratings.node, ratings.service_account) == (
        False,
        "kind-control-plane",
        "default",
    )
    assert (pods(state)["details-v1-6b8f9"].ip, pods(state)["details-v1-6b8f9"].ready) == (
        None,
        False,
    )
    assert state.services == (
        ServiceInfo(
            name="ratings",
            namespace="default",
            cluster_ips=("10.96.14.3",),
            ports=(ServicePortInfo(port=9080, target_port=9080, name="tcp-9080"),),
            selector=frozen_labels({"app": "ratings"}),
            internal_traffic_policy="Cluster",  # the API server's default
        ),
        ServiceInfo(
            name="reviews",
            namespace="default",
            cluster_ips=("10.96.14.2",),
            ports=(ServicePortInfo(port=9080, target_port=9080, name="tcp-9080"),),
            selector=frozen_labels({"app": "reviews"}),
            labels=frozen_labels({"app": "reviews"}),
            internal_traffic_policy="Cluster",
        ),
    )
    assert state.endpoint_slices == (
        EndpointSliceInfo(
            service="reviews", namespace="default", addresses=("10.244.1.5",), name="reviews-x2x9q"
        ),
    )
    # Read by controlplane.l7.gateway_api.parse_gateway: labels, listeners, generation.
    created = kube.get("gateways", "waypoint", "default")["metadata"]["creationTimestamp"]
    assert state.waypoints == (
        WaypointInfo(
            name="waypoint",
            namespace="default",
            address="10.96.200.10",
            waypoint_for="service",
            listeners=(WaypointListener(name="mesh", port=15008, protocol="HBONE"),),
            labels=frozen_labels({"istio.io/waypoint-for": "service"}),
            generation=1,
            created=created,
        ),
    )
    assert state.l7 == ()
    [policy] = state.policies
    assert (policy.name, policy.namespace, policy.action) == ("reviews", "default", "ALLOW")
    assert policy.selector == frozen_labels({"app": "reviews"})
    assert policy.rules is not None and len(policy.rules) == 1
    assert (state.trust_domain, state.cluster_id, state.root_namespace, state.rejected) == (
        "cluster.local",
        "Kubernetes",
        "istio-system",
        (),
    )


def test_services_carry_their_traffic_preferences_and_only_the_mesh_annotation(
    kube: FakeKube, client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    kube.add("namespaces", k.namespace("default"))
    close = k.service("close", cluster_ip="10.96.0.11", selector={"app": "close"})
    close["spec"]["trafficDistribution"] = "PreferClose"
    local = k.service("local", cluster_ip="10.96.0.12", selector={"app": "local"})
    local["spec"]["internalTrafficPolicy"] = "Local"
    annotated = k.service("annotated", cluster_ip="10.96.0.13", selector={"app": "a"})
    annotated["metadata"]["annotations"] = {
        "networking.istio.io/traffic-distribution": "preferclose",
        "kubectl.kubernetes.io/last-applied-configuration": "{...}",
    }
    odd = k.service("odd", cluster_ip="10.96.0.14", selector={"app": "odd"})
    odd["metadata"]["annotations"] = {"networking.istio.io/traffic-distribution": "Nearby"}
    for service in (close, local, annotated, odd):
        kube.add("services", service)

    async def scenario() -> SourceState:
        async with running(client) as recorder:
            return await recorder.first()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        state = asyncio.run(scenario())
    services = {s.name: s for s in state.services}
    assert services["close"].traffic_distribution == "PreferClose"
    assert services["close"].internal_traffic_policy == "Cluster"
    assert services["local"].internal_traffic_policy == "Local"
    assert services["local"].traffic_distribution == ""
    # Only the annotation the mesh reads: kubectl's rewrite on every apply is no change.
    assert services["annotated"].annotations == frozen_labels(
        {"networking.istio.io/traffic-distribution": "preferclose"}
    )
    # A value Istio does not know is kept (translation ignores it) and said once.
    assert services["odd"].annotations["networking.istio.io/traffic-distribution"] == "Nearby"
    notes = [r.getMessage() for r in caplog.records if "'Nearby'" in r.getMessage()]
    assert len(notes) == 1 and "service default/odd" in notes[0] and "ignored" in notes[0]
    assert state.rejected == ()


def test_changes_are_published_within_a_second(kube: FakeKube, client: ApiClient) -> None:
    bookinfo(kube)

    async def scenario() -> None:
        async with running(client) as recorder:
            await recorder.first()
            kube.add("pods", k.pod("productpage-v1-8f6d", ip="10.244.1.9"))
            state = await recorder.until(lambda s: "productpage-v1-8f6d" in pods(s))
            assert pods(state)["productpage-v1-8f6d"].ip == "10.244.1.9"

            ns = kube.get("namespaces", "default")
            ns["metadata"]["labels"]["istio.io/use-waypoint"] = "waypoint"
            kube.update("namespaces", ns)
            await recorder.until(
                lambda s: any(n.labels.get("istio.io/use-waypoint") for n in s.namespaces)
            )

            kube.delete("services", kube.get("services", "reviews", "default"))
            state = await recorder.until(lambda s: [x.name for x in s.services] == ["ratings"])
            assert "reviews-v1-7d9c4" in pods(state)

    asyncio.run(scenario())


def test_a_bookmark_moves_the_watch_on_without_a_relist(kube: FakeKube, client: ApiClient) -> None:
    bookinfo(kube)

    async def scenario() -> None:
        async with running(client) as recorder:
            await recorder.first()
            # Other kinds move the cluster's version on; only a bookmark tells the pod watch.
            kube.add("namespaces", k.namespace("other"))
            await recorder.until(lambda s: len(s.namespaces) == 3)
            version = kube.send_bookmark()
            watches = len(kube.watch_requests("pods"))
            kube.close_watches()  # as when timeoutSeconds elapse
            await eventually(lambda: len(kube.watch_requests("pods")) > watches)
            assert kube.watch_requests("pods")[-1].query["resourceVersion"] == version
            kube.add("pods", k.pod("late-1", ip="10.244.1.50"))
            await recorder.until(lambda s: "late-1" in pods(s))

    asyncio.run(scenario())
    assert len(kube.list_requests("pods")) == 1


@pytest.mark.parametrize("how", ["event", "http"])
def test_410_gone_relists_and_converges(
    kube: FakeKube, client: ApiClient, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The API server forgot the watch's version while pods changed: list again."""
    bookinfo(kube)

    def converged(state: SourceState) -> bool:
        reviews = pods(state).get("reviews-v1-7d9c4")
        return (
            reviews is not None
            and reviews.labels.get("version") == "v2"
            and "ratings-v1-5fd8b" not in pods(state)
            and "new-1" in pods(state)
        )

    async def scenario() -> None:
        async with running(client) as recorder:
            await recorder.first()
            with kube.held():  # none of this reaches the open watch
                changed = kube.get("pods", "reviews-v1-7d9c4", "default")
                changed["metadata"]["labels"]["version"] = "v2"
                kube.update("pods", changed)
                kube.delete("pods", kube.get("pods", "ratings-v1-5fd8b", "default"))
                kube.add("pods", k.pod("new-1", ip="10.244.1.77"))
                kube.expire("pods", how=how)
            await recorder.until(converged, within_s=2.0)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(scenario())
    assert len(kube.list_requests("pods")) == 2
    assert len(kube.list_requests("services")) == 1, "only the expired kind is listed again"
    assert any("pods: watch expired (410 Gone" in r.getMessage() for r in caplog.records)


def test_a_burst_of_pods_is_published_a_few_times(kube: FakeKube, client: ApiClient) -> None:
    bookinfo(kube)

    def all_loaded(state: SourceState) -> bool:
        return sum(p.name.startswith("load-") for p in state.pods) == 500

    async def scenario() -> tuple[int, SourceState]:
        async with running(client) as recorder:
            await recorder.first()
            before = len(recorder.states)
            for i in range(500):
                kube.add("pods", k.pod(f"load-{i}", ip=f"10.245.{i // 200}.{i % 200 + 1}"))
            state = await recorder.until(all_loaded, within_s=5.0)
            await asyncio.sleep(0.2)  # nothing more is coming
            return len(recorder.states) - before, state

    publications, state = asyncio.run(scenario())
    assert 1 <= publications <= 20, publications
    assert len(state.pods) == 503
    assert pods(state)["load-499"].ip == "10.245.2.100"


def test_server_errors_are_ridden_out_with_backoff(
    kube: FakeKube, client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    bookinfo(kube)
    kube.fail_next(3)

    async def scenario() -> SourceState:
        async with running(client) as recorder:
            await recorder.first()
            kube.add("pods", k.pod("after-1", ip="10.244.1.60"))
            return await recorder.until(lambda s: "after-1" in pods(s))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state = asyncio.run(scenario())
    assert len(state.services) == 2 and len(state.waypoints) == 1
    lines = warning_lines(caplog)
    assert len(lines) == 3, lines
    for line in lines:
        assert "HTTP 500" in line and "etcdserver: request timed out" in line, line
        assert "retrying in" in line, line


def test_an_invalid_policy_stands_as_a_deny_and_the_valid_ones_are_kept(
    kube: FakeKube, client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    bookinfo(kube)
    kube.add("authorizationpolicies", k.authorization_policy("by-name", "default", BAD_POLICY))

    async def scenario() -> SourceState:
        async with running(client) as recorder:
            state = await recorder.first()
            # Publications and a relist later, the refusal is still logged once.
            kube.add("pods", k.pod("another-1", ip="10.244.1.61"))
            await recorder.until(lambda s: "another-1" in pods(s))
            kube.expire("authorizationpolicies")
            await eventually(lambda: len(kube.list_requests("authorizationpolicies")) == 2)
            kube.add("pods", k.pod("another-2", ip="10.244.1.62"))
            await recorder.until(lambda s: "another-2" in pods(s))
            return state

    with caplog.at_level(logging.INFO, logger=LOGGER):
        state = asyncio.run(scenario())
    assert [p.name for p in state.policies] == ["by-name", "reviews"]
    bad = state.policies[0]
    assert (bad.action, bad.rules) == ("DENY", (Rule(clauses=()),))  # fail closed: deny all
    assert bad.invalid.startswith(
        "AuthorizationPolicy default/by-name: spec.rules[0].to[0].operation.ports[0]: "
        "'http' is not a port number. Until it is fixed, it is enforced as a DENY"
    )
    assert state.rejected == ()
    assert sum("by-name" in r.getMessage() for r in caplog.records) == 1  # once, not per relist


def test_pods_the_mesh_does_not_carry_are_left_out(kube: FakeKube, client: ApiClient) -> None:
    kube.add("namespaces", k.namespace("default"))
    kube.add("pods", k.pod("web-1", ip="10.244.1.5"))
    kube.add("pods", k.pod("kube-proxy-x7", "kube-system", host_network=True))
    kube.add("pods", k.pod("migrate-1", ip="10.244.1.8", phase="Succeeded", ready=False))
    kube.add("pods", k.pod("broken-1", ip="10.244.1.300"))

    async def scenario() -> SourceState:
        async with running(client) as recorder:
            return await recorder.first()

    state = asyncio.run(scenario())
    assert list(pods(state)) == ["web-1"]
    assert state.rejected == (
        "pod default/broken-1: status.podIP '10.244.1.300' is not an IP address",
    )


def test_a_missing_crd_counts_as_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without the Gateway API CRDs the mesh still works (no waypoints), and says why, once."""
    with FakeKube(missing=["gateways"]) as kube:
        kube.add("namespaces", k.namespace("default"))
        kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
        with contextlib.closing(api_client_from(kubeconfig)) as client:

            async def scenario() -> SourceState:
                async with running(client) as recorder:
                    return await recorder.first()

            with caplog.at_level(logging.WARNING, logger=LOGGER):
                state = asyncio.run(scenario())
    assert state.waypoints == () and [n.name for n in state.namespaces] == ["default"]
    [line] = warning_lines(caplog)
    assert "gateways: the API server does not serve gateway.networking.k8s.io/v1" in line


def test_service_accounts_are_kept(kube: FakeKube, client: ApiClient) -> None:
    bookinfo(kube)

    async def scenario() -> tuple[ServiceAccountInfo, ...]:
        recorder = Recorder()
        source = KubernetesSource(client, on_change=recorder)
        task = asyncio.create_task(source.run())
        await recorder.first()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return source.service_accounts()

    accounts = asyncio.run(scenario())
    assert [(a.namespace, a.name) for a in accounts] == [
        ("default", "bookinfo-reviews"),
        ("default", "default"),
    ]


def test_review_token(kube: FakeKube, client: ApiClient) -> None:
    kube.add_token(
        "bound-token",
        namespace="default",
        service_account="bookinfo-reviews",
        node="kind-worker",
        pod="reviews-v1-7d9c4",
        audiences=["istio-ca"],
    )

    known = review_token(client, "bound-token", ["istio-ca"])
    assert known.authenticated and not known.error
    assert known.username == "system:serviceaccount:default:bookinfo-reviews"
    assert known.service_account == ("default", "bookinfo-reviews")
    assert known.node_name == "kind-worker"

    unknown = review_token(client, "not-a-token", ["istio-ca"])
    assert not unknown.authenticated and "invalid bearer token" in unknown.error
    assert unknown.service_account is None and unknown.node_name is None

    wrong_audience = review_token(client, "bound-token", ["someone-else"])
    assert not wrong_audience.authenticated


def test_cancelling_run_stops_promptly(
    kube: FakeKube, client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    bookinfo(kube)

    async def scenario() -> float:
        recorder = Recorder()
        source = KubernetesSource(client, on_change=recorder, logger=logging.getLogger(LOGGER))
        task = asyncio.create_task(source.run())
        await recorder.first()  # every informer is blocked reading its watch
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        elapsed = asyncio.run(scenario())
    assert elapsed < 0.5
    assert not [t.name for t in threading.enumerate() if t.name.startswith("kube-")]
    assert warning_lines(caplog) == []


def test_api_client_from_names_what_it_tried(tmp_path: Path) -> None:
    with pytest.raises(KubernetesConfigError, match=r"cannot use kubeconfig .*missing"):
        api_client_from(str(tmp_path / "missing"))


def test_the_fake_speaks_what_the_official_watch_helper_reads(
    kube: FakeKube, client: ApiClient
) -> None:
    """Keeps the fake honest: kubernetes.watch decodes its streams into the client's models."""
    start = kube.resource_version
    kube.add("pods", k.pod("reviews-v1-7d9c4", ip="10.244.1.5"))
    kube.add("gateways", k.gateway("waypoint", "default", "10.96.200.10"))
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)

    w = new_watch()
    for event in w.stream(core.list_namespaced_pod, "default", resource_version=start):
        assert event["type"] == "ADDED"
        pod = event["object"]
        assert isinstance(pod, kubernetes.client.V1Pod) and pod.status is not None
        assert pod.status.pod_ip == "10.244.1.5"
        w.stop()
    for event in w.stream(
        custom.list_cluster_custom_object,
        "gateway.networking.k8s.io",
        "v1",
        "gateways",
        resource_version=start,
    ):
        assert event["object"]["status"]["addresses"][0]["value"] == "10.96.200.10"
        w.stop()

    kube.expire("pods")
    with pytest.raises(ApiException) as gone:
        # With timeout_seconds the helper does not retry: the 410 event is raised.
        next(
            iter(
                w.stream(
                    core.list_pod_for_all_namespaces, resource_version=start, timeout_seconds=5
                )
            )
        )
    assert gone.value.status == 410


# -- what the L7 translation reads -------------------------------------------------------------

HTTP_ROUTE = {
    "metadata": {
        "name": "reviews",
        "namespace": "default",
        "annotations": {LAST_APPLIED: '{"kind":"HTTPRoute"}\n', "team": "shop"},
    },
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
        "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}],
    },
}
L7_OBJECTS = {
    "httproutes": HTTP_ROUTE,
    "grpcroutes": {
        "metadata": {"name": "ratings", "namespace": "default"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "ratings"}]},
    },
    "virtualservices": {
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
    },
    "destinationrules": {
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
    },
}


def test_routes_and_traffic_policies_are_kept_as_written(kube: FakeKube, client: ApiClient) -> None:
    bookinfo(kube)
    for resource, obj in L7_OBJECTS.items():
        kube.add(resource, obj)

    async def scenario() -> tuple[SourceState, int, SourceState]:
        async with running(client) as recorder:
            first = await recorder.first()
            # Every object listed again, unchanged: nothing new to publish.
            kube.expire()
            await eventually(lambda: len(kube.list_requests("httproutes")) == 2, within_s=3)
            await asyncio.sleep(0.3)
            published = len(recorder.states)
            # A route changes: the new version is published, with its generation.
            route = kube.get("httproutes", "reviews", "default")
            route["spec"]["rules"][0]["backendRefs"][0]["port"] = 9081
            kube.update("httproutes", route)
            changed = await recorder.until(
                lambda s: any(
                    o.raw["spec"]["rules"][0]["backendRefs"][0]["port"] == 9081
                    for o in s.l7
                    if o.kind == "HTTPRoute"
                )
            )
            return first, published, changed

    first, published, changed = asyncio.run(scenario())
    assert published == 1
    by_kind = {o.kind: o for o in first.l7}
    assert sorted(by_kind) == ["DestinationRule", "GRPCRoute", "HTTPRoute", "VirtualService"]
    route = by_kind["HTTPRoute"]
    assert (route.namespace, route.name) == ("default", "reviews")
    meta = route.raw["metadata"]
    assert "resourceVersion" not in meta and "managedFields" not in meta
    assert meta["annotations"] == {"team": "shop"}  # kubectl's copy of the object is noise
    assert meta["uid"] and meta["generation"] == 1 and meta["creationTimestamp"]
    assert route.raw["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route.raw["spec"] == HTTP_ROUTE["spec"]
    assert "annotations" not in by_kind["GRPCRoute"].raw["metadata"]
    assert len(changed.l7) == 4


def test_service_ports_carry_their_app_protocol(kube: FakeKube, client: ApiClient) -> None:
    kube.add("namespaces", k.namespace("default"))
    kube.add(
        "services",
        k.service(
            "grpc",
            cluster_ip="10.96.0.21",
            ports=[
                {"name": "api", "port": 50051, "appProtocol": "kubernetes.io/h2c"},
                {"name": "plain", "port": 8080},
            ],
        ),
    )

    async def scenario() -> SourceState:
        async with running(client) as recorder:
            return await recorder.first()

    [svc] = asyncio.run(scenario()).services
    assert [(p.name, p.app_protocol) for p in svc.ports] == [
        ("api", "kubernetes.io/h2c"),
        ("plain", ""),
    ]


def test_a_gateway_the_l7_reader_refuses_is_rejected_alone(
    kube: FakeKube, client: ApiClient
) -> None:
    bookinfo(kube)
    broken = k.gateway("broken", "default", None)
    broken["spec"]["listeners"][0]["tls"] = None
    broken["spec"]["allowedListeners"] = {"namespaces": {"from": "All"}}
    kube.add("gateways", broken)
    odd = k.gateway("odd", "default", "10.96.200.11")
    odd["metadata"]["labels"]["istio.io/waypoint-for"] = "everything"
    kube.add("gateways", odd)

    async def scenario() -> SourceState:
        async with running(client) as recorder:
            return await recorder.first()

    state = asyncio.run(scenario())
    waypoints = {w.name: w for w in state.waypoints}
    assert sorted(waypoints) == ["odd", "waypoint"]  # the ingress Gateway is not ours
    assert "waypoint-for='everything'" in waypoints["odd"].problem
    assert state.rejected == (
        "Gateway default/broken: spec.allowedListeners: not supported: listener sets",
    )


def test_missing_route_and_policy_crds_count_as_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = ["httproutes", "grpcroutes", "virtualservices", "destinationrules"]
    with FakeKube(missing=missing) as kube:
        kube.add("namespaces", k.namespace("default"))
        kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))
        with contextlib.closing(api_client_from(kubeconfig)) as client:

            async def scenario() -> SourceState:
                async with running(client, backoff_max_s=0.05) as recorder:
                    state = await recorder.first()
                    # They are asked again (slowly), and not said again.
                    await eventually(lambda: len(kube.list_requests("httproutes")) >= 3, 3)
                    return state

            with caplog.at_level(logging.WARNING, logger=LOGGER):
                state = asyncio.run(scenario())
    assert state.l7 == ()
    lines = warning_lines(caplog)
    assert len(lines) == 4
    for plural in missing:
        assert sum("the API server does not serve" in x and plural in x for x in lines) == 1


# -- the fake's writes are the API server's --------------------------------------------------


def request(
    client: ApiClient, method: str, path: str, body: Any = None, content_type: str = ""
) -> tuple[int, dict[str, Any]]:
    """One raw request through the client's transport; (status, JSON body)."""
    headers = {"Accept": "application/json"}
    if content_type or body is not None:
        headers["Content-Type"] = content_type or "application/json"
    method, url, headers, body, post = client.param_serialize(
        method=method,
        resource_path=path,
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = client.call_api(method, url, headers, body, post)
    data: bytes = response.read()  # type: ignore[no-untyped-call]
    return response.status, json.loads(data or b"{}")


GATEWAYS = "/apis/gateway.networking.k8s.io/v1/namespaces/default/gateways"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"


def test_the_fake_updates_with_conflicts_and_the_status_subresource(
    kube: FakeKube, client: ApiClient
) -> None:
    kube.add("gateways", k.gateway("waypoint", "default", None))
    gw = kube.get("gateways", "waypoint", "default")
    stale = copy.deepcopy(gw)

    # PUT to the object: the spec changes (generation too), the status does not.
    gw["spec"]["listeners"][0]["port"] = 15009
    gw["status"] = {"conditions": []}
    code, body = request(client, "PUT", f"{GATEWAYS}/waypoint", gw)
    assert code == 200 and body["metadata"]["generation"] == 2
    assert body["status"] == stale["status"]
    assert int(body["metadata"]["resourceVersion"]) > int(stale["metadata"]["resourceVersion"])

    # A write from an old version is refused, as the API server refuses it.
    code, body = request(client, "PUT", f"{GATEWAYS}/waypoint", stale)
    assert (code, body["reason"]) == (409, "Conflict")
    assert "the object has been modified" in body["message"]

    # PUT to /status: only the status changes.
    current = kube.get("gateways", "waypoint", "default")
    current["status"] = {"addresses": [{"type": "IPAddress", "value": "10.96.0.9"}]}
    current["spec"]["listeners"] = []
    code, body = request(client, "PUT", f"{GATEWAYS}/waypoint/status", current)
    assert code == 200 and body["status"]["addresses"][0]["value"] == "10.96.0.9"
    assert body["spec"]["listeners"][0]["port"] == 15009 and body["metadata"]["generation"] == 2

    # A merge patch; a resourceVersion in it is a precondition; null removes.
    patch = {"metadata": {"labels": {"team": "shop", "istio.io/waypoint-for": None}}}
    code, body = request(client, "PATCH", f"{GATEWAYS}/waypoint", patch, MERGE)
    assert code == 200 and body["metadata"]["labels"] == {"team": "shop"}
    patch = {"metadata": {"resourceVersion": stale["metadata"]["resourceVersion"]}}
    assert request(client, "PATCH", f"{GATEWAYS}/waypoint", patch, MERGE)[0] == 409
    # A custom resource takes no strategic merge patch; JSON patch is not implemented here.
    assert request(client, "PATCH", f"{GATEWAYS}/waypoint", {}, STRATEGIC)[0] == 415
    assert (
        request(client, "PATCH", f"{GATEWAYS}/waypoint", [], "application/json-patch+json")[0]
        == 415
    )
    # Nothing there: 404; a no-op write makes no new version.
    assert request(client, "PUT", f"{GATEWAYS}/nope", gw)[0] == 404
    before = kube.resource_version
    request(client, "PATCH", f"{GATEWAYS}/waypoint", {"spec": {}}, MERGE)
    assert kube.resource_version == before


def test_the_fake_defaults_allocates_and_collects_garbage(
    kube: FakeKube, client: ApiClient
) -> None:
    kube.add("gateways", k.gateway("waypoint", "default", None))
    owner_uid = kube.get("gateways", "waypoint", "default")["metadata"]["uid"]
    owner = [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
              "name": "waypoint", "uid": owner_uid, "controller": True}]  # fmt: skip
    svc = {"metadata": {"name": "waypoint", "ownerReferences": owner},
           "spec": {"ports": [{"name": "mesh", "port": 15008}]}}  # fmt: skip
    code, body = request(client, "POST", "/api/v1/namespaces/default/services", svc)
    assert code == 201
    spec = body["spec"]
    assert spec["clusterIP"] and spec["clusterIPs"] == [spec["clusterIP"]]
    assert (spec["type"], spec["ports"][0]["targetPort"], spec["ports"][0]["protocol"]) == (
        "ClusterIP",
        15008,
        "TCP",
    )
    # The address stays when an update leaves it out, and may not change.
    ip = spec["clusterIP"]
    body["spec"].pop("clusterIP")
    body["spec"].pop("clusterIPs")
    code, again = request(client, "PUT", "/api/v1/namespaces/default/services/waypoint", body)
    assert code == 200 and again["spec"]["clusterIP"] == ip
    again["spec"]["clusterIP"] = "10.96.0.1"
    assert request(client, "PUT", "/api/v1/namespaces/default/services/waypoint", again)[0] == 422

    containers = [{"name": "w", "image": "w:1"}]
    dep = {"metadata": {"name": "waypoint", "ownerReferences": owner},
           "spec": {"selector": {"matchLabels": {"app": "w"}},
                    "template": {"spec": {"containers": containers}}}}  # fmt: skip
    code, body = request(client, "POST", DEPLOYMENTS, dep)
    assert code == 201 and body["spec"]["replicas"] == 1 and body["metadata"]["generation"] == 1
    assert body["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert request(client, "POST", DEPLOYMENTS, dep)[1]["reason"] == "AlreadyExists"

    # A precondition that does not hold refuses the delete; deleting the owner takes both.
    wrong = {"preconditions": {"uid": "not-its-uid"}}
    assert request(client, "DELETE", f"{GATEWAYS}/waypoint", wrong)[0] == 409
    code, body = request(client, "DELETE", f"{GATEWAYS}/waypoint")
    assert (code, body["status"], body["details"]["uid"]) == (200, "Success", owner_uid)
    assert kube.find("services", "waypoint", "default") is None
    assert kube.find("deployments", "waypoint", "default") is None
    # Written with an owner that is gone: collected at once, as the GC collects it.
    assert request(client, "POST", DEPLOYMENTS, dep)[0] == 201
    assert kube.find("deployments", "waypoint", "default") is None


def test_the_fake_selects_by_label_in_lists_and_watches(kube: FakeKube, client: ApiClient) -> None:
    kube.add("configmaps", {"metadata": {"name": "a", "labels": {"istio.io/config": "true"}}})
    kube.add("configmaps", {"metadata": {"name": "b", "labels": {"tier": "x"}}})
    core = kubernetes.client.CoreV1Api(client)

    def names(selector: str) -> list[str]:
        listed = core.list_config_map_for_all_namespaces(label_selector=selector)
        return [str(i.metadata.name) for i in listed.items if i.metadata is not None]

    assert names("istio.io/config=true") == ["a"]
    assert names("tier in (x,y),!istio.io/config") == ["b"]
    assert names("tier!=x") == ["a"] and names("tier notin (x)") == ["a"] and names("tier") == ["b"]
    with pytest.raises(ApiException) as bad:
        names("tier in (x")
    assert bad.value.status == 400

    start = kube.resource_version
    b = kube.get("configmaps", "b", "default")
    b["metadata"]["labels"]["istio.io/config"] = "true"  # starts matching
    kube.update("configmaps", b)
    a = kube.get("configmaps", "a", "default")
    a["metadata"]["labels"] = {}  # stops matching
    kube.update("configmaps", a)
    w = new_watch()
    seen = []
    for event in w.stream(
        core.list_config_map_for_all_namespaces,
        label_selector="istio.io/config=true",
        resource_version=start,
        timeout_seconds=1,
    ):
        seen.append((event["type"], event["object"].metadata.name))
    assert seen == [("ADDED", "b"), ("DELETED", "a")]
