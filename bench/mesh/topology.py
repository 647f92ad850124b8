"""The two pods of the bench, their identities, ports and marks, and the placements."""

from __future__ import annotations

from typing import Any

PLACEMENTS = ("floor", "ours", "ebpf", "envoy")
# The placements through our ztunnels, and the capture backend of the node agents in each.
MESH_CAPTURE = {"ours": "iptables", "ebpf": "ebpf"}
TC_PROGRAM = "zt_ingress"  # the eBPF capture's tc ingress filter on a pod's eth0 (ebpf.capture)
POD_IFACE = "eth0"
IPERF_PORT = 5201
HTTP_PORT = 8080
OUTBOUND_PORT = 15001  # the client Envoy's listener, as ztunnel's outbound
HBONE_PORT = 15008
ZTUNNEL_PORTS = (15001, 15006, 15008)
ENVOY_MARK = 0x539  # ztunnel's mark (inpod.INPOD_MARK): sockets the REDIRECT leaves alone
MARK_MASK = 0xFFF
SOL_SOCKET, SO_MARK = 1, 36
BENCH_CHAIN = "MESHBENCH_OUTPUT"
AMBIENT = "istio.io/dataplane-mode"
CLIENT_POD = "client/client"
SERVER_POD = "server/server"
CLIENT_SAN = "spiffe://cluster.local/ns/client/sa/default"
SERVER_SAN = "spiffe://cluster.local/ns/server/sa/default"
CLUSTER: dict[str, Any] = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "namespaces": [{"name": "client"}, {"name": "server"}],
    "pods": [
        {
            "name": "client",
            "namespace": "client",
            "node": "node1",
            "command": ["sleep", "infinity"],
        },
        {
            "name": "server",
            "namespace": "server",
            "node": "node2",
            "command": ["sleep", "infinity"],
        },
    ],
}
