"""The waypoint deployer against a local API server: Gateways in, instances and status out.

meshd's Kubernetes source and the deployer run as meshd runs them (the source's
state, built by ``controlplane.l7.build``, offered to the deployer), through
the official client, against ``tests.support.fake_kube``, which allocates
Service addresses, defaults what the API server defaults, checks
resourceVersions and collects garbage by owner reference.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from controlplane import kube_status
from controlplane.ca_service import CaService, TokenReviewAuthenticator, serve_ca
from controlplane.deployer import WaypointDeployer
from controlplane.kube_waypoints import (
    DeployerSettings,
    GatewayRef,
    covers,
    instance_objects,
    replicas_of,
)
from controlplane.l7.build import build
from controlplane.l7.gateway_api import ParentRef
from controlplane.l7.status import Condition, ObjectStatus, ParentStatus
from controlplane.sources.kubernetes import KubernetesSource, api_client_from, review_token
from controlplane.state import SourceState
from mesh.caclient import CaClient, CaError
from mesh.identity import CertificateAuthority, SpiffeId
from tests.support import fake_kube as k
from tests.support.fake_kube import FakeKube

ApiClient = kubernetes.client.ApiClient
LOGGER = "test.kube-waypoints"
SETTINGS = DeployerSettings(image="ambient-mesh:test", resync_s=60.0)
ROOT_PEM = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"
MANAGED = {"gateway.istio.io/managed": "istio.io-mesh-controller"}
OTHER_CONTROLLER = {
    "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
    "controllerName": "example.com/ingress",
    "conditions": [
        {
            "type": "Accepted",
            "status": "True",
            "reason": "Accepted",
            "message": "",
            "observedGeneration": 1,
            "lastTransitionTime": "2026-03-01T12:00:00Z",
        }
    ],
}


def waypoint(name: str = "waypoint", namespace: str = "shop", **spec: Any) -> k.Obj:
    """A waypoint Gateway as ``istioctl waypoint apply`` writes it."""
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"istio.io/waypoint-for": "service"},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            **spec,
        },
    }


def http_route(name: str, namespace: str, service: str, port: int) -> k.Obj:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": service, "port": port}],
            "rules": [{"backendRefs": [{"name": service, "port": port}]}],
        },
        # Another controller's answer, for a parent of its own: never ours to touch.
        "status": {"parents": [copy.deepcopy(OTHER_CONTROLLER)]},
    }


def shop(kube: FakeKube) -> None:
    """An ambient namespace whose reviews service uses the waypoint, with a route."""
    kube.add("namespaces", k.namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    kube.add(
        "services",
        k.service(
            "reviews",
            "shop",
            cluster_ip="10.96.14.2",
            ports=[{"name": "web", "port": 9080, "appProtocol": "http"}],
            selector={"app": "reviews"},
            labels={"istio.io/use-waypoint": "waypoint"},
        ),
    )
    kube.add("pods", k.pod("reviews-v1-7d9c4", "shop", ip="10.244.1.5", labels={"app": "reviews"}))
    kube.add("httproutes", http_route("reviews", "shop", "reviews", 9080))


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def client(kube: FakeKube, tmp_path: Path) -> Iterator[ApiClient]:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    with contextlib.closing(api_client_from(str(kubeconfig))) as api:
        yield api


@contextlib.asynccontextmanager
async def meshd(
    client: ApiClient, settings: DeployerSettings = SETTINGS
) -> AsyncIterator[WaypointDeployer]:
    """The source and the deployer, wired as meshd wires them (on_source, then offer)."""
    logger = logging.getLogger(LOGGER)
    deployer = WaypointDeployer(
        client, settings, root_cert=lambda: ROOT_PEM, logger=logger, backoff_initial_s=0.05
    )
    source = KubernetesSource(
        client, on_change=lambda s: deployer.offer(s, build(s)), logger=logger
    )
    tasks = [asyncio.create_task(source.run()), asyncio.create_task(deployer.run())]
    try:
        yield deployer
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def eventually(check: Callable[[], Any], within_s: float = 10.0) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def quiet(kube: FakeKube, for_s: float = 0.5, within_s: float = 10.0) -> int:
    """Wait until no write has been served for ``for_s``; the number of writes so far."""
    deadline = time.monotonic() + within_s
    count, since = len(kube.writes()), time.monotonic()
    while time.monotonic() - since < for_s:
        assert time.monotonic() < deadline, f"still writing: {kube.writes()[-3:]}"
        await asyncio.sleep(0.05)
        if len(kube.writes()) != count:
            count, since = len(kube.writes()), time.monotonic()
    return count


def gone(kube: FakeKube, resource: str, name: str, namespace: str) -> bool:
    return kube.find(resource, name, namespace) is None


def conditions(status: k.Obj) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions") or ()}


# -- a Gateway becomes a running instance -----------------------------------------------


def test_a_waypoint_gateway_gets_its_instance_address_and_status(
    kube: FakeKube, client: ApiClient
) -> None:
    shop(kube)
    kube.add("gateways", waypoint())
    uid = kube.get("gateways", "waypoint", "shop")["metadata"]["uid"]

    async def scenario() -> None:
        async with meshd(client):
            await eventually(lambda: kube.find("deployments", "waypoint", "shop"))
            await eventually(
                lambda: (
                    conditions(kube.get("gateways", "waypoint", "shop").get("status") or {}).get(
                        "Programmed", ("",)
                    )[0]
                    == "True"
                )
            )
            await eventually(
                lambda: len(kube.get("httproutes", "reviews", "shop")["status"]["parents"]) == 2
            )
            await quiet(kube)

    asyncio.run(scenario())
    owner = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": "waypoint",
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    sa = kube.get("serviceaccounts", "waypoint", "shop")
    dep = kube.get("deployments", "waypoint", "shop")
    svc = kube.get("services", "waypoint", "shop")
    for obj in (sa, dep, svc):
        assert obj["metadata"]["ownerReferences"] == [owner]
        assert obj["metadata"]["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller"
        assert obj["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"

    # The Deployment: one replica (the API's default: we leave it to an HPA or kubectl scale).
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["selector"] == {
        "matchLabels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    }
    pod = dep["spec"]["template"]
    assert {
        "gateway.networking.k8s.io/gateway-name": "waypoint",
        "gateway.istio.io/managed": "istio.io-mesh-controller",
        "istio.io/dataplane-mode": "none",
        "service.istio.io/canonical-name": "waypoint",
    }.items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["serviceAccountName"] == "waypoint"
    [container] = pod["spec"]["containers"]
    assert container["image"] == "ambient-mesh:test"
    assert container["command"] == ["waypoint"]
    assert container["args"] == [
        "--gateway",
        "shop/waypoint",
        "--xds-address",
        "istiod.istio-system.svc:15012",
        "--root-cert",
        "/var/run/secrets/istio/root-cert.pem",
        "--token-file",
        "/var/run/secrets/tokens/istio-token",
        "--trust-domain",
        "cluster.local",
    ]
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("hbone", 15008),
        ("metrics", 15020),
        ("status-port", 15021),
    ]
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/healthz/ready",
        "port": 15021,
        "scheme": "HTTP",
    }
    security = container["securityContext"]
    assert (security["runAsUser"], security["runAsNonRoot"]) == (1337, True)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["istiod-ca-cert"]["configMap"]["name"] == "istio-ca-root-cert"
    [token] = volumes["istio-token"]["projected"]["sources"]
    assert token["serviceAccountToken"]["audience"] == "istio-ca"
    # The mesh root, where the pod mounts it from.
    root = kube.get("configmaps", "istio-ca-root-cert", "shop")
    assert root["data"] == {"root-cert.pem": ROOT_PEM}

    # The Service: an address from the API server, meshlab's ports, selecting the pods.
    ip = svc["spec"]["clusterIP"]
    assert ip and svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    assert [(p["name"], p["port"], p["appProtocol"]) for p in svc["spec"]["ports"]] == [
        ("mesh", 15008, "all"),
        ("status-port", 15021, "tcp"),
        ("metrics", 15020, "http"),
    ]

    # The Gateway's status: the Service's address, Accepted and Programmed.
    status = kube.get("gateways", "waypoint", "shop")["status"]
    assert status["addresses"] == [{"type": "IPAddress", "value": ip}]
    assert conditions(status) == {
        "Accepted": ("True", "Accepted"),
        "Programmed": ("True", "Programmed"),
    }
    assert all(
        c["lastTransitionTime"] and c["observedGeneration"] == 1 for c in status["conditions"]
    )

    # The route: our parent entry beside the other controller's, which is kept as it was.
    parents = kube.get("httproutes", "reviews", "shop")["status"]["parents"]
    assert parents[0] == OTHER_CONTROLLER
    ours = parents[1]
    assert ours["controllerName"] == "istio.io/mesh-controller"
    assert ours["parentRef"] == {
        "group": "",
        "kind": "Service",
        "namespace": "shop",
        "name": "reviews",
        "port": 9080,
    }
    assert conditions(ours) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    # Status went through the status subresource, nothing else wrote to the objects.
    for resource in ("gateways", "httproutes"):
        assert {(r.method, r.path.rsplit("/", 1)[-1]) for r in kube.writes(resource)} == {
            ("PUT", "status")
        }


def test_an_unchanged_world_costs_no_write(kube: FakeKube, client: ApiClient) -> None:
    shop(kube)
    kube.add("gateways", waypoint())

    async def scenario() -> tuple[int, int, WaypointDeployer]:
        async with meshd(client) as deployer:
            await eventually(lambda: kube.find("services", "waypoint", "shop"))
            settled = await quiet(kube)
            passes = deployer.passes
            # Changes the deployer hears of, none of which asks for anything new.
            kube.add("pods", k.pod("reviews-v1-8x8x8", "shop", ip="10.244.1.6"))
            dep = kube.get("deployments", "waypoint", "shop")
            dep["status"] = {"replicas": 1, "readyReplicas": 1, "observedGeneration": 1}
            kube.update("deployments", dep)  # as the deployment controller does
            svc = kube.get("services", "waypoint", "shop")
            svc["metadata"]["labels"]["team"] = "shop"  # someone else's label
            kube.update("services", svc)
            await eventually(lambda: deployer.passes > passes)
            return settled, await quiet(kube), deployer

    settled, after, deployer = asyncio.run(scenario())
    assert after == settled, kube.writes()[settled:]
    # And a pass called directly on the last state, with nothing changed, writes nothing.
    state = deployer.state
    assert state is not None
    assert deployer.reconcile(state, build(state)).writes == []
    assert len(kube.writes()) == after


def test_deleting_the_gateway_removes_its_instance(kube: FakeKube, client: ApiClient) -> None:
    shop(kube)
    kube.add("gateways", waypoint())

    async def scenario() -> None:
        async with meshd(client):
            await eventually(lambda: kube.find("deployments", "waypoint", "shop"))
            kube.delete("gateways", kube.get("gateways", "waypoint", "shop"))
            for resource in ("deployments", "services", "serviceaccounts"):
                await eventually(functools.partial(gone, kube, resource, "waypoint", "shop"))
            await quiet(kube)
            # The garbage collector did it: meshd leaves that to it, and deletes nothing.
            assert not [w for w in kube.writes() if w.method == "DELETE"]
            # The route's parent entry of ours says the waypoint is no more.
            route = kube.get("httproutes", "reviews", "shop")
            assert route["status"]["parents"][0] == OTHER_CONTROLLER

    asyncio.run(scenario())
    assert kube.find("services", "reviews", "shop") is not None


def left_behind(name: str, uid: str) -> k.Obj:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {**MANAGED, "gateway.networking.k8s.io/gateway-name": name},
            "ownerReferences": [
                {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                 "name": name, "uid": uid}
            ],
        },
    }  # fmt: skip


def test_what_a_gone_gateway_left_behind_is_deleted(tmp_path: Path) -> None:
    """Children whose Gateway is gone and that the garbage collector has not deleted (it
    is not running here): after the GC's grace, the deployer deletes what it made."""
    with FakeKube(garbage_collector=False) as kube:
        kube.add("namespaces", k.namespace("shop"))
        gone = "5d1e6c2a-0000-4000-8000-000000000000"
        kube.add("serviceaccounts", left_behind("old", gone))
        spec = {"selector": {"matchLabels": {"a": "b"}}}
        kube.add("deployments", {**left_behind("old", gone), "spec": spec})
        kube.add("services", k.service("mine", "shop", labels=MANAGED))  # no Gateway owner: kept
        kubeconfig = str(kube.write_kubeconfig(tmp_path / "kubeconfig"))

        async def scenario() -> float:
            with contextlib.closing(api_client_from(kubeconfig)) as client:
                async with meshd(client, replace(SETTINGS, orphan_grace_s=0.5)):
                    await eventually(lambda: kube.find("serviceaccounts", "old", "shop"))
                    started = time.monotonic()
                    await eventually(lambda: kube.find("deployments", "old", "shop") is None)
                    await eventually(lambda: kube.find("serviceaccounts", "old", "shop") is None)
                    waited = time.monotonic() - started
                    await quiet(kube)
                    return waited

        waited = asyncio.run(scenario())
        deletes = [w.path for w in kube.writes() if w.method == "DELETE"]
        assert sorted(deletes) == [
            "/api/v1/namespaces/shop/serviceaccounts/old",
            "/apis/apps/v1/namespaces/shop/deployments/old",
        ]
        assert waited >= 0.3  # the garbage collector's turn first
        assert kube.find("services", "mine", "shop") is not None


