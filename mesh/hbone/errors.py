"""HBONE errors: who broke the rules, and what that means on the wire.

``status`` is the HTTP status a refusal carries on the CONNECT response;
``error_code`` is the HTTP/2 error code of a GOAWAY or RST_STREAM.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.hbone.frames import code_name


class HboneError(Exception):
    """Base of every HBONE error."""


class Refused(HboneError):
    """A server-side handler refusing a CONNECT: the status is sent to the client.

    400 bad request (method, authority), 401 denied by policy, 503 unknown or
    unreachable upstream.
    """

    def __init__(self, status: int, reason: str) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"a refusal needs a 4xx or 5xx status, got {status}")
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


class StatusError(HboneError):
    """The peer answered a CONNECT with a status other than 200."""

    def __init__(self, status: int, authority: str, peer: str) -> None:
        self.status = status
        self.authority = authority
        self.peer = peer
        meaning = {
            400: "the peer could not parse the request",
            401: "denied by the destination's policy",
            503: "the destination is unknown or refused the connection",
        }.get(status, "refused")
        super().__init__(f"CONNECT {authority} via {peer} answered {status}: {meaning}")


class ProtocolViolation(HboneError):
    """The peer broke HTTP/2; the connection is closed with ``error_code``."""

    def __init__(self, error_code: int, reason: str) -> None:
        self.error_code = error_code
        self.reason = reason
        super().__init__(f"{code_name(error_code)}: {reason}")


class StreamReset(HboneError):
    """A stream was reset (RST_STREAM) by the peer or by us."""

    def __init__(self, error_code: int, remote: bool) -> None:
        self.error_code = error_code
        self.remote = remote
        who = "the peer" if remote else "us"
        super().__init__(f"stream reset by {who}: {code_name(error_code)}")


class ConnectionLost(HboneError):
    """The HBONE connection ended before or while a stream used it."""


class PeerIdentityMismatch(HboneError):
    """The server's certificate names another identity than the one expected."""

    def __init__(self, expected: Sequence[str], actual: str, peer: str) -> None:
        self.expected = list(expected)
        self.actual = actual
        super().__init__(
            f"peer {peer} presented identity {actual}, expected "
            f"{' or '.join(self.expected)} (hint: is the destination's certificate "
            "for another service account, or is the address stale?)"
        )


class TlsFailure(HboneError):
    """The TLS handshake failed or the peer's certificate was refused."""


class PoolClosed(HboneError):
    """The client pool has been shut down."""
