"""``meshlab apply -f`` and ``meshlab delete``: objects in, as ``kubectl`` takes them.

Multi-document YAML; each document one object of a kind the mesh reads:
``v1`` Service, Istio ``AuthorizationPolicy``, ``RequestAuthentication``,
``VirtualService``, ``DestinationRule``, ``EnvoyFilter`` and ``Telemetry``, Gateway API
``Gateway``, ``HTTPRoute`` and ``GRPCRoute``, and the ``istio`` ``ConfigMap`` (MeshConfig).
Every document is checked before anything changes (a bad one fails the
whole apply, naming it); then the cluster's state is changed at once.
A waypoint ``Gateway`` also gets its instance (:mod:`meshlab.waypoints`):
its pod is started, or stopped when the Gateway is deleted. meshd reads the
objects from the state file and reports their status.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from mesh.cluster import Cluster
from mesh.cluster.errors import ClusterError
from mesh.cluster.model import resource_key
from mesh.cluster.parse import parse_policy, parse_resource, service_from_kubernetes
from mesh.cluster.statefile import locked, pod_token_path, read_state, write_state
from meshlab import cni, lifecycle, mesh, waypoints
from meshlab.errors import MeshlabError

Log = Callable[[str], None]

# kind -> (kubectl's resource name, its plural and short forms)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Service": ("service", ("services", "svc")),
    "AuthorizationPolicy": (
        "authorizationpolicy.security.istio.io",
        ("authorizationpolicies", "ap"),
    ),
    "Gateway": ("gateway.gateway.networking.k8s.io", ("gateways", "gtw")),
    "HTTPRoute": ("httproute.gateway.networking.k8s.io", ("httproutes",)),
    "GRPCRoute": ("grpcroute.gateway.networking.k8s.io", ("grpcroutes",)),
    "VirtualService": ("virtualservice.networking.istio.io", ("virtualservices", "vs")),
    "DestinationRule": ("destinationrule.networking.istio.io", ("destinationrules", "dr")),
    "RequestAuthentication": (
        "requestauthentication.security.istio.io",
        ("requestauthentications", "ra"),
    ),
    "EnvoyFilter": ("envoyfilter.networking.istio.io", ("envoyfilters",)),
    "Telemetry": ("telemetry.telemetry.istio.io", ("telemetries",)),
    # Only istio-system/istio is read: MeshConfig in its ``mesh`` key.
    "ConfigMap": ("configmap", ("configmaps", "cm")),
}


def kind_of(word: str) -> str:
    """``svc``, ``httproutes``, ``HTTPRoute``... -> the kind."""
    lowered = word.lower()
    for kind, (resource, aliases) in KINDS.items():
        if lowered in (kind.lower(), resource, resource.split(".", 1)[0], *aliases):
            return kind
    raise MeshlabError(
        f'the server doesn\'t have a resource type "{word}" (known: '
        f"{', '.join(k.lower() for k in KINDS)})"
    )


def shown(kind: str, name: str) -> str:
    return f"{KINDS[kind][0]}/{name}"


@dataclass(frozen=True)
class Document:
    kind: str
    namespace: str
    name: str
    raw: Mapping[str, Any]


def read_documents(path: Path) -> list[Document]:
    try:
        loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError as e:
        raise MeshlabError(f"{path} does not exist") from e
    except yaml.YAMLError as e:
        raise MeshlabError(f"{path} is not valid YAML: {e}") from e
    docs = []
    for i, raw in enumerate(loaded):
        where = f"{path}, document {i + 1}"
        if not isinstance(raw, Mapping) or "kind" not in raw:
            raise MeshlabError(f"{where}: not a Kubernetes object (no kind)")
        kind = str(raw["kind"])
        if kind not in KINDS:
            raise MeshlabError(
                f"{where}: kind {kind!r} is not one the mesh reads ({', '.join(KINDS)})"
            )
        try:
            if kind == "AuthorizationPolicy":
                raw = parse_policy(raw)
            elif kind != "Service":
                raw = parse_resource(raw)
        except ClusterError as e:
            raise MeshlabError(f"{where}: {e}") from e
        meta = raw.get("metadata") or {}
        if not isinstance(meta, Mapping) or not meta.get("name"):
            raise MeshlabError(f"{where}: metadata.name is required")
        namespace = str(meta.get("namespace") or "default")
        docs.append(Document(kind, namespace, str(meta["name"]), raw))
    return docs


def _stamped(raw: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    """As the API server: creationTimestamp kept from before, generation bumped on change."""
    doc = copy.deepcopy(dict(raw))
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("namespace", "default")
    old = dict((before or {}).get("metadata") or {})
    meta["creationTimestamp"] = old.get("creationTimestamp") or datetime.now(UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    changed = before is None or (before.get("spec") != doc.get("spec"))
    meta["generation"] = int(old.get("generation") or 0) + (1 if changed else 0)
    doc["metadata"] = meta
    if before is not None and "status" in before and "status" not in doc:
        doc["status"] = before["status"]
    return doc


def apply(name: str, documents: Sequence[Document], log: Log) -> list[str]:
    """Apply the documents to cluster ``name``; returns kubectl's lines."""
    lines = []
    with locked(name):
        state = read_state(name)
        starts = []
        for doc in documents:
            state, verb, start = _apply_one(state, doc)
            lines.append(f"{shown(doc.kind, doc.name)} {verb}")
            if start is not None:
                starts.append(start)
        state = write_state(state)
        if starts:
            lifecycle.require_root("meshlab apply (a waypoint's pod)")
            cni_path = cni.find_cni_path()
            for pod_key in starts:
                pod = next(p for p in state.pods if p.key == pod_key)
                if pod.pid is None:
                    state = lifecycle.start_pod(state, pod, cni_path, log)
    return lines


