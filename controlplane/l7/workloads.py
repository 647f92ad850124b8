"""The pods a waypoint serves as workloads (``istio.io/waypoint-for`` ``workload`` or ``all``).

A pod bound to a waypoint as a workload has that waypoint in its Workload
resource, so a client's ztunnel sends what it addresses to the pod's own IP
(any port) to the waypoint, the CONNECT ``:authority`` being ``podIP:port``.
The waypoint's share lists those pods (:class:`WorkloadSpec`), bound by the
same rules (:func:`controlplane.l7.binding.bind`) as the Workload API, so
that what ztunnel sends to a waypoint is what the waypoint expects.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.l7.binding import bind
from controlplane.state import PodInfo, SourceState, WaypointInfo
from mesh.ambient import in_ambient


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSpec:
    """A pod bound to the waypoint as a workload: traffic addressed to its IP (any port)
    arrives at the waypoint and is relayed to that IP and port, to this pod only."""

    namespace: str
    name: str
    ip: str
    identity: str  # its SPIFFE ID
    hbone: bool  # the pod is in the mesh: reached over HBONE to ip:15008
    canonical_name: str = ""
    canonical_revision: str = ""
    cluster_id: str = "Kubernetes"  # the mesh's cluster id (its metrics' *_cluster)


def bound_pods(
    state: SourceState,
    namespaces: Mapping[str, Mapping[str, str]],
    waypoints: Mapping[tuple[str, str], WaypointInfo],
) -> dict[str, list[PodInfo]]:
    """The pods bound as workloads to each usable waypoint, by its key, in IP order.

    Bound by the rules the Workload API's ``waypoint`` follows
    (:func:`controlplane.translate.translate`), so that what ztunnel sends to
    the waypoint is what the waypoint expects; a pod without an IP (not
    wired yet), or with one that is not an address or already another pod's
    (meshd refuses those workloads), is not bound.
    """
    owners: set[str] = set()
    bound: dict[str, list[PodInfo]] = {}
    for pod in state.pods:
        if not pod.ip:
            continue
        try:
            ipaddress.ip_address(pod.ip)
        except ValueError:
            continue
        if pod.ip in owners:
            continue
        owners.add(pod.ip)
        binding = bind(
            kind="workload",
            what=f"pod {pod.namespace}/{pod.name}",
            namespace=pod.namespace,
            object_labels=pod.labels,
            namespace_labels=namespaces.get(pod.namespace, {}),
            waypoints=waypoints,
            all_namespaces=namespaces,
        )
        if binding is not None and binding.usable:
            bound.setdefault(binding.key, []).append(pod)
    for pods in bound.values():
        pods.sort(key=_ip_order)
    return bound


def _ip_order(pod: PodInfo) -> tuple[int, int]:
    ip = ipaddress.ip_address(pod.ip or "")
    return (ip.version, int(ip))


def workload_spec(
    state: SourceState, pod: PodInfo, namespaces: Mapping[str, Mapping[str, str]]
) -> WorkloadSpec:
    labels = pod.labels
    return WorkloadSpec(
        namespace=pod.namespace,
        name=pod.name,
        ip=str(pod.ip),
        identity=f"spiffe://{state.trust_domain}/ns/{pod.namespace}/sa/{pod.service_account}",
        hbone=in_ambient(labels, namespaces.get(pod.namespace, {})),
        canonical_name=labels.get("service.istio.io/canonical-name")
        or labels.get("app")
        or pod.name,
        canonical_revision=labels.get("service.istio.io/canonical-revision")
        or labels.get("version")
        or "latest",
        cluster_id=state.cluster_id,
    )


def pod_cluster_name(ip: str) -> str:
    """The cluster of one pod served as a workload: ``inbound-pod|<ip>``.

    Istio's waypoint sends all of them through one cluster (``encap``, to its
    ``connect_originate`` listener, checking only the trust domain); one per
    pod carries that pod's own SPIFFE ID, which the waypoint checks.
    """
    return f"inbound-pod|{ip}"
