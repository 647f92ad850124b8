"""What a service port carries, as Istio decides it: ``appProtocol`` first, then the port name.

Istio sniffs ports it cannot name; a waypoint that sniffs stalls server-first
protocols (MySQL, SMTP) until a timeout, so here an unnamed port is plain TCP
unless an HTTP route attaches to it (which says what it carries).
"""

from __future__ import annotations

from controlplane.l7.ir import Protocol
from controlplane.state import ServiceInfo, ServicePortInfo

_APP_PROTOCOLS = {
    "http": Protocol.HTTP,
    "http2": Protocol.HTTP2,
    "grpc": Protocol.GRPC,
    "grpc-web": Protocol.HTTP,
    "kubernetes.io/h2c": Protocol.HTTP2,
    "kubernetes.io/ws": Protocol.HTTP,
    "tcp": Protocol.TCP,
}
_NAME_PREFIXES = {
    "http": Protocol.HTTP,
    "http2": Protocol.HTTP2,
    "grpc": Protocol.GRPC,
    "grpc-web": Protocol.HTTP,
    "tcp": Protocol.TCP,
}


def declared_protocol(port: ServicePortInfo) -> Protocol | None:
    """The protocol the port declares, or None when it declares none we know (then TCP,
    unless a route says otherwise). Other declared protocols (https, tls, mongo, ...)
    are TCP to a waypoint."""
    if port.protocol != "TCP":
        return Protocol.TCP  # UDP and SCTP never reach a waypoint; treated as opaque
    if port.app_protocol:
        return _APP_PROTOCOLS.get(port.app_protocol.lower(), Protocol.TCP)
    name = port.name.lower()
    for prefix in ("grpc-web", "http2", "http", "grpc", "tcp"):
        if name == prefix or name.startswith(prefix + "-"):
            return _NAME_PREFIXES[prefix]
    if name in ("https", "tls", "mongo", "mysql", "redis", "udp") or name.startswith(
        ("https-", "tls-", "mongo-", "mysql-", "redis-")
    ):
        return Protocol.TCP
    return None


def declared_protocol_of(info: ServiceInfo, port: int | None) -> Protocol | None:
    """The declared protocol of a port, or for all ports: TCP only if every port is TCP."""
    ports = [p for p in info.ports if port is None or p.port == port]
    found = [declared_protocol(p) for p in ports]
    if found and all(f is Protocol.TCP for f in found):
        return Protocol.TCP
    return None