def test_a_gateway_of_another_class_loses_its_instance_at_once(
    kube: FakeKube, client: ApiClient
) -> None:
    kube.add("namespaces", k.namespace("shop"))
    kube.add("gateways", waypoint())

    async def scenario() -> None:
        async with meshd(client):
            await eventually(lambda: kube.find("services", "waypoint", "shop"))
            gw = kube.get("gateways", "waypoint", "shop")
            gw["spec"]["gatewayClassName"] = "istio"  # now an ingress controller's
            kube.update("gateways", gw)
            for resource in ("deployments", "services", "serviceaccounts"):
                await eventually(functools.partial(gone, kube, resource, "waypoint", "shop"))

    asyncio.run(scenario())
    assert len([w for w in kube.writes() if w.method == "DELETE"]) == 3
    assert kube.find("gateways", "waypoint", "shop") is not None


def test_a_deleted_or_edited_child_is_repaired(kube: FakeKube, client: ApiClient) -> None:
    kube.add("namespaces", k.namespace("shop"))
    kube.add("gateways", waypoint())

    async def scenario() -> None:
        async with meshd(client):
            first = await eventually(lambda: kube.find("deployments", "waypoint", "shop"))
            await quiet(kube)
            kube.delete("deployments", first)
            again = await eventually(lambda: kube.find("deployments", "waypoint", "shop"))
            assert again["metadata"]["uid"] != first["metadata"]["uid"]
            edited = kube.get("deployments", "waypoint", "shop")
            edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
            kube.update("deployments", edited)
            await eventually(
                lambda: (
                    kube.get("deployments", "waypoint", "shop")["spec"]["template"]["spec"][
                        "containers"
                    ][0]["image"]
                    == "ambient-mesh:test"
                )
            )
            # Repaired with a merge patch of our fields, not a replacement.
            [patch] = [w for w in kube.writes("deployments") if w.method == "PATCH"]
            assert patch.content_type == "application/merge-patch+json"

    asyncio.run(scenario())


