"""``authz-check`` and ``trace``: the proxy's own decisions, replayed over a dump. Pure.

Both build a :class:`~ztunnel.index.StateIndex` from the dump and call the
cores ztunnel decides with (:func:`ztunnel.route.route_outbound`,
:func:`ztunnel.authz.authorize`), so the answer is the one ztunnel would give
on that snapshot. Each returns a plain JSON-able document (``-o json``) and
:func:`render_authz` / :func:`render_trace` say it for people.

Assumptions, stated in every answer that rests on them:

* a source given as an IP has the identity of the workload with that IP if
  it is a mesh (HBONE) workload, else none (plaintext);
* a source given as a SPIFFE ID has the IP of the first workload (by uid)
  with that identity, else ``0.0.0.0``;
* the first healthy endpoint (by uid) stands for ztunnel's random pick.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from mesh.identity import IdentityError, SpiffeId
from mesh.model import Service, TunnelProtocol, Workload
from ztunnel.authz import Connection, Decision, applicable, authorize, matches
from ztunnel.ctl.document import Dump
from ztunnel.ctl.errors import CtlError
from ztunnel.index import StateIndex
from ztunnel.route import Kind, route_outbound

Doc = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ANY_IP = ipaddress.IPv4Address("0.0.0.0")


class UsageError(ValueError):
    """A malformed argument (exit code 2)."""


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT (IPv6 as [addr]:port)")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _ip(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an IP address") from None


def _name(w: Workload) -> str:
    return f"{w.namespace}/{w.name}"


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _decide(index: StateIndex, workload: Workload, conn: Connection) -> Doc:
    """One authorization decision at ``workload``, with the rule that made it."""
    decision: Decision = authorize(index, workload, conn)
    rule = None
    policy = index.state.policies.get(decision.policy or "")
    if policy is not None:
        rule = next(
            (
                i
                for i, r in enumerate(policy.rules)
                if matches(dataclasses.replace(policy, rules=(r,)), conn)
            ),
            None,
        )
    identity = conn.source_identity
    return {
        "at": _name(workload),
        "address": _hostport(str(conn.destination_ip), conn.destination_port),
        "sourceIdentity": str(identity) if identity is not None else "",
        "sourceIp": str(conn.source_ip),
        "allowed": decision.allowed,
        "reason": decision.reason,
        "policy": decision.policy,
        "rule": rule,
        "applicable": [p.resource_name for p in applicable(index, workload)[0]],
    }


def _not_in_mesh(what: str, address: str) -> Doc:
    return {
        "at": what,
        "address": address,
        "allowed": True,
        "reason": f"{what} is not in the mesh: no ztunnel authorizes connections to it",
        "policy": None,
        "rule": None,
        "applicable": [],
    }


# --- authz-check -------------------------------------------------------------


# The feed holds no trace of the HTTP fields meshd left out (Istio's Authorization
# resource has none), so the caveat is said whenever a policy is in play.
L4_ONLY = (
    "ztunnel decides on L4 alone: HTTP fields (methods, paths, headers, request "
    "principals) of these policies are not in its config; an ALLOW rule naming them "
    "matches nothing and a DENY rule is kept without them, as Istio does (the policy's "
    "ZtunnelAccepted status names them); bind L7 rules to a waypoint with targetRefs"
)


def authz_check(dump: Dump, source: str, target: str) -> Doc:
    """Would ``source`` (a SPIFFE ID or an IP) be allowed to ``target`` (IP:PORT)?"""
    host, port = parse_hostport(target, "--to")
    dst_ip = _ip(host, "--to")
    index = dump.index()
    notes: list[str] = []
    service = index.service_by_vip(str(dst_ip))
    if service is not None:
        endpoints = ", ".join(
            f"{e.workload.addresses[0]} ({_name(e.workload)})"
            for e in index.endpoints.get(service.resource_name, ())
            if e.workload.addresses
        )
        raise CtlError(
            f"{dst_ip} is the VIP of service {service.namespace}/{service.name}: "
            f"authorization happens at its endpoints ({endpoints or 'none'})",
            "ask about one endpoint's IP:target port, or use trace",
        )
    identity, src_ip = _source(index, source, notes)
    result: Doc = {
        "from": source,
        "to": target,
        "sourceIdentity": str(identity) if identity is not None else "",
        "sourceIp": str(src_ip),
        "destination": None,
    }
    workload = index.workload_by_ip(str(dst_ip))
    if workload is None:
        decision = _not_in_mesh(str(dst_ip), target)
    else:
        result["destination"] = {"workload": _name(workload), "uid": workload.uid}
        if workload.tunnel_protocol is not TunnelProtocol.HBONE:
            decision = _not_in_mesh(f"workload {_name(workload)}", target)
        else:
            conn = Connection(identity, src_ip, dst_ip, port)
            decision = _decide(index, workload, conn)
            if workload.waypoint is not None:
                notes.append(
                    f"{_name(workload)} uses waypoint {workload.waypoint}: traffic through it "
                    "arrives with the waypoint's identity, not the client's"
                )
    result |= {k: decision[k] for k in ("allowed", "reason", "policy", "rule", "applicable")}
    if result["applicable"]:
        notes.append(L4_ONLY)
    result["notes"] = notes
    return result


def _source(index: StateIndex, source: str, notes: list[str]) -> tuple[SpiffeId | None, IPAddress]:
    if source.startswith("spiffe://"):
        try:
            identity = SpiffeId.parse(source)
        except IdentityError as e:
            raise UsageError(f"--from {source!r}: {e}") from None
        having = sorted(
            (w for w in index.state.workloads.values() if w.identity == identity and w.addresses),
            key=lambda w: w.uid,
        )
        if having:
            notes.append(f"source IP assumed: {having[0].addresses[0]}, {_name(having[0])}'s")
            return identity, having[0].addresses[0]
        notes.append(
            "no workload has this identity: source IP assumed 0.0.0.0 "
            "(policies on source IPs are judged against it)"
        )
        return identity, ANY_IP
    ip = _ip(source, "--from (a SPIFFE ID or an IP)")
    workload = index.workload_by_ip(str(ip))
    if workload is None:
        notes.append(f"source {ip} is not a mesh workload: no identity (plaintext)")
        return None, ip
    if workload.tunnel_protocol is TunnelProtocol.HBONE:
        notes.append(f"source {ip} is {_name(workload)}, in the mesh: identity {workload.identity}")
        return workload.identity, ip
    notes.append(f"source {ip} is {_name(workload)}, not in the mesh: no identity (plaintext)")
    return None, ip


def render_authz(result: Doc) -> str:
    verdict = "ALLOW" if result["allowed"] else "DENY"
    lines = [f"{verdict}: {result['reason']}"]
    if result["policy"]:
        rule = "" if result["rule"] is None else f", rule {result['rule']}"
        lines.append(f"  policy:      {result['policy']}{rule}")
    identity = result["sourceIdentity"] or "no identity"
    if identity == result["from"]:
        lines.append(f"  source:      {identity} from {result['sourceIp']}")
    else:
        lines.append(f"  source:      {result['from']} ({identity})")
    destination = result["destination"]
    where = f" ({destination['workload']})" if destination else " (not a mesh workload)"
    lines.append(f"  destination: {result['to']}{where}")
    if result["applicable"]:
        lines.append(f"  applicable:  {', '.join(result['applicable'])}")
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# --- trace -------------------------------------------------------------------


def trace(dump: Dump, pod: str, target: str) -> Doc:
    """How a new connection from ``pod`` (ns/name) to ``target`` (HOST:PORT) goes."""
    namespace, sep, name = pod.partition("/")
    if not sep or not namespace or not name:
        raise UsageError(f"--from {pod!r}: expected NAMESPACE/POD")
    host, port = parse_hostport(target, "--to")
    index = dump.index()
    src = index.workload_by_name(namespace, name)
    if src is None:
        raise CtlError(f"{dump.origin} has no workload {pod}", "ztunnel-ctl workloads lists them")
    notes: list[str] = []
    service, dst_ip = _destination(index, host, src, notes)
    captured = _captured(dump, src, notes)
    src_ip = src.addresses[0] if src.addresses else ANY_IP
    identity = src.identity if captured is not False else None
    result: Doc = {
        "source": {
            "pod": pod,
            "uid": src.uid,
            "ip": str(src_ip),
            "identity": str(identity) if identity is not None else "",
            "node": src.node,
            "captured": captured,
        },
        "destination": {
            "requested": target,
            "address": _hostport(str(dst_ip), port),
            "service": f"{service.namespace}/{service.name}" if service else None,
        },
        "route": None,
        "authorization": [],
        "notes": notes,
    }
    hops: list[Doc] = result["authorization"]
    if captured is False:
        result["outcome"] = _uncaptured(index, dst_ip, port, src_ip, service, hops, notes)
        return result
    route = route_outbound(index, str(dst_ip), port, source=src)
    result["route"] = {
        "kind": route.kind.value,
        "reason": route.reason,
        "connect": _hostport(route.connect_ip, route.connect_port) if route.connect_ip else "",
        "authority": route.authority,
        "expectedIdentity": str(route.expected_identity) if route.expected_identity else "",
        "destination": _name(route.destination) if route.destination else None,
    }
    if route.kind is Kind.REFUSE:
        result["outcome"] = "refused"
        return result
    if route.kind is Kind.PASSTHROUGH:
        result["outcome"] = "passthrough"
        return result
    authority_port = parse_hostport(route.authority, "authority")[1]
    if route.kind is Kind.HBONE and route.service is not None:
        notes.append(
            "ztunnel picks one of the service's usable endpoints at random; "
            "the first by uid is shown"
        )
    if route.kind is Kind.HBONE and route.destination is not None:
        ip = _ip(route.connect_ip, "endpoint")
        hops.append(
            _decide(index, route.destination, Connection(identity, src_ip, ip, authority_port))
        )
    waypoint = index.workload_by_ip(route.connect_ip)
    if route.kind is Kind.WAYPOINT and waypoint is not None:
        # Istio's ztunnel does not authorize what reaches a waypoint: the waypoint
        # applies the policies that target it. Its own connection onward carries
        # its identity, and that is what the destination's ztunnel judges.
        notes.append(
            f"the waypoint {_name(waypoint)} applies the policies that target it (L4 and L7); "
            "not evaluated here"
        )
        final = route.destination
        if final is not None and final.addresses and waypoint.addresses:
            conn = Connection(
                waypoint.identity, waypoint.addresses[0], final.addresses[0], authority_port
            )
            hops.append(_decide(index, final, conn))
        else:
            notes.append(
                f"the waypoint picks an endpoint and connects as {waypoint.identity}: "
                f"check one with authz-check --from {waypoint.identity} --to ENDPOINT:PORT"
            )
    result["outcome"] = "allowed" if all(h["allowed"] for h in hops) else "denied"
    return result


def _destination(
    index: StateIndex, host: str, src: Workload, notes: list[str]
) -> tuple[Service | None, IPAddress]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return index.service_by_vip(str(ip)), ip
    # A name, resolved as the pod's DNS would: full, or short within its namespace.
    wanted = {host, f"{host}.svc.cluster.local", f"{host}.{src.namespace}.svc.cluster.local"}
    found = [s for s in index.state.services.values() if s.hostname.rstrip(".") in wanted]
    if not found:
        raise CtlError(f"no service is named {host!r}", "pass an IP, or see ztunnel-ctl services")
    service = sorted(found, key=lambda s: s.resource_name)[0]
    if not service.addresses:
        raise CtlError(f"service {service.resource_name} has no VIP", "connect to an endpoint IP")
    notes.append(f"{host} resolves to {service.addresses[0]} (service {service.resource_name})")
    return service, service.addresses[0]


def _captured(dump: Dump, src: Workload, notes: list[str]) -> bool | None:
    """Whether the pod is enrolled in this ztunnel; None when the dump is another node's."""
    node = dump.config.get("node")
    enrolled = any(
        isinstance(s.get("info"), dict)
        and s["info"].get("name") == src.name
        and s["info"].get("namespace") == src.namespace
        for s in dump.workload_state().values()
    )
    if enrolled:
        return True
    if isinstance(node, str) and node and src.node and node != src.node:
        notes.append(
            f"{_name(src)} runs on {src.node}, and this is {node}'s ztunnel: capture assumed "
            f"(ask --node {src.node} to know)"
        )
        return None
    return False


