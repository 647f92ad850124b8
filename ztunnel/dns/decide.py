"""The pure decision: a query's bytes and a table in; a reply, a forward or a drop out."""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztunnel.dns.table import (
    EDNS_PAYLOAD,
    HEADER_LEN,
    ID_FLAGS,
    OPCODE_BITS,
    TTL_S,
    U16,
    UDP_PAYLOAD,
    Host,
    Labels,
    Table,
    domain_labels,
    has_domain,
)

log = logging.getLogger("ztunnel.dns")


# -- the decision ---------------------------------------------------------------------------


class Outcome(enum.Enum):
    ANSWERED = "answered"  # from the mesh's names
    REFUSED = "refused"  # FORMERR or NOTIMP


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``wire`` to the client."""

    wire: bytes
    outcome: Outcome
    reason: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Ask the upstream resolvers; relay their answer, or ``servfail`` if none answers."""

    query: dns.message.Message  # parsed, with the client's id
    wire: bytes  # as the client sent it
    servfail: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing: there is no one sensible to answer."""

    reason: str


Action = Reply | Forward | Drop


def answer(
    query: bytes,
    table: Table,
    pod_namespace: str,
    *,
    cluster_domain: str = "cluster.local",
    tcp: bool = False,
) -> Action:
    """Decide what a query from a pod in ``pod_namespace`` gets; ``tcp`` lifts the
    UDP size limit on the answer."""
    if len(query) < HEADER_LEN:
        return Drop(f"{len(query)} bytes, too short for a DNS header")
    qid, flags = ID_FLAGS.unpack_from(query)
    if flags & dns.flags.QR:
        return Drop(f"id {qid}: a response, not a query")
    opcode = dns.opcode.from_flags(flags)
    if opcode != dns.opcode.QUERY:
        return _error(qid, flags, dns.rcode.NOTIMP, f"opcode {dns.opcode.to_text(opcode)}")
    try:
        message = dns.message.from_wire(query)
    except Exception as e:  # whatever dnspython cannot parse is the sender's mistake
        return _error(qid, flags, dns.rcode.FORMERR, f"malformed ({type(e).__name__}: {e})")
    if len(message.question) != 1:
        return _error(
            qid, flags, dns.rcode.FORMERR, f"{len(message.question)} questions, expected 1"
        )
    question = message.question[0]
    asked = f"{question.name} {dns.rdatatype.to_text(question.rdtype)}"
    if question.rdclass != dns.rdataclass.IN or question.rdtype not in (
        dns.rdatatype.A,
        dns.rdatatype.AAAA,
    ):
        return _forward(message, query, f"{asked}: not IN A/AAAA")
    found = _find(question.name, table, pod_namespace, cluster_domain)
    if found is None:
        return _forward(message, query, f"{asked}: not a mesh name")
    host, canonical = found
    response = dns.message.make_response(
        message, recursion_available=True, our_payload=EDNS_PAYLOAD
    )
    response.flags |= dns.flags.AA
    addresses = host.v4 if question.rdtype == dns.rdatatype.A else host.v6
    owner = question.name
    if addresses:
        if canonical is not None:
            response.answer.append(
                dns.rrset.from_text_list(owner, TTL_S, "IN", "CNAME", [canonical.to_text()])
            )
            owner = canonical
        response.answer.append(
            dns.rrset.from_text_list(owner, TTL_S, "IN", question.rdtype, list(addresses))
        )
    if tcp:
        limit = 65535
    elif message.edns >= 0:  # the client said how much it takes over UDP
        limit = max(message.payload, UDP_PAYLOAD)
    else:
        limit = UDP_PAYLOAD
    wire = response.to_wire(max_size=limit, prefer_truncation=True)
    what = f"{len(addresses)} address(es)" if addresses else "no address of this family"
    return Reply(wire, Outcome.ANSWERED, f"{asked}: {what} (namespace {host.namespace})")


def _error(qid: int, flags: int, rcode: dns.rcode.Rcode, reason: str) -> Reply:
    """A header-only answer: the id, opcode and RD of the query, and ``rcode``."""
    response = dns.message.Message(id=qid)
    response.flags = int(dns.flags.QR) | (flags & (OPCODE_BITS | int(dns.flags.RD)))
    response.set_rcode(rcode)
    return Reply(response.to_wire(), Outcome.REFUSED, f"{dns.rcode.to_text(rcode)}: {reason}")


def _forward(message: dns.message.Message, wire: bytes, reason: str) -> Forward:
    servfail = dns.message.make_response(
        message, recursion_available=True, our_payload=EDNS_PAYLOAD
    )
    servfail.set_rcode(dns.rcode.SERVFAIL)
    return Forward(message, wire, servfail.to_wire(), reason)


def _find(
    name: dns.name.Name, table: Table, pod_namespace: str, cluster_domain: str
) -> tuple[Host, dns.name.Name | None] | None:
    """The service a name means to this pod, and the canonical name to CNAME to when
    the name was found by taking a search domain off."""
    if not table.hosts:
        return None
    original = name.labels[:-1] if name.is_absolute() else name.labels
    labels = tuple(label.lower() for label in original)
    for alias, kept in _aliases(
        labels, pod_namespace.lower().encode(), domain_labels(cluster_domain)
    ):
        for candidate in _wildcards(alias) if table.has_wildcards else (alias,):
            hosts = table.hosts.get(candidate)
            if not hosts:
                continue
            host = next((h for h in hosts if h.namespace == pod_namespace), hosts[0])
            if kept is None or candidate[0] == b"*":
                return host, None
            return host, dns.name.Name((*original[:kept], b""))
    return None


def _aliases(name: Labels, namespace: bytes, domain: Labels) -> Iterator[tuple[Labels, int | None]]:
    """The names ``name`` may stand for, most specific first, as Istio's ``get_aliases``:
    itself, its Kubernetes expansions, then itself without each search domain, and
    those expansions. With each, how many leading labels are left when a search
    domain was taken off (``None`` if not)."""
    svc = (b"svc", *domain)
    namespaced = (namespace, *svc)
    seen: set[Labels] = set()
    todo: list[tuple[Labels, int | None]] = [(name, None)]
    todo += [(full, None) for full in _kube_fqdns(name, namespaced, svc, domain)]
    for search in (namespaced, svc, domain):
        if has_domain(name, search):
            short = name[: len(name) - len(search)]
            todo.append((short, len(short)))
            todo += [(full, len(short)) for full in _kube_fqdns(short, namespaced, svc, domain)]
    for alias, kept in todo:
        if alias and alias not in seen:
            seen.add(alias)
            yield alias, kept


def _kube_fqdns(name: Labels, namespaced: Labels, svc: Labels, domain: Labels) -> list[Labels]:
    """``name`` completed to the Kubernetes forms it can be a prefix of (Istio's
    ``to_kube_fqdns``): ``<svc>``, ``<svc>.<ns>``, ``<svc>.<ns>.svc``, and the
    pod-host forms ``<pod>.<sub>``, ``<pod>.<sub>.<ns>``, ``<pod>.<sub>.<ns>.svc``."""
    n = len(name)
    if n == 1:
        return [name + namespaced]
    if n == 2:
        return [name + svc, name + namespaced]
    if n == 3:
        return ([name + domain] if name[-1] == b"svc" else []) + [name + svc]
    if n == 4 and name[-1] == b"svc":
        return [name + domain]
    return []


def _wildcards(name: Labels) -> list[Labels]:
    """``a.b.c`` -> ``a.b.c``, ``*.b.c``, ``*.c``: for ServiceEntry wildcard hosts."""
    return [name] + [(b"*", *name[i:]) for i in range(1, len(name))]


def is_answer_to(query: dns.message.Message, upstream_id: int, wire: bytes) -> bool:
    """Is ``wire`` the upstream's answer to ``query`` sent as ``upstream_id``?"""
    if len(wire) < HEADER_LEN or U16.unpack_from(wire)[0] != upstream_id:
        return False
    try:
        response = dns.message.from_wire(wire, question_only=True)
    except Exception:  # a broken answer is no answer
        return False
    if not response.flags & dns.flags.QR:
        return False
    if not response.question:  # allowed for errors (RFC 1035 leaves it open)
        return response.rcode() in (dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.REFUSED)
    return bool(response.question == query.question)
