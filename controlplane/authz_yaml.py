"""Istio ``AuthorizationPolicy`` objects (security.istio.io/v1) -> our L4 policy values.

What ztunnel can enforce is L4: ``from.source`` principals, namespaces and
IP blocks (and their ``not`` forms), ``to.operation`` ports. A policy that
asks for more (HTTP methods, paths, hosts, ``when`` conditions) needs a
waypoint; here it is refused with a message naming the field, so the
operator knows, rather than being enforced half-way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.state import AuthorizationPolicyInfo, frozen_labels
from mesh.model import Clause, Match, Rule, StringMatch

_SOURCE_FIELDS = {
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "requestPrincipals",
    "notRequestPrincipals",
    "serviceAccounts",
    "notServiceAccounts",
}
_L7_SOURCE = {"requestPrincipals", "notRequestPrincipals"}
_OPERATION_FIELDS = {
    "ports",
    "notPorts",
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
}
_L7_OPERATION = {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}


class InvalidPolicy(ValueError):
    """An AuthorizationPolicy that cannot be used; says which field and why."""

    def __init__(self, name: str, path: str, reason: str) -> None:
        self.name = name
        self.path = path
        super().__init__(f"AuthorizationPolicy {name}: {path}: {reason}")


def parse_authorization_policy(obj: Mapping[str, Any]) -> AuthorizationPolicyInfo:
    """Parse one object as the API server (or a YAML file) has it."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "default")
    full = f"{namespace}/{name}"
    if not name:
        raise InvalidPolicy(full, "metadata.name", "is required")
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise InvalidPolicy(full, "spec", "must be a mapping")
    unknown = set(spec) - {"selector", "action", "rules", "targetRef", "targetRefs", "provider"}
    if unknown:
        raise InvalidPolicy(full, f"spec.{sorted(unknown)[0]}", "unknown field")
    action = str(spec.get("action") or "ALLOW").upper()
    if action not in ("ALLOW", "DENY"):
        raise InvalidPolicy(
            full, "spec.action", f"{action!r} is not enforced by ztunnel (ALLOW or DENY)"
        )
    if spec.get("targetRef") or spec.get("targetRefs"):
        raise InvalidPolicy(full, "spec.targetRefs", "policies attached to a waypoint are L7")
    selector = _selector(full, spec.get("selector"))
    raw_rules = spec.get("rules")
    rules: tuple[Rule, ...] | None
    if raw_rules is None:
        rules = None
    elif not isinstance(raw_rules, list):
        raise InvalidPolicy(full, "spec.rules", "must be a list")
    else:
        rules = tuple(_rule(full, f"spec.rules[{i}]", r) for i, r in enumerate(raw_rules))
    return AuthorizationPolicyInfo(
        name=name, namespace=namespace, action=action, selector=selector, rules=rules
    )


def _selector(full: str, raw: Any) -> Mapping[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"matchLabels"}:
        raise InvalidPolicy(full, "spec.selector", "only matchLabels is supported")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidPolicy(full, "spec.selector.matchLabels", "must map strings to strings")
    return frozen_labels(labels)


def _rule(full: str, path: str, raw: Any) -> Rule:
    if not isinstance(raw, Mapping):
        raise InvalidPolicy(full, path, "a rule must be a mapping")
    unknown = set(raw) - {"from", "to", "when"}
    if unknown:
        raise InvalidPolicy(full, f"{path}.{sorted(unknown)[0]}", "unknown field")
    if raw.get("when"):
        raise InvalidPolicy(full, f"{path}.when", "conditions need a waypoint (L7)")
    clauses: list[Clause] = []
    sources = _list(full, f"{path}.from", raw.get("from"))
    if sources:
        clauses.append(
            Clause(tuple(_source(full, f"{path}.from[{i}]", s) for i, s in enumerate(sources)))
        )
    operations = _list(full, f"{path}.to", raw.get("to"))
    if operations:
        clauses.append(
            Clause(tuple(_operation(full, f"{path}.to[{i}]", o) for i, o in enumerate(operations)))
        )
    return Rule(tuple(clauses))


