"""ztunnel, the node agent.

Owns: capture management and the CNI plugin, the in-pod listeners, the
outbound and inbound proxies, L4 authorization, the DNS proxy, admin, metrics
and readiness, and ``ztunnel-ctl``.

Modules:

* the sans-I/O cores: ``index`` (lookups over one xDS snapshot), ``authz``
  (L4 authorization, Istio's semantics, with the deciding policy) and
  ``route`` (where an outbound connection goes), ``baggage`` (the CONNECT's
  baggage both ways, and the labels the destination takes from it);
* ``zds``: the node agent's and the proxy's sides of the ZDS exchange;
* ``capture``: the in-pod iptables rules and reply routing;
* ``netns``: sockets made inside a pod's namespace;
* ``pod``: one enrolled pod's listeners and proxying (15001, 15006, 15008);
  ``splice``: plain TCP to plain TCP;
* ``runtime``: the ztunnel process (xDS, certificates, ZDS, the pods);
  ``cli``: the ``ztunnel`` command;
* ``nodeagent``: the node agent and the ``ztunnel-cni`` plugin (a process
  of their own, as Istio's CNI node agent).

May import: ``mesh``, ``ebpf`` (the capture backend) and third-party
libraries. Never ``controlplane``, ``waypoint`` or ``meshlab``.
"""
