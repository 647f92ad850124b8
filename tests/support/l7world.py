"""A small world with a waypoint, for the L7 tests: namespace ``shop`` in the mesh,
bound to the waypoint ``shop/waypoint``, a ``reviews`` service over v1 and v2
pods, one service per version, and whatever routes a test adds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from controlplane.state import (
    L7Object,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    WaypointInfo,
    WaypointListener,
    frozen_labels,
)

WAYPOINT = WaypointInfo(
    name="waypoint",
    namespace="shop",
    address="10.96.0.30",
    listeners=(WaypointListener(name="mesh", port=15008, protocol="HBONE"),),
)
VIPS = {"reviews": "10.96.0.20", "reviews-v1": "10.96.0.21", "reviews-v2": "10.96.0.22"}


def service(
    name: str,
    selector: Mapping[str, str],
    *,
    ports: Sequence[ServicePortInfo] | None = None,
    labels: Mapping[str, str] | None = None,
    namespace: str = "shop",
    vip: str | None = None,
) -> ServiceInfo:
    return ServiceInfo(
        name=name,
        namespace=namespace,
        cluster_ips=(vip or VIPS[name],),
        ports=tuple(ports or (ServicePortInfo(port=9080, target_port=8080, name="http"),)),
        selector=frozen_labels(selector),
        labels=frozen_labels(labels or {}),
    )


def pod(name: str, ip: str, version: str, ready: bool = True) -> PodInfo:
    return PodInfo(
        uid=name,
        name=name,
        namespace="shop",
        node="node1",
        ip=ip,
        service_account="reviews",
        labels=frozen_labels({"app": "reviews", "version": version}),
        ready=ready,
    )


def objects(text: str) -> tuple[L7Object, ...]:
    """YAML documents (HTTPRoute, VirtualService, ...) as the source hands them over."""
    out = []
    for doc in yaml.safe_load_all(text):
        if doc:
            meta = doc.get("metadata") or {}
            out.append(
                L7Object(
                    kind=doc["kind"],
                    namespace=meta.get("namespace") or "default",
                    name=meta["name"],
                    raw=doc,
                )
            )
    return tuple(out)


_API_VERSIONS = {
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "GRPCRoute": "gateway.networking.k8s.io/v1",
    "VirtualService": "networking.istio.io/v1",
    "DestinationRule": "networking.istio.io/v1",
}


def l7(
    kind: str,
    name: str,
    spec: Mapping[str, Any],
    *,
    namespace: str = "shop",
    created: str = "",
) -> L7Object:
    """One object of ``kind`` built in code (``objects`` reads YAML)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "generation": 1}
    if created:
        meta["creationTimestamp"] = created
    raw = {"apiVersion": _API_VERSIONS[kind], "kind": kind, "metadata": meta, "spec": dict(spec)}
    return L7Object(kind=kind, namespace=namespace, name=name, raw=raw)


def world(routes: str = "", **changes: Any) -> SourceState:
    base: dict[str, Any] = {
        "namespaces": (
            NamespaceInfo(
                name="shop",
                labels=frozen_labels(
                    {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}
                ),
            ),
        ),
        "pods": (
            pod("reviews-v1-a", "10.244.1.11", "v1"),
            pod("reviews-v1-b", "10.244.2.12", "v1"),
            pod("reviews-v2-a", "10.244.1.21", "v2"),
        ),
        "services": (
            service("reviews", {"app": "reviews"}),
            service("reviews-v1", {"app": "reviews", "version": "v1"}),
            service("reviews-v2", {"app": "reviews", "version": "v2"}),
        ),
        "waypoints": (WAYPOINT,),
        "l7": objects(routes),
    }
    base.update(changes)
    return SourceState(**base)


# Every request to reviews goes to v1 (either pod answers as "v1"), so that two
# proxies' answers compare whole although each picks its endpoint at random.
V1_ONLY = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop, creationTimestamp: "2026-12-01T10:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080}]
"""

CANARY = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop, creationTimestamp: "2026-12-01T10:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{headers: [{name: User-Agent, type: RegularExpression, value: ".*iPhone.*"}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
"""
