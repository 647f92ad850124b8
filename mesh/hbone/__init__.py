"""HBONE: the mTLS HTTP/2 CONNECT transport that carries every byte of the mesh.

Owns the wire contract of ``../shared/DESIGN.md`` ("HBONE"): TLS 1.3 with
ALPN ``h2`` and client certificates both ways, HTTP/2 CONNECT with
``:authority`` = ``ip:port``, Istio's windows and frame size, PING keepalive.
``connection`` is the sans-I/O HTTP/2 core (our own framing, ``hpack`` for
header decoding; ``h2`` is the reference peer of its tests);
``tunnel``, ``channel``, ``server`` and ``pool`` are the asyncio shell;
``python -m mesh.hbone`` is the operator's probe (``serve`` / ``forward``).

May import: ``mesh.identity``, ``hpack``, ``cryptography``, ``uvloop`` and the
standard library.
"""

from mesh.hbone.channel import Channel, PlainProtocol
from mesh.hbone.errors import (
    ConnectionLost,
    HboneError,
    PeerIdentityMismatch,
    PoolClosed,
    ProtocolViolation,
    Refused,
    StatusError,
    StreamReset,
    TlsFailure,
)
from mesh.hbone.forward import Forwarder
from mesh.hbone.headers import connect_headers, format_authority, parse_authority
from mesh.hbone.local import LocalSocket
from mesh.hbone.pool import HboneClientPool, PoolKey
from mesh.hbone.server import ConnectRequest, HboneServer, open_upstream
from mesh.hbone.settings import (
    CLIENT_HTTP2,
    HBONE_PORT,
    SERVER_HTTP2,
    HboneConfig,
    Http2Settings,
)
from mesh.hbone.tls import TlsIdentity

__all__ = [
    "CLIENT_HTTP2",
    "HBONE_PORT",
    "SERVER_HTTP2",
    "Channel",
    "ConnectRequest",
    "ConnectionLost",
    "Forwarder",
    "HboneClientPool",
    "HboneConfig",
    "HboneError",
    "HboneServer",
    "Http2Settings",
    "LocalSocket",
    "PeerIdentityMismatch",
    "PlainProtocol",
    "PoolClosed",
    "PoolKey",
    "ProtocolViolation",
    "Refused",
    "StatusError",
    "StreamReset",
    "TlsFailure",
    "TlsIdentity",
    "connect_headers",
    "format_authority",
    "open_upstream",
    "parse_authority",
]
