"""The model as JSON, in the shape of Istio ztunnel's ``/config_dump``.

``dump_*`` turn model values into the JSON objects ztunnel's admin server
emits (serde, camelCase: ``src/state/workload.rs``, ``src/state/service.rs``,
``src/rbac.rs`` of istio/ztunnel), so ``istioctl ztunnel-config`` and
``ztunnel-ctl`` read ours as they read Istio's. ``load_*`` are the inverses:
``load_x(dump_x(v)) == v`` for every valid value (valid as ``from_proto``
would accept it). A malformed document raises :class:`DumpError` naming the
path of the bad field (``workloads[3].workloadIps[0]: 'x' is not an IP
address``).

Spellings, as ztunnel's serde derives them:

* workload ``protocol`` ``"HBONE"``/``"TCP"``, ``status``
  ``"Healthy"``/``"Unhealthy"``; service ``vips`` and an address waypoint's
  ``destination`` are ``"<network>/<ip>"`` (``"/10.96.0.20"``), a hostname
  waypoint's is ``"<namespace>/<hostname>"``, its port ``hboneMtlsPort``;
  ``ports`` maps ``"80": 8080``; ``endpoints`` are keyed by workload uid;
* policy ``scope`` ``"Global"``/``"Namespace"``/``"WorkloadSelector"``,
  ``action`` ``"Allow"``/``"Deny"``, ``rules`` nested rule → clause → match,
  string matches ``{"Exact": v}``, ``{"Prefix": v}``, ``{"Suffix": v}``,
  ``{"Presence": []}``;
* load balancing ``mode`` ``"Standard"`` (unspecified), ``"Strict"``,
  ``"Failover"``, ``"Passthrough"``; scopes ``"Region"`` ... ``"Network"``;
  ``healthPolicy`` ``"OnlyHealthy"``/``"AllowAll"``.

Beyond ztunnel (ztunnel keeps these elsewhere; ``istioctl`` ignores unknown
keys): a workload's ``servicePorts`` (its port map per service, which ztunnel
shows only in the services' ``endpoints``), and a service's ``network`` when
it has no VIP to carry it. A service port listed twice collapses to its
first target, the one routing uses.

Loading is lenient about keys ztunnel emits and the model does not hold
(``capacity``, ``networkMode``, ``hostname``, ``dryRun``, ...), and accepts
the older dump shapes ``istioctl`` still reads (objects keyed by name instead
of lists, a waypoint ``port`` instead of ``hboneMtlsPort``).

Imports :mod:`mesh.xds.state` for :class:`XdsState`; since ``mesh.xds``
imports ``mesh.model``, this module is not re-exported by ``mesh.model``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

from mesh.identity import IdentityError, SpiffeId
from mesh.model.policy import Action, Clause, Match, MatchKind, Policy, Rule, Scope, StringMatch
from mesh.model.workload import (
    DEFAULT_TRUST_DOMAIN,
    HBONE_PORT,
    GatewayAddress,
    HealthPolicy,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Port,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from mesh.xds.state import TYPE_URLS, XdsState

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Doc = dict[str, Any]
E = TypeVar("E")

PROTOCOLS = {TunnelProtocol.HBONE: "HBONE", TunnelProtocol.NONE: "TCP"}
STATUSES = {WorkloadStatus.HEALTHY: "Healthy", WorkloadStatus.UNHEALTHY: "Unhealthy"}
SCOPES = {
    Scope.GLOBAL: "Global",
    Scope.NAMESPACE: "Namespace",
    Scope.WORKLOAD_SELECTOR: "WorkloadSelector",
}
ACTIONS = {Action.ALLOW: "Allow", Action.DENY: "Deny"}
LB_MODES = {
    LoadBalancingMode.UNSPECIFIED: "Standard",
    LoadBalancingMode.STRICT: "Strict",
    LoadBalancingMode.FAILOVER: "Failover",
    LoadBalancingMode.PASSTHROUGH: "Passthrough",
}
LB_SCOPES = {s: s.name.capitalize() for s in LoadBalancingScope}
HEALTH_POLICIES = {HealthPolicy.ONLY_HEALTHY: "OnlyHealthy", HealthPolicy.ALLOW_ALL: "AllowAll"}
STRING_MATCHES = {
    MatchKind.EXACT: "Exact",
    MatchKind.PREFIX: "Prefix",
    MatchKind.SUFFIX: "Suffix",
    MatchKind.PRESENCE: "Presence",
}
# Match fields in ztunnel's order: (JSON key, model attribute, kind).
_MATCH_FIELDS = (
    ("namespaces", "namespaces", "string"),
    ("notNamespaces", "not_namespaces", "string"),
    ("principals", "principals", "string"),
    ("notPrincipals", "not_principals", "string"),
    ("sourceIps", "source_ips", "cidr"),
    ("notSourceIps", "not_source_ips", "cidr"),
    ("destinationIps", "destination_ips", "cidr"),
    ("notDestinationIps", "not_destination_ips", "cidr"),
    ("destinationPorts", "destination_ports", "port"),
    ("notDestinationPorts", "not_destination_ports", "port"),
)


class DumpError(ValueError):
    """A dump document is malformed; ``path`` says where (``workloads[3].uid``)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# --- dumping -----------------------------------------------------------------


