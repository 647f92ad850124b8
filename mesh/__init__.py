"""What the proxies and the control plane share.

Owns: the mesh model, SPIFFE identity and certificates (``mesh.identity``), the
cluster description format that ``meshlab`` writes and ``meshd`` reads
(``mesh.cluster``), the HBONE protocol, the xDS client, Istio's metric labels
and names (``mesh.istio_metrics``) and access log formats
(``mesh.accesslog_formats``), and generated protobuf modules.

May import: the standard library and third-party libraries only. Never
``controlplane``, ``ztunnel``, ``waypoint``, ``ebpf`` or ``meshlab``.
"""