def _uncaptured(
    index: StateIndex,
    ip: IPAddress,
    port: int,
    src_ip: IPAddress,
    service: Service | None,
    hops: list[Doc],
    notes: list[str],
) -> str:
    notes.append(
        "the source pod is not captured (not enrolled in ztunnel): its connection leaves as "
        "plain TCP, with no identity"
    )
    if service is not None:
        notes.append("without ztunnel nothing in the mesh load-balances the service VIP")
        return "passthrough"
    workload = index.workload_by_ip(str(ip))
    if workload is None or workload.tunnel_protocol is not TunnelProtocol.HBONE:
        return "passthrough"
    # The destination's ztunnel captures it inbound (15006) and authorizes it as plaintext.
    hops.append(_decide(index, workload, Connection(None, src_ip, ip, port)))
    return "allowed" if hops[-1]["allowed"] else "denied"


def render_trace(result: Doc) -> str:
    src, dst, route = result["source"], result["destination"], result["route"]
    captured = {True: "captured", False: "NOT captured", None: "capture unknown"}[src["captured"]]
    identity = src["identity"] or "no identity"
    lines = [
        f"trace {src['pod']} -> {dst['requested']}",
        f"  source:      {src['pod']} {src['ip']} ({identity}) on {src['node'] or '?'}, {captured}",
    ]
    service = f"service {dst['service']}, " if dst["service"] else ""
    lines.append(f"  destination: {service}{dst['address']}")
    if route is not None:
        kind = {
            "hbone": "HBONE",
            "waypoint": "via waypoint",
            "passthrough": "passthrough (plain TCP)",
            "refuse": "refused",
        }[route["kind"]]
        line = f"  route:       {kind}"
        if route["connect"]:
            line += f" to {route['connect']}"
        if route["authority"]:
            line += f", :authority {route['authority']}"
        if route["expectedIdentity"]:
            line += f", expecting {route['expectedIdentity']}"
        lines += [line, f"               ({route['reason']})"]
    for hop in result["authorization"]:
        verdict = "allow" if hop["allowed"] else "DENY"
        by = f" [{hop['policy']}" + ("" if hop["rule"] is None else f", rule {hop['rule']}") + "]"
        lines.append(
            f"  authorize:   at {hop['at']} ({hop['address']}): {verdict}, {hop['reason']}"
            + (by if hop["policy"] else "")
        )
    lines.append(f"  outcome:     {result['outcome']}")
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"
