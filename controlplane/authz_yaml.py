"""Istio ``AuthorizationPolicy`` objects (security.istio.io/v1) -> our L4 policy values.

What ztunnel can enforce is L4: ``from.source`` principals, namespaces,
service accounts and IP blocks (and their ``not`` forms), ``to.operation``
ports, and the ``when`` conditions on ``source.ip``, ``source.namespace``,
``source.principal``, ``destination.ip`` and ``destination.port``. For the
HTTP attributes (hosts, methods, paths, request principals, remote IP
blocks, every other ``when`` key) this follows Istio's ambient semantics,
which fail closed:

* in an ALLOW policy, a rule naming any of them is omitted (it matches
  nothing; a policy left without rules allows nothing);
* in a DENY policy, a rule naming any of them is enforced without them (it
  denies all that its L4 parts match);

and the policy carries Istio's warning (``ZtunnelAccepted``, reason
``UnsupportedValue``: "ztunnel does not support HTTP attributes (found:
...)"), shown in meshd's status, so nobody believes an HTTP rule is in force
where only ztunnel stands. Policies bound by ``targetRefs`` are the
waypoint's, not ztunnel's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.l7.status import Condition, ObjectStatus
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
# Istio's HTTP attributes of a source (remote IP blocks come from X-Forwarded-For).
_L7_SOURCE = ("remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals")
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
_L7_OPERATION = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
# The condition keys ztunnel evaluates; every other known key is HTTP (Istio's list).
_L4_WHEN = (
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
)
_L7_WHEN = ("remote.ip", "request.auth.principal", "request.auth.audiences",
            "request.auth.presenter", "connection.sni")  # fmt: skip
_L7_WHEN_PREFIXES = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")
WARNING = (
    "ztunnel does not support HTTP attributes (found: {found}). "
    "In ambient mode you must use a waypoint proxy to enforce HTTP rules. {consequence}"
)
ALLOW_CONSEQUENCE = (
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. "
    "This will be more restrictive than requested."
)
DENY_CONSEQUENCE = (
    "DENY policy with HTTP attributes is enforced without the HTTP rules. "
    "This will be more restrictive than requested."
)


FAIL_CLOSED = (
    "{error}. Until it is fixed, it is enforced as a DENY of every connection to the "
    "workloads it {scope} (fail closed: a policy that cannot be read never allows)."
)


def ztunnel_status(policy: AuthorizationPolicyInfo) -> ObjectStatus:
    """Istio's ``ZtunnelAccepted`` condition for a policy ztunnel enforces."""
    if policy.invalid:
        condition = Condition(
            type="ZtunnelAccepted", status=False, reason="Invalid", message=policy.invalid
        )
    else:
        condition = Condition(
            type="ZtunnelAccepted",
            status=True,
            reason="UnsupportedValue" if policy.warning else "Accepted",
            message=policy.warning or "attached to ztunnel",
        )
    return ObjectStatus(
        kind="AuthorizationPolicy",
        namespace=policy.namespace,
        name=policy.name,
        generation=policy.generation,
        conditions=(condition,),
    )


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
    found: set[str] = set()
    if raw_rules is None:
        rules = None
    elif not isinstance(raw_rules, list):
        raise InvalidPolicy(full, "spec.rules", "must be a list")
    else:
        kept = []
        for i, raw in enumerate(raw_rules):
            rule, l7 = _rule(full, f"spec.rules[{i}]", raw, namespace)
            found |= l7
            if not (l7 and action == "ALLOW"):  # an ALLOW rule with HTTP parts matches nothing
                kept.append(rule)
        rules = tuple(kept)
    warning = ""
    if found:
        consequence = ALLOW_CONSEQUENCE if action == "ALLOW" else DENY_CONSEQUENCE
        warning = WARNING.format(found=", ".join(sorted(found)), consequence=consequence)
    generation = meta.get("generation")
    return AuthorizationPolicyInfo(
        name=name,
        namespace=namespace,
        action=action,
        selector=selector,
        rules=rules,
        warning=warning,
        generation=generation if isinstance(generation, int) else 0,
    )


