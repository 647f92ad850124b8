"""What the proxies and the control plane share.

Owns: the mesh model, SPIFFE identity and certificates (``mesh.identity``), the
cluster description format that ``meshlab`` writes and ``meshd`` reads
(``mesh.cluster``), and later the HBONE protocol, the xDS client, telemetry
helpers and generated protobuf modules.

May import: the standard library and third-party libraries only. Never
``controlplane``, ``ztunnel``, ``waypoint``, ``ebpf`` or ``meshlab``.
"""