def dump_workload(workload: Workload) -> Doc:
    """One workload as ztunnel's ``/config_dump`` shows it (key order as ztunnel's)."""
    w = workload
    doc: Doc = {"workloadIps": [str(a) for a in w.addresses]}
    if w.waypoint is not None:
        doc["waypoint"] = _dump_gateway(w.waypoint, w.network)
    doc["protocol"] = PROTOCOLS[w.tunnel_protocol]
    doc["networkMode"] = "Standard"
    doc["uid"] = w.uid
    doc["name"] = w.name
    doc["namespace"] = w.namespace
    # ztunnel never has these empty (it fills in the defaults): always shown.
    doc["trustDomain"] = w.trust_domain
    doc["serviceAccount"] = w.service_account
    _put(doc, "network", w.network)
    _put(doc, "workloadName", w.workload_name)
    doc["workloadType"] = "pod"
    _put(doc, "canonicalName", w.canonical_name)
    _put(doc, "canonicalRevision", w.canonical_revision)
    _put(doc, "node", w.node)
    _put(doc, "authorizationPolicies", list(w.authorization_policies))
    doc["status"] = STATUSES[w.status]
    doc["clusterId"] = w.cluster_id
    if w.locality:
        loc = w.locality
        doc["locality"] = {"region": loc.region, "zone": loc.zone, "subzone": loc.subzone}
    if w.services:
        doc["services"] = list(w.services)
        doc["servicePorts"] = {name: _dump_ports(ports) for name, ports in w.services.items()}
    doc["capacity"] = 1
    return doc


def dump_service(service: Service, endpoints: Iterable[Workload] = ()) -> Doc:
    """One service as ztunnel shows it, with its ``endpoints``.

    ``endpoints`` are the workloads that list the service; as in ztunnel, an
    unhealthy one is left out unless the service's health policy is
    ALLOW_ALL, and each shows the port map the workload gives the service.
    """
    s = service
    lb = s.load_balancing
    allow_all = lb is not None and lb.health_policy is HealthPolicy.ALLOW_ALL
    shown: Doc = {}
    for w in endpoints:
        ports = w.services.get(s.resource_name)
        if ports is None or not (allow_all or w.status is WorkloadStatus.HEALTHY):
            continue
        shown[w.uid] = {
            "workloadUid": w.uid,
            "port": _dump_ports(ports),
            "status": STATUSES[w.status],
        }
    doc: Doc = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [f"{s.network}/{a}" for a in s.addresses],
        "ports": _dump_ports(s.ports),
        "endpoints": shown,
        "subjectAltNames": list(s.subject_alt_names),
    }
    if s.waypoint is not None:
        doc["waypoint"] = _dump_gateway(s.waypoint, s.network)
    if lb is not None:
        doc["loadBalancer"] = {
            "routingPreferences": [LB_SCOPES[p] for p in lb.routing_preference],
            "mode": LB_MODES[lb.mode],
            "healthPolicy": HEALTH_POLICIES[lb.health_policy],
        }
    if s.network and not s.addresses:
        doc["network"] = s.network  # ours: no VIP carries it
    return doc


def dump_policy(policy: Policy) -> Doc:
    """One authorization policy as ztunnel shows it."""
    return {
        "name": policy.name,
        "namespace": policy.namespace,
        "scope": SCOPES[policy.scope],
        "action": ACTIONS[policy.action],
        "rules": [
            [[_dump_match(m) for m in clause.matches] for clause in rule.clauses]
            for rule in policy.rules
        ],
        "dryRun": False,
    }


