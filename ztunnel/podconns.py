"""The objects a pod's proxy keeps per connection, and the small facts about them.

The outbound protocol (15001), the app side of an inbound HBONE stream, the
registry entry of a live inbound connection, and how a refusal is named.

May import: the standard library, ``mesh``, ``ztunnel.authz`` and
``ztunnel.splice`` (no other ztunnel module: :mod:`ztunnel.pod` imports this one).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.hbone.channel import PlainProtocol
from ztunnel.authz import Connection, Decision
from ztunnel.splice import Half

if TYPE_CHECKING:
    from ztunnel.pod import PodProxy

SO_ORIGINAL_DST = 80


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(packed), port


@dataclass(eq=False, slots=True)
class Inbound:
    """A live inbound connection: the facts authorization allowed it on, and how to end it."""

    kind: str  # "HBONE" (15008) or "plaintext" (15006)
    facts: Connection
    close: Callable[[str], None]  # ends it, abruptly, saying why

    def __str__(self) -> str:
        facts = self.facts
        who = f" ({facts.source_identity})" if facts.source_identity is not None else ""
        return (
            f"{self.kind} {facts.source_ip}{who} -> {facts.destination_ip}:{facts.destination_port}"
        )


class AppSide(PlainProtocol):
    """The socket to the app of an inbound HBONE stream. It lives as long as the
    stream (the stream's end closes it), so its end takes the stream out of the
    registry."""

    def __init__(self, registry: set[Inbound], ended: Callable[[], None]) -> None:
        super().__init__()
        self.registry = registry
        self.live: Inbound | None = None
        self.lost = False
        self.ended = ended

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        super().connection_lost(exc)
        if self.live is not None:
            self.registry.discard(self.live)
        self.ended()


def why(decision: Decision) -> str:
    return f"{decision.reason} ({decision.policy or 'no policy'})"


class Outbound(PlainProtocol):
    """A connection accepted on 15001: handed to its proxy as soon as it is made."""

    def __init__(self, proxy: PodProxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy.outbound_made(self)

    def hand_over(self) -> Half:
        """A splice half taking over this connection's bytes so far (passthrough)."""
        early, self._early = self._early, []
        return Half.taking_over(early, self._early_eof)


class NoRoute(ConnectionRefusedError):
    """The snapshot gives the destination no way through (no healthy endpoint, ...)."""


REFUSED_KIND = {400: "bad_request", 401: "policy", 503: "upstream"}


def addr(peer: tuple[str, int]) -> str:
    return f"{peer[0]}:{peer[1]}"


def refusal_kind(error: BaseException) -> str:
    """The ``reason`` label of a refusal."""
    if isinstance(error, PermissionError):
        return "policy"
    if isinstance(error, NoRoute):
        return "no_route"
    if isinstance(error, ConnectionRefusedError):
        return "not_ready"
    return "upstream"
