"""meshd, the control plane.

Owns: the sources of truth (Kubernetes, mesh file, a running meshlab cluster),
translation into xDS resources, the Delta ADS server, the CA service and the
waypoint deployer. Empty until the control-plane issue lands.

May import: ``mesh`` and third-party libraries. Never ``ztunnel``,
``waypoint``, ``ebpf`` or ``meshlab``.
"""
