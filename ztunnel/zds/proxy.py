"""The proxy's side of ZDS: connect to the node agent, take pods, ack each request.

The handler does the work (open the in-pod listeners, fetch certificates)
and raises to refuse. An ``Add``'s netns descriptor is valid during the
call only (the handler ``os.dup``s it to keep it). A refusal's text goes
back in the ack, and the exchange goes on. At ``SnapshotSent`` the handler
is given the uids the snapshot named, so it can drop pods it still holds
that are gone. The connection is kept with backoff and jitter while the
agent is away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ztunnel.zds import protocol
from ztunnel.zds.channel import Channel
from ztunnel.zds.protocol import Add, Delete, Keep, Request, SnapshotDone, ZdsError

log = logging.getLogger("ztunnel.zds")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """``SnapshotSent``: the agent has named every pod it has (``uids``)."""

    uids: frozenset[str]


Event = Add | Keep | Delete | Snapshot
Handler = Callable[[Event], Awaitable[None]]


class ZdsProxy:
    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.rng = rng or random.Random()
        self.connected = asyncio.Event()
        self.requests = 0
        self.refused = 0

    async def run(self) -> None:
        """Until cancelled: connect, serve, and reconnect after a pause when the agent goes."""
        delay = self.backoff_initial_s
        while True:
            try:
                channel = await Channel.connect(self.path)
            except OSError as e:
                log.debug("zds: cannot reach the node agent at %s: %s", self.path, e)
            else:
                delay = self.backoff_initial_s
                try:
                    await self._serve(channel)
                except (EOFError, OSError, ZdsError) as e:
                    log.warning("zds: lost the node agent: %s", e)
                finally:
                    self.connected.clear()
                    channel.close()
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, self.backoff_max_s)

    async def _serve(self, channel: Channel) -> None:
        await channel.send(protocol.hello())
        self.connected.set()
        in_snapshot: set[str] | None = set()
        while True:
            data, fds = await channel.recv()
            self.requests += 1
            error = ""
            try:
                request: Request = protocol.decode_request(data, fds)
                event: Event
                if isinstance(request, SnapshotDone):
                    event = Snapshot(frozenset(in_snapshot or ()))
                    in_snapshot = None
                else:
                    event = request
                    if in_snapshot is not None and isinstance(request, Add | Keep):
                        in_snapshot.add(request.uid)
                await self._handle(event)
            except ZdsError as e:
                error = str(e)
            except Exception as e:  # the handler refused: say why, keep going
                error = f"{type(e).__name__}: {e}"
            if error:
                self.refused += 1
                log.warning("zds: refusing a request: %s", error)
            await channel.send(protocol.encode_ack(error))

    async def _handle(self, event: Event) -> None:
        try:
            await self.handler(event)
        finally:
            if isinstance(event, Add):
                os.close(event.netns_fd)
