"""Istio ``AuthorizationPolicy`` objects bound to a waypoint by ``targetRefs``, as Istio reads them.

A policy (``security.istio.io/v1``, or v1beta1) with ``targetRef`` or
``targetRefs`` is the waypoint's: a ``Gateway`` (the waypoint itself, every
service and workload it serves), a ``Service`` (that service, where a
waypoint serves it) or, in the root namespace, the ``GatewayClass``
``istio-waypoint`` (every waypoint). Its rules become Istio's model of a
rule (``pilot/pkg/security/authz/model``): one list of principal attributes
per ``from`` entry (or one empty list), one list of permission attributes per
``to`` entry (or one), the ``when`` conditions appended to whichever side
their key belongs to; each attribute keeps its values and notValues, in
Istio's order. :mod:`controlplane.l7.envoy_rbac` turns them into Envoy's
RBAC filters.

What is refused says so in the policy's ``WaypointAccepted`` condition, and
fails closed: ``CUSTOM`` (no external authorizer here) and a policy whose
rules cannot be read deny every request to their targets, as Istio denies
for a CUSTOM policy without its provider; ``AUDIT`` is refused and changes
no decision (it only ever logs). A policy whose targets cannot be read binds
nowhere and says why.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

from controlplane.l7.istio_object import created_of, generation_of
from controlplane.l7.reader import InvalidObject, Reader
from controlplane.l7.status import ObjectStatus, waypoint_accepted
from controlplane.state import L7Object

KIND = "AuthorizationPolicy"
WAYPOINT_CLASS = "istio-waypoint"
_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
_TARGET_KINDS = {
    ("gateway.networking.k8s.io", "Gateway"),
    ("", "Service"),
    ("gateway.networking.k8s.io", "GatewayClass"),
}

# Istio's attribute names (model.go); the operation fields use its internal names.
SOURCE_IP = "source.ip"
REMOTE_IP = "remote.ip"
SOURCE_NAMESPACE = "source.namespace"
SOURCE_SERVICE_ACCOUNT = "source.serviceAccount"
SOURCE_PRINCIPAL = "source.principal"
REQUEST_PRINCIPAL = "request.auth.principal"
REQUEST_AUDIENCES = "request.auth.audiences"
REQUEST_PRESENTER = "request.auth.presenter"
REQUEST_HEADERS = "request.headers"
REQUEST_CLAIMS = "request.auth.claims"
DESTINATION_IP = "destination.ip"
DESTINATION_PORT = "destination.port"
CONNECTION_SNI = "connection.sni"
HOST = ":authority"
METHOD = ":method"
PATH = "path-matcher"
# Keys only HTTP carries: a TCP chain cannot evaluate them (Istio's forTCP errors).
HTTP_ONLY = frozenset({HOST, METHOD, PATH, REQUEST_PRINCIPAL, REQUEST_AUDIENCES,
                       REQUEST_PRESENTER})  # fmt: skip
HTTP_ONLY_PREFIXES = (REQUEST_HEADERS + "[", REQUEST_CLAIMS + "[")
_PERMISSION_WHEN = (DESTINATION_IP, DESTINATION_PORT, CONNECTION_SNI)
_PRINCIPAL_WHEN = (
    SOURCE_IP, REMOTE_IP, SOURCE_NAMESPACE, SOURCE_SERVICE_ACCOUNT,
    SOURCE_PRINCIPAL, REQUEST_PRINCIPAL, REQUEST_AUDIENCES, REQUEST_PRESENTER,
)  # fmt: skip
_BRACKETS = re.compile(r"\[([^\[\]]+)\]")
_TEMPLATE_SEGMENTS = ("{*}", "{**}")


@dataclass(frozen=True, slots=True)
class Attribute:
    """One attribute of a rule: ``key`` (Istio's name), its values and notValues."""

    key: str
    values: tuple[str, ...]
    not_values: tuple[str, ...] = ()

    @property
    def http_only(self) -> bool:
        return self.key in HTTP_ONLY or self.key.startswith(HTTP_ONLY_PREFIXES)


@dataclass(frozen=True, slots=True)
class RuleModel:
    """Istio's Model of one rule: any permission list and any principal list must hold;
    each list holds when all of its attributes do."""

    permissions: tuple[tuple[Attribute, ...], ...]
    principals: tuple[tuple[Attribute, ...], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    kind: str  # Gateway, Service or GatewayClass
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointPolicy:
    namespace: str
    name: str
    action: str  # ALLOW, DENY (CUSTOM and invalid ones: DENY of everything, fail_closed set)
    targets: tuple[Target, ...]
    rules: tuple[RuleModel, ...] = ()
    fail_closed: str = ""  # why it denies everything instead of what it says
    problem: str = ""  # what is refused (the status message), "" when all is well
    generation: int = 0
    created: str = ""

    @property
    def id_prefix(self) -> str:
        return f"ns[{self.namespace}]-policy[{self.name}]"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def has_target_refs(raw: Mapping[str, object]) -> bool:
    """Whether an AuthorizationPolicy binds by ``targetRef(s)``: the waypoint's, not ztunnel's."""
    spec = raw.get("spec")
    return isinstance(spec, Mapping) and bool(spec.get("targetRef") or spec.get("targetRefs"))


def parse_all(objects: Iterable[L7Object], root_namespace: str) -> list[WaypointPolicy]:
    """The waypoints' policies (oldest first); one whose targets cannot be read is left out
    with an error status, see :func:`parse_statuses`."""
    out = []
    for obj in sorted(objects, key=lambda o: (created_of(o.raw), o.namespace, o.name)):
        if obj.kind != KIND:
            continue
        policy = parse_policy(obj, root_namespace)
        if policy is not None:
            out.append(policy)
    return out


def unreadable(objects: Iterable[L7Object], root_namespace: str) -> list[ObjectStatus]:
    """Statuses of the policies whose ``targetRefs`` cannot be read (bound nowhere)."""
    out = []
    for obj in objects:
        if obj.kind != KIND:
            continue
        try:
            _targets(_reader(obj), obj.namespace, root_namespace)
        except InvalidObject as e:
            out.append(_status(obj.namespace, obj.name, generation_of(obj.raw), False,
                               "Invalid", f"{e.path}: {e.reason}"))  # fmt: skip
    return out


def parse_policy(obj: L7Object, root_namespace: str) -> WaypointPolicy | None:
    """One policy; None when its targets cannot be read (it binds nowhere)."""
    r = _reader(obj)
    try:
        targets = _targets(r, obj.namespace, root_namespace)
    except InvalidObject:
        return None
    base = WaypointPolicy(
        namespace=obj.namespace,
        name=obj.name,
        action="ALLOW",
        targets=targets,
        generation=generation_of(obj.raw),
        created=created_of(obj.raw),
    )
    try:
        spec = _spec(r)
        action = spec.one_of("action", ("ALLOW", "DENY", "AUDIT", "CUSTOM"), "ALLOW")
        rules = tuple(_rule(rule) for rule in spec.children("rules"))
    except InvalidObject as e:
        message = f"{e.path}: {e.reason}; every request to its targets is denied until it is fixed"
        return replace(base, action="DENY", fail_closed=message, problem=message)
    if action == "CUSTOM":
        message = (
            "CUSTOM (external authorization) is not supported: every request to its "
            "targets is denied, as Istio denies when a CUSTOM policy's provider is missing"
        )
        return replace(base, action="DENY", fail_closed=message, problem=message)
    if action == "AUDIT":
        return replace(
            base,
            action="AUDIT",
            problem="AUDIT is not supported (it would only log): the policy has no effect",
        )
    return replace(base, action=action, rules=rules)


def status_of(policy: WaypointPolicy, bound: Sequence[str]) -> ObjectStatus:
    """Istio's ``WaypointAccepted`` condition: where the policy is in force, or why not."""
    if policy.problem:
        where = f" (bound to {', '.join(bound)})" if bound else ""
        return _status(policy.namespace, policy.name, policy.generation, False,
                       "Invalid" if policy.fail_closed else "UnsupportedValue",
                       policy.problem + where)  # fmt: skip
    if not bound:
        targets = ", ".join(str(t) for t in policy.targets)
        return _status(policy.namespace, policy.name, policy.generation, False,
                       "TargetNotFound", f"no waypoint serves {targets}")  # fmt: skip
    return _status(policy.namespace, policy.name, policy.generation, True, "Accepted",
                   f"bound to {', '.join(bound)}")  # fmt: skip


_status = partial(waypoint_accepted, KIND)  # namespace, name, generation, ok, reason, message


# ------------------------------------------------------------------ reading


def _reader(obj: L7Object) -> Reader:
    r = Reader(obj.raw, KIND, f"{obj.namespace}/{obj.name}")
    api = r.raw.get("apiVersion", _API_VERSIONS[0])
    if api not in _API_VERSIONS:
        raise r.error(f"{api!r} is not one of {', '.join(_API_VERSIONS)}", "apiVersion")
    return r


def _spec(r: Reader) -> Reader:
    spec = r.child("spec")
    spec.only({"targetRef", "targetRefs", "action", "rules", "selector", "provider"})
    if spec.has("selector"):
        raise spec.error("cannot be combined with targetRefs (Istio refuses both)", "selector")
    if spec.has("provider"):
        raise spec.error("not supported: CUSTOM providers (external authorization)", "provider")
    return spec


def read_targets(r: Reader, namespace: str, root_namespace: str) -> tuple[Target, ...]:
    """A policy's ``targetRef``/``targetRefs`` (the waypoint's kinds), for any Istio
    policy kind that binds the same way (RequestAuthentication too)."""
    return _targets(r, namespace, root_namespace)


def _targets(r: Reader, namespace: str, root_namespace: str) -> tuple[Target, ...]:
    spec = r.child("spec")
    refs = list(spec.children("targetRefs"))
    if spec.has("targetRef"):
        if refs:
            raise spec.error("set targetRef or targetRefs, not both", "targetRef")
        refs = [spec.child("targetRef")]
    out = []
    for ref in refs:
        ref.only({"group", "kind", "name", "namespace"})
        group, kind, name = ref.text("group", ""), ref.text("kind"), ref.text("name")
        if (group, kind) not in _TARGET_KINDS:
            raise ref.error(
                f"{kind} ({group or 'core'}) is not a target a waypoint enforces "
                "(Gateway, Service, or GatewayClass istio-waypoint in the root namespace)",
                "kind",
            )
        if ref.text("namespace", namespace) != namespace:
            raise ref.error("must be the policy's own namespace", "namespace")
        if kind == "GatewayClass":
            if name != WAYPOINT_CLASS:
                raise ref.error(f"only GatewayClass {WAYPOINT_CLASS} is enforced", "name")
            if namespace != root_namespace:
                raise ref.error(
                    f"a GatewayClass target is for policies in the root namespace "
                    f"({root_namespace})",
                    "kind",
                )
        out.append(Target(kind=kind, namespace=namespace, name=name))
    return tuple(out)


def _rule(r: Reader) -> RuleModel:
    r.only({"from", "to", "when"})
    base_permission: list[Attribute] = []
    base_principal: list[Attribute] = []
    for c in r.children("when"):
        c.only({"key", "values", "notValues"})
        key = c.text("key")
        attribute = _attribute(c, key, "values", "notValues")
        if not attribute.values and not attribute.not_values:
            raise c.error("needs values or notValues")
        if key in _PERMISSION_WHEN:
            base_permission.append(attribute)
        elif key in _PRINCIPAL_WHEN or key.startswith(HTTP_ONLY_PREFIXES):
            base_principal.append(attribute)
        elif key.startswith("experimental.envoy.filters."):
            raise c.error(f"{key!r}: experimental Envoy metadata keys are not supported", "key")
        else:
            raise c.error(f"{key!r} is not a condition Istio knows", "key")
    principals = []
    for entry in r.children("from"):
        entry.only({"source"})
        s = entry.child("source")
        fields: tuple[tuple[str, str, str], ...] = (
            (SOURCE_PRINCIPAL, "principals", "notPrincipals"),
            (REQUEST_PRINCIPAL, "requestPrincipals", "notRequestPrincipals"),
            (SOURCE_SERVICE_ACCOUNT, "serviceAccounts", "notServiceAccounts"),
            (SOURCE_NAMESPACE, "namespaces", "notNamespaces"),
            (REMOTE_IP, "remoteIpBlocks", "notRemoteIpBlocks"),
            (SOURCE_IP, "ipBlocks", "notIpBlocks"),
        )
        s.only({name for _, *names in fields for name in names})
        principals.append(tuple(_fields(s, fields)) + tuple(base_principal))
    permissions = []
    for entry in r.children("to"):
        entry.only({"operation"})
        o = entry.child("operation")
        fields = (
            (HOST, "hosts", "notHosts"),
            (METHOD, "methods", "notMethods"),
            (PATH, "paths", "notPaths"),
            (DESTINATION_PORT, "ports", "notPorts"),
        )
        o.only({name for _, *names in fields for name in names})
        permissions.append(tuple(_fields(o, fields)) + tuple(base_permission))
    return RuleModel(
        permissions=tuple(permissions) or (tuple(base_permission),),
        principals=tuple(principals) or (tuple(base_principal),),
    )


def _fields(r: Reader, fields: Sequence[tuple[str, str, str]]) -> Iterable[Attribute]:
    for key, values, not_values in fields:
        attribute = _attribute(r, key, values, not_values)
        if attribute.values or attribute.not_values:
            yield attribute


def _attribute(r: Reader, key: str, field: str, not_field: str) -> Attribute:
    values, not_values = r.strings(field), r.strings(not_field)
    for name, given in ((field, values), (not_field, not_values)):
        for i, value in enumerate(given):
            problem = _check_value(key, value)
            if problem:
                raise r.error(problem, f"{name}[{i}]")
    if key.startswith(REQUEST_HEADERS) and key != REQUEST_HEADERS:
        if not re.fullmatch(r"request\.headers\[[^\[\]]+\]", key):
            raise r.error(f"{key!r}: expecting request.headers[<NAME>]", "key")
    elif key.startswith(REQUEST_CLAIMS):
        rest = key[len(REQUEST_CLAIMS) :]
        if not rest or _BRACKETS.sub("", rest) or not _BRACKETS.findall(rest):
            raise r.error(f"{key!r}: expecting request.auth.claims[<NAME>]([<NAME>]...)", "key")
    elif key == REQUEST_HEADERS:
        raise r.error(f"{key!r}: expecting request.headers[<NAME>]", "key")
    return Attribute(key, values, not_values)


def _check_value(key: str, value: str) -> str:
    if not value:
        return "must not be empty"
    if key in (SOURCE_IP, REMOTE_IP, DESTINATION_IP):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{value!r} is not an IP address or CIDR"
    elif key == DESTINATION_PORT:
        if not value.isdigit() or int(value) > 65535:
            return f"{value!r} is not a port number"
    elif key == SOURCE_SERVICE_ACCOUNT:
        ns, sep, sa = value.partition("/")
        if (sep and (not ns or not sa)) or "/" in sa or "*" in value:
            return f"{value!r} is not NAME or NAMESPACE/NAME"
    elif key == PATH and any(t in value for t in _TEMPLATE_SEGMENTS):
        return _check_template(value)
    return ""


def _check_template(path: str) -> str:
    """Istio's path template rules: ``{*}`` and ``{**}`` are whole segments, ``{**}`` last."""
    if not path.startswith("/"):
        return f"{path!r}: a path template must start with /"
    segments = path[1:].split("/")
    for i, segment in enumerate(segments):
        if "{" in segment or "}" in segment:
            if segment not in _TEMPLATE_SEGMENTS:
                return f"{path!r}: {{*}} and {{**}} must be whole path segments"
            if segment == "{**}" and i != len(segments) - 1:
                return f"{path!r}: {{**}} must be the last segment"
        elif "*" in segment:
            return f"{path!r}: a path template cannot also use * outside {{*}} and {{**}}"
    return ""


def claims_of(key: str) -> list[str]:
    """``request.auth.claims[a][b]`` -> ``["a", "b"]``."""
    return _BRACKETS.findall(key[len(REQUEST_CLAIMS) :])


def header_of(key: str) -> str:
    """``request.headers[X-Name]`` -> ``x-name`` (header names are case-insensitive)."""
    return key[len(REQUEST_HEADERS) + 1 : -1].lower()
