"""ztunnel, the node agent.

Owns: capture management and the CNI plugin, the in-pod listeners, the
outbound and inbound proxies, L4 authorization, the DNS proxy, admin, metrics
and readiness, and ``ztunnel-ctl``. Empty until the ztunnel issue lands.

May import: ``mesh``, ``ebpf`` (the capture backend) and third-party
libraries. Never ``controlplane``, ``waypoint`` or ``meshlab``.
"""
