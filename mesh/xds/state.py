"""The proxy's view of the feed, sans I/O: responses in, immutable snapshots and answers out.

Each Delta response is applied as a whole new :class:`XdsState`: every
resource is converted and validated first; one that fails is refused alone
(named in the NACK, the rest applied), and readers only ever see complete
snapshots. What the proxy holds survives a lost connection untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import DecodeError

from mesh.model import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    InvalidResource,
    Policy,
    Service,
    Workload,
    address_from_proto,
)
from mesh.proto.istio.security import authorization_pb2
from mesh.proto.istio.workload import workload_pb2

TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class XdsState:
    """Everything the proxy knows from meshd, at one moment."""

    workloads: Mapping[str, Workload] = field(default_factory=_empty)
    services: Mapping[str, Service] = field(default_factory=_empty)
    policies: Mapping[str, Policy] = field(default_factory=_empty)
    # name -> version, per type: what a reconnect announces as held.
    versions: Mapping[str, Mapping[str, str]] = field(default_factory=_empty)
    # Types for which a first response has arrived.
    synced_types: frozenset[str] = frozenset()

    @property
    def synced(self) -> bool:
        return set(TYPE_URLS) <= self.synced_types

    def summary(self) -> str:
        return f"{len(self.workloads)} workloads, {len(self.policies)} policies"

    def workload_by_ip(self, ip: str) -> Workload | None:
        for workload in self.workloads.values():
            if any(str(a) == ip for a in workload.addresses):
                return workload
        return None


class FeedState(Protocol):
    """What the client needs of any proxy's state: what it holds, and whether it is whole."""

    @property
    def versions(self) -> Mapping[str, Mapping[str, str]]: ...

    @property
    def synced(self) -> bool: ...

    def summary(self) -> str: ...


S = TypeVar("S", bound=FeedState)


@dataclass(frozen=True, slots=True)
class Applied(Generic[S]):
    """The outcome of one response: the new state, and what to answer."""

    state: S
    refused: Mapping[str, str]  # name -> reason
    changed: bool

    @property
    def nack_message(self) -> str:
        return "; ".join(f"{name}: {reason}" for name, reason in sorted(self.refused.items()))

    def refused_details(self) -> list[any_pb2.Any]:
        """The refused names, for the NACK's details (meshd reads them)."""
        names = struct_pb2.ListValue()
        names.extend(sorted(self.refused))
        packed = any_pb2.Any()
        packed.Pack(names)
        return [packed]


def apply_response(
    state: XdsState,
    type_url: str,
    resources: Iterable[tuple[str, str, any_pb2.Any]],
    removed: Iterable[str],
) -> Applied[XdsState]:
    """Apply one Delta response (``(name, version, Any)`` resources, removed names)."""
    refused: dict[str, str] = {}
    versions = dict(state.versions.get(type_url, {}))
    changed = False
    if type_url == ADDRESS_TYPE_URL:
        workloads = dict(state.workloads)
        services = dict(state.services)
        for name, version, packed in resources:
            try:
                value = _address(name, packed)
            except InvalidResource as e:
                refused[name] = e.reason
                continue
            workloads.pop(name, None)
            services.pop(name, None)
            if isinstance(value, Workload):
                workloads[name] = value
            else:
                services[name] = value
            versions[name] = version
            changed = True
        for name in removed:
            if workloads.pop(name, None) is not None or services.pop(name, None) is not None:
                changed = True
            versions.pop(name, None)
        new = replace(
            state, workloads=MappingProxyType(workloads), services=MappingProxyType(services)
        )
    elif type_url == AUTHORIZATION_TYPE_URL:
        policies = dict(state.policies)
        for name, version, packed in resources:
            try:
                policies[name] = _policy(name, packed)
            except InvalidResource as e:
                refused[name] = e.reason
                continue
            versions[name] = version
            changed = True
        for name in removed:
            if policies.pop(name, None) is not None:
                changed = True
            versions.pop(name, None)
        new = replace(state, policies=MappingProxyType(policies))
    else:
        return Applied(state, {}, False)
    all_versions = dict(state.versions)
    all_versions[type_url] = MappingProxyType(versions)
    synced = state.synced_types | {type_url}
    changed = changed or synced != state.synced_types
    return Applied(
        replace(new, versions=MappingProxyType(all_versions), synced_types=synced),
        MappingProxyType(refused),
        changed,
    )


def _address(name: str, packed: any_pb2.Any) -> Workload | Service:
    message = workload_pb2.Address()
    if packed.type_url != ADDRESS_TYPE_URL:
        raise InvalidResource(name, f"type {packed.type_url!r}, expected {ADDRESS_TYPE_URL}")
    try:
        message.ParseFromString(packed.value)
    except DecodeError as e:
        raise InvalidResource(name, f"cannot decode: {e}") from e
    value = address_from_proto(message)
    if value.resource_name != name:
        raise InvalidResource(name, f"resource named {name!r} holds {value.resource_name!r}")
    return value


def _policy(name: str, packed: any_pb2.Any) -> Policy:
    message = authorization_pb2.Authorization()
    if packed.type_url != AUTHORIZATION_TYPE_URL:
        raise InvalidResource(name, f"type {packed.type_url!r}, expected {AUTHORIZATION_TYPE_URL}")
    try:
        message.ParseFromString(packed.value)
    except DecodeError as e:
        raise InvalidResource(name, f"cannot decode: {e}") from e
    policy = Policy.from_proto(message)
    if policy.resource_name != name:
        raise InvalidResource(name, f"resource named {name!r} holds {policy.resource_name!r}")
    return policy