def root_cert_in(kube: FakeKube, namespace: str) -> k.Obj | None:
    return kube.find("configmaps", "istio-ca-root-cert", namespace)


def test_the_mesh_root_is_in_every_namespace_but_kubernetes_own_and_kept_there(
    kube: FakeKube, client: ApiClient
) -> None:
    # No waypoint at all: ztunnel (istio-system) and any pod's proxy mount this.
    for name in ("istio-system", "shop", "kube-system", "kube-public"):
        kube.add("namespaces", k.namespace(name))

    async def scenario() -> None:
        async with meshd(client):
            for ns in ("istio-system", "shop"):
                cm = await eventually(functools.partial(root_cert_in, kube, ns))
                assert cm["data"]["root-cert.pem"] == ROOT_PEM
            await quiet(kube)
            assert gone(kube, "configmaps", "istio-ca-root-cert", "kube-system")
            assert gone(kube, "configmaps", "istio-ca-root-cert", "kube-public")
            # A namespace made later gets it; one deleted by hand comes back.
            kube.add("namespaces", k.namespace("books"))
            await eventually(lambda: kube.find("configmaps", "istio-ca-root-cert", "books"))
            kube.delete("configmaps", kube.get("configmaps", "istio-ca-root-cert", "shop"))
            await eventually(lambda: kube.find("configmaps", "istio-ca-root-cert", "shop"))

    asyncio.run(scenario())


