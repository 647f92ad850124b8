"""Workloads and services as the proxies know them (the Workload API's content).

Typed, immutable values; protobuf stays at the edge: ``from_proto`` converts
one ``istio.workload.Address`` and raises :class:`InvalidResource` for that
resource alone, ``to_proto`` builds the message meshd sends.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.identity import IdentityError, SpiffeId
from mesh.model.errors import InvalidResource
from mesh.proto.istio.workload import workload_pb2 as pb

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_TRUST_DOMAIN = "cluster.local"
HBONE_PORT = 15008
ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"


class TunnelProtocol(enum.IntEnum):
    NONE = pb.NONE
    HBONE = pb.HBONE


@functools.lru_cache(maxsize=4096)
def _identity(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    return SpiffeId(trust_domain=trust_domain, namespace=namespace, service_account=service_account)


class WorkloadStatus(enum.IntEnum):
    HEALTHY = pb.HEALTHY
    UNHEALTHY = pb.UNHEALTHY


class LoadBalancingScope(enum.IntEnum):
    """A fact an endpoint may share with the source workload: a part of its
    locality, its node, cluster or network."""

    REGION = pb.LoadBalancing.REGION
    ZONE = pb.LoadBalancing.ZONE
    SUBZONE = pb.LoadBalancing.SUBZONE
    NODE = pb.LoadBalancing.NODE
    CLUSTER = pb.LoadBalancing.CLUSTER
    NETWORK = pb.LoadBalancing.NETWORK


class LoadBalancingMode(enum.IntEnum):
    """How ztunnel uses a service's routing preference.

    STRICT: only endpoints matching the source on every scope, else none;
    FAILOVER: the endpoints matching on the most leading scopes, else the
    next best; UNSPECIFIED and PASSTHROUGH: the preference is not used.
    """

    UNSPECIFIED = pb.LoadBalancing.UNSPECIFIED_MODE
    STRICT = pb.LoadBalancing.STRICT
    FAILOVER = pb.LoadBalancing.FAILOVER
    PASSTHROUGH = pb.LoadBalancing.PASSTHROUGH


class HealthPolicy(enum.IntEnum):
    ONLY_HEALTHY = pb.LoadBalancing.ONLY_HEALTHY
    ALLOW_ALL = pb.LoadBalancing.ALLOW_ALL


@dataclass(frozen=True, slots=True, kw_only=True)
class Port:
    service_port: int
    target_port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayAddress:
    """A waypoint: reached at ``address`` (an IP) or by service ``hostname``."""

    address: IPAddress | None = None
    hostname: str | None = None  # "namespace/hostname" of the waypoint's service
    port: int = HBONE_PORT

    def __str__(self) -> str:
        target = self.hostname if self.address is None else str(self.address)
        return f"{target}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Locality:
    """Where a workload runs: its node's topology labels (empty: not known)."""

    region: str = ""
    zone: str = ""
    subzone: str = ""

    def __bool__(self) -> bool:
        return bool(self.region or self.zone or self.subzone)

    def __str__(self) -> str:
        return f"{self.region}/{self.zone}/{self.subzone}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancing:
    """Which endpoints of a service a source workload prefers (Istio's ``LoadBalancing``).

    An endpoint ranks by how many scopes of ``routing_preference``, counted
    from the first and stopping at the first mismatch, it shares with the
    source; ``mode`` says what the rank decides.
    """

    routing_preference: tuple[LoadBalancingScope, ...] = ()
    mode: LoadBalancingMode = LoadBalancingMode.UNSPECIFIED
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One pod. Its xDS resource name is ``uid``."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...]
    node: str = ""
    service_account: str = "default"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    waypoint: GatewayAddress | None = None
    services: Mapping[str, tuple[Port, ...]] = field(default_factory=lambda: MappingProxyType({}))
    authorization_policies: tuple[str, ...] = ()
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    cluster_id: str = ""
    network: str = ""
    locality: Locality = Locality()

    @property
    def identity(self) -> SpiffeId:
        # Asked on every connection: the value is built (and validated) once per triple.
        return _identity(self.trust_domain, self.namespace, self.service_account)

    @property
    def resource_name(self) -> str:
        return self.uid

    def to_proto(self) -> pb.Address:
        workload = pb.Workload(
            uid=self.uid,
            name=self.name,
            namespace=self.namespace,
            addresses=[a.packed for a in self.addresses],
            network=self.network,
            tunnel_protocol=self.tunnel_protocol.name,
            trust_domain=self.trust_domain,
            service_account=self.service_account,
            node=self.node,
            canonical_name=self.canonical_name,
            canonical_revision=self.canonical_revision,
            workload_type=pb.POD,
            workload_name=self.workload_name,
            authorization_policies=list(self.authorization_policies),
            status=self.status.name,
            cluster_id=self.cluster_id,
        )
        if self.waypoint is not None:
            workload.waypoint.CopyFrom(_gateway_to_proto(self.waypoint, self.network))
        if self.locality:  # istiod leaves it unset when the node has no topology labels
            workload.locality.CopyFrom(
                pb.Locality(
                    region=self.locality.region,
                    zone=self.locality.zone,
                    subzone=self.locality.subzone,
                )
            )
        for key, ports in self.services.items():
            workload.services[key].ports.extend(
                pb.Port(service_port=p.service_port, target_port=p.target_port) for p in ports
            )
        return pb.Address(workload=workload)

    @classmethod
    def from_proto(cls, message: pb.Workload) -> Workload:
        name = message.uid or message.name
        if not message.uid:
            raise InvalidResource(name, "workload without a uid")
        if not message.addresses and not message.hostname:
            raise InvalidResource(name, "workload with neither an address nor a hostname")
        trust_domain = message.trust_domain or DEFAULT_TRUST_DOMAIN
        service_account = message.service_account or "default"
        try:
            SpiffeId(
                trust_domain=trust_domain,
                namespace=message.namespace,
                service_account=service_account,
            )
        except IdentityError as e:
            raise InvalidResource(name, f"identity: {e}") from e
        try:
            tunnel = TunnelProtocol(message.tunnel_protocol)
            status = WorkloadStatus(message.status)
        except ValueError as e:
            raise InvalidResource(name, f"unknown enum value: {e}") from e
        services = {
            key: tuple(_port(name, p) for p in ports.ports)
            for key, ports in message.services.items()
        }
        return cls(
            uid=message.uid,
            name=message.name,
            namespace=message.namespace,
            addresses=tuple(_ip(name, a) for a in message.addresses),
            node=message.node,
            service_account=service_account,
            trust_domain=trust_domain,
            tunnel_protocol=tunnel,
            waypoint=_gateway(name, message.waypoint) if message.HasField("waypoint") else None,
            services=MappingProxyType(services),
            authorization_policies=tuple(message.authorization_policies),
            status=status,
            canonical_name=message.canonical_name,
            canonical_revision=message.canonical_revision,
            workload_name=message.workload_name,
            cluster_id=message.cluster_id,
            network=message.network,
            locality=Locality(
                region=message.locality.region,
                zone=message.locality.zone,
                subzone=message.locality.subzone,
            ),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A service. Its xDS resource name is ``namespace/hostname``."""

    name: str
    namespace: str
    hostname: str
    addresses: tuple[IPAddress, ...] = ()
    ports: tuple[Port, ...] = ()
    waypoint: GatewayAddress | None = None
    subject_alt_names: tuple[str, ...] = ()
    network: str = ""
    load_balancing: LoadBalancing | None = None  # None: any healthy endpoint

    @property
    def resource_name(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def to_proto(self) -> pb.Address:
        service = pb.Service(
            name=self.name,
            namespace=self.namespace,
            hostname=self.hostname,
            addresses=[
                pb.NetworkAddress(network=self.network, address=a.packed) for a in self.addresses
            ],
            ports=[
                pb.Port(service_port=p.service_port, target_port=p.target_port) for p in self.ports
            ],
            subject_alt_names=list(self.subject_alt_names),
        )
        if self.waypoint is not None:
            service.waypoint.CopyFrom(_gateway_to_proto(self.waypoint, self.network))
        if self.load_balancing is not None:
            service.load_balancing.CopyFrom(_load_balancing_to_proto(self.load_balancing))
        return pb.Address(service=service)

    @classmethod
    def from_proto(cls, message: pb.Service) -> Service:
        name = f"{message.namespace}/{message.hostname}"
        if not message.hostname or not message.namespace:
            raise InvalidResource(name, "service without a namespace or hostname")
        return cls(
            name=message.name,
            namespace=message.namespace,
            hostname=message.hostname,
            addresses=tuple(_ip(name, a.address) for a in message.addresses),
            ports=tuple(_port(name, p) for p in message.ports),
            waypoint=_gateway(name, message.waypoint) if message.HasField("waypoint") else None,
            subject_alt_names=tuple(message.subject_alt_names),
            network=message.addresses[0].network if message.addresses else "",
            load_balancing=(
                _load_balancing(name, message.load_balancing)
                if message.HasField("load_balancing")
                else None
            ),
        )


def address_from_proto(message: pb.Address) -> Workload | Service:
    """One ``istio.workload.Address`` resource as a model value."""
    kind = message.WhichOneof("type")
    if kind == "workload":
        return Workload.from_proto(message.workload)
    if kind == "service":
        return Service.from_proto(message.service)
    raise InvalidResource("?", "Address with neither a workload nor a service")


def _ip(resource: str, raw: bytes) -> IPAddress:
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise InvalidResource(resource, f"an address of {len(raw)} bytes is neither IPv4 nor IPv6")


def _port(resource: str, port: pb.Port) -> Port:
    for value in (port.service_port, port.target_port):
        if value > 65535:
            raise InvalidResource(resource, f"port {value} is out of range")
    if port.service_port == 0:
        raise InvalidResource(resource, "service port 0")
    return Port(service_port=port.service_port, target_port=port.target_port)


def _gateway(resource: str, message: pb.GatewayAddress) -> GatewayAddress:
    kind = message.WhichOneof("destination")
    port = message.hbone_mtls_port or HBONE_PORT
    if kind == "address":
        return GatewayAddress(address=_ip(resource, message.address.address), port=port)
    if kind == "hostname":
        return GatewayAddress(
            hostname=f"{message.hostname.namespace}/{message.hostname.hostname}", port=port
        )
    raise InvalidResource(resource, "waypoint with neither an address nor a hostname")


def _load_balancing(resource: str, message: pb.LoadBalancing) -> LoadBalancing:
    """Unknown or unspecified scopes and modes refuse the service, as ztunnel does."""
    try:
        scopes = tuple(LoadBalancingScope(s) for s in message.routing_preference)
        mode = LoadBalancingMode(message.mode)
        health = HealthPolicy(message.health_policy)
    except ValueError as e:
        raise InvalidResource(resource, f"load balancing: unknown enum value: {e}") from e
    return LoadBalancing(routing_preference=scopes, mode=mode, health_policy=health)


def _load_balancing_to_proto(lb: LoadBalancing) -> pb.LoadBalancing:
    return pb.LoadBalancing(
        routing_preference=[pb.LoadBalancing.Scope.Name(s) for s in lb.routing_preference],
        mode=pb.LoadBalancing.Mode.Name(lb.mode),
        health_policy=pb.LoadBalancing.HealthPolicy.Name(lb.health_policy),
    )


def _gateway_to_proto(gateway: GatewayAddress, network: str) -> pb.GatewayAddress:
    message = pb.GatewayAddress(hbone_mtls_port=gateway.port)
    if gateway.address is not None:
        message.address.CopyFrom(pb.NetworkAddress(network=network, address=gateway.address.packed))
    elif gateway.hostname is not None:
        namespace, _, hostname = gateway.hostname.partition("/")
        message.hostname.CopyFrom(pb.NamespacedHostname(namespace=namespace, hostname=hostname))
    return message
