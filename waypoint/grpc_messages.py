"""gRPC as the waypoint's telemetry sees it: which requests are gRPC, how many messages
went by, and which ``grpc-status`` values may become a metric label.

Envoy's ``grpc_stats`` filter counts the messages of a gRPC stream by reading
the length-prefixed framing of its body as it passes (``FrameInspector``):
each message is a 5-byte prefix (a compressed-flag byte, then a 4-byte
big-endian length) and that many bytes of payload. A message counts as soon
as its first byte (the flag) is seen, so a body cut mid-message counts the
messages it started. :class:`MessageCounter` does the same over chunks that
split the framing anywhere, keeping only the bytes left to skip and at most
four bytes of a split prefix: it jumps over payloads by arithmetic, so its
cost is per chunk and per message, never per byte.
"""

from __future__ import annotations

import struct

_LENGTH = struct.Struct(">xI")  # the prefix: flag byte (skipped), big-endian length
PREFIX = 5
GRPC = "application/grpc"
# The status codes gRPC defines (OK .. UNAUTHENTICATED): the only values a label may take.
KNOWN_STATUSES = frozenset(str(code) for code in range(17))


def is_grpc(content_type: str | None) -> bool:
    """Envoy's ``Grpc::Common::hasGrpcContentType``: ``application/grpc`` exactly or
    ``application/grpc+<codec>`` (``application/grpc-web`` is not gRPC)."""
    if not content_type or not content_type.startswith(GRPC):
        return False
    return len(content_type) == len(GRPC) or content_type[len(GRPC)] == "+"


def http_to_grpc_status(http_status: int) -> int:
    """Envoy's ``Grpc::Utility::httpToGrpcStatus``."""
    return {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}.get(
        http_status, 2
    )


def grpc_status_label(grpc_status: str, http_status: int) -> str:
    """``grpc_response_status`` of a gRPC request, as Envoy's ``getGrpcStatus`` finds it:
    the ``grpc-status`` of the trailers or headers (``grpc_status``, "" when none), else
    the one the HTTP status implies, else "" (no response at all). A value that is not
    one of gRPC's codes (an upstream may send anything) is ``unknown``."""
    if grpc_status:
        return grpc_status if grpc_status in KNOWN_STATUSES else "unknown"
    if http_status:
        return str(http_to_grpc_status(http_status))
    return ""


class MessageCounter:
    """The messages started in one direction of one gRPC stream, fed chunk by chunk."""

    __slots__ = ("_prefix", "_skip", "count")

    def __init__(self) -> None:
        self.count = 0
        self._skip = 0  # payload bytes of the current message not seen yet
        self._prefix = b""  # the start of a prefix split over chunks (1..4 bytes)

    def feed(self, data: bytes) -> None:
        """One more chunk of the body (any size, cut anywhere)."""
        n = len(data)
        skip = self._skip
        if skip >= n:
            self._skip = skip - n
            return
        i = skip
        prefix = self._prefix
        if prefix:
            need = PREFIX - len(prefix)
            if n - i < need:
                self._prefix = prefix + data[i:]
                self._skip = 0
                return
            (length,) = _LENGTH.unpack(prefix + data[i : i + need])
            i += need + length
            self._prefix = b""
        started = 0
        last = n - PREFIX
        unpack = _LENGTH.unpack_from
        while i <= last:
            started += 1
            i += PREFIX + unpack(data, i)[0]
        if i < n:  # a prefix begins here and ends in a later chunk
            started += 1
            self._prefix = data[i:]
            i = n
        self._skip = i - n
        self.count += started
