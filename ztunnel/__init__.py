"""ztunnel, the node agent.

Owns: capture management and the CNI plugin, the in-pod listeners, the
outbound and inbound proxies, L4 authorization, the DNS proxy, admin, metrics
and readiness, and ``ztunnel-ctl``.

So far:

* the sans-I/O cores: ``index`` (lookups over one xDS snapshot), ``authz``
  (L4 authorization, Istio's semantics, with the deciding policy) and
  ``route`` (where an outbound connection goes);
* ``zds``: the node agent's and the proxy's sides of the ZDS exchange;
* ``capture``: the in-pod iptables rules and reply routing;
* ``netns``: sockets made inside a pod's namespace.

The proxies that use them follow.

May import: ``mesh``, ``ebpf`` (the capture backend) and third-party
libraries. Never ``controlplane``, ``waypoint`` or ``meshlab``.
"""
