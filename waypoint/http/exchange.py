"""What the router needs of a downstream request, whichever codec carries it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from waypoint.http.body import Body
from waypoint.http.messages import Headers, LocalReply, RequestHead, ResponseHead


class Exchange(Protocol):
    head: RequestHead
    info: dict[str, Any]
    body: Body
    ended: bool
    status: int
    response_bytes: int  # body bytes sent (what Envoy's %BYTES_SENT% counts)
    request_head_bytes: int  # the request head's size on the wire (HTTP/2: HPACK-decoded)
    response_head_bytes: int  # the rest on the wire: heads, trailers, chunk framing
    done: asyncio.Future[None]

    @property
    def protocol(self) -> str: ...

    @property
    def head_sent(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    @property
    def write_paused(self) -> bool: ...

    def informational(self, status: int, headers: Headers) -> None: ...

    def respond(self, head: ResponseHead, *, end: bool) -> None: ...

    def write(self, data: bytes, *, end: bool = False) -> None: ...

    def end(self, trailers: Headers | None = None) -> None: ...

    def local_reply(self, reply: LocalReply, extra: Sequence[tuple[str, str]] = ()) -> None: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...


class Upstream(Protocol):
    """One upstream request's carrier: an HTTP/1.1 connection or an HTTP/2 stream."""

    requests: int

    @property
    def lost(self) -> bool: ...

    def send(
        self, head: RequestHead, attempt: Any, *, has_body: bool, length: int | None
    ) -> None: ...

    def data(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def raw_end(self) -> None: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...
