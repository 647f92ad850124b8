"""L4 authorization policies as the proxies know them (``istio.security.Authorization``).

The structure is Istio's: a policy has rules (OR-ed); a rule has clauses
(AND-ed, one per ``from``/``to``/``when`` of the YAML); a clause has matches
(OR-ed); inside a match, values of one kind are OR-ed and kinds are AND-ed.
Evaluating them against a connection is the ztunnel's business; here they
are only values and their conversion.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from google.protobuf import empty_pb2

from mesh.model.errors import InvalidResource
from mesh.proto.istio.security import authorization_pb2 as pb

AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(enum.IntEnum):
    ALLOW = pb.ALLOW
    DENY = pb.DENY


class Scope(enum.IntEnum):
    GLOBAL = pb.GLOBAL
    NAMESPACE = pb.NAMESPACE
    WORKLOAD_SELECTOR = pb.WORKLOAD_SELECTOR


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> StringMatch:
        """Istio's YAML shorthand: ``*`` presence, ``x*`` prefix, ``*x`` suffix, else exact."""
        if text == "*":
            return cls(MatchKind.PRESENCE)
        if text.endswith("*"):
            return cls(MatchKind.PREFIX, text[:-1])
        if text.startswith("*"):
            return cls(MatchKind.SUFFIX, text[1:])
        return cls(MatchKind.EXACT, text)

    def matches(self, value: str) -> bool:
        if self.kind is MatchKind.EXACT:
            return value == self.value
        if self.kind is MatchKind.PREFIX:
            return value.startswith(self.value)
        if self.kind is MatchKind.SUFFIX:
            return value.endswith(self.value)
        return bool(value)

    def to_proto(self) -> pb.StringMatch:
        if self.kind is MatchKind.PRESENCE:
            return pb.StringMatch(presence=empty_pb2.Empty())
        if self.kind is MatchKind.PREFIX:
            return pb.StringMatch(prefix=self.value)
        if self.kind is MatchKind.SUFFIX:
            return pb.StringMatch(suffix=self.value)
        return pb.StringMatch(exact=self.value)

    @classmethod
    def from_proto(cls, message: pb.StringMatch) -> StringMatch:
        kind = message.WhichOneof("match_type")
        if kind is None:
            raise ValueError("string match without a value")
        if kind == "presence":
            return cls(MatchKind.PRESENCE)
        return cls(MatchKind(kind), str(getattr(message, kind)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def to_proto(self) -> pb.Match:
        return pb.Match(
            namespaces=[m.to_proto() for m in self.namespaces],
            not_namespaces=[m.to_proto() for m in self.not_namespaces],
            principals=[m.to_proto() for m in self.principals],
            not_principals=[m.to_proto() for m in self.not_principals],
            source_ips=[_cidr(n) for n in self.source_ips],
            not_source_ips=[_cidr(n) for n in self.not_source_ips],
            destination_ips=[_cidr(n) for n in self.destination_ips],
            not_destination_ips=[_cidr(n) for n in self.not_destination_ips],
            destination_ports=list(self.destination_ports),
            not_destination_ports=list(self.not_destination_ports),
        )

    @classmethod
    def from_proto(cls, message: pb.Match) -> Match:
        for port in (*message.destination_ports, *message.not_destination_ports):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range")
        return cls(
            namespaces=tuple(StringMatch.from_proto(m) for m in message.namespaces),
            not_namespaces=tuple(StringMatch.from_proto(m) for m in message.not_namespaces),
            principals=tuple(StringMatch.from_proto(m) for m in message.principals),
            not_principals=tuple(StringMatch.from_proto(m) for m in message.not_principals),
            source_ips=tuple(_network(a) for a in message.source_ips),
            not_source_ips=tuple(_network(a) for a in message.not_source_ips),
            destination_ips=tuple(_network(a) for a in message.destination_ips),
            not_destination_ips=tuple(_network(a) for a in message.not_destination_ips),
            destination_ports=tuple(message.destination_ports),
            not_destination_ports=tuple(message.not_destination_ports),
        )


@dataclass(frozen=True, slots=True)
class Clause:
    matches: tuple[Match, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    clauses: tuple[Clause, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """One authorization policy. Its xDS resource name is ``namespace/name``."""

    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...] = ()

    @property
    def resource_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_proto(self) -> pb.Authorization:
        return pb.Authorization(
            name=self.name,
            namespace=self.namespace,
            scope=self.scope.name,
            action=self.action.name,
            rules=[
                pb.Rule(
                    clauses=[
                        pb.Clause(matches=[m.to_proto() for m in clause.matches])
                        for clause in rule.clauses
                    ]
                )
                for rule in self.rules
            ],
        )

    @classmethod
    def from_proto(cls, message: pb.Authorization) -> Policy:
        name = f"{message.namespace}/{message.name}"
        if not message.name:
            raise InvalidResource(name, "policy without a name")
        try:
            return cls(
                name=message.name,
                namespace=message.namespace,
                scope=Scope(message.scope),
                action=Action(message.action),
                rules=tuple(
                    Rule(
                        tuple(
                            Clause(tuple(Match.from_proto(m) for m in clause.matches))
                            for clause in rule.clauses
                        )
                    )
                    for rule in message.rules
                ),
            )
        except ValueError as e:
            raise InvalidResource(name, str(e)) from e


def _cidr(network: IPNetwork) -> pb.Address:
    return pb.Address(address=network.network_address.packed, length=network.prefixlen)


def _network(address: pb.Address) -> IPNetwork:
    raw = address.address
    if len(raw) not in (4, 16):
        raise ValueError(f"an address of {len(raw)} bytes is neither IPv4 nor IPv6")
    ip = ipaddress.ip_address(raw)
    return ipaddress.ip_network(f"{ip}/{address.length}", strict=False)