def _list(full: str, path: str, raw: Any) -> Sequence[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidPolicy(full, path, "must be a list")
    return raw


def _strings(full: str, path: str, raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise InvalidPolicy(full, path, "must be a list of non-empty strings")
    return raw


def _source(full: str, path: str, raw: Any) -> Match:
    if not isinstance(raw, Mapping) or set(raw) != {"source"}:
        raise InvalidPolicy(full, path, "each entry of from must be {source: ...}")
    source = raw["source"] or {}
    path = f"{path}.source"
    if not isinstance(source, Mapping):
        raise InvalidPolicy(full, path, "must be a mapping")
    unknown = set(source) - _SOURCE_FIELDS
    if unknown:
        raise InvalidPolicy(full, f"{path}.{sorted(unknown)[0]}", "unknown field")
    l7 = set(source) & _L7_SOURCE
    if l7:
        raise InvalidPolicy(full, f"{path}.{sorted(l7)[0]}", "JWT principals need a waypoint")
    principals = _strings(full, f"{path}.principals", source.get("principals"))
    not_principals = _strings(full, f"{path}.notPrincipals", source.get("notPrincipals"))
    return Match(
        principals=tuple(_principal(p) for p in principals),
        not_principals=tuple(_principal(p) for p in not_principals),
        namespaces=tuple(
            StringMatch.parse(n)
            for n in _strings(full, f"{path}.namespaces", source.get("namespaces"))
        ),
        not_namespaces=tuple(
            StringMatch.parse(n)
            for n in _strings(full, f"{path}.notNamespaces", source.get("notNamespaces"))
        ),
        source_ips=_blocks(
            full,
            path,
            "ipBlocks",
            [*(source.get("ipBlocks") or []), *(source.get("remoteIpBlocks") or [])],
        ),
        not_source_ips=_blocks(
            full,
            path,
            "notIpBlocks",
            [*(source.get("notIpBlocks") or []), *(source.get("notRemoteIpBlocks") or [])],
        ),
    )


def _principal(text: str) -> StringMatch:
    # Istio's principals are "<trust domain>/ns/<ns>/sa/<sa>", matched against
    # the SPIFFE ID without its scheme.
    return StringMatch.parse(text.removeprefix("spiffe://"))


def _blocks(full: str, path: str, name: str, raw: Iterable[Any]) -> tuple[Any, ...]:
    networks = []
    for i, block in enumerate(raw):
        try:
            networks.append(ipaddress.ip_network(str(block), strict=False))
        except ValueError:
            raise InvalidPolicy(
                full, f"{path}.{name}[{i}]", f"{block!r} is not an IP address or CIDR"
            ) from None
    return tuple(networks)


def _operation(full: str, path: str, raw: Any) -> Match:
    if not isinstance(raw, Mapping) or set(raw) != {"operation"}:
        raise InvalidPolicy(full, path, "each entry of to must be {operation: ...}")
    operation = raw["operation"] or {}
    path = f"{path}.operation"
    if not isinstance(operation, Mapping):
        raise InvalidPolicy(full, path, "must be a mapping")
    unknown = set(operation) - _OPERATION_FIELDS
    if unknown:
        raise InvalidPolicy(full, f"{path}.{sorted(unknown)[0]}", "unknown field")
    l7 = set(operation) & _L7_OPERATION
    if l7:
        raise InvalidPolicy(full, f"{path}.{sorted(l7)[0]}", "HTTP attributes need a waypoint")
    return Match(
        destination_ports=_ports(full, f"{path}.ports", operation.get("ports")),
        not_destination_ports=_ports(full, f"{path}.notPorts", operation.get("notPorts")),
    )


def _ports(full: str, path: str, raw: Any) -> tuple[int, ...]:
    ports = []
    for i, value in enumerate(_list(full, path, raw)):
        text = str(value)
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise InvalidPolicy(full, f"{path}[{i}]", f"{value!r} is not a port number")
        ports.append(int(text))
    return tuple(ports)