def dump_state(state: XdsState) -> Doc:
    """A whole snapshot: ``workloads``, ``services`` and ``policies``, each sorted by name."""
    workloads = [state.workloads[k] for k in sorted(state.workloads)]
    by_service: dict[str, list[Workload]] = {}
    for w in workloads:
        for name in w.services:
            by_service.setdefault(name, []).append(w)
    return {
        "workloads": [dump_workload(w) for w in workloads],
        "services": [
            dump_service(s, by_service.get(s.resource_name, ()))
            for s in (state.services[k] for k in sorted(state.services))
        ],
        "policies": [dump_policy(state.policies[k]) for k in sorted(state.policies)],
    }


def _put(doc: Doc, key: str, value: object) -> None:
    """Set ``key`` unless ``value`` is empty, as ztunnel's ``skip_serializing_if``."""
    if value:
        doc[key] = value


def _dump_ports(ports: Iterable[Port]) -> dict[str, int]:
    shown: dict[str, int] = {}
    for p in ports:
        shown.setdefault(str(p.service_port), p.target_port)
    return shown


def _dump_gateway(gateway: GatewayAddress, network: str) -> Doc:
    if gateway.address is not None:
        destination = f"{network}/{gateway.address}"
    else:
        destination = gateway.hostname or ""
    return {"destination": destination, "hboneMtlsPort": gateway.port}


def _dump_match(m: Match) -> Doc:
    doc: Doc = {}
    for key, attr, kind in _MATCH_FIELDS:
        values = getattr(m, attr)
        if not values:
            continue
        if kind == "string":
            doc[key] = [_dump_string_match(s) for s in values]
        elif kind == "cidr":
            doc[key] = [str(n) for n in values]
        else:
            doc[key] = list(values)
    return doc


def _dump_string_match(s: StringMatch) -> Doc:
    if s.kind is MatchKind.PRESENCE:
        return {"Presence": []}  # serde's form of the empty tuple variant ``Presence()``
    return {STRING_MATCHES[s.kind]: s.value}


# --- loading -----------------------------------------------------------------


class _At:
    """A JSON value and the path that reached it, for errors that say where."""

    __slots__ = ("path", "value")

    def __init__(self, value: object, path: str) -> None:
        self.value = value
        self.path = path

    def fail(self, reason: str) -> NoReturn:
        raise DumpError(self.path, reason)

    def key(self, name: str) -> _At:
        return _At(self.obj().get(name), f"{self.path}.{name}" if self.path else name)

    def has(self, name: str) -> bool:
        return self.obj().get(name) is not None

    def obj(self) -> dict[str, object]:
        if not isinstance(self.value, dict):
            self.fail(f"expected an object, got {_kind(self.value)}")
        return self.value

    def items(self) -> list[_At]:
        """The elements of a list (``null`` or missing: none)."""
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            self.fail(f"expected a list, got {_kind(self.value)}")
        return [_At(v, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def entries(self) -> list[tuple[str, _At]]:
        """The members of an object (``null`` or missing: none)."""
        if self.value is None:
            return []
        return [(k, _At(v, f'{self.path}["{k}"]')) for k, v in self.obj().items()]

    def text(self, default: str | None = None) -> str:
        if self.value is None and default is not None:
            return default
        if not isinstance(self.value, str):
            self.fail(f"expected a string, got {_kind(self.value)}")
        return self.value

    def number(self, low: int, high: int) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"expected an integer, got {_kind(value)}")
        if not low <= value <= high:
            self.fail(f"{value} is out of range ({low}-{high})")
        return value

    def choice(self, names: Mapping[E, str]) -> E:
        text = self.text()
        for value, name in names.items():
            if name == text:
                return value
        self.fail(f"{text!r} is not one of {', '.join(names.values())}")

    def ip(self) -> IPAddress:
        return _parse_ip(self, self.text())

    def strings(self) -> tuple[str, ...]:
        return tuple(item.text() for item in self.items())


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )


