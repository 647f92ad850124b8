"""L4 authorization: may this connection reach this workload? Pure, with the reason.

Istio's semantics, as ztunnel applies them:

* the policies that apply to a workload are the GLOBAL ones (root
  namespace, no selector), the NAMESPACE ones of its namespace, and the
  WORKLOAD_SELECTOR ones it names;
* any matching DENY denies; otherwise, with no ALLOW policy, allow; a
  matching ALLOW allows; otherwise deny;
* a policy matches if any rule does; a rule if all its clauses do; a clause
  if any of its matches does; a match if every field it sets holds (values
  of one field OR-ed, ``not_`` fields must all fail). A policy without rules
  matches nothing.

Principals are ``<trust domain>/ns/<ns>/sa/<sa>``. A connection without a
peer identity (plaintext from outside the mesh) matches no principal or
namespace, so ``notPrincipals: ["*"]`` catches it, as in Istio.

Beyond Istio: a workload that names a policy the proxy has not received yet
is denied (the missing policy could be a DENY), a workload bound to a
waypoint (its own, or its services') takes connections that do not come
from that waypoint's instances only when an ALLOW policy matches them
explicitly (Istio lets them in, skipping the waypoint's L7 policy), and
every decision says which policy made it.

Live connections are decided again on every new snapshot (:func:`revoked`),
as Istio's ztunnel does: those the new snapshot denies are closed, the rest
go on untouched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from mesh.identity import SpiffeId
from mesh.model import Action, Match, Policy, Workload
from ztunnel.index import StateIndex

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Connection:
    """What is known of a connection when it arrives at the destination's proxy."""

    source_identity: SpiffeId | None  # None: plaintext, no peer certificate
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    policy: str | None = None  # ``namespace/name`` of the deciding policy, if one decided

    def __bool__(self) -> bool:
        return self.allowed


def applicable(index: StateIndex, workload: Workload) -> tuple[list[Policy], list[str]]:
    """The policies that apply to ``workload``, and those it names that are unknown."""
    policies = [*index.global_policies, *index.namespace_policies.get(workload.namespace, ())]
    missing = []
    known = index.state.policies
    for name in workload.authorization_policies:
        policy = known.get(name)
        if policy is None:
            missing.append(name)
        else:
            policies.append(policy)
    return policies, missing


def authorize(index: StateIndex, workload: Workload, conn: Connection) -> Decision:
    policies, missing = applicable(index, workload)
    if missing:
        return Decision(
            False,
            f"the workload names policies not received yet ({', '.join(missing)}): "
            "denied until they arrive",
        )
    allows = []
    for policy in policies:
        if policy.action is Action.DENY:
            if matches(policy, conn):
                return Decision(False, "denied by a DENY policy", policy.resource_name)
        else:
            allows.append(policy)
    bypass = _past_waypoint(index, workload, conn)
    if bypass is not None:
        # Beyond Istio: a destination bound to a waypoint takes traffic from elsewhere
        # only when a policy allows it explicitly, so L7 policy cannot be skipped.
        for policy in allows:
            if matches(policy, conn):
                return Decision(
                    True, "allowed past its waypoint by an ALLOW policy", policy.resource_name
                )
        return Decision(False, bypass)
    if not allows:
        return Decision(True, "no ALLOW policy applies")
    for policy in allows:
        if matches(policy, conn):
            return Decision(True, "allowed by an ALLOW policy", policy.resource_name)
    names = ", ".join(p.resource_name for p in allows)
    return Decision(False, f"no ALLOW policy matched (applicable: {names})")


def _past_waypoint(index: StateIndex, workload: Workload, conn: Connection) -> str | None:
    """Why the connection skips the destination's waypoint, or None if it does not."""
    gateways = index.waypoints_of(workload)
    if not gateways:
        return None
    for gateway in gateways:
        if conn.source_identity is not None and conn.source_identity in index.waypoint_identities(
            gateway
        ):
            return None
    names = ", ".join(sorted({str(g) for g in gateways}))
    return (
        f"the destination is bound to waypoint {names}: traffic must come through it "
        "(or be allowed explicitly by an ALLOW policy)"
    )


def revoked(
    index: StateIndex, destination: tuple[str, str], live: Iterable[tuple[K, Connection]]
) -> list[tuple[K, Decision]]:
    """The live connections a new snapshot no longer allows, each with the decision.

    ``destination`` is the ``(namespace, name)`` of the workload the
    connections reach; ``live`` pairs whatever the caller closes a
    connection by (``K``) with the facts it was authorized on. Each is
    authorized again, as a new connection would be, with two rules of their own:

    * the workload gone from the snapshot: every connection to it is closed;
    * the workload naming a policy not received yet: nothing is decided (the
      usual fail-closed denial would cut connections a late ALLOW may still
      allow); the snapshot that brings the policy decides.

    A connection the new snapshot still allows is never in the answer, so a
    change that does not concern it (another workload, another port, another
    source) leaves it alone.
    """
    workload = index.workload_by_name(*destination)
    if workload is None:
        gone = Decision(False, f"the workload {destination[0]}/{destination[1]} left the xDS state")
        return [(key, gone) for key, _ in live]
    if applicable(index, workload)[1]:
        return []
    decided: dict[Connection, Decision] = {}
    closing = []
    for key, conn in live:
        decision = decided.get(conn)
        if decision is None:
            decision = decided[conn] = authorize(index, workload, conn)
        if not decision:
            closing.append((key, decision))
    return closing


def matches(policy: Policy, conn: Connection) -> bool:
    return any(
        all(any(_match(m, conn) for m in clause.matches) for clause in rule.clauses)
        for rule in policy.rules
    )


def principal(identity: SpiffeId) -> str:
    """Istio's principal form: the SPIFFE ID without ``spiffe://``."""
    return str(identity).removeprefix("spiffe://")


def _match(m: Match, conn: Connection) -> bool:
    identity = conn.source_identity
    name = principal(identity) if identity is not None else None
    namespace = identity.namespace if identity is not None else None
    port = conn.destination_port
    return (
        (not m.destination_ports or port in m.destination_ports)
        and port not in m.not_destination_ports
        and (not m.source_ips or any(conn.source_ip in n for n in m.source_ips))
        and not any(conn.source_ip in n for n in m.not_source_ips)
        and (not m.destination_ips or any(conn.destination_ip in n for n in m.destination_ips))
        and not any(conn.destination_ip in n for n in m.not_destination_ips)
        and (not m.principals or (name is not None and any(s.matches(name) for s in m.principals)))
        and not (name is not None and any(s.matches(name) for s in m.not_principals))
        and (
            not m.namespaces
            or (namespace is not None and any(s.matches(namespace) for s in m.namespaces))
        )
        and not (namespace is not None and any(s.matches(namespace) for s in m.not_namespaces))
    )
