"""Plain TCP to plain TCP: the passthrough and inbound-plaintext paths.

Two :class:`Half` protocols are paired; each writes what it reads into the
other, a FIN becomes a half-close on the other side, a reset a reset, and
a full write buffer on one side pauses reading on the other (so a slow
reader holds back a fast writer instead of filling memory).
"""

from __future__ import annotations

import asyncio
from typing import cast

from mesh.hbone.channel import reset_transport


class Half(asyncio.Protocol):
    """One socket of a splice. Until paired it keeps what arrives, with reading paused."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self._early: list[bytes] = []
        self._eof = False  # our socket's peer has finished sending
        self._wrote_eof = False  # we have finished sending to it
        self._lost = False
        self._reset = False
        self.received = 0  # bytes read from this socket
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    def taking_over(cls, early: list[bytes], eof: bool) -> Half:
        """A half for a connection another protocol already read ``early`` (and, with
        ``eof``, the end) from."""
        half = cls()
        half._early = early
        half._eof = eof
        half.received = sum(len(data) for data in early)
        return half

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def pair(self, peer: Half) -> None:
        self.peer = peer
        early, self._early = self._early, []
        assert peer.transport is not None and self.transport is not None
        for data in early:
            peer.transport.write(data)
        if self._lost:
            peer._close(reset=self._reset)
        elif self._eof:
            peer._write_eof()
        else:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.peer is None or self.peer.transport is None:
            self._early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self._eof = True
        if self.peer is not None:
            self.peer._write_eof()
        if self._wrote_eof and self.transport is not None:
            self.transport.close()  # both directions are done
        return True  # keep writing: a half-close

    def _write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
            self._wrote_eof = True
            if self._eof:
                transport.close()  # both directions are done

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._reset = exc is not None
        if self.peer is not None:
            self.peer._close(reset=exc is not None)
        if not self.closed.done():
            self.closed.set_result(None)

    def _close(self, *, reset: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reset:
            reset_transport(transport)
        else:
            transport.close()

    # A full write buffer here pauses the other side's reading.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def splice(a: Half, b: Half) -> None:
    """Join two connected halves."""
    a.pair(b)
    b.pair(a)