def fail_closed(obj: Mapping[str, Any], error: InvalidPolicy) -> AuthorizationPolicyInfo | None:
    """What an unreadable policy (bound by selector) stands for: a DENY of all traffic to
    the workloads it selects, or, when its selector cannot be read either, to its whole
    namespace (the mesh, in the root namespace). Dropping it would allow by accident what
    a DENY was written to stop, or everything an only ALLOW was written to limit. None
    when it has no name: then it is no object at all."""
    meta: Mapping[str, Any] = obj.get("metadata") or {}
    if not isinstance(meta, Mapping):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    namespace = str(meta.get("namespace") or "default")
    spec = obj.get("spec")
    selector: Mapping[str, str] | None = None
    scope = "may select: all of namespace " + namespace + ", as its selector cannot be read"
    try:
        selector = _selector(
            error.name, spec.get("selector") if isinstance(spec, Mapping) else None
        )
        if selector is not None:
            scope = "selects"
        elif isinstance(spec, Mapping) and spec.get("selector") is None:
            scope = f"selects (all of namespace {namespace}: it has no selector)"
    except InvalidPolicy:
        pass
    generation = meta.get("generation")
    return AuthorizationPolicyInfo(
        name=name,
        namespace=namespace,
        action="DENY",
        selector=selector,
        rules=(Rule(clauses=()),),  # no clause: matches every connection
        generation=generation if isinstance(generation, int) else 0,
        invalid=FAIL_CLOSED.format(error=str(error), scope=scope),
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


def _rule(full: str, path: str, raw: Any, namespace: str) -> tuple[Rule, set[str]]:
    """The rule's L4 parts, and the names of the HTTP attributes it also asks for."""
    if not isinstance(raw, Mapping):
        raise InvalidPolicy(full, path, "a rule must be a mapping")
    unknown = set(raw) - {"from", "to", "when"}
    if unknown:
        raise InvalidPolicy(full, f"{path}.{sorted(unknown)[0]}", "unknown field")
    found: set[str] = set()
    clauses: list[Clause] = []
    sources = _list(full, f"{path}.from", raw.get("from"))
    if sources:
        matches = []
        for i, s in enumerate(sources):
            match, l7 = _source(full, f"{path}.from[{i}]", s, namespace)
            matches.append(match)
            found |= l7
        clauses.append(Clause(tuple(matches)))
    operations = _list(full, f"{path}.to", raw.get("to"))
    if operations:
        matches = []
        for i, o in enumerate(operations):
            match, l7 = _operation(full, f"{path}.to[{i}]", o)
            matches.append(match)
            found |= l7
        clauses.append(Clause(tuple(matches)))
    for i, condition in enumerate(_list(full, f"{path}.when", raw.get("when"))):
        clause, key = _condition(full, f"{path}.when[{i}]", condition)
        clauses.append(clause)
        if key is not None:
            found.add(key)
    return Rule(tuple(clauses)), found


def _condition(full: str, path: str, raw: Any) -> tuple[Clause, str | None]:
    """One ``when`` entry as a clause, and its key when ztunnel cannot see it (then the
    clause holds for every connection: what is left of a DENY rule is enforced)."""
    if not isinstance(raw, Mapping):
        raise InvalidPolicy(full, path, "a condition must be a mapping")
    unknown = set(raw) - {"key", "values", "notValues"}
    if unknown:
        raise InvalidPolicy(full, f"{path}.{sorted(unknown)[0]}", "unknown field")
    key = raw.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidPolicy(full, f"{path}.key", "is required")
    values = _strings(full, f"{path}.values", raw.get("values"))
    not_values = _strings(full, f"{path}.notValues", raw.get("notValues"))
    if not values and not not_values:
        raise InvalidPolicy(full, path, "needs values or notValues")
    if key in _L7_WHEN or key.startswith(_L7_WHEN_PREFIXES):
        return Clause((Match(),)), key
    if key not in _L4_WHEN:
        raise InvalidPolicy(full, f"{path}.key", f"{key!r} is not a condition Istio knows")
    match: Match
    if key == "source.ip":
        match = Match(
            source_ips=_blocks(full, path, "values", values),
            not_source_ips=_blocks(full, path, "notValues", not_values),
        )
    elif key == "destination.ip":
        match = Match(
            destination_ips=_blocks(full, path, "values", values),
            not_destination_ips=_blocks(full, path, "notValues", not_values),
        )
    elif key == "destination.port":
        match = Match(
            destination_ports=_ports(full, f"{path}.values", values),
            not_destination_ports=_ports(full, f"{path}.notValues", not_values),
        )
    elif key == "source.namespace":
        match = Match(
            namespaces=tuple(StringMatch.parse(v) for v in values),
            not_namespaces=tuple(StringMatch.parse(v) for v in not_values),
        )
    else:  # source.principal
        match = Match(
            principals=tuple(_principal(v) for v in values),
            not_principals=tuple(_principal(v) for v in not_values),
        )
    return Clause((match,)), None


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


def _source(full: str, path: str, raw: Any, namespace: str) -> tuple[Match, set[str]]:
    if not isinstance(raw, Mapping) or set(raw) != {"source"}:
        raise InvalidPolicy(full, path, "each entry of from must be {source: ...}")
    source = raw["source"] or {}
    path = f"{path}.source"
    if not isinstance(source, Mapping):
        raise InvalidPolicy(full, path, "must be a mapping")
    unknown = set(source) - _SOURCE_FIELDS
    if unknown:
        raise InvalidPolicy(full, f"{path}.{sorted(unknown)[0]}", "unknown field")
    found = set()
    for name in _L7_SOURCE:
        if _strings(full, f"{path}.{name}", source.get(name)):
            found.add(name)
    principals = [
        _principal(p) for p in _strings(full, f"{path}.principals", source.get("principals"))
    ]
    accounts = _accounts(full, f"{path}.serviceAccounts", source.get("serviceAccounts"), namespace)
    if principals and accounts:
        # Both must hold, and a match has one principal field: say so rather than OR them.
        raise InvalidPolicy(
            full, f"{path}.serviceAccounts", "cannot be combined with principals in one source"
        )
    not_principals = [
        _principal(p) for p in _strings(full, f"{path}.notPrincipals", source.get("notPrincipals"))
    ]
    not_accounts = _accounts(
        full, f"{path}.notServiceAccounts", source.get("notServiceAccounts"), namespace
    )
    match = Match(
        principals=tuple(principals or accounts),
        not_principals=(*not_principals, *not_accounts),
        namespaces=tuple(
            StringMatch.parse(n)
            for n in _strings(full, f"{path}.namespaces", source.get("namespaces"))
        ),
        not_namespaces=tuple(
            StringMatch.parse(n)
            for n in _strings(full, f"{path}.notNamespaces", source.get("notNamespaces"))
        ),
        source_ips=_blocks(full, path, "ipBlocks", source.get("ipBlocks") or []),
        not_source_ips=_blocks(full, path, "notIpBlocks", source.get("notIpBlocks") or []),
    )
    return match, found


def _accounts(full: str, path: str, raw: Any, namespace: str) -> list[StringMatch]:
    """``serviceAccounts`` (``name`` in the policy's namespace, or ``ns/name``) as
    principals of any trust domain: ``*/ns/<ns>/sa/<name>``, as Istio matches them."""
    out = []
    for i, value in enumerate(_strings(full, path, raw)):
        ns, sep, sa = value.partition("/")
        if not sep:
            ns, sa = namespace, value
        if not ns or not sa or "/" in sa or "*" in value:
            raise InvalidPolicy(full, f"{path}[{i}]", f"{value!r} is not NAME or NAMESPACE/NAME")
        out.append(StringMatch.parse(f"*/ns/{ns}/sa/{sa}"))
    return out


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


def _operation(full: str, path: str, raw: Any) -> tuple[Match, set[str]]:
    if not isinstance(raw, Mapping) or set(raw) != {"operation"}:
        raise InvalidPolicy(full, path, "each entry of to must be {operation: ...}")
    operation = raw["operation"] or {}
    path = f"{path}.operation"
    if not isinstance(operation, Mapping):
        raise InvalidPolicy(full, path, "must be a mapping")
    unknown = set(operation) - _OPERATION_FIELDS
    if unknown:
        raise InvalidPolicy(full, f"{path}.{sorted(unknown)[0]}", "unknown field")
    found = {n for n in _L7_OPERATION if _strings(full, f"{path}.{n}", operation.get(n))}
    match = Match(
        destination_ports=_ports(full, f"{path}.ports", operation.get("ports")),
        not_destination_ports=_ports(full, f"{path}.notPorts", operation.get("notPorts")),
    )
    return match, found


def _ports(full: str, path: str, raw: Any) -> tuple[int, ...]:
    ports = []
    for i, value in enumerate(_list(full, path, raw)):
        text = str(value)
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise InvalidPolicy(full, f"{path}[{i}]", f"{value!r} is not a port number")
        ports.append(int(text))
    return tuple(ports)
