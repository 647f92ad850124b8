"""A message body in flight: chunks in from one side, read by the other, with back-pressure."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

HIGH_WATER = 1 << 20  # above this much unread, the producer is paused


class BodyError(Exception):
    """The body cannot complete: its sender went away or reset."""


class Body:
    """Chunks of one body. ``push``/``finish``/``fail`` from the codec, ``read`` by the router.

    ``pause``/``resume`` are called when unread data crosses the high and low
    water marks, so a slow reader slows the sender instead of filling memory.
    """

    __slots__ = (
        "_chunks",
        "_consumed",
        "_pause",
        "_paused",
        "_resume",
        "_waiter",
        "ended",
        "error",
        "received",
        "size",
        "trailers",
    )

    def __init__(
        self,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
        consumed: Callable[[int], None] | None = None,
    ) -> None:
        """``consumed(n)``: n bytes were read (HTTP/2 gives that window back)."""
        self._consumed = consumed
        self._chunks: deque[bytes] = deque()
        self.size = 0
        self.received = 0
        self.ended = False
        self.error: BaseException | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False

    @classmethod
    def empty(cls) -> Body:
        body = cls()
        body.ended = True
        return body

    def push(self, data: bytes) -> None:
        if self.ended or self.error is not None or not data:
            return
        self._chunks.append(data)
        self.size += len(data)
        self.received += len(data)
        if self.size > HIGH_WATER and not self._paused and self._pause is not None:
            self._paused = True
            self._pause()
        self._wake()

    def finish(self, trailers: list[tuple[str, str]] | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.trailers = trailers
            self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.ended and self.error is None:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes | None:
        """What is buffered now (b"" when nothing yet), or None at the end. Never waits."""
        if self._chunks:
            data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            self._chunks.clear()
            self.size = 0
            if self._consumed is not None:
                self._consumed(len(data))
            if self._paused and self._resume is not None:
                self._paused = False
                self._resume()
            return data
        if self.error is not None:
            raise BodyError(str(self.error)) from self.error
        if self.ended:
            return None
        return b""

    async def read(self) -> bytes | None:
        """The next data, or None once the body is complete; raises :class:`BodyError`."""
        while True:
            data = self.take()
            if data != b"":
                return data
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
