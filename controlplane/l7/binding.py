"""Which waypoint a service or pod uses: Istio's binding rules, failing closed.

``istio.io/use-waypoint`` on the object (pod or service) wins over the
namespace's; ``none`` opts out; ``istio.io/use-waypoint-namespace`` names the
Gateway's namespace (default: the object's). The Gateway must exist, be a
valid waypoint, allow the object's namespace (its HBONE listener's
``allowedRoutes``), and handle the kind of traffic (``istio.io/waypoint-for``:
``service`` waypoints take services, ``workload`` ones pods, ``all`` both).

Where Istio would quietly send traffic straight to the destination when the
waypoint asked for cannot be used (a missing or broken Gateway), we answer
:class:`Binding` with ``usable`` False: the Workload API then names the
waypoint by hostname only, which ztunnel cannot reach, so it refuses the
connection rather than skip the waypoint's L7 policy. The one quiet case
is Istio's too: a namespace label naming a service waypoint does not bind the
namespace's pods (they are reached through their services).

A waypoint's own instance (its pods and Service, labelled
``gateway.istio.io/managed=istio.io-mesh-controller``) is never bound, as in
istiod (``fetchWaypointForService``, and the workload builder's "waypoints do
not have waypoints"): its namespace's label would otherwise send traffic to the
waypoint through itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.state import (
    MANAGED,
    MANAGED_VALUE,
    USE_WAYPOINT,
    USE_WAYPOINT_NAMESPACE,
    WaypointInfo,
)

CLUSTER_DOMAIN = "svc.cluster.local"


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """A waypoint asked for. ``waypoint`` is set when it exists; ``problem`` says why it
    cannot be used (then ``usable`` is False and traffic must be refused)."""

    name: str
    namespace: str
    waypoint: WaypointInfo | None = None
    problem: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def usable(self) -> bool:
        return self.waypoint is not None and not self.problem

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.{CLUSTER_DOMAIN}"


def bind(
    *,
    kind: str,
    what: str,
    namespace: str,
    object_labels: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    waypoints: Mapping[tuple[str, str], WaypointInfo],
    all_namespaces: Mapping[str, Mapping[str, str]] | None = None,
) -> Binding | None:
    """The waypoint ``what`` (a ``service`` or ``workload`` of ``namespace``) is bound to.

    None: no waypoint (none asked for, opted out, a namespace-wide label for
    the other kind of traffic, or ``what`` is a waypoint's own pod or Service).
    """
    if object_labels.get(MANAGED) == MANAGED_VALUE:
        return None  # a waypoint instance: never through a waypoint, even its own
    name = object_labels.get(USE_WAYPOINT)
    explicit = name is not None
    if name is None:
        name = namespace_labels.get(USE_WAYPOINT)
        ns = namespace_labels.get(USE_WAYPOINT_NAMESPACE, namespace)
    else:
        ns = object_labels.get(USE_WAYPOINT_NAMESPACE, namespace)
    if not name or name == "none":
        return None
    gateway = waypoints.get((ns, name))
    if gateway is None:
        if not explicit and kind == "workload":
            return None  # most likely a service waypoint named for the namespace
        return Binding(
            name=name,
            namespace=ns,
            problem=f"{what}: waypoint {ns}/{name} does not exist",
        )
    serves = gateway.waypoint_for in (kind, "all")
    if not serves:
        if not explicit:
            return None  # Istio: a namespace label only binds what the waypoint takes
        return Binding(
            name=name,
            namespace=ns,
            waypoint=gateway,
            problem=(
                f"{what}: waypoint {ns}/{name} is for {gateway.waypoint_for} traffic "
                f"({'istio.io/waypoint-for'}), not {kind}"
            ),
        )
    if gateway.problem:
        return Binding(
            name=name,
            namespace=ns,
            waypoint=gateway,
            problem=f"{what}: waypoint {ns}/{name} is not accepted: {gateway.problem}",
        )
    ns_labels = (all_namespaces or {}).get(namespace, namespace_labels)
    if not gateway.accepts_namespace(namespace, ns_labels):
        return Binding(
            name=name,
            namespace=ns,
            waypoint=gateway,
            problem=(
                f"{what}: waypoint {ns}/{name} does not allow namespace {namespace} "
                "(its mesh listener's allowedRoutes.namespaces)"
            ),
        )
    if not gateway.address:
        return Binding(
            name=name,
            namespace=ns,
            waypoint=gateway,
            problem=f"{what}: waypoint {ns}/{name} has no address yet (is its instance running?)",
        )
    return Binding(name=name, namespace=ns, waypoint=gateway)