def _parse_ip(at: _At, text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        at.fail(f"{text!r} is not an IP address")


def load_workload(doc: object, path: str = "workload") -> Workload:
    """The workload ``doc`` (as :func:`dump_workload` makes it) describes."""
    at = _At(doc, path)
    at.obj()
    uid = at.key("uid").text()
    if not uid:
        at.key("uid").fail("a workload needs a uid")
    namespace = at.key("namespace").text()
    trust_domain = at.key("trustDomain").text(DEFAULT_TRUST_DOMAIN)
    service_account = at.key("serviceAccount").text("default")
    try:
        SpiffeId(trust_domain=trust_domain, namespace=namespace, service_account=service_account)
    except IdentityError as e:
        at.fail(f"identity: {e}")
    network = at.key("network").text("")
    listed = at.key("services").strings()
    port_maps = dict(at.key("servicePorts").entries())
    for name, ports_at in port_maps.items():
        if name not in listed:
            ports_at.fail("ports for a service the workload does not list in 'services'")
    services = {name: _load_ports(port_maps[name]) if name in port_maps else () for name in listed}
    locality = at.key("locality")
    return Workload(
        uid=uid,
        name=at.key("name").text(""),
        namespace=namespace,
        addresses=tuple(a.ip() for a in at.key("workloadIps").items()),
        node=at.key("node").text(""),
        service_account=service_account,
        trust_domain=trust_domain,
        tunnel_protocol=(
            at.key("protocol").choice(PROTOCOLS) if at.has("protocol") else TunnelProtocol.NONE
        ),
        waypoint=_load_gateway(at.key("waypoint")) if at.has("waypoint") else None,
        services=MappingProxyType(services),
        authorization_policies=at.key("authorizationPolicies").strings(),
        status=at.key("status").choice(STATUSES) if at.has("status") else WorkloadStatus.HEALTHY,
        canonical_name=at.key("canonicalName").text(""),
        canonical_revision=at.key("canonicalRevision").text(""),
        workload_name=at.key("workloadName").text(""),
        cluster_id=at.key("clusterId").text(""),
        network=network,
        locality=(
            Locality(
                region=locality.key("region").text(""),
                zone=locality.key("zone").text(""),
                subzone=locality.key("subzone").text(""),
            )
            if locality.value is not None
            else Locality()
        ),
    )


def load_service(doc: object, path: str = "service") -> Service:
    """The service ``doc`` describes (its ``endpoints`` are the workloads' business)."""
    at = _At(doc, path)
    at.obj()
    namespace = at.key("namespace").text()
    hostname = at.key("hostname").text()
    if not namespace or not hostname:
        at.fail("a service needs a namespace and a hostname")
    networks: set[str] = set()
    addresses = []
    for vip in at.key("vips").items():
        network, sep, ip = vip.text().partition("/")
        if not sep:
            vip.fail(f"{vip.value!r} is not '<network>/<ip>'")
        networks.add(network)
        addresses.append(_parse_ip(vip, ip))
    if len(networks) > 1:
        at.key("vips").fail(f"VIPs on several networks ({', '.join(sorted(networks))})")
    network = networks.pop() if networks else at.key("network").text("")
    return Service(
        name=at.key("name").text(""),
        namespace=namespace,
        hostname=hostname,
        addresses=tuple(addresses),
        ports=_load_ports(at.key("ports")),
        waypoint=_load_gateway(at.key("waypoint")) if at.has("waypoint") else None,
        subject_alt_names=at.key("subjectAltNames").strings(),
        network=network,
        load_balancing=_load_lb(at.key("loadBalancer")) if at.has("loadBalancer") else None,
    )


def load_policy(doc: object, path: str = "policy") -> Policy:
    """The authorization policy ``doc`` describes."""
    at = _At(doc, path)
    at.obj()
    name = at.key("name").text()
    if not name:
        at.key("name").fail("a policy needs a name")
    if at.key("dryRun").value:
        at.key("dryRun").fail("dry-run policies are not supported (they would be enforced)")
    return Policy(
        name=name,
        namespace=at.key("namespace").text(""),
        scope=at.key("scope").choice(SCOPES),
        action=at.key("action").choice(ACTIONS),
        rules=tuple(
            Rule(tuple(Clause(tuple(_load_match(m) for m in c.items())) for c in r.items()))
            for r in at.key("rules").items()
        ),
    )


def load_state(doc: object) -> XdsState:
    """The snapshot a dump describes; synced when its ``config.synced`` says so.

    ``workloads``, ``services`` and ``policies`` may be lists (ztunnel today)
    or objects keyed by name (older ztunnels). Two entries with one name are
    refused, naming both.
    """
    at = _At(doc, "")
    at.obj()
    workloads = _load_all(at.key("workloads"), load_workload, lambda w: w.uid)
    services = _load_all(at.key("services"), load_service, lambda s: s.resource_name)
    policies = _load_all(at.key("policies"), load_policy, lambda p: p.resource_name)
    config = at.key("config")
    synced = False
    if config.value is not None and config.has("synced"):
        flag = config.key("synced")
        if not isinstance(flag.value, bool):
            flag.fail(f"expected a boolean, got {_kind(flag.value)}")
        synced = flag.value
    return XdsState(
        workloads=MappingProxyType(workloads),
        services=MappingProxyType(services),
        policies=MappingProxyType(policies),
        synced_types=frozenset(TYPE_URLS) if synced else frozenset(),
    )


def each_entry(value: object, path: str) -> list[tuple[str, object]]:
    """``(path, entry)`` for a list or a name-keyed object of entries, as ``istioctl`` reads."""
    at = _At(value, path)
    if isinstance(at.value, dict):
        return [(sub.path, sub.value) for _, sub in at.entries()]
    return [(sub.path, sub.value) for sub in at.items()]


def _load_all(at: _At, load: Callable[[object, str], E], key: Callable[[E], str]) -> dict[str, E]:
    found: dict[str, E] = {}
    where: dict[str, str] = {}
    for path, value in each_entry(at.value, at.path):
        item = load(value, path)
        name = key(item)
        if name in found:
            raise DumpError(path, f"{name!r} appears twice (also at {where[name]})")
        found[name] = item
        where[name] = path
    return found


def _load_ports(at: _At) -> tuple[Port, ...]:
    """``{"80": 8080}``; a target port 0 means "the service's", as in Istio's workload ports."""
    ports = []
    for key, target in at.entries():
        if not key.isdigit() or not 0 < int(key) < 65536:
            target.fail(f"{key!r} is not a port number")
        ports.append(Port(service_port=int(key), target_port=target.number(0, 65535)))
    return tuple(ports)


def _load_gateway(at: _At) -> GatewayAddress:
    at.obj()
    destination = at.key("destination")
    text = destination.text()
    port_at = at.key("hboneMtlsPort") if at.has("hboneMtlsPort") else at.key("port")
    port = port_at.number(0, 65535) if port_at.value is not None else HBONE_PORT
    _, sep, rest = text.partition("/")
    if not sep or not rest:
        destination.fail(f"{text!r} is neither '<network>/<ip>' nor '<namespace>/<hostname>'")
    try:
        address = ipaddress.ip_address(rest)
    except ValueError:
        return GatewayAddress(hostname=text, port=port)
    return GatewayAddress(address=address, port=port)


def _load_lb(at: _At) -> LoadBalancing:
    at.obj()
    return LoadBalancing(
        routing_preference=tuple(s.choice(LB_SCOPES) for s in at.key("routingPreferences").items()),
        mode=at.key("mode").choice(LB_MODES) if at.has("mode") else LoadBalancingMode.UNSPECIFIED,
        health_policy=(
            at.key("healthPolicy").choice(HEALTH_POLICIES)
            if at.has("healthPolicy")
            else HealthPolicy.ONLY_HEALTHY
        ),
    )


def _load_match(at: _At) -> Match:
    known = {key for key, _, _ in _MATCH_FIELDS}
    for key, value in at.obj().items():
        # Ignoring a condition would widen the match: refuse what the model cannot hold
        # (ztunnel's serviceAccounts, say) rather than authorize differently.
        if key not in known and value:
            at.key(key).fail(f"the model has no {key!r} condition")
    values: dict[str, tuple[Any, ...]] = {}
    for key, attr, kind in _MATCH_FIELDS:
        items = at.key(key).items()
        if kind == "string":
            values[attr] = tuple(_load_string_match(i) for i in items)
        elif kind == "cidr":
            values[attr] = tuple(_load_cidr(i) for i in items)
        else:
            values[attr] = tuple(i.number(1, 65535) for i in items)
    return Match(**values)


def _load_string_match(at: _At) -> StringMatch:
    members = at.obj()
    if len(members) != 1:
        at.fail(f"expected one of {{{', '.join(STRING_MATCHES.values())}}}: <value>")
    ((name, _),) = members.items()
    kind = _At(name, at.path).choice(STRING_MATCHES)
    if kind is MatchKind.PRESENCE:
        return StringMatch(MatchKind.PRESENCE)
    return StringMatch(kind, at.key(name).text())


def _load_cidr(at: _At) -> IPNetwork:
    text = at.text()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        at.fail(f"{text!r} is not an IP network (address/length)")