def test_replicas_come_from_the_gateways_parameters(kube: FakeKube, client: ApiClient) -> None:
    kube.add("namespaces", k.namespace("shop"))
    kube.add(
        "configmaps",
        {
            "metadata": {"name": "waypoint-params", "namespace": "shop"},
            "data": {"deployment": "spec:\n  replicas: 3\n"},
        },
    )
    ref = {"group": "", "kind": "ConfigMap", "name": "waypoint-params"}
    kube.add("gateways", waypoint(infrastructure={"parametersRef": ref}))

    async def scenario() -> None:
        async with meshd(client):
            dep = await eventually(lambda: kube.find("deployments", "waypoint", "shop"))
            assert dep["spec"]["replicas"] == 3

    asyncio.run(scenario())


def test_an_object_meshd_did_not_make_is_left_alone(
    kube: FakeKube, client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    kube.add("namespaces", k.namespace("shop"))
    kube.add("services", k.service("waypoint", "shop", cluster_ip="10.96.3.3", labels={}))
    kube.add("gateways", waypoint())

    async def scenario() -> None:
        async with meshd(client):
            await eventually(lambda: kube.find("deployments", "waypoint", "shop"))
            await eventually(
                lambda: any("is not managed by meshd" in r.getMessage() for r in caplog.records)
            )
            await quiet(kube)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        asyncio.run(scenario())
    # Asked once (the create that found it), not on every pass.
    assert len(kube.writes("services")) == 1
    svc = kube.get("services", "waypoint", "shop")
    assert "ownerReferences" not in svc["metadata"] and svc["metadata"]["labels"] == {}
    lines = [r.getMessage() for r in caplog.records if "is not managed by meshd" in r.getMessage()]
    assert len(lines) == 1 and "service shop/waypoint" in lines[0]  # said once, not per pass
    # No Service of ours, so no address: accepted, not programmed.
    status = kube.get("gateways", "waypoint", "shop")["status"]
    assert conditions(status)["Programmed"] == ("False", "AddressNotAssigned")


def test_an_unreadable_gateway_is_told_why(kube: FakeKube, client: ApiClient) -> None:
    kube.add("namespaces", k.namespace("shop"))
    kube.add("gateways", waypoint(backendTLS={"clientCertificateRef": {"name": "x"}}))

    async def scenario() -> None:
        async with meshd(client):
            await eventually(lambda: kube.get("gateways", "waypoint", "shop").get("status"))

    asyncio.run(scenario())
    status = kube.get("gateways", "waypoint", "shop")["status"]
    assert conditions(status) == {
        "Accepted": ("False", "Invalid"),
        "Programmed": ("False", "Invalid"),
    }
    assert "spec.backendTLS: not supported" in status["conditions"][0]["message"]


# -- the CA: the waypoint's pod asks for its own identity ---------------------------------


def test_a_waypoint_pod_obtains_its_own_identity_with_its_projected_token(
    kube: FakeKube, client: ApiClient, tmp_path: Path
) -> None:
    """The token the Deployment projects (audience istio-ca), reviewed by the API server
    for that audience, earns the waypoint's service account identity and no other."""
    kube.add_token(
        "waypoint-pod-token",
        namespace="shop",
        service_account="waypoint",
        node="kind-worker",
        pod="waypoint-5b9d7c-x2x9q",
        audiences=[SETTINGS.token_audience],
    )
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    authenticator = TokenReviewAuthenticator(
        lambda token: review_token(client, token, [SETTINGS.token_audience])
    )
    service = CaService(ca, authenticator, SourceState)
    own = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/waypoint")
    other = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/reviews")

    async def scenario() -> tuple[SpiffeId, str]:
        server, port = await serve_ca(service, "127.0.0.1:0")
        ca_client = CaClient(f"127.0.0.1:{port}", "waypoint-pod-token", timeout_s=5)
        try:
            cert = await ca_client.fetch(own)
            with pytest.raises(CaError) as refused:
                await ca_client.fetch(other)
            return cert.identity, refused.value.message
        finally:
            await ca_client.close()
            await server.stop(None)

    identity, refusal = asyncio.run(scenario())
    assert identity == own
    assert "workload shop/waypoint may only obtain its own identity" in refusal


# -- the pure parts ---------------------------------------------------------------------------


GW = GatewayRef(namespace="shop", name="waypoint", uid="u-1", generation=2)


def test_covers_ignores_defaults_and_additions_but_not_changes() -> None:
    _, dep, _ = instance_objects(GW, SETTINGS)
    live = copy.deepcopy(dep)
    live["metadata"]["labels"]["team"] = "shop"
    live["spec"]["revisionHistoryLimit"] = 10
    live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/x"
    assert covers(dep, live)
    live["spec"]["template"]["spec"]["containers"][0]["args"].append("--extra")
    assert not covers(dep, live)
    assert not covers({"a": [1, 2]}, {"a": [1]}) and covers({"a": 1}, {"a": 1, "b": 2})


def test_replicas_only_when_the_gateway_says() -> None:
    _, dep, _ = instance_objects(GW, SETTINGS)
    assert "replicas" not in dep["spec"]
    _, dep, _ = instance_objects(GatewayRef(namespace="a", name="b", uid="u", replicas=2), SETTINGS)
    assert dep["spec"]["replicas"] == 2
    assert replicas_of({"data": {"deployment": "spec: {replicas: 0}"}}) == 0
    assert replicas_of({"data": {"service": "x"}}) is None
    with pytest.raises(ValueError, match="not a count"):
        replicas_of({"data": {"deployment": "spec: {replicas: many}"}})


def test_infrastructure_labels_and_annotations_reach_every_object() -> None:
    gw = GatewayRef.of(
        {
            "metadata": {"name": "w", "namespace": "n", "uid": "u"},
            "spec": {
                "infrastructure": {
                    "labels": {"team": "shop"},
                    "annotations": {"note": "x", "gateway.istio.io/service-account": "y"},
                }
            },
        }
    )
    for obj in instance_objects(gw, SETTINGS):
        assert obj["metadata"]["labels"]["team"] == "shop"
        assert obj["metadata"]["annotations"]["note"] == "x"
        assert "gateway.istio.io/service-account" not in obj["metadata"]["annotations"]


ACCEPTED = ObjectStatus(
    kind="Gateway",
    namespace="shop",
    name="waypoint",
    generation=2,
    conditions=(
        Condition(type="Accepted", status=True, reason="Accepted"),
        Condition(type="Programmed", status=True, reason="Programmed", message="serving"),
    ),
    addresses=("10.96.128.1",),
)


def test_an_unchanged_condition_keeps_its_transition_time() -> None:
    first = kube_status.gateway_status(None, ACCEPTED, ["10.96.128.1"], "T1")
    assert first is not None
    assert [c["lastTransitionTime"] for c in first["conditions"]] == ["T1", "T1"]
    assert kube_status.gateway_status(first, ACCEPTED, ["10.96.128.1"], "T2") is None
    flipped = ObjectStatus(
        kind="Gateway",
        namespace="shop",
        name="waypoint",
        generation=2,
        conditions=(
            Condition(type="Accepted", status=True, reason="Accepted"),
            Condition(type="Programmed", status=False, reason="AddressNotAssigned"),
        ),
    )
    second = kube_status.gateway_status(first, flipped, [], "T3")
    assert second is not None and "addresses" not in second
    assert [c["lastTransitionTime"] for c in second["conditions"]] == ["T1", "T3"]


def test_only_our_route_parents_are_ours_to_replace() -> None:
    ref = ParentRef(group="", kind="Service", namespace="shop", name="reviews", port=9080)
    computed = ObjectStatus(
        kind="HTTPRoute",
        namespace="shop",
        name="r",
        generation=1,
        parents=(
            ParentStatus(
                parent=ref, conditions=(Condition(type="Accepted", status=True, reason="Accepted"),)
            ),
        ),
    )
    live = {"parents": [copy.deepcopy(OTHER_CONTROLLER)]}
    new = kube_status.route_status(live, computed, "T1")
    assert new is not None and new["parents"][0] == OTHER_CONTROLLER
    assert kube_status.route_status(new, computed, "T2") is None
    # No parent of ours any more: our entry goes, the other stays.
    assert kube_status.route_status(new, None, "T3") == live
    assert kube_status.route_status({}, None, "T3") is None


# -- meshd, the program -------------------------------------------------------------------------


def test_meshd_deploys_waypoints_with_its_image_and_root(
    kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``meshd --source kubernetes`` runs the deployer: the image from WAYPOINT_IMAGE, the
    root from its CA Secret in the waypoint namespace's istio-ca-root-cert."""
    from tests.unit.controlplane.test_meshd_kubernetes import meshd as meshd_process
    from tests.unit.hbone.conftest import run

    monkeypatch.setenv("WAYPOINT_IMAGE", "registry.example/ambient-mesh:1.2.3")
    shop(kube)
    kube.add("gateways", waypoint())
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")

    async def body() -> None:
        async with meshd_process(kubeconfig):
            await eventually(lambda: kube.find("configmaps", "istio-ca-root-cert", "shop"), 30)
            await eventually(
                lambda: (kube.get("gateways", "waypoint", "shop").get("status") or {}).get(
                    "addresses"
                ),
                30,
            )

    run(body, timeout_s=60)
    [container] = kube.get("deployments", "waypoint", "shop")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["image"] == "registry.example/ambient-mesh:1.2.3"
    secret = kube.get("secrets", "istio-ca-secret", "istio-system")
    root = kube.get("configmaps", "istio-ca-root-cert", "shop")["data"]["root-cert.pem"]
    assert base64.b64decode(secret["data"]["root-cert.pem"]).decode() == root
