"""The kinds the fake API server serves: their group, version and paths, and how an object
of each is rendered on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    plural: str
    group: str
    version: str
    kind: str
    namespaced: bool = True
    status: bool = True  # has a status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def base(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def builtin(self) -> bool:
        # Lists of built-in kinds carry no kind/apiVersion on their items; CRs do.
        return not self.group.endswith(("istio.io", "networking.k8s.io"))


RESOURCES = {
    r.plural: r
    for r in (
        Resource("namespaces", "", "v1", "Namespace", namespaced=False),
        Resource("pods", "", "v1", "Pod"),
        Resource("services", "", "v1", "Service"),
        Resource("serviceaccounts", "", "v1", "ServiceAccount", status=False),
        Resource("secrets", "", "v1", "Secret", status=False),
        Resource("configmaps", "", "v1", "ConfigMap", status=False),
        Resource("endpointslices", "discovery.k8s.io", "v1", "EndpointSlice", status=False),
        Resource("deployments", "apps", "v1", "Deployment"),
        Resource("daemonsets", "apps", "v1", "DaemonSet"),
        Resource("authorizationpolicies", "security.istio.io", "v1", "AuthorizationPolicy"),
        Resource("requestauthentications", "security.istio.io", "v1", "RequestAuthentication"),
        Resource("envoyfilters", "networking.istio.io", "v1alpha3", "EnvoyFilter"),
        Resource("telemetries", "telemetry.istio.io", "v1", "Telemetry"),
        Resource("gateways", "gateway.networking.k8s.io", "v1", "Gateway"),
        Resource("httproutes", "gateway.networking.k8s.io", "v1", "HTTPRoute"),
        Resource("grpcroutes", "gateway.networking.k8s.io", "v1", "GRPCRoute"),
        Resource("virtualservices", "networking.istio.io", "v1", "VirtualService"),
        Resource("destinationrules", "networking.istio.io", "v1", "DestinationRule"),
        Resource("leases", "coordination.k8s.io", "v1", "Lease", status=False),
    )
}
# Kinds whose metadata.generation counts changes to what they ask for.
GENERATION = {"deployments"}


class Route(NamedTuple):
    resource: str
    namespace: str | None
    name: str | None
    subresource: str  # "status", or "" for the object itself


def route_of(path: str) -> Route | None:
    """The resource, namespace, name and subresource a collection or object path names."""
    for res in RESOURCES.values():
        if not path.startswith(f"{res.base}/"):
            continue
        parts = path[len(res.base) + 1 :].split("/")
        namespace = None
        if res.namespaced and len(parts) > 2 and parts[0] == "namespaces":
            namespace, parts = parts[1], parts[2:]
        if parts[0] != res.plural or not all(parts) or namespace == "":
            continue
        if len(parts) <= 2:
            return Route(res.plural, namespace, parts[1] if len(parts) == 2 else None, "")
        if len(parts) == 3 and parts[2] == "status":
            return Route(res.plural, namespace, parts[1], "status")
    return None


def qualified(res: Resource) -> str:
    return f"{res.plural}.{res.group}" if res.group else res.plural


def render(res: Resource, obj: Obj, *, in_list: bool = False) -> Obj:
    if in_list and res.builtin:
        return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
    return {"kind": res.kind, "apiVersion": res.api_version, **obj}
