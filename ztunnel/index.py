"""Lookups over one xDS snapshot, built once per snapshot.

The proxy answers "who is this IP?", "which service is this VIP?", "which
pods back this service?" and "which policies apply to this workload?" on
every connection. :class:`StateIndex` answers each with a dictionary lookup;
it is immutable and built from an immutable :class:`~mesh.xds.XdsState`, so
a connection decided against one snapshot never sees half of the next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.identity import SpiffeId
from mesh.model import GatewayAddress, Policy, Port, Scope, Service, Workload
from mesh.xds import XdsState


def _frozen() -> Mapping[str, tuple[Policy, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload behind a service, and the port the service's port maps to on it."""

    workload: Workload
    ports: tuple[Port, ...]


@dataclass(frozen=True, slots=True)
class StateIndex:
    state: XdsState
    workloads_by_ip: Mapping[str, Workload]
    services_by_vip: Mapping[str, Service]
    endpoints: Mapping[str, tuple[Endpoint, ...]]  # by service resource name
    workloads_by_name: Mapping[tuple[str, str], Workload]  # (namespace, name)
    global_policies: tuple[Policy, ...] = ()
    namespace_policies: Mapping[str, tuple[Policy, ...]] = field(default_factory=_frozen)

    @classmethod
    def build(cls, state: XdsState) -> StateIndex:
        by_ip: dict[str, Workload] = {}
        by_name: dict[tuple[str, str], Workload] = {}
        endpoints: dict[str, list[Endpoint]] = {}
        for workload in state.workloads.values():
            by_name.setdefault((workload.namespace, workload.name), workload)
            for address in workload.addresses:
                by_ip.setdefault(str(address), workload)
            for service, ports in workload.services.items():
                endpoints.setdefault(service, []).append(Endpoint(workload, ports))
        by_vip = {str(a): s for s in state.services.values() for a in s.addresses}
        global_policies = []
        by_namespace: dict[str, list[Policy]] = {}
        for policy in state.policies.values():
            if policy.scope is Scope.GLOBAL:
                global_policies.append(policy)
            elif policy.scope is Scope.NAMESPACE:
                by_namespace.setdefault(policy.namespace, []).append(policy)
        return cls(
            state=state,
            workloads_by_ip=MappingProxyType(by_ip),
            services_by_vip=MappingProxyType(by_vip),
            workloads_by_name=MappingProxyType(by_name),
            endpoints=MappingProxyType(
                {k: tuple(sorted(v, key=lambda e: e.workload.uid)) for k, v in endpoints.items()}
            ),
            global_policies=tuple(sorted(global_policies, key=lambda p: p.resource_name)),
            namespace_policies=MappingProxyType(
                {
                    ns: tuple(sorted(ps, key=lambda p: p.resource_name))
                    for ns, ps in by_namespace.items()
                }
            ),
        )

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self.workloads_by_ip.get(ip)

    def workload_by_name(self, namespace: str, name: str) -> Workload | None:
        return self.workloads_by_name.get((namespace, name))

    def service_by_vip(self, ip: str) -> Service | None:
        return self.services_by_vip.get(ip)

    def waypoints_of(self, workload: Workload) -> list[GatewayAddress]:
        """The waypoints traffic to ``workload`` must come through: its own (a workload
        waypoint) and those of the services it backs."""
        found = [workload.waypoint] if workload.waypoint is not None else []
        for name in workload.services:
            service = self.state.services.get(name)
            if service is not None and service.waypoint is not None:
                found.append(service.waypoint)
        return found

    def waypoint_identities(self, gateway: GatewayAddress) -> set[SpiffeId]:
        """The identities of a waypoint's instances (none when it cannot be reached)."""
        if gateway.address is None:
            return set()
        address = str(gateway.address)
        service = self.service_by_vip(address)
        if service is not None:
            return {e.workload.identity for e in self.endpoints.get(service.resource_name, ())}
        pod = self.workload_by_ip(address)
        return {pod.identity} if pod is not None else set()
