"""ztunnel's DNS proxy: the mesh's service names answered in the pod, the rest forwarded.

The in-pod capture rules send an enrolled pod's DNS (UDP and TCP port 53) to
port 15053 in the pod's own network namespace, where ztunnel runs one
:class:`DnsProxy` for the pod. As Istio's ztunnel does, it:

* answers ``A`` and ``AAAA`` queries for the hostnames of the services in the
  xDS snapshot, authoritatively (AA) with a TTL of 30 s: the service's VIPs of
  the asked family; an empty NOERROR answer (NODATA) when the name is known but
  has no address of that family; the endpoints' addresses for a Kubernetes
  headless service (no VIP, hostname under ``svc.<cluster domain>``);
* understands the names the pod's resolver builds from its search list
  (``<ns>.svc.<domain>``, ``svc.<domain>``, ``<domain>``). It knows the pod's
  namespace, so ``echo.server.client.svc.cluster.local`` asked by a pod in
  ``client`` is ``echo.server`` plus that pod's first search domain: the answer
  is a ``CNAME`` to ``echo.server.`` and that name's addresses. A single label
  (``echo``) only ever means the service of that name in the pod's namespace;
* forwards everything else (other names, other types or classes) to the
  upstream resolvers, over the transport the client used, trying each in turn
  with a timeout, and relays the first answer under the client's query id;
  SERVFAIL when none answers;
* answers FORMERR to a query it cannot parse or with other than one question,
  NOTIMP to an opcode other than QUERY, and drops what is too short to hold a
  header, so nothing a client sends can stop it.

The decision is pure: :func:`build_table` turns a snapshot into a
:class:`Table` of hostnames, and :func:`answer` turns query bytes and a table
into a :class:`Reply`, a :class:`Forward` or a :class:`Drop`, tested without
sockets. :class:`DnsProxy` is the asyncio shell around it: UDP and TCP
(RFC 7766 length framing, pipelining, idle timeout, bounded connections) on
sockets it is handed, and upstream sockets from a factory, so that ztunnel can
make them inside the pod's namespace with its mark.

Where this departs from Istio, on purpose: a message that is itself a
response is dropped rather than answered with FORMERR (two proxies would
otherwise bounce FORMERRs at each other forever); pod hostnames of headless
services (``pod.sub.ns.svc.<domain>``) are left to the upstream; addresses are
given in a stable order, not shuffled; VIPs are not filtered by network.

Modules: ``table`` (names of a snapshot), ``decide`` (the pure answer),
``proxy`` (the asyncio shell). May import: ``mesh``, ``ztunnel.index`` and
``dnspython``.
"""

from ztunnel.dns.decide import Drop, Forward, Outcome, Reply, answer
from ztunnel.dns.proxy import DnsProxy, upstreams_from_resolv_conf
from ztunnel.dns.table import DNS_PORT, TTL_S, Host, SocketFactory, Table, TableCache, build_table

__all__ = [
    "DNS_PORT",
    "TTL_S",
    "DnsProxy",
    "Drop",
    "Forward",
    "Host",
    "Outcome",
    "Reply",
    "SocketFactory",
    "Table",
    "TableCache",
    "answer",
    "build_table",
    "upstreams_from_resolv_conf",
]