def _apply_one(state: Cluster, doc: Document) -> tuple[Cluster, str, str | None]:
    if doc.kind == "AuthorizationPolicy":
        exists = any(
            (
                str((p.get("metadata") or {}).get("namespace") or "default"),
                str((p.get("metadata") or {}).get("name")),
            )
            == (doc.namespace, doc.name)
            for p in state.policies
        )
        return state.with_policy(doc.raw), "configured" if exists else "created", None
    if doc.kind == "Service":
        return _apply_service(state, doc)
    before = state.resource(doc.kind, doc.namespace, doc.name)
    stamped = _stamped(doc.raw, before)
    verb = "created" if before is None else ("unchanged" if before == stamped else "configured")
    if doc.kind == "Gateway" and waypoints.is_waypoint(stamped):
        return _apply_waypoint(state, stamped, verb)
    return state.with_resource(stamped), verb, None


def _apply_service(state: Cluster, doc: Document) -> tuple[Cluster, str, str | None]:
    if doc.namespace not in {ns.name for ns in state.namespaces}:
        raise MeshlabError(f'namespaces "{doc.namespace}" not found')
    existing = next(
        (s for s in state.services if (s.namespace, s.name) == (doc.namespace, doc.name)), None
    )
    raw = copy.deepcopy(dict(doc.raw))
    if existing is not None:
        raw.setdefault("spec", {}).setdefault("clusterIP", str(existing.vip))
    taken = {s.vip for s in state.services if s is not existing}
    try:
        service = service_from_kubernetes(raw, state.network, taken)
    except ClusterError as e:
        raise MeshlabError(f"Service {doc.namespace}/{doc.name}: {e}") from e
    if service.vip in taken:
        raise MeshlabError(f"Service {doc.namespace}/{doc.name}: {service.vip} is already used")
    verb = "created" if existing is None else ("unchanged" if existing == service else "configured")
    return state.with_service(service), verb, None


def _apply_waypoint(
    state: Cluster, gateway: dict[str, Any], verb: str
) -> tuple[Cluster, str, str | None]:
    namespace, name = waypoints.gateway_of(gateway)
    if namespace not in {ns.name for ns in state.namespaces}:
        raise MeshlabError(f'namespaces "{namespace}" not found')
    assert state.name
    running = waypoints.instances(state, namespace, name)
    if running:
        pod = running[0]
    else:
        token = pod_token_path(state.name, namespace, name)
        command = waypoints.command(
            namespace,
            name,
            bin_dir=mesh.bin_dir(),
            xds=f"{state.network.gateway}:{mesh.XDS_TLS_PORT}",
            root_cert=mesh.root_cert(state.name),
            token=token,
        )
        pod = waypoints.instance_pod(state, namespace, name, command=command)
        lifecycle.issue_pod_token(state.name, pod)
    state = waypoints.with_instance(state, gateway, pod)
    return state, verb, None if running else pod.key


def delete(name: str, targets: Sequence[tuple[str, str, str]], log: Log) -> list[str]:
    """Delete ``(kind, namespace, name)`` objects; a missing one fails before anything goes."""
    lines = []
    with locked(name):
        state = read_state(name)
        stopping = []
        for kind, namespace, obj in targets:
            state, pods = _delete_one(state, kind, namespace, obj)
            stopping += pods
            lines.append(f'{KINDS[kind][0]} "{obj}" deleted')
        if stopping:
            lifecycle.require_root("meshlab delete (a waypoint's pod)")
            for pod in stopping:
                lifecycle.stop_pod(state, pod)
                log(f"pod {pod.key}: stopped")
        write_state(state)
    return lines


def _delete_one(state: Cluster, kind: str, namespace: str, name: str) -> tuple[Cluster, list[Any]]:
    missing = MeshlabError(
        f'{KINDS[kind][0].split(".", 1)[0]}s "{name}" not found in namespace "{namespace}"'
    )
    if kind == "AuthorizationPolicy":
        keys = {
            (
                str((p.get("metadata") or {}).get("namespace") or "default"),
                str((p.get("metadata") or {}).get("name")),
            )
            for p in state.policies
        }
        if (namespace, name) not in keys:
            raise missing
        return state.without_policy(namespace, name), []
    if kind == "Service":
        if not any((s.namespace, s.name) == (namespace, name) for s in state.services):
            raise missing
        return state.without_service(namespace, name), []
    resource = state.resource(kind, namespace, name)
    if resource is None:
        raise missing
    if kind == "Gateway" and waypoints.is_waypoint(resource):
        pods = waypoints.instances(state, namespace, name)
        return waypoints.without_instance(state, namespace, name), pods
    return state.without_resource(kind, namespace, name), []


def targets_of(documents: Sequence[Document]) -> list[tuple[str, str, str]]:
    return [(d.kind, d.namespace, d.name) for d in documents]


def resources_of(state: Cluster, kind: str, namespace: str | None) -> list[Mapping[str, Any]]:
    """The objects of ``kind`` (in ``namespace``, or all), as written, for ``meshlab get``."""
    if kind == "AuthorizationPolicy":
        items = list(state.policies)
    elif kind == "Service":
        items = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": s.name, "namespace": s.namespace, "labels": dict(s.labels)},
                "spec": {
                    "clusterIP": str(s.vip),
                    "selector": dict(s.selector),
                    "ports": [
                        {
                            k: v
                            for k, v in {
                                "name": p.name,
                                "port": p.port,
                                "targetPort": p.target_port,
                                "protocol": p.protocol,
                                "appProtocol": p.app_protocol,
                            }.items()
                            if v
                        }
                        for p in s.ports
                    ],
                },
            }
            for s in state.services
        ]
    else:
        items = [r for r in state.resources if r.get("kind") == kind]
    return [i for i in items if namespace is None or resource_key(i)[1] == namespace]
